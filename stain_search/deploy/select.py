"""Pick what to deploy: every kept trial × epoch checkpoint of a search, ranked.

Tune and most sweep tools rank *trials* by their last report and hand back
their latest checkpoint, although a GAN is often best several epochs before
it stops. Here each checkpoint a search kept (Ray keeps the best k per
trial, ``trials/<trial>/checkpoint_epoch_XXXX/``) is a candidate with its
own epoch's metrics from its ``meta.json``, so the epoch to deploy is chosen
as carefully as the trial.

Joined in: the trial's state from the Optuna study (COMPLETE, PRUNED, FAIL,
RUNNING: a failed trial's checkpoints are left out unless asked for), and,
where the MLflow store is at hand, its run id and Optuna trial number (the
``stain_search.trial`` / ``stain_search.optuna_trial`` tags); without MLflow
the number is found by matching the searched parameters.

Ranking follows the search's own objective(s): one objective sorts the
checkpoints by it; several rank them by non-dominated sorting (Deb et al.,
2002, "A fast and elitist multiobjective genetic algorithm: NSGA-II") —
rank 1 is the Pareto front — and by the first objective within a rank.
Constraints (``--min ssim_structure=0.7``: at least; ``--max fd_random=80``:
at most) drop checkpoints before ranking.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from stain_search.checkpoint import CheckpointError, list_checkpoints, read_meta
from stain_search.errors import ConfigError
from stain_search.search import DEFAULT_STORAGE, search_dir_for

ALWAYS_SHOWN = ("ssim_structure",)  # the "does it keep the tissue" check, beside the objectives


@dataclass(frozen=True)
class Constraint:
    metric: str
    bound: str  # "min": metric ≥ value; "max": metric ≤ value
    value: float

    def holds(self, metrics: dict[str, Any]) -> bool:
        v = metrics.get(self.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return v >= self.value if self.bound == "min" else v <= self.value

    def __str__(self) -> str:
        return f"{self.metric} {'≥' if self.bound == 'min' else '≤'} {self.value:g}"


def parse_constraint(text: str, *, bound: str) -> Constraint:
    """`ssim_structure=0.7` (with ``bound`` "min" or "max") → a Constraint."""
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not metric.strip() or number is None or not math.isfinite(number):
        raise ConfigError(f"--{bound} {text!r}: expected METRIC=NUMBER, e.g. "
                          f"--{bound} ssim_structure=0.7")
    return Constraint(metric.strip(), bound, number)


@dataclass
class Candidate:
    """One checkpoint: a trial at an epoch, with that epoch's metrics."""

    trial: str  # folder name, trial_<id>
    epoch: int
    metrics: dict[str, float]
    params: dict[str, Any]  # the searched parameters' values
    checkpoint: Path
    number: int | None = None  # Optuna trial number
    state: str = "UNKNOWN"  # Optuna state: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    run_id: str | None = None  # the trial's MLflow run
    rank: int = 0  # 1 = best (single objective) / Pareto front (several)

    def values(self, objectives: list[tuple[str, str]]) -> list[float | None]:
        out = []
        for metric, _ in objectives:
            v = self.metrics.get(metric)
            out.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
        return out


@dataclass
class Selection:
    search: str
    search_dir: Path
    objectives: list[tuple[str, str]]  # (metric, "min"|"max")
    params: list[str]  # searched keys
    constraints: list[Constraint]
    candidates: list[Candidate]  # ranked, best first
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count
    notes: list[str] = field(default_factory=list)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def front(self) -> list[Candidate]:
        return [c for c in self.candidates if c.rank == 1]

    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "search": self.search, "search_dir": str(self.search_dir),
            "objectives": [{"metric": m, "mode": mode} for m, mode in self.objectives],
            "multi_objective": self.multi_objective,
            "constraints": [asdict(c) for c in self.constraints],
            "candidates": [{**asdict(c), "checkpoint": str(c.checkpoint),
                            "pareto": self.multi_objective and c.rank == 1}
                           for c in self.candidates],
            "dropped": self.dropped, "notes": self.notes,
        }


# --- ranking ------------------------------------------------------------------------

