"""Pick what to deploy: every kept trial × epoch checkpoint of a search, ranked.

Tune and most sweep tools rank *trials* by their last report and hand back
their latest checkpoint, although a GAN is often best several epochs before
it stops. Here each checkpoint a search kept (the trial keeps the best k
and the newest per trial, ``trials/<trial>/checkpoint_epoch_XXXX/``) is a candidate with its
own epoch's metrics from its ``meta.json``, so the epoch to deploy is chosen
as carefully as the trial.

Joined in: the trial's state from the Optuna study (COMPLETE, PRUNED, FAIL,
RUNNING: a failed trial's checkpoints are left out unless asked for), and,
where the MLflow store is at hand, its run id and Optuna trial number (the
``stain_search.trial`` / ``stain_search.optuna_trial`` tags); without MLflow
the number is found by matching the searched parameters.

The deploy rule — the one answer to "which model do I deploy?". The run's
closing summary, ``summary.json``, ``stain-search best`` (its first row),
``report`` (its "chosen" mark) and ``export``'s default all call
:func:`select` and take ``Selection.best()``:

- One objective: the best value of the objective among all kept checkpoints
  (trial × epoch), ties broken by the later epoch.
- Several (a Pareto search): the non-dominated checkpoints (the front, by
  ``stain_search.pareto``), and among them the best *first* objective. The
  first objective is the one the space lists first: the user's own order of
  importance, so the rule needs no weights or scaling (a "compromise" point
  depends on how the front happens to be spread, and moves when one trial is
  added). The whole front is listed by ``best`` and drawn by ``report``.
- Constraints drop checkpoints before ranking: the space's own
  (``constraints:``, recorded in the search's identity), plus any given here
  (``--min ssim_structure=0.7``: at least; ``--max fd_random=80``: at most);
  ``--no-constraints`` leaves the space's out. When no checkpoint meets them,
  nothing is deployable: ``Selection.infeasible`` holds the ranking without
  them, which ``best`` shows under a "no feasible checkpoint" line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stain_search.checkpoint import CheckpointError, list_checkpoints, read_meta, state_problem
from stain_search.config import flat_config
from stain_search.pbt import COPIED_FROM
from stain_search.errors import ConfigError
from stain_search.pareto import deploy_order, pareto_ranks
from stain_search.search_dir import SearchDir
from stain_search.constraints import Constraint

ALWAYS_SHOWN = ("ssim_structure",)  # the "does it keep the tissue" check, beside the objectives


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


RULE_SINGLE = "best epoch value among kept checkpoints (later epoch wins a tie)"
RULE_PARETO = "Pareto front of kept checkpoints, then the best first objective"


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
    search_id: str | None = None
    # No checkpoint meets the constraints: the rest ranked without them (never deployed).
    infeasible: list[Candidate] = field(default_factory=list)
    # The search folder's URI when it is kept in a URI storage (search_dir: its mirror)
    location: str | None = None

    def where(self, candidate: Candidate) -> str:
        """Where a candidate's checkpoint is kept, as a user names it."""
        if self.location is None:
            return str(candidate.checkpoint)
        return f"{self.location}/{Path(candidate.checkpoint).relative_to(self.search_dir).as_posix()}"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def rule(self) -> str:
        return RULE_PARETO if self.multi_objective else RULE_SINGLE

    @property
    def front(self) -> list[Candidate]:
        return [c for c in self.candidates if c.rank == 1]

    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "search": self.search, "search_dir": str(self.search_dir),
            "search_id": self.search_id, "rule": self.rule,
            "objectives": [{"metric": m, "mode": mode} for m, mode in self.objectives],
            "multi_objective": self.multi_objective,
            "constraints": [asdict(c) for c in self.constraints],
            "candidates": [{**asdict(c), "checkpoint": self.where(c),
                            "pareto": self.multi_objective and c.rank == 1}
                           for c in self.candidates],
            "dropped": self.dropped, "notes": self.notes,
            "infeasible": [{**asdict(c), "checkpoint": self.where(c)}
                           for c in self.infeasible],
        }

    def no_feasible_line(self) -> str | None:
        """One line when constraints left nothing to deploy but checkpoints exist."""
        if self.candidates or not self.infeasible:
            return None
        b = self.infeasible[0]
        shown = ", ".join(f"{c.metric}={_fmt(b.metrics.get(c.metric))}" for c in self.constraints)
        return (f"no feasible checkpoint: none meets {', '.join(map(str, self.constraints))}; "
                f"best infeasible shown (not deployable): #{b.number} {b.trial} epoch "
                f"{b.epoch} ({shown}); `--no-constraints` or other --min/--max to choose "
                f"among them")


