"""All Optuna glue: the study, its sampler and pruner, pruning from a trial,
and telling the study how a trial ended. Optuna only, no Ray: the readers
(``status``, ``best``, the report) open the study through this module. The
Ray Tune searcher that asks the study for trials is
``stain_search.study_searcher``.

Why not Ray's own OptunaSearch: it records scheduler-stopped trials as
COMPLETE with their truncated score (misleading TPE), never uses Optuna's
pruners, and keeps its study in memory unless given a storage. Here the
study lives in a journal file beside the search (``optuna-dashboard
study.journal`` opens it), early stopping is Optuna pruning decided from
that same study by the trial's rank-0 worker, and a pruned trial is told to
the study as PRUNED, never as a complete result.

The journal is the driver's: only the driver opens it. A trial, on whichever
Ray node it runs, reaches the study through Optuna's gRPC storage proxy,
which the driver serves the journal with while Tune runs
(``stain_search.study_proxy``: bound to the driver's Ray node address, a free
port or ``STAIN_SEARCH_STUDY_PORT``, every call with a deadline); what it
needs to connect, :class:`~stain_search.context.StudyAccess`, travels in the
trial's context. Why this and not the alternatives Optuna offers: a shared
journal file needs a filesystem every node mounts, which object-storage
clusters lack; an RDB storage needs a database server the user must run
beside the cluster (and would remain an option for one who has it); deciding
pruning in the driver's Tune scheduler would give up Optuna's pruners and
the per-epoch learning curves in the study. The proxy keeps one journal,
written by one process, with Optuna's own pruners deciding, and needs only
the port the driver already listens on. The search's folder (and its
storage) keeps the journal file as before; ``resume`` reopens it.

The study is the search's one record of its trials: a resumed search
continues every trial the study still holds as RUNNING (interrupted: its
folder has its checkpoints) before it asks for new ones, and tops the study
up to ``num_samples`` finished trials. Tune's own experiment state is not
needed for that.

Constraints (a space's ``constraints:``) go through Optuna 5's own API: before
a trial is told, the driver sets one value per constraint with
``Trial.set_constraint`` (named by the constraint, e.g. ``ssim_structure ≥ 0.6``),
≤ 0 where it holds (``constraints.Constraint.violation``), computed from the
same checkpoint whose objectives the study is told. TPE (one objective or
several) and NSGA-II read ``trial.constraints`` themselves, so they prefer
feasible trials (Optuna's constrained TPE, Watanabe & Hutter 2023; NSGA-II's
constrained domination, Deb et al. 2002); the random sampler ignores them, but
they are recorded all the same. A study stored before (one ``constraints``
list attribute, which a ``constraints_func`` read back) reads the same: Optuna's
``trial.constraints`` reads both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna

from stain_search.context import Pruning, StudyAccess
from stain_search.spaces import Param, SearchSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmPoint:
    """A point a new study starts with (enqueued, with its user attributes):
    ``stain_search.warm_start`` makes them from another search's best trials."""

    params: dict[str, Any]
    attrs: dict[str, str]  # study user attributes, e.g. {"stain_search.warm_start": "OTHER #N"}

# Keys the searcher adds to each trial's config beside the suggested values.
OPTUNA_TRIAL_ID, OPTUNA_NUMBER, PARAMS = "optuna_trial_id", "optuna_number", "params"
# A PBT schedule the trial replays (`stain-search confirm` of a PBT search): the
# study trial's user attribute, handed on in the trial's config.
REPLAY = "pbt.replay"
# The study trial's user attributes named ``stain_search.*`` (set when a trial
# is enqueued, e.g. the configuration a confirmation run confirms): the trial
# puts them on its MLflow run as tags.
TAGS, TAG_PREFIX = "tags", "stain_search."
TS = optuna.trial.TrialState
FINISHED = (TS.COMPLETE, TS.PRUNED, TS.FAIL)


