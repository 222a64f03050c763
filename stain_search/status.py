"""`stain-search status`: where a search stands, read without Ray.

From another terminal while it runs, or after the fact. Everything comes from
the search folder (``stain_search.search_dir``): the record, the study (each
trial's state and the epochs it reported), the driver lock and heartbeat
(``stain_search.lock``), and the checkpoints, ranked by the deploy rule
(``stain_search.deploy.select``, which joins MLflow run ids when the store
is there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stain_search.lock import STALE_AFTER_S, is_locked, read_driver
from stain_search.search_dir import SearchDir, list_searches, trial_name

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


@dataclass
class RunningTrial:
    number: int
    trial: str
    epoch: int  # the last epoch it reported to the study (0: none yet)
    epochs: int | None  # of how many


@dataclass
class SearchStatus:
    name: str
    search_dir: Path
    search_id: str | None
    state: str  # running | interrupted | finished | not started
    num_samples: int
    counts: dict[str, int]
    running: list[RunningTrial]
    best: dict[str, Any] | None  # the deploy rule's checkpoint so far
    driver: dict[str, Any] | None  # pid, host, started, heartbeat_age_s, alive
    objectives: list[tuple[str, str]] = field(default_factory=list)
    resume: str | None = None  # the command that continues it

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["search_dir"] = str(self.search_dir)
        return out


def driver_state(sdir: SearchDir) -> dict[str, Any] | None:
    info = read_driver(sdir.driver_file)
    locked = is_locked(sdir.lock_file)
    if info is None and not locked:
        return None
    # The lock is the truth on this machine; the heartbeat on any other.
    alive = locked or (info is not None and info.heartbeat_age_s < STALE_AFTER_S)
    return {"alive": alive, **({"pid": info.pid, "host": info.host, "started": info.started,
                                "heartbeat_age_s": round(info.heartbeat_age_s, 1)}
                               if info else {})}


def search_status(name: str, *, storage: str | Path | None = None,
                  tracking_uri: str | None = None) -> SearchStatus:
    from stain_search.deploy.select import select_dir
    from stain_search.study import open_study

    sdir = SearchDir.of(storage, name).pull()
    record = sdir.read_record()
    counts = {s: 0 for s in STATES}
    running: list[RunningTrial] = []
    epochs = record.base.get("train.epochs")
    if sdir.study_journal.is_file():
        try:
            trials = open_study(record.name, sdir.study_journal).get_trials(deepcopy=False)
        except KeyError:  # the driver stopped before creating the study
            trials = []
        for t in trials:
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
            if t.state.name == "RUNNING":
                running.append(RunningTrial(t.number, trial_name(t.number),
                                            max(t.intermediate_values, default=0), epochs))
    driver = driver_state(sdir)
    finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
    if driver is not None and driver["alive"]:
        state = "running"
    elif finished >= record.budget.num_samples and not counts["RUNNING"]:
        state = "finished"
    elif sum(counts.values()):
        state = "interrupted"
    else:
        state = "not started"
    selection = select_dir(sdir, tracking_uri=tracking_uri)
    top = selection.best()
    best = None if top is None else {"trial": top.trial, "number": top.number,
                                     "epoch": top.epoch, "state": top.state,
                                     **{m: top.metrics.get(m) for m, _ in selection.objectives}}
    return SearchStatus(
        name=record.name, search_dir=sdir.root, search_id=record.search_id, state=state,
        num_samples=record.budget.num_samples, counts=counts, running=running, best=best,
        driver=driver, objectives=selection.objectives,
        resume=(f"stain-search resume {record.name}"
                + (f" --storage {storage}" if storage else "")
                if state == "interrupted" else None))


def list_status(storage: str | Path | None) -> list[SearchStatus]:
    return [search_status(s.name, storage=storage) for s in list_searches(storage)]


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_status(s: SearchStatus) -> str:
    counted = ", ".join(f"{n} {k.lower()}" for k, n in s.counts.items() if n)
    lines = [f"search {s.name!r}: {s.state} — {counted or 'no trials yet'} "
             f"(budget {s.num_samples} trials)  [{s.search_dir}]"]
    d = s.driver
    if d is not None and "pid" in d:
        lines.append(f"  driver: pid {d['pid']} on {d['host']} since {d['started']}, heartbeat "
                     f"{d['heartbeat_age_s']:.0f} s ago ({'alive' if d['alive'] else 'gone'})")
    for t in s.running:
        of = f"/{t.epochs}" if t.epochs else ""
        lines.append(f"  {'running' if s.state == 'running' else 'interrupted'}: #{t.number} "
                     f"{t.trial} at epoch {t.epoch}{of}")
    if s.best is not None:
        vals = ", ".join(f"{m}={_value(s.best.get(m))}" for m, _ in s.objectives)
        lines.append(f"  best so far: #{s.best['number']} {s.best['trial']} at epoch "
                     f"{s.best['epoch']}: {vals}")
    if s.resume:
        lines.append(f"  continue it: {s.resume}")
    return "\n".join(lines)


def format_listing(rows: list[SearchStatus], *, storage: str | Path | None) -> str:
    if not rows:
        from stain_search.search_dir import storage_or_default
        from stain_search.storage import is_uri

        where = storage_or_default(storage)
        return (f"no searches in {where if is_uri(where) else Path(where).resolve()} "
                f"(pass --storage, or start one: stain-search run spaces/lambda.yaml)")
    out = []
    for s in rows:
        done = s.counts["COMPLETE"] + s.counts["PRUNED"] + s.counts["FAIL"]
        best = (f"best #{s.best['number']} epoch {s.best['epoch']}" if s.best else "no best yet")
        out.append(f"{s.name:<24} {s.state:<12} {done}/{s.num_samples} trials  {best}")
    return "\n".join(out)