# --- ranking ------------------------------------------------------------------------

def rank(candidates: list[Candidate], objectives: list[tuple[str, str]]) -> list[Candidate]:
    """Sorted by the deploy rule, best first, with ``rank`` set: the position
    (one objective) or the Pareto front number (several). All candidates must
    have every objective."""
    if not candidates:
        return []
    modes = [mode for _, mode in objectives]
    values = np.array([c.values(objectives) for c in candidates], dtype=float)
    order = deploy_order(values, modes, tie_break=[c.epoch for c in candidates])
    if len(objectives) == 1:
        for position, i in enumerate(order, 1):
            candidates[i].rank = position
    else:
        for c, r in zip(candidates, pareto_ranks(values, modes)):
            c.rank = int(r)
    return [candidates[i] for i in order]


# --- what is on disk, in the study and in MLflow ----------------------------------------

def study_trials(sdir: SearchDir, name: str) -> list[Any]:
    """The study's frozen trials ([] when there is no study file)."""
    from stain_search.study import open_study

    if not sdir.study_journal.is_file():
        return []
    try:
        return open_study(name, sdir.study_journal).get_trials(deepcopy=False)
    except KeyError:  # the driver stopped before creating the study
        return []


def mlflow_trials(name: str, search_id: str | None, tracking_uri: str | None,
                  notes: list[str]) -> dict[str, tuple[str, int | None]]:
    """Trial folder name → (run id, Optuna number), from this search's MLflow runs
    (by its id: another search of the same name in the store is not joined)."""
    from stain_search import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        notes.append(f"no MLflow store at {uri}: run ids left out (pass --tracking-uri)")
        return {}
    try:
        c = tracking.client(uri)
        experiment = c.get_experiment_by_name(name)
        runs = (tracking.trial_runs(c, experiment.experiment_id, search=name,
                                    search_id=search_id) if experiment else [])
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


DAMAGED = "checkpoint whose weights no longer match what was written: truncated or replaced"


def gather(sdir: SearchDir, keys: list[str], dropped: dict[str, int]) -> list[Candidate]:
    """Every readable checkpoint under ``trials/``."""
    return [c for folder in sorted(p for p in sdir.trials.glob("*") if p.is_dir())
            for c in gather_trial(folder, keys, dropped)]


def gather_trial(folder: Path, keys: list[str], dropped: dict[str, int]) -> list[Candidate]:
    """Every readable checkpoint of one trial's folder."""
    out = []
    for ckpt in list_checkpoints(folder):
        try:
            meta = read_meta(ckpt)
        except CheckpointError:
            dropped["unreadable checkpoint"] = dropped.get("unreadable checkpoint", 0) + 1
            continue
        if meta.get(COPIED_FROM):  # a PBT exploit's copy: the donor's original counts
            continue
        if state_problem(ckpt, meta):  # its weights changed since written: never ranked
            dropped[DAMAGED] = dropped.get(DAMAGED, 0) + 1
            continue
        config = flat_config(meta.get("config", {}))
        out.append(Candidate(trial=folder.name, epoch=int(meta.get("epoch", 0)),
                             metrics=dict(meta.get("metrics") or {}),
                             params={k: config.get(k) for k in keys}, checkpoint=ckpt))
    return out