def storage(path: Path) -> optuna.storages.JournalStorage:
    # File-locked journal: safe for the driver and every trial's worker at once.
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def set_aside_torn_tail(path: Path) -> str | None:
    """A journal whose last record was cut off (a crash mid-append): move the
    partial line to ``<journal>.torn`` and keep every whole record, so the next
    append starts on a line of its own. The driver calls it, under its lock,
    before anything appends; returns the line to tell the user, or None.

    A last line that is whole JSON and only lacks its newline gets the newline."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    if tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n")
    partial = tail[cut + 1:]
    keep = size - len(partial)
    try:
        json.loads(partial)
    except ValueError:
        pass
    else:
        with open(path, "ab") as f:
            f.write(b"\n")
            os.fsync(f.fileno())
        return None
    torn = path.with_name(path.name + ".torn")
    with open(torn, "ab") as f:
        f.write(partial + b"\n")
        os.fsync(f.fileno())
    with open(path, "r+b") as f:
        f.truncate(keep)
        os.fsync(f.fileno())
    return (f"{path}: its last record was cut off ({len(partial)} bytes, a crash mid-write); "
            f"moved it to {torn.name} and kept the {keep} bytes before it")


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool | None:
    """Whether the trial met every constraint; None when it holds no values."""
    values = trial.constraints
    return None if not values else all(v <= 0 for v in values.values())


SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    # TPE handles one objective and several (multi-objective TPE, Ozaki et al.,
    # 2020): the better choice for Pareto searches under ~100 trials.
    "tpe": lambda seed, population: optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, multivariate=True, n_startup_trials=4),
    "random": lambda seed, population: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed, population: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=population),
    # PBT and PB2 draw their initial population at random (Jaderberg et al.,
    # 2017); what they learn lives in the exploits, not in the sampler.
    "pbt": lambda seed, population: optuna.samplers.RandomSampler(seed=seed),
    "pb2": lambda seed, population: optuna.samplers.RandomSampler(seed=seed),
}

PRUNERS: dict[str, Callable[[Pruning], optuna.pruners.BasePruner]] = {
    "none": lambda p: optuna.pruners.NopPruner(),
    # Median rule (Golovin et al., 2017): stop a trial whose best-so-far is
    # worse than the median of others' at the same epoch.
    "median": lambda p: optuna.pruners.MedianPruner(n_startup_trials=p.min_trials,
                                                    n_warmup_steps=p.grace_period),
    # Asynchronous successive halving (Li et al., 2020), Optuna's version.
    "successive_halving": lambda p: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.grace_period, reduction_factor=2),
}


def make_pruner(pruning: Pruning) -> optuna.pruners.BasePruner:
    if pruning.multi_objective:
        # Optuna prunes single-objective studies only; a Pareto search's median
        # rule is applied by TrialPruning itself (below).
        return optuna.pruners.NopPruner()
    return PRUNERS[pruning.pruner](pruning)


def make_sampler(spec: SearchSpec, *, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE
        return SAMPLERS[spec.search.algorithm](seed, spec.search.population_size)


def create_study(spec: SearchSpec, path: Path, *, warm: list[WarmPoint] = ()) -> optuna.Study:
    """The search's study (created, or loaded on resume). ``warm``: points a
    fresh study starts with (``run --warm-start``; stain_search.warm_start),
    enqueued before the space's own ``search.enqueue``."""
    fresh = not Path(path).exists()
    # A resumed search must not replay the first run's random draws (it would
    # suggest the same points again): offset the seed by the trials so far.
    done = 0 if fresh else len(optuna.load_study(study_name=spec.name,
                                                 storage=storage(path)).trials)
    sampler = make_sampler(spec, seed=spec.search.seed + done)
    study = optuna.create_study(
        study_name=spec.name, storage=storage(path), sampler=sampler,
        pruner=make_pruner(Pruning.of(spec.search.early_stopping, spec.objectives)),
        load_if_exists=True,
        directions=["minimize" if o.mode == "min" else "maximize" for o in spec.objectives])
    if fresh:  # a resumed study already holds them
        # optuna-dashboard and the study's own plots then name the axes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.metric for o in spec.objectives])
        for point in warm:
            study.enqueue_trial(dict(point.params), user_attrs=dict(point.attrs))
        attrs = spec.search.enqueue_attrs or []
        for i, point in enumerate(spec.search.enqueue or []):
            study.enqueue_trial(dict(point), user_attrs=attrs[i] if i < len(attrs) else None)
    return study


