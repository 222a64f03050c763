"""Progress of a long phase, for a person at a terminal — and silence elsewhere.

Reference features for FID/KID, ``stain-search data prepare`` and
``stain-search export`` each take seconds to minutes. At a terminal they draw
one rich progress bar on stderr::

    tiling slide_03 (2/5) ━━━━━━━━━━━━━━━━━━━╸━━━━━━━━━━━  52% 1204/2310 tiles 0:00:41 ETA 0:00:38

A phase whose length is unknown (an ONNX export) shows a spinner, what is
running now and the time so far instead. Off a terminal — CI logs, ``>
out.log``, ``nohup``, and every Ray worker (a trial's output goes to Ray's
log files) — nothing is printed: the command's own closing line says what
was done. ``STAIN_SEARCH_NO_PROGRESS=1`` silences the bars at a terminal too.

"Is this a terminal" is :func:`is_terminal`: ``cli.py`` asks it of stdout for
the search's live view (:mod:`stain_search.console`), and asks
:func:`progress_enabled` for ``translate``'s tile bar.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Protocol, TextIO

NO_PROGRESS_ENV = "STAIN_SEARCH_NO_PROGRESS"


class Advance(Protocol):
    def __call__(self, n: int = 1, *, description: str | None = None) -> None:
        """Count ``n`` more done; ``description`` (if given) replaces the bar's text."""


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or fake stream is not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


def _in_ray_worker() -> bool:
    """Inside a Ray task or actor (a trial). Only looked up if Ray is already imported:
    the check must never be what imports Ray."""
    worker = sys.modules.get("ray._private.worker")
    if worker is None:
        return False
    try:
        return worker.global_worker.mode == worker.WORKER_MODE
    except AttributeError:  # Ray moved it: fall back to the terminal test alone
        return False


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether a bar drawn on ``stream`` (default: stderr) would reach a person."""
    if os.environ.get(NO_PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return is_terminal(sys.stderr if stream is None else stream) and not _in_ray_worker()


def _quiet(n: int = 1, *, description: str | None = None) -> None:
    pass


def _columns(total: int | None, unit: str) -> list:
    from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    # markup=False: descriptions hold file names, and "[...]" in one is not a style.
    text = TextColumn("{task.description}", markup=False)
    if total is None:
        return [SpinnerColumn(), text, TimeElapsedColumn()]
    return [text, BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
            TextColumn(unit, markup=False), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn()]


@contextmanager
def progress(description: str, total: int | None = None, *, unit: str = "",
             enabled: bool | None = None, stream: TextIO | None = None) -> Iterator[Advance]:
    """``with progress("tiling", total=n, unit="tiles") as advance:`` call ``advance()``
    per item done.

    ``total=None``: a phase of unknown length (spinner and elapsed time, erased
    at the end; ``advance(0, description=...)`` says what runs now). ``enabled``
    defaults to :func:`progress_enabled` of ``stream`` (default: stderr);
    when off, ``advance`` does nothing and nothing is written.
    """
    stream = sys.stderr if stream is None else stream
    if not (progress_enabled(stream) if enabled is None else enabled):
        yield _quiet
        return
    from rich.console import Console
    from rich.progress import Progress

    # stdout is redirected above the bar only when it is this terminal too:
    # `stain-search data prepare ... > out.log` keeps its lines in out.log.
    # A finished count stays on screen as a record ("tiling … 100% 48/48 tiles");
    # a spinner's last step would only be stale, so it is erased.
    bar = Progress(*_columns(total, unit), console=Console(file=stream), transient=total is None,
                   redirect_stdout=is_terminal(sys.stdout), redirect_stderr=stream is sys.stderr)
    task = bar.add_task(description, total=total)

    def advance(n: int = 1, *, description: str | None = None) -> None:
        bar.update(task, advance=n, description=description)

    with bar:
        yield advance