def trial_best(folder: Path, objectives: list[tuple[str, str]],
               constraints: Iterable[Constraint] = ()) -> Candidate | None:
    """The deploy rule within one trial: its checkpoint a search would deploy
    if it were the only trial. What the study is told for the trial (so the
    sampler learns the quantity the user deploys by), what a PBT member's
    schedule is read from and what a confirmation run counts. As
    :func:`select_dir`, the space's ``constraints`` filter before the rank: the
    best checkpoint that meets them all; a trial none of whose checkpoints does,
    its best all the same (its constraint values then tell the study it is
    infeasible)."""
    found = [c for c in gather_trial(folder, [], {}) if None not in c.values(objectives)]
    feasible = [c for c in found if all(con.holds(c.metrics) for con in constraints)]
    ranked = rank(feasible or found, objectives)
    return ranked[0] if ranked else None


def select(name: str, *, storage: str | Path | None = None, tracking_uri: str | None = None,
           constraints: Iterable[Constraint] = (), space_constraints: bool = True,
           include_failed: bool = False, per_trial: bool = False) -> Selection:
    """Rank the checkpoints of search ``name`` (see the module docstring)."""
    return select_dir(SearchDir.of(storage, name).pull(), tracking_uri=tracking_uri,
                      constraints=constraints, space_constraints=space_constraints,
                      include_failed=include_failed, per_trial=per_trial)


def select_dir(sdir: SearchDir, *, tracking_uri: str | None = None,
               constraints: Iterable[Constraint] = (), space_constraints: bool = True,
               include_failed: bool = False, per_trial: bool = False) -> Selection:
    """:func:`select` on a search folder. ``constraints`` come on top of the
    space's own (``space_constraints=False`` leaves those out)."""
    record = sdir.read_record()
    name = record.name
    objectives = [(o.metric, o.mode) for o in record.objectives]
    keys = [p.key for p in record.params]
    constraints = list(dict.fromkeys([*(record.constraints if space_constraints else ()),
                                      *constraints]))
    dropped: dict[str, int] = {}
    notes: list[str] = []
    candidates = gather(sdir, keys, dropped)
    known = {m for c in candidates for m in c.metrics}
    for con in constraints:
        if candidates and con.metric not in known:
            raise ConfigError(f"constraint `{con}`: no checkpoint reports {con.metric!r}; "
                              f"metrics: {', '.join(sorted(known))}")
    trials = study_trials(sdir, name)
    by_number = {t.number: t for t in trials}
    runs = mlflow_trials(name, record.search_id, tracking_uri, notes)
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

    def usable(c: Candidate) -> bool:
        if c.state == "FAIL" and not include_failed:
            return drop("failed trial (--include-failed keeps them)")
        if any(v is None for v in c.values(objectives)):
            return drop("no objective value")
        return True

    def feasible(c: Candidate) -> bool:
        for con in constraints:
            if not con.holds(c.metrics):
                return drop(f"fails {con}")
        return True

    usable_ones = [c for c in candidates if usable(c)]
    ranked = _per_trial(rank([c for c in usable_ones if feasible(c)], objectives),
                        objectives, per_trial=per_trial)
    infeasible = ([] if ranked or not constraints
                  else _per_trial(rank(usable_ones, objectives), objectives, per_trial=per_trial))
    notes += certainty_notes(ranked, objectives, by_number, search=name)
    return Selection(search=name, search_dir=sdir.root, objectives=objectives, params=keys,
                     constraints=constraints, candidates=ranked, dropped=dropped, notes=notes,
                     search_id=record.search_id, infeasible=infeasible,
                     location=sdir.remote.uri if sdir.remote is not None else None)


def _per_trial(ranked: list[Candidate], objectives: list[tuple[str, str]], *,
               per_trial: bool) -> list[Candidate]:
    """Each trial's best checkpoint only (``per_trial``), ranks renumbered."""
    if not per_trial:
        return ranked
    seen: set[str] = set()
    ranked = [c for c in ranked if not (c.trial in seen or seen.add(c.trial))]
    if len(objectives) == 1:  # positions among the trials' best
        for position, c in enumerate(ranked, 1):
            c.rank = position
    return ranked