def dominates(a: list[float], b: list[float]) -> bool:
    """a dominates b (all minimised): no worse anywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_ranks(points: list[list[float]]) -> list[int]:
    """Non-dominated sorting (minimisation): 1 for the Pareto front, 2 for the
    front once the first is removed, and so on."""
    ranks = [0] * len(points)
    remaining = set(range(len(points)))
    rank = 1
    while remaining:
        front = {i for i in remaining
                 if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def rank(candidates: list[Candidate], objectives: list[tuple[str, str]]) -> list[Candidate]:
    """Sorted best first, with ``rank`` set (all must have every objective)."""
    signed = [[v if mode == "min" else -v for v, (_, mode) in zip(c.values(objectives), objectives)]
              for c in candidates]
    if len(objectives) == 1:
        order = sorted(range(len(candidates)), key=lambda i: (signed[i][0], -candidates[i].epoch))
        for position, i in enumerate(order, 1):
            candidates[i].rank = position
    else:
        for c, r in zip(candidates, pareto_ranks(signed)):
            c.rank = r
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i].rank, signed[i][0]))
    return [candidates[i] for i in order]


# --- what is on disk, in the study and in MLflow ----------------------------------------

def read_search(search_dir: Path, name: str) -> dict[str, Any]:
    record = search_dir / "search.json"
    if not record.is_file():
        raise ConfigError(f"{search_dir}: no search named {name!r} (no search.json); pass the "
                          f"--storage the search ran with (default ./{DEFAULT_STORAGE})")
    return json.loads(record.read_text())


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in (config or {}).items()
            if isinstance(section, dict) for k, v in section.items()}


def study_trials(search_dir: Path, name: str) -> list[Any]:
    """The study's frozen trials ([] when there is no study file)."""
    import optuna

    from stain_search.study import storage

    path = search_dir / "study.journal"
    if not path.is_file():
        return []
    study = optuna.load_study(study_name=name, storage=storage(path))
    return study.get_trials(deepcopy=False)


def mlflow_trials(name: str, tracking_uri: str | None,
                  notes: list[str]) -> dict[str, tuple[str, int | None]]:
    """Trial folder name → (run id, Optuna number), from the search's MLflow runs."""
    from stain_search import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        notes.append(f"no MLflow store at {uri}: run ids left out (pass --tracking-uri)")
        return {}
    try:
        c = tracking.client(uri)
        experiment = c.get_experiment_by_name(name)
        runs = tracking.trial_runs(c, experiment.experiment_id, search=name) if experiment else []
    except tracking.TrackingError as err:
        notes.append(f"MLflow unavailable, run ids left out: {err}")
        return {}
    out = {}
    for run in runs:
        tags = run.data.tags
        number = tags.get(tracking.OPTUNA_TRIAL)
        if tags.get(tracking.TRIAL):
            out[tags[tracking.TRIAL]] = (run.info.run_id,
                                         int(number) if number not in (None, "") else None)
    return out


def _match_number(params: dict[str, Any], trials: list[Any]) -> int | None:
    """The Optuna trial whose suggested values are these (only if unique)."""
    hits = [t.number for t in trials if t.params and all(
        k in params and params[k] == v for k, v in t.params.items())]
    return hits[0] if len(hits) == 1 else None


def gather(search_dir: Path, keys: list[str], dropped: dict[str, int]) -> list[Candidate]:
    """Every readable checkpoint under ``trials/``."""
    out = []
    for folder in sorted(p for p in (search_dir / "trials").glob("*") if p.is_dir()):
        for ckpt in list_checkpoints(folder):
            try:
                meta = read_meta(ckpt)
            except CheckpointError:
                dropped["unreadable checkpoint"] = dropped.get("unreadable checkpoint", 0) + 1
                continue
            config = flat_config(meta.get("config", {}))
            out.append(Candidate(trial=folder.name, epoch=int(meta.get("epoch", 0)),
                                 metrics=dict(meta.get("metrics") or {}),
                                 params={k: config.get(k) for k in keys}, checkpoint=ckpt))
    return out


