"""Ray Tune's population-based schedulers, as a search runs them.

Tune's ``PopulationBasedTraining`` (and ``PB2``) decide, every
``perturbation_interval`` epochs (Tune's ``time_attr`` is our ``epoch``, so a
member resumed at epoch 6 is at epoch 6 for the scheduler too), which member
exploits which. Two things are ours:

- **Identity.** Ray's explore copies the donor's whole config; here the
  recipient keeps its own Optuna trial, MLflow run and folder (the identity
  keys of its config), and takes the donor's values of every searched key
  (its weights' architecture) with the mutated keys explored and clipped to
  the space's bounds.
- **The study.** Tune's PBT takes no search algorithm, so the study's
  members are asked up front (:func:`population`, Optuna's random sampler),
  and :class:`PopulationRecorder`, a Tune callback, tells the study each
  member's end, as ``StudySearcher`` does for other searches.

Ray's PBT draws its choices from Python's ``random`` (PB2 also from NumPy):
the driver seeds both from ``search.seed`` before Tune starts.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from stain_search.pbt import clip
from stain_search.spaces import SearchSpec
from stain_search.study import (OPTUNA_NUMBER, OPTUNA_TRIAL_ID, PARAMS, TAGS, create_study,
                                run_tags, suggest, tell_finished)

IDENTITY = (OPTUNA_TRIAL_ID, OPTUNA_NUMBER, TAGS)


class _Members:
    """Keeps the recipient's identity and the space's bounds through an exploit,
    and never exploits at a member's last epoch."""

    bounds: dict[str, tuple[float, float]] = {}
    last_epoch: int | None = None  # the members' train.epochs

    def on_trial_result(self, tune_controller, trial, result):
        # An exploit at the last epoch would end the member on a copy of its
        # donor's checkpoint with no epoch of its own after it: the same weights
        # and score twice in the population, and no checkpoint of the member's own
        # for the deploy rule to pick (a copy counts as its donor's). Synchronous
        # PBT too: every member skips its last epoch's barrier, so none waits at it.
        if self.last_epoch is not None and result.get(self._time_attr, 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def _get_new_config(self, trial, trial_to_clone):
        # The one extension point Ray's PB2 itself overrides: the donor's
        # config, explored. Everything else of the scheduler is Ray's.
        new, operations = super()._get_new_config(trial, trial_to_clone)
        new = copy.deepcopy(new)
        for key in IDENTITY:
            new[key] = copy.deepcopy(trial.config.get(key))
        for key, (low, high) in self.bounds.items():
            new[PARAMS][key] = clip(float(new[PARAMS][key]), low, high)
        return new, operations


class MemberPBT(_Members, PopulationBasedTraining):
    pass


class MemberPB2(_Members, PB2):
    pass


def build_scheduler(spec: SearchSpec):
    """The scheduler of a ``pbt``/``pb2`` space (metric and mode: the Tuner's)."""
    by_key = {p.key: p for p in spec.params}
    bounds = {k: (float(by_key[k].low), float(by_key[k].high)) for k in spec.mutate}
    settings = spec.search.pbt
    common = dict(time_attr="epoch", perturbation_interval=settings.perturbation_interval,
                  quantile_fraction=settings.quantile_fraction, synch=settings.synch,
                  # epochs that are not evaluated carry no metric: not an error
                  require_attrs=False)
    if spec.search.algorithm == "pb2":
        scheduler = MemberPB2(hyperparam_bounds={PARAMS: {k: list(b) for k, b in bounds.items()}},
                              **common)
    else:
        domain = {k: (tune.loguniform if by_key[k].distribution == "loguniform" else tune.uniform)(*b)
                  for k, b in bounds.items()}
        scheduler = MemberPBT(hyperparam_mutations={PARAMS: domain},
                              resample_probability=settings.resample_probability, **common)
    scheduler.bounds = bounds
    scheduler.last_epoch = spec.base_config().train.epochs
    return scheduler


def seed_schedulers(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)


def member_config(trial: optuna.trial.FrozenTrial | optuna.Trial, params: dict[str, Any]) -> dict:
    return {PARAMS: dict(params), OPTUNA_TRIAL_ID: trial._trial_id, OPTUNA_NUMBER: trial.number,
            TAGS: run_tags(trial.user_attrs)}


def population(study: optuna.Study, spec: SearchSpec, *, resumed: list[int], new: int,
               current: Callable[[int], dict[str, Any] | None]) -> list[dict]:
    """Every member's first Tune config: interrupted members first, each with
    the values it trained with last (``current``: its newest checkpoint's; its
    initial draw if it has none), then ``new`` members asked of the study."""
    configs = []
    for number in resumed:
        frozen = study.trials[number]
        configs.append(member_config(frozen, current(number) or frozen.params))
    for _ in range(new):
        trial = study.ask()
        configs.append(member_config(trial, suggest(trial, spec.params)))
    return configs


class PopulationRecorder(Callback):
    """Tells the study how each member ended (Tune's PBT takes no searcher):
    its deploy-rule value, constraints, and ``attrs`` (its schedule)."""

    def __init__(self, spec: SearchSpec, study_path: Path, *, stopping: Callable[[], bool],
                 on_result: Callable[[str, dict], None] | None = None,
                 told=None, constrained=None, attrs=None):
        self.spec, self.study_path = spec, Path(study_path)
        self.stopping, self.on_result = stopping, on_result
        self.told, self.constrained, self.attrs = told, constrained, attrs
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # Tune pickles its callbacks with the Tuner
        state.update(_study=None, stopping=lambda: False, on_result=None, told=None,
                     constrained=None, attrs=None)
        return state

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = create_study(self.spec, self.study_path)
        return self._study

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.on_result is not None:
            self.on_result(trial.trial_id, result)

    def _tell(self, trial, *, error: bool) -> None:
        number = trial.config.get(OPTUNA_NUMBER)
        if number is None:
            return
        tell_finished(self.study, self.spec, int(number), trial.last_result or None,
                      error=error, stopping=self.stopping(), told=self.told,
                      constrained=self.constrained, attrs=self.attrs)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._tell(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._tell(trial, error=True)


# --- the driver's side ---------------------------------------------------------------------
# Study user attributes of a finished member: what the study holds for PBT beside its draw.
SCHEDULE_ATTR, FINAL_ATTR, EXPLOITS_ATTR = "pbt.schedule", "pbt.final_params", "pbt.exploits"


def current_values(sdir, spec: SearchSpec, number: int) -> dict[str, Any] | None:
    """The searched keys' values member ``number`` trained with last (its
    newest checkpoint's, after any exploit); None before its first checkpoint."""
    from stain_search.checkpoint import latest_checkpoint, read_meta
    from stain_search.config import flat_config
    from stain_search.mirror import pull_trial

    newest = latest_checkpoint(pull_trial(sdir, number))
    if newest is None:
        return None
    config = flat_config(read_meta(newest).get("config") or {})
    keys = [p.key for p in spec.params]
    return {k: config[k] for k in keys if k in config}


def member_attrs(sdir, spec: SearchSpec, number: int) -> dict[str, Any]:
    """What the study keeps of a finished member beside its initial draw: the
    schedule of its deploy-rule checkpoint, its final values, its exploits."""
    from stain_search.checkpoint import read_meta
    from stain_search.deploy.select import trial_best
    from stain_search.mirror import pull_trial
    from stain_search.pbt import schedule_of

    folder = pull_trial(sdir, number)
    best = trial_best(folder, [(o.metric, o.mode) for o in spec.objectives], spec.constraints)
    if best is None:
        return {}
    schedule = schedule_of(read_meta(best.checkpoint))
    mine = [s for s in schedule if s.get("trial") == folder.name and s.get("donor")]
    return {SCHEDULE_ATTR: schedule, FINAL_ATTR: current_values(sdir, spec, number) or {},
            EXPLOITS_ATTR: len(mine)}


def population_tuning(spec: SearchSpec, study: optuna.Study, sdir, *, resumed: list[int],
                      new: int, max_concurrent: int, stopping: Callable[[], bool],
                      on_result=None, told=None, constrained=None):
    """Tune's search algorithm, scheduler, study recorder and param_space for a
    PBT/PB2 search."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    configs = population(study, spec, resumed=resumed, new=new,
                         current=lambda n: current_values(sdir, spec, n))
    seed_schedulers(spec.search.seed + len(study.trials))
    search_alg = BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=max_concurrent)
    recorder = PopulationRecorder(spec, sdir.study_journal, stopping=stopping,
                                  on_result=on_result, told=told, constrained=constrained,
                                  attrs=lambda n: member_attrs(sdir, spec, n))
    return search_alg, build_scheduler(spec), recorder, template(configs)


def template(configs: list[dict]) -> dict:
    """Tune's ``param_space`` for preset configs: every path they set, no value
    (Tune requires each preset key to be in the space; nothing is sampled)."""
    out: dict = {}
    for config in configs:
        for key, value in config.items():
            if isinstance(value, dict) and value:
                out[key] = {**(out.get(key) or {}), **template([value])}
            else:
                out.setdefault(key, None)
    return out