def certainty_notes(ranked: list[Candidate], objectives: list[tuple[str, str]],
                    study_trials: dict[int, Any], *, search: str = "NAME") -> list[str]:
    """How sure the choice is: the best's margin over the runner-up (the best
    checkpoint of another trial) against the metric's spread over evaluation
    subsets (KID's ``…_std``), and where the study holds another value than the
    rule deploys by (searches made before the driver told the study each trial's
    deploy-rule value kept its last epoch)."""
    if not ranked:
        return []
    best, metric = ranked[0], objectives[0][0]
    notes = []
    runner = next((c for c in ranked[1:] if c.trial != best.trial), None)
    stds = [c.metrics.get(f"{metric}_std") for c in (best, runner) if c is not None]
    stds = [float(v) for v in stds if isinstance(v, (int, float)) and math.isfinite(v)]
    if runner is not None and stds:
        margin = abs(best.metrics[metric] - runner.metrics[metric])
        spread = max(stds)
        if margin <= spread:
            notes.append(f"#{best.number} and #{runner.number} are within one std of {metric} "
                         f"({margin:.3g} apart, std {spread:.3g} over evaluation subsets): the "
                         f"data cannot tell them apart; confirm with `stain-search confirm "
                         f"{search} --top 2 --seeds 3` before trusting this order")
        else:
            notes.append(f"#{best.number} leads #{runner.number} by {margin:.3g} {metric}, "
                         f"{margin / spread:.1f}× its std over evaluation subsets")
    told = study_trials.get(best.number)
    values = getattr(told, "values", None)
    if values and len(objectives) == 1 and math.isfinite(values[0]):
        if not math.isclose(values[0], best.metrics[metric], rel_tol=1e-9, abs_tol=1e-12):
            notes.append(f"the study (what the sampler learns from) holds another value of "
                         f"#{best.number}, {metric} = {values[0]:.4g} (its last epoch: searches "
                         f"before stain-search told the study the deploy rule's value); the "
                         f"deploy rule picks its epoch {best.epoch}, {metric} = "
                         f"{best.metrics[metric]:.4g}")
    return notes


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
        infeasible = selection.no_feasible_line()
        if infeasible and trial is None and epoch is None:
            raise ConfigError(f"search {selection.search!r}: {infeasible}")
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
    shown_metrics += [c.metric for c in selection.constraints if c.metric not in shown_metrics]
    # No feasible checkpoint: the best infeasible ones, marked ✗ in place of a rank.
    infeasible = selection.no_feasible_line()
    listed = selection.infeasible if infeasible else selection.candidates
    rows = [["✗" if infeasible else str(c.rank), c.trial, _fmt(c.number), c.state, str(c.epoch),
             *[_fmt(c.metrics.get(m)) for m in shown_metrics],
             *[_fmt(c.params.get(k)) for k in selection.params], (c.run_id or "-")[:8]]
            for c in listed[:top]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    numeric = {0, 2, 4, *range(5, 5 + len(shown_metrics))}  # right-aligned columns

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    goal = ", ".join(f"{m} {mode}" for m, mode in selection.objectives)
    out = [infeasible] if infeasible else []
    out += [f"search {selection.search!r}: checkpoints ranked by {goal}"
            + (" (rank 1 = Pareto front)" if selection.multi_objective else "")]
    if selection.constraints:
        out.append("constraints: " + ", ".join(map(str, selection.constraints)))
    out += ["", line(head), line(["-" * w for w in widths]), *map(line, rows), ""]
    n = len(listed)
    more = " (--top for more)" if n > top else ""
    out.append(f"{min(n, top)} of {n} checkpoint(s) shown{more}")
    if n == 0:
        out.append(f"nothing to rank yet: a trial saves its first checkpoint when it finishes "
                   f"its first epoch (`stain-search status {selection.search}` follows it)")
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