def serve_study(path: Path, *, name: str, host: str):
    """The driver's study (its journal), served to the trials on every node
    while the returned server's ``with`` block runs (``stain_search.study_proxy``)."""
    from stain_search.study_proxy import StudyServer

    return StudyServer(storage(path), name=name, host=host)


def open_study(name: str, path: Path, *, pruning: Pruning | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage(path),
                             pruner=make_pruner(pruning) if pruning else None)


def load_study(spec: SearchSpec, path: Path) -> optuna.Study:
    return open_study(spec.name, path,
                      pruning=Pruning.of(spec.search.early_stopping, spec.objectives))


def median_prunes(study: optuna.Study, trial_id: int, *, pruning: Pruning, step: int) -> bool:
    """The median rule on one named metric, for studies Optuna will not prune
    (several objectives): the trial's best value so far is worse than the median
    of the other trials' best values up to the same epoch, with at least
    ``min_trials`` finished (COMPLETE) trials to compare against."""
    if step <= pruning.grace_period:
        return False
    better = min if pruning.mode == "min" else max
    trial = study._storage.get_trial(trial_id)
    own = [v for s, v in trial.intermediate_values.items() if s <= step and math.isfinite(v)]
    if not own:
        return False
    others = []
    for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.PRUNED)):
        values = [v for s, v in t.intermediate_values.items() if s <= step and math.isfinite(v)]
        if values and t._trial_id != trial_id:
            others.append(better(values))
    if len([t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,))]) < pruning.min_trials:
        return False
    if not others:
        return False
    others.sort()
    mid = len(others) // 2
    median = others[mid] if len(others) % 2 else 0.5 * (others[mid - 1] + others[mid])
    mine = better(own)
    return mine > median if pruning.mode == "min" else mine < median


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """Define-by-run: conditional parameters are asked only when enabled."""
    values: dict[str, Any] = {}
    for p in params:
        if any(values.get(parent) not in allowed for parent, allowed in p.when):
            continue
        if p.distribution == "choice":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.distribution in ("uniform", "loguniform"):
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step,
                                                log=p.distribution == "loguniform")
        else:
            values[p.key] = trial.suggest_int(p.key, p.low, p.high, step=int(p.step or 1),
                                              log=p.distribution == "logint")
    return values


class TrialPruning:
    """Used by a trial's rank-0 worker: report an epoch, ask whether to stop.
    The study is reached through the proxy the driver serves it with
    (``access``; ``stain_search.study_proxy``), from whichever node the trial
    runs on; a driver that is gone raises ``StudyUnreachable`` within a bounded
    time."""

    def __init__(self, access: StudyAccess, trial_id: int, pruning: Pruning):
        from stain_search.study_proxy import connect, reaching

        self.pruning = pruning
        self.metric = pruning.metric
        self.reaching = lambda: reaching(access)
        with self.reaching():
            self.study = optuna.load_study(study_name=access.name, storage=connect(access),
                                           pruner=make_pruner(pruning))
            self.trial = optuna.trial.Trial(self.study, trial_id)
        self.trial_id = trial_id

    def record(self, metrics: dict[str, Any], *, epoch: int) -> None:
        """Give the study an epoch it may have missed (a trial restarted from
        that epoch's checkpoint, killed before it reported), without asking."""
        if self.metric not in metrics:
            return
        with self.reaching():
            if epoch in self.study._storage.get_trial(self.trial_id).intermediate_values:
                return
            self.study._storage.set_trial_intermediate_value(self.trial_id, epoch,
                                                             float(metrics[self.metric]))

    def should_prune(self, metrics: dict[str, Any], *, epoch: int) -> bool:
        if self.metric not in metrics:
            return False
        value = float(metrics[self.metric])
        with self.reaching():
            if not self.pruning.multi_objective:
                self.trial.report(value, step=epoch)
                return self.trial.should_prune()
            # Trial.report refuses multi-objective studies; the storage keeps the
            # curve all the same (optuna-dashboard shows it), and the rule is ours.
            self.study._storage.set_trial_intermediate_value(self.trial_id, epoch, value)
            return (self.pruning.pruner == "median"
                    and median_prunes(self.study, self.trial_id, pruning=self.pruning,
                                      step=epoch))


