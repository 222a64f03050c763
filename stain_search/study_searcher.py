"""The Ray Tune searcher backed by the search's Optuna study (ask/tell): the one
place where Optuna meets Ray Tune. Everything else about the study is in
``stain_search.study``, which imports no Ray, so the readers never load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import optuna
from ray.tune.search import Searcher

from stain_search.spaces import SearchSpec
from stain_search.study import (OPTUNA_NUMBER, OPTUNA_TRIAL_ID, PARAMS, TAGS, create_study,
                                replay_of, run_tags, suggest, tell_finished)


class StudySearcher(Searcher):
    """A Ray Tune Searcher backed by a persistent Optuna study (ask/tell).

    ``resume`` lists study trials (numbers) to continue before asking for new
    ones. ``stopping()`` says the driver is stopping (Ctrl-C, SIGTERM, a full
    disk): trials that end then without a final result are not told to the
    study, so they stay RUNNING and the next resume continues them.
    ``on_result`` sees every result first (the driver watches for storage
    errors and progress there). ``told`` gives, for a finished trial's number,
    the objective values to tell the study instead of its last result: the
    driver passes the deploy rule's values (the trial's best kept checkpoint),
    so the sampler learns the same quantity the user deploys by. ``constrained``
    gives, for a space with constraints, the trial's constraint values from that
    same checkpoint (Optuna's convention: ≤ 0 holds), set on the trial with
    ``Trial.set_constraint`` before it is told (the samplers read them)."""

    def __init__(self, spec: SearchSpec, study_path: Path, *, resume: list[int] = (),
                 stopping: Callable[[], bool] = lambda: False,
                 on_result: Callable[[str, dict], None] | None = None,
                 told: Callable[[int], list[float] | None] | None = None,
                 constrained: Callable[[int], list[float] | None] | None = None):
        first = spec.objectives[0]
        super().__init__(metric=first.metric, mode=first.mode)
        self.spec = spec
        self.study_path = Path(study_path)
        self.resume = list(resume)
        self.stopping = stopping
        self.on_result = on_result
        self.told = told
        self.constrained = constrained
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
        state["stopping"] = None
        state["on_result"] = None
        state["told"] = None
        state["constrained"] = None
        return state

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.stopping():
            # FINISHED, not None ("not ready yet"): with no trial running, Tune
            # would otherwise wait up to 10 minutes for one before it stops.
            return Searcher.FINISHED
        if self.resume:
            number = self.resume.pop(0)
            frozen = self.study.trials[number]
            self.numbers[trial_id] = number
            return {PARAMS: dict(frozen.params), OPTUNA_TRIAL_ID: frozen._trial_id,
                    OPTUNA_NUMBER: number, TAGS: run_tags(frozen.user_attrs),
                    **replay_of(frozen.user_attrs)}
        trial = self.study.ask()
        values = suggest(trial, self.spec.params)
        self.numbers[trial_id] = trial.number
        return {PARAMS: values, OPTUNA_TRIAL_ID: trial._trial_id, OPTUNA_NUMBER: trial.number,
                TAGS: run_tags(trial.user_attrs), **replay_of(trial.user_attrs)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.on_result is not None:
            self.on_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        number = self.numbers.get(trial_id)
        if number is None:
            return  # never suggested here
        if result and self.on_result is not None:
            self.on_result(trial_id, result)
        tell_finished(self.study, self.spec, number, result, error=error,
                      stopping=self.stopping(), told=self.told, constrained=self.constrained)

    # Tune checkpoints its searcher with the experiment. The study is the
    # search's record; this only keeps Tune's trial ids → Optuna numbers.
    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"numbers": self.numbers}))

    def restore(self, checkpoint_path: str) -> None:
        self.numbers = dict(json.loads(Path(checkpoint_path).read_text()).get("numbers", {}))
