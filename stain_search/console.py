"""What a search shows while it runs: the search, not Ray's tables.

A Ray Tune callback in the driver (:class:`SearchConsole`) follows every
trial's epoch results and endings. On a terminal it draws a compact live
view (rich), refreshed a few times a second::

    search lambda — 2/6 done (1 complete, 1 pruned, 0 failed, 2 pending) · 1m12s, ETA 2m30s
      #2  epoch 3/4  fd_random 4.12  ssim_structure 0.61  2.3 img/s
      #3  epoch 1/4  fd_random 6.80  ssim_structure 0.55  2.1 img/s
      best so far: #1 at epoch 4, fd_random 3.85

Elsewhere (CI, ``nohup``, a scheduler's log) it prints one line per trial
that ends, and the driver prints the closing summary. Ray's own output is
quiet meanwhile (``verbose`` 0, worker output to Ray's log files); ``-v``
restores it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

from stain_search.spaces import Objective


@dataclass
class TrialView:
    number: int
    started: float
    epoch: int = 0
    values: dict[str, float] = field(default_factory=dict)
    images_per_s: float | None = None


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class SearchConsole(Callback):
    """The driver's view of the search (see the module docstring)."""

    def __init__(self, *, name: str, objectives: list[Objective], num_samples: int,
                 max_concurrent: int, epochs: int, done_before: dict[str, int],
                 live: bool, stream: TextIO | None = None):
        self.name, self.objectives = name, list(objectives)
        self.num_samples, self.max_concurrent, self.epochs = num_samples, max_concurrent, epochs
        self.counts = {"complete": 0, "pruned": 0, "failed": 0, **done_before}
        self.stream = stream or sys.stdout
        self.running: dict[str, TrialView] = {}
        self.starts: dict[str, float] = {}  # Tune trial id → when it started
        self.best: tuple[float, int, int] | None = None  # (signed value, number, epoch)
        self.epoch_seconds: list[float] = []
        self.t0 = time.monotonic()
        self._live = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self.render(), console=Console(file=self.stream),
                              refresh_per_second=4, transient=False)
            self._live.start()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the Tuner; a terminal does not travel.
        state = self.__dict__.copy()
        state["stream"], state["_live"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stream = sys.stdout

    # --- what Tune tells us -----------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        # From here, not from its first result: a trial's time includes its start-up
        # and its first epoch (else a 2-epoch trial "took 0s").
        self.starts[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        number = result.get("config", {}).get("optuna_number")
        epoch = result.get("epoch")
        if number is None or not isinstance(epoch, (int, float)) or epoch < 1:
            return
        started = self.starts.get(trial.trial_id) or time.monotonic()
        view = self.running.setdefault(trial.trial_id, TrialView(int(number), started))
        if epoch > view.epoch:
            self.epoch_seconds.append((time.monotonic() - view.started) / epoch)
        view.epoch = int(epoch)
        view.values = {o.metric: result[o.metric] for o in self.objectives
                       if isinstance(result.get(o.metric), (int, float))}
        view.images_per_s = result.get("images_per_s")
        first = self.objectives[0]
        value = view.values.get(first.metric)
        if value is not None and math.isfinite(value):
            signed = value if first.mode == "min" else -value
            if self.best is None or signed < self.best[0] or (
                    signed == self.best[0] and view.epoch > self.best[2]):
                self.best = (signed, view.number, view.epoch)
        self.refresh()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, error=True)

    def _ended(self, trial, *, error: bool) -> None:
        view = self.running.pop(trial.trial_id, None)
        self.starts.pop(trial.trial_id, None)
        last = trial.last_result or {}
        if last.get("storage_error"):
            return  # the driver stops the search and says why
        outcome = ("failed" if error or last.get("diverged") else
                   "pruned" if last.get("pruned") else "complete")
        self.counts[outcome] += 1
        number = view.number if view else last.get("config", {}).get("optuna_number", "?")
        took = _fmt_s(time.monotonic() - view.started) if view else "?"
        vals = "  ".join(f"{m} {_fmt(v)}" for m, v in (view.values if view else {}).items())
        line = (f"trial #{number} {outcome} at epoch {view.epoch if view else '?'}  {vals}  "
                f"({took}) — {self.done}/{self.num_samples} done{self._best_text(', ')}")
        if self._live is not None:
            self._live.console.print(line)
        else:
            print(line, file=self.stream, flush=True)
        self.refresh()

    def on_step_end(self, iteration, trials, **info):
        self.refresh()

    # --- the view -------------------------------------------------------------------------

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def _best_text(self, prefix: str = "") -> str:
        if self.best is None:
            return ""
        signed, number, epoch = self.best
        first = self.objectives[0]
        value = signed if first.mode == "min" else -signed
        return f"{prefix}best so far: #{number} at epoch {epoch}, {first.metric} {_fmt(value)}"

    def eta_s(self) -> float | None:
        if not self.epoch_seconds:
            return None
        per_epoch = sum(self.epoch_seconds[-20:]) / len(self.epoch_seconds[-20:])
        pending = max(0, self.num_samples - self.done - len(self.running))
        left = sum(max(0, self.epochs - v.epoch) for v in self.running.values())
        left += pending * self.epochs
        return per_epoch * left / max(1, min(self.max_concurrent, pending + len(self.running)))

    def header(self) -> str:
        c = self.counts
        pending = max(0, self.num_samples - self.done - len(self.running))
        eta = self.eta_s()
        return (f"search {self.name} — {self.done}/{self.num_samples} done ({c['complete']} "
                f"complete, {c['pruned']} pruned, {c['failed']} failed, {len(self.running)} "
                f"running, {pending} pending) · {_fmt_s(time.monotonic() - self.t0)}"
                + (f", ETA {_fmt_s(eta)}" if eta is not None else ""))

    def lines(self) -> list[str]:
        out = [self.header()]
        for view in sorted(self.running.values(), key=lambda v: v.number):
            vals = "  ".join(f"{m} {_fmt(v)}" for m, v in view.values.items())
            speed = f"  {view.images_per_s:.1f} img/s" if view.images_per_s else ""
            out.append(f"  #{view.number}  epoch {view.epoch}/{self.epochs}  {vals}{speed}")
        if self.best is not None:
            out.append("  " + self._best_text())
        return out

    def render(self):
        from rich.text import Text

        return Text("\n".join(self.lines()))

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.render())

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
            self._live = None