def tell_finished(study: optuna.Study, spec: SearchSpec, number: int, result: dict | None, *,
                  error: bool, stopping: bool,
                  told: Callable[[int], list[float] | None] | None = None,
                  constrained: Callable[[int], list[float] | None] | None = None,
                  attrs: Callable[[int], dict[str, Any]] | None = None) -> None:
    """Tell the study how trial ``number`` ended (the driver's one place for it:
    ``study_searcher.StudySearcher`` and, for PBT, ``pbt_scheduler.PopulationRecorder``).
    A trial that ends while the driver stops, without a final result, is not
    told: it stays RUNNING, and the next resume continues it. ``attrs`` gives
    user attributes to store on the trial first (a PBT member's schedule)."""
    final = bool(result) and (result.get("done") or result.get("pruned")
                              or result.get("diverged"))
    if stopping and not final or (result or {}).get("storage_error"):
        return  # interrupted: stays RUNNING, and the next resume continues it
    frozen = study._storage.get_trial(
        study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    if frozen.state.is_finished():
        return
    state, values = outcome(spec, result, error=error)
    deployed = told(number) if state == TS.COMPLETE and told else None
    if deployed is not None:
        values = deployed if spec.multi_objective else deployed[0]
    if spec.constraints and state in (TS.COMPLETE, TS.PRUNED):
        # No values (no checkpoint to read them from): infeasible, never NaN.
        found = (constrained(number) if constrained else None) or [math.inf] * len(spec.constraints)
        trial = optuna.trial.Trial(study, frozen._trial_id)
        for constraint, value in zip(spec.constraints, found):
            trial.set_constraint(str(constraint), float(value))
    for key, value in (attrs(number) if attrs else {}).items():
        study._storage.set_trial_user_attr(frozen._trial_id, key, value)
    try:
        study.tell(number, values, state=state, skip_if_finished=True)
    except (ValueError, RuntimeError) as err:  # e.g. a NaN objective
        log.warning("trial %s: telling the study failed (%s); recording it as failed", number, err)
        study.tell(number, state=TS.FAIL, skip_if_finished=True)


def replay_of(user_attrs: dict[str, Any]) -> dict[str, Any]:
    return {REPLAY: user_attrs[REPLAY]} if user_attrs.get(REPLAY) else {}


def run_tags(user_attrs: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in user_attrs.items() if k.startswith(TAG_PREFIX)}


def outcome(spec: SearchSpec, result: dict | None, *, error: bool):
    """(state, values) to tell the study for a trial's final result."""
    if error or not result or result.get("diverged"):
        return TS.FAIL, None
    if result.get("pruned"):
        return TS.PRUNED, None
    values = [result.get(o.metric) for o in spec.objectives]
    if any(v is None for v in values):
        return TS.FAIL, None
    return TS.COMPLETE, values if spec.multi_objective else values[0]


def unfinished_numbers(study: optuna.Study) -> list[int]:
    """Trials a stopped driver left RUNNING: the next run continues them."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,))]


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def fail_stale_trials(study: optuna.Study, keep_numbers: set[int]) -> int:
    """Trials still RUNNING after every Tune trial ended normally (not stopped):
    nothing will ever finish them."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
        if t.number not in keep_numbers:
            study.tell(t.number, state=TS.FAIL, skip_if_finished=True)
            n += 1
    return n
