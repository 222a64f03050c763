"""A PBT member's results under the ``ray_train`` executor: Ray Train's rank-0
results, handed back to the member's Tune trial, which reports each to Tune
itself with the PBT pointer checkpoint (Ray's ``TuneReportCallback`` forwards
no checkpoint). Its own module: the callback's base class is Ray Train's, which
``trainables.cyclegan`` loads only when a trial uses that executor."""

from __future__ import annotations

import threading
from typing import Any, Callable

from ray.train.v2.api.callback import UserCallback


class MemberResults(UserCallback):
    """Rank 0's results, one at a time (a one-slot queue), from Ray Train's
    controller to the trial, where ``fit`` hands each to ``report``."""

    def __init__(self):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(dict(metrics[0]))  # runs in Ray Train's controller

    def fit(self, trainer, *, report: Callable[[dict[str, Any]], None]):
        """``trainer.fit()`` in a thread, reporting its results here as they come."""
        from ray.util.queue import Empty

        out: dict[str, Any] = {}

        def run() -> None:
            try:
                out["result"] = trainer.fit()
            except BaseException as err:  # noqa: BLE001 - raised below, in the trial
                out["error"] = err

        thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
        thread.start()
        while thread.is_alive() or not self.queue.empty():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            report(item)
        thread.join()
        self.queue.shutdown()
        if "error" in out:
            raise out["error"]
        return out["result"]
