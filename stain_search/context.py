"""What a trial needs from its search, built once by the driver and passed whole.

The driver (``stain_search.search``) builds one frozen :class:`TrialContext`
and Ray pickles it to every trial (``tune.with_parameters``); a trial adds its
own part (:class:`WorkerContext`: its config, MLflow run, folder and Optuna
trial) and hands that to its workers. No trial re-reads the space file or
re-resolves anything the driver decided: the search name, the study (where
the driver serves it: :class:`StudyAccess`), the tracking ids, the
objectives, the resources, the pruning rule and the evaluation features
(the ``eval`` section of ``base_config`` is resolved before Ray starts) all
travel here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stain_search.config import Config
from stain_search.search_dir import SearchDir
from stain_search.spaces import EarlyStopping, Objective, Resources


@dataclass(frozen=True)
class Pruning:
    """How a trial's rank 0 decides to stop early (see ``stain_search.study``)."""

    pruner: str  # none | median | successive_halving
    metric: str  # the metric reported to the study every epoch
    mode: str  # its direction: min | max
    grace_period: int
    min_trials: int
    multi_objective: bool  # Pareto study: the median rule is applied by us, not Optuna

    @classmethod
    def of(cls, early: EarlyStopping, objectives: list[Objective]) -> "Pruning":
        from stain_search.evaluate import metric_directions

        metric = early.metric or objectives[0].metric
        mode = next((o.mode for o in objectives if o.metric == metric), None)
        return cls(pruner=early.pruner, metric=metric,
                   mode=mode or metric_directions().get(metric, "min"),
                   grace_period=early.grace_period, min_trials=early.min_trials,
                   multi_objective=len(objectives) > 1)


@dataclass(frozen=True)
class StudyAccess:
    """How a trial on any node reaches the search's study: the gRPC proxy the
    driver serves it with (``stain_search.study_proxy``), on the driver's Ray
    node. Decided once by the driver; a trial never looks for the journal."""

    name: str  # the study's name (the search's)
    host: str  # the driver's Ray node address (127.0.0.1 on a private local cluster)
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TrialContext:
    """The search's fixed part: the same for every trial of one driver run."""

    search: str  # the search name (also the study's and MLflow experiment's name)
    search_id: str  # tagged on every MLflow run of this search
    search_dir: SearchDir
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_config: Config  # base settings, with the evaluation features resolved
    objectives: tuple[Objective, ...]
    resources: Resources
    pruning: Pruning
    study: StudyAccess  # the study, as the driver serves it to every node
    # pbt/pb2: the keys exploits perturb (empty: not a population-based search)
    mutate: tuple[str, ...] = ()

    @property
    def first_objective(self) -> Objective:
        return self.objectives[0]


@dataclass(frozen=True)
class WorkerContext:
    """One trial's part, added by the trial's driver for its worker(s)."""

    trial: TrialContext
    config: Config  # base + this trial's suggested values
    trial_name: str  # trial_NNN
    number: int  # Optuna trial number
    study_trial_id: int  # Optuna's storage id of the trial (for pruning reports)
    run_id: str  # the trial's MLflow run
    # pbt/pb2: the member's schedule so far (stain_search.pbt), kept in every checkpoint
    schedule: tuple = ()
    # a PBT schedule this trial replays epoch by epoch (confirming a PBT search)
    replay: tuple = ()

    @property
    def trial_dir(self) -> Path:
        """Where this trial's checkpoints are written (:func:`trial_folder`)."""
        return trial_folder(self.trial, self.number)

    @property
    def trial_remote(self):
        """The trial's folder in a URI storage (None: a local storage)."""
        return self.trial.search_dir.trial_remote(self.number)


def trial_folder(trial: TrialContext, number: int) -> Path:
    """Where trial ``number`` writes its checkpoints: the search folder's trial
    folder, or with a URI storage this node's scratch (each checkpoint is
    uploaded from there, see :attr:`WorkerContext.trial_remote`)."""
    sdir = trial.search_dir
    if sdir.remote is None:
        return sdir.trial(number)
    from stain_search.storage import scratch_root

    return scratch_root() / trial.search_id / sdir.trial(number).relative_to(sdir.root)
