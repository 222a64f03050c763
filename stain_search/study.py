"""All Optuna glue, in one module: the study, its sampler and pruner, and the
Ray Tune searcher that asks it for trials.

Why not Ray's own OptunaSearch: it records scheduler-stopped trials as
COMPLETE with their truncated score (misleading TPE), never uses Optuna's
pruners, and keeps its study in memory unless given a storage. Here the
study lives in a journal file beside the search (``optuna-dashboard
study.journal`` opens it), early stopping is Optuna pruning decided from
that same study by the trial's rank-0 worker, and a pruned trial is told to
the study as PRUNED — never as a complete result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search import Searcher

from stain_search.spaces import SearchSpec, suggest

log = logging.getLogger(__name__)

# Keys the searcher adds to each trial's config beside the suggested values.
OPTUNA_TRIAL_ID, OPTUNA_NUMBER, PARAMS = "optuna_trial_id", "optuna_number", "params"


def storage(path: Path) -> optuna.storages.JournalStorage:
    # File-locked journal: safe for the driver and every trial's worker at once.
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


SAMPLERS = {
    "tpe": lambda seed, multi: optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, multivariate=True, n_startup_trials=4),
    "random": lambda seed, multi: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed, multi: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
}


def make_pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    es = spec.search.early_stopping
    return {
        "none": lambda: optuna.pruners.NopPruner(),
        # Median rule (Golovin et al., 2017): stop a trial whose best-so-far is
        # worse than the median of others' at the same epoch.
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=es.min_trials,
                                                      n_warmup_steps=es.grace_period),
        # Asynchronous successive halving (Li et al., 2020), Optuna's version.
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=es.grace_period, reduction_factor=2),
    }[es.pruner]()


def create_study(spec: SearchSpec, path: Path) -> optuna.Study:
    fresh = not Path(path).exists()
    # A resumed search must not replay the first run's random draws (it would
    # suggest the same points again): offset the seed by the trials so far.
    done = 0 if fresh else len(optuna.load_study(study_name=spec.name,
                                                 storage=storage(path)).trials)
    sampler = SAMPLERS[spec.search.algorithm](spec.search.seed + done, spec.multi_objective)
    study = optuna.create_study(
        study_name=spec.name, storage=storage(path), sampler=sampler,
        pruner=make_pruner(spec), load_if_exists=True,
        directions=["minimize" if o.mode == "min" else "maximize" for o in spec.objectives])
    if fresh:  # a resumed study already holds them
        for point in spec.search.enqueue or []:
            study.enqueue_trial(dict(point))
    return study


def load_study(spec: SearchSpec, path: Path) -> optuna.Study:
    return optuna.load_study(study_name=spec.name, storage=storage(path),
                             pruner=make_pruner(spec))


def pruning_metric(spec: SearchSpec) -> str:
    # Reported every epoch even without a pruner: the study then holds each
    # trial's learning curve (optuna-dashboard, analysis); NopPruner never prunes.
    return spec.search.early_stopping.metric or spec.objectives[0].metric


class TrialPruning:
    """Used by a trial's rank-0 worker: report an epoch, ask whether to stop."""

    def __init__(self, spec: SearchSpec, path: Path, trial_id: int):
        self.metric = pruning_metric(spec)
        self.study = load_study(spec, path)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.multi = spec.multi_objective

    def should_prune(self, metrics: dict[str, Any], *, epoch: int) -> bool:
        if self.metric not in metrics:
            return False
        if self.multi:
            # Optuna cannot prune multi-objective studies through trial.report;
            # the median rule is applied on the chosen metric's history instead.
            return False
        self.trial.report(float(metrics[self.metric]), step=epoch)
        return self.trial.should_prune()


class StudySearcher(Searcher):
    """A Ray Tune Searcher backed by a persistent Optuna study (ask/tell)."""

    def __init__(self, spec: SearchSpec, study_path: Path):
        first = spec.objectives[0]
        super().__init__(metric=first.metric, mode=first.mode)
        self.spec = spec
        self.study_path = Path(study_path)
        self._study: optuna.Study | None = None
        self.numbers: dict[str, int] = {}  # Tune trial id → Optuna trial number

    @property
    def study(self) -> optuna.Study:
        if self._study is None:  # opened lazily: Tune pickles the searcher
            self._study = create_study(self.spec, self.study_path)
        return self._study

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_study"] = None  # file handles and locks do not travel
        return state

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        trial = self.study.ask()
        values = suggest(trial, self.spec.params)
        self.numbers[trial_id] = trial.number
        return {PARAMS: values, OPTUNA_TRIAL_ID: trial._trial_id, OPTUNA_NUMBER: trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)

    def _remember(self, trial_id: str, result: dict | None) -> int | None:
        # After a driver crash the restored searcher may predate this trial's
        # suggestion; Tune's results carry the trial config, which names it.
        number = (result or {}).get("config", {}).get(OPTUNA_NUMBER)
        if number is not None and trial_id not in self.numbers:
            self.numbers[trial_id] = int(number)
        return self.numbers.get(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        number = self._remember(trial_id, result)
        if number is None:
            return  # never suggested here; fail_stale_trials settles it
        frozen = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number))
        if frozen.state.is_finished():
            return
        state, values = outcome(self.spec, result, error=error)
        try:
            self.study.tell(number, values, state=state, skip_if_finished=True)
        except (ValueError, RuntimeError) as err:  # e.g. a NaN objective
            log.warning("trial %s: telling the study failed (%s); recording it as failed", number, err)
            self.study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)

    def get_state(self) -> dict:
        return {"numbers": self.numbers}

    def set_state(self, state: dict) -> None:
        self.numbers = dict(state.get("numbers", {}))

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


def outcome(spec: SearchSpec, result: dict | None, *, error: bool):
    """(state, values) to tell the study for a trial's final result."""
    TS = optuna.trial.TrialState
    if error or not result or result.get("diverged"):
        return TS.FAIL, None
    if result.get("pruned"):
        return TS.PRUNED, None
    values = [result.get(o.metric) for o in spec.objectives]
    if any(v is None for v in values):
        return TS.FAIL, None
    return TS.COMPLETE, values if spec.multi_objective else values[0]


def fail_stale_trials(study: optuna.Study, keep_numbers: set[int]) -> int:
    """Trials asked for by a driver that died before Tune recorded them."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number not in keep_numbers:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            n += 1
    return n
