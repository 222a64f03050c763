"""How a search stops early: Ctrl-C, SIGTERM (a cluster scheduler), or a full disk.

All three take one path. The first SIGINT or SIGTERM (or a storage error a
trial reports) records why, and Ray Tune is asked to end its run gracefully
(Tune's own stop signal, SIGUSR1, sent from inside its loop by
:class:`StopCallback`). While the search is stopping, trials that end are
not told to the study, so they stay RUNNING there and the next
``stain-search resume`` continues each from its newest checkpoint. A second
signal stops at once (KeyboardInterrupt).

Tune's own SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``):
it would print Ray's ``Tuner.restore(...)`` advice, which is not how a
stain-search search resumes.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from ray.tune import Callback


@dataclass
class StopReason:
    kind: str  # "signal" | "storage"
    detail: str  # the signal's name, or the storage error's message


class Stopper:
    """``with Stopper() as stop:`` around ``tuner.fit()``; ``stop.reason`` after."""

    def __init__(self):
        self.reason: StopReason | None = None
        self._saved: dict[int, object] = {}

    @property
    def stopping(self) -> bool:
        return self.reason is not None

    def request(self, kind: str, detail: str) -> None:
        if self.reason is None:
            self.reason = StopReason(kind, detail)

    def _on_signal(self, signum: int, frame) -> None:
        if self.reason is not None and self.reason.kind == "signal":
            raise KeyboardInterrupt  # the second one: stop now
        self.request("signal", signal.Signals(signum).name)

    def __enter__(self) -> "Stopper":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        quiet_tune_restore_advice()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._on_signal)
        # Tune replaces this inside fit(); outside it, a stray SIGUSR1 must not
        # end the process (its default action).
        self._saved[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: None)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class _NoTuneRestoreAdvice(logging.Filter):
    """Ray Tune ends an interrupted run by advising ``Tuner.restore(...)``; a
    stain-search search resumes with ``stain-search resume NAME`` instead,
    which the driver prints (and Tune's "Stop signal received" says less)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tuner.restore" not in message and "Stop signal received" not in message


def quiet_tune_restore_advice() -> None:
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTuneRestoreAdvice) for f in logger.filters):
        logger.addFilter(_NoTuneRestoreAdvice())


class StopCallback(Callback):
    """Hands a requested stop to Tune from inside its loop, where Tune's own
    SIGUSR1 handler is installed (before that, a signal would be lost)."""

    def __init__(self, stopper: Stopper):
        self.stopper = stopper
        self.sent = False

    def on_step_begin(self, iteration, trials, **info):
        if self.stopper.stopping and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)


def storage_error_message(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming the path, the error and the free space there."""
    import errno
    import shutil
    from pathlib import Path

    where = Path(path or err.filename or ".")
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    what = os.strerror(err.errno) if err.errno else str(err)
    hint = ("free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT)
            else "make it writable")
    return f"{what}: {where} ({free}); {hint}, then resume the search"


STORAGE_ERRNOS = {28, 122, 30}  # ENOSPC, EDQUOT, EROFS: a retry cannot help


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in STORAGE_ERRNOS