def select(name: str, *, storage: str | Path | None = None, tracking_uri: str | None = None,
           constraints: Iterable[Constraint] = (), include_failed: bool = False,
           per_trial: bool = False) -> Selection:
    """Rank the checkpoints of search ``name`` (see the module docstring)."""
    search_dir = search_dir_for(storage, name)
    record = read_search(search_dir, name)
    objectives = [(o["metric"], o["mode"]) for o in record["objectives"]]
    keys = [p["key"] for p in record.get("params", [])]
    constraints = list(constraints)
    dropped: dict[str, int] = {}
    notes: list[str] = []
    candidates = gather(search_dir, keys, dropped)
    known = {m for c in candidates for m in c.metrics}
    for con in constraints:
        if candidates and con.metric not in known:
            raise ConfigError(f"constraint `{con}`: no checkpoint reports {con.metric!r}; "
                              f"metrics: {', '.join(sorted(known))}")
    trials = study_trials(search_dir, name)
    by_number = {t.number: t for t in trials}
    runs = mlflow_trials(name, tracking_uri, notes)
    for c in candidates:
        run_id, number = runs.get(c.trial, (None, None))
        c.run_id = run_id
        c.number = number if number is not None else _match_number(c.params, trials)
        study_trial = by_number.get(c.number)
        if study_trial is not None:
            c.state = study_trial.state.name
            c.params = {k: study_trial.params.get(k, c.params.get(k)) for k in keys}

    def drop(reason: str) -> bool:
        dropped[reason] = dropped.get(reason, 0) + 1
        return False

    def keep(c: Candidate) -> bool:
        if c.state == "FAIL" and not include_failed:
            return drop("failed trial (--include-failed keeps them)")
        if any(v is None for v in c.values(objectives)):
            return drop("no objective value")
        for con in constraints:
            if not con.holds(c.metrics):
                return drop(f"fails {con}")
        return True

    ranked = rank([c for c in candidates if keep(c)], objectives)
    if per_trial:
        seen: set[str] = set()
        ranked = [c for c in ranked if not (c.trial in seen or seen.add(c.trial))]
        if len(objectives) == 1:  # positions among the trials' best
            for position, c in enumerate(ranked, 1):
                c.rank = position
    return Selection(search=name, search_dir=search_dir, objectives=objectives, params=keys,
                     constraints=constraints, candidates=ranked, dropped=dropped, notes=notes)


def pick(selection: Selection, *, trial: str | None = None, epoch: int | None = None) -> Candidate:
    """The checkpoint to export: the best, or the best of one trial, or one epoch.

    ``trial`` is a folder name (trial_3f2a…), its id without the prefix, or
    the Optuna trial number.
    """
    chosen = selection.candidates
    if trial is not None:
        t = str(trial).lstrip("#")
        chosen = [c for c in chosen if t in (c.trial, c.trial.removeprefix("trial_"))
                  or (t.isdigit() and c.number == int(t))]
        if not chosen:
            known = sorted({f"{c.trial} (#{c.number})" for c in selection.candidates})
            raise ConfigError(f"--trial {trial}: no ranked checkpoint of that trial in search "
                              f"{selection.search!r}; trials: {', '.join(known) or 'none'}")
    if epoch is not None:
        epochs = sorted({c.epoch for c in chosen})
        chosen = [c for c in chosen if c.epoch == epoch]
        if not chosen:
            raise ConfigError(f"--epoch {epoch}: no kept checkpoint at that epoch "
                              f"(kept: {', '.join(map(str, epochs)) or 'none'})")
    if not chosen:
        why = "; ".join(f"{n} {r}" for r, n in selection.dropped.items()) or "no checkpoints"
        raise ConfigError(f"search {selection.search!r}: no checkpoint to export ({why})")
    return chosen[0]


# --- showing it ---------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def format_table(selection: Selection, *, top: int = 10) -> str:
    objectives = [m for m, _ in selection.objectives]
    shown_metrics = objectives + [m for m in ALWAYS_SHOWN if m not in objectives]
    head = ["rank", "trial", "#", "state", "epoch", *shown_metrics, *selection.params, "run"]
    rows = [[str(c.rank), c.trial, _fmt(c.number), c.state, str(c.epoch),
             *[_fmt(c.metrics.get(m)) for m in shown_metrics],
             *[_fmt(c.params.get(k)) for k in selection.params], (c.run_id or "-")[:8]]
            for c in selection.candidates[:top]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    numeric = {0, 2, 4, *range(5, 5 + len(shown_metrics))}  # right-aligned columns

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    goal = ", ".join(f"{m} {mode}" for m, mode in selection.objectives)
    out = [f"search {selection.search!r}: checkpoints ranked by {goal}"
           + (" (rank 1 = Pareto front)" if selection.multi_objective else "")]
    if selection.constraints:
        out.append("constraints: " + ", ".join(map(str, selection.constraints)))
    out += ["", line(head), line(["-" * w for w in widths]), *map(line, rows), ""]
    n = len(selection.candidates)
    more = " (--top for more)" if n > top else ""
    out.append(f"{min(n, top)} of {n} checkpoint(s) shown{more}")
    if selection.multi_objective:
        out.append(f"Pareto front: {len(selection.front)} checkpoint(s)")
    for reason, count in selection.dropped.items():
        out.append(f"left out: {count} ({reason})")
    out += [f"note: {n}" for n in selection.notes]
    best = selection.best()
    if best is not None:
        out.append(f"export the best ({best.trial}, epoch {best.epoch}): stain-search export "
                   f"{selection.search}   (another: add --trial TRIAL [--epoch N])")
    return "\n".join(out)
