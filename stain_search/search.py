"""`stain-search run`: the search driver (thin: it validates, records and starts).

A search is Ray Tune trials suggested by an Optuna study (``stain_search.study``),
each trial one CycleGAN training (``stain_search.trainables.cyclegan``: in the
Tune trial process, or a Ray Train TorchTrainer for data-parallel trials),
everything tracked in MLflow (``stain_search.tracking``). The folder it keeps
is described once, in ``stain_search.search_dir``.

The driver, top to bottom:

1. Validates before Ray starts, writing nothing: the space, the folder (another
   search's? a live driver?), every image (``stain_search.preflight``), the
   storage and the tracking store.
2. Records the search (``search.json``: its id, identity and budget), takes the
   driver lock, opens the MLflow parent run, resolves the evaluation features
   once, and builds the one :class:`~stain_search.context.TrialContext` every
   trial receives.
3. Runs Tune: first the study's unfinished trials (a resumed search continues
   them), then new ones up to ``num_samples`` finished trials; a new search
   with ``--warm-start OTHER`` first re-trains OTHER's best points
   (``stain_search.warm_start``). Each finished trial is told its deploy-rule
   values and, where the space has ``constraints:``, their values too (Optuna's
   ``Trial.set_constraint``, an MLflow ``stain_search.feasible`` tag).
4. Ctrl-C, SIGTERM or a full disk stop it cleanly (``stain_search.stopping``):
   interrupted trials stay resumable in the study and in MLflow.
5. Names the checkpoint to deploy (``stain_search.deploy.select``) in
   ``summary.json`` and the closing lines.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback

from stain_search import cluster, tracking
from stain_search.cluster import ray_log_dir, trial_resources
from stain_search.config import Config, check_name
from stain_search.context import Pruning, TrialContext
from stain_search.errors import ConfigError, SearchInterrupted, StorageFull
from stain_search.console import SearchConsole
from stain_search.lock import DriverLock
from stain_search.mirror import JournalSync, pull_trial
from stain_search.study_proxy import requested_port
from stain_search.plan import describe
from stain_search.preflight import (check_search_dir, check_shared_storage, resolve_budget,
                                    verify_data)
from stain_search.search_dir import (STORAGE_ENV, Budget, SearchDir, SearchRecord, trial_name)
from stain_search.spaces import SearchSpec, load_space
from stain_search.weights import resolve_eval
from stain_search.summary import summary_record
from stain_search.stopping import (StopCallback, Stopper, is_storage_error,
                                   storage_error_message)

EXPERIMENT_STATE_PERIOD_S = 1


@dataclass
class SearchOutcome:
    """What a finished driver run hands back to the command line."""

    spec: SearchSpec
    search_dir: SearchDir
    record: SearchRecord
    tracking_uri: str
    selection: Any  # stain_search.deploy.select.Selection
    elapsed_s: float


# --- 2. Ray ---------------------------------------------------------------------------

def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def quiet_libraries() -> None:
    """The search's console speaks for the search: MLflow's and Optuna's
    informational logs, and Tune's experiment box (its newer reporter prints it
    at any verbosity), stay quiet."""
    import logging

    import mlflow  # noqa: F401 - it configures its loggers on import: do that first
    import optuna

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(address: str | None, *, verbose: int = 0) -> bool:
    """Connect to a cluster (--address / RAY_ADDRESS) or start a local one; True
    when this call did. Quiet unless ``verbose``: the trials' own output goes to
    Ray's log files."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = cluster.address_of(address)
    quiet = {} if verbose else {"logging_level": logging.WARNING}
    if address:  # the driver's Ray Train settings reach trials on every node
        env = cluster.forwarded_env()
        ray.init(address=address, log_to_driver=bool(verbose),
                 **({"runtime_env": {"env_vars": env}} if env else {}), **quiet)
    else:
        # A private local cluster: no token auth needed, no dashboard to start.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=bool(verbose),
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}, **quiet)
    return True


def tune_trial_name(trial) -> str:
    # Short and deterministic (the default embeds every config value).
    return f"tune_{trial.trial_id}"


def next_tune_run(sdir: SearchDir) -> str:
    """Each driver run gets its own Tune experiment folder (logs only)."""
    return f"run-{sdir.tune_runs() + 1}"


class ParentProgress(Callback):
    """The search's progress as one chart in MLflow: the best objective value
    any trial has reported, logged on the parent run at each finished trial."""

    def __init__(self, client, parent_run_id: str, objective, *, finished_before: int):
        self.client, self.parent, self.objective = client, parent_run_id, objective
        self.finished = finished_before
        self.best: float | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["client"] = None  # Tune pickles its callbacks with the Tuner
        return state

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.objective.metric)
        if isinstance(value, (int, float)) and value == value:
            better = min if self.objective.mode == "min" else max
            self.best = value if self.best is None else better(self.best, value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        if self.best is not None and self.client is not None:
            tracking.log_best_so_far(self.client, self.parent, self.objective.metric,
                                     self.best, step=self.finished)


# --- the driver -------------------------------------------------------------------------

def run_search(space: str | Path, *, data: str | None = None, name: str | None = None,
               storage: str | Path | None = None, tracking_uri: str | None = None,
               address: str | None = None, resume: bool = False,
               num_samples: int | None = None, max_concurrent: int | None = None,
               profile: str | None = None, warm_start: str | None = None,
               shared_fs: bool = False, overrides: dict[str, Any] | None = None,
               profile_by: str = "--profile",
               verbose: int = 1, live: bool = False, say=None) -> SearchOutcome:
    """Run (or resume) a search. ``verbose`` 0 shows the search's own console
    (``stain_search.console``: a live view if ``live``, else a line per trial)
    through ``say`` (print); 1 or more, Ray Tune's tables and every trial's
    output, as Ray prints them. ``warm_start``: the name of a finished search in
    the same ``storage`` whose best trials a new search starts with. ``shared_fs``:
    a local ``storage`` that every node of a multi-node cluster sees."""
    if name:
        check_name(name, what="--name")
    spec = load_space(space, data=data, profile=profile, overrides=overrides,
                      profile_by=profile_by)
    if name:
        spec.name = name
    source = "--storage" if storage else "the space's storage:" if spec.storage else \
        f"${STORAGE_ENV}" if os.environ.get(STORAGE_ENV) else "the default storage"
    storage = storage or spec.storage
    return search_spec(spec, SearchDir.of(storage, spec.name), tracking_uri=tracking_uri,
                       storage_source=source,
                       address=address, resume=resume, num_samples=num_samples,
                       max_concurrent=max_concurrent, verbose=verbose, live=live, say=say,
                       shared_fs=shared_fs,
                       warm_start=SearchDir.of(storage, warm_start).pull() if warm_start else None)


@dataclass(frozen=True)
class ParentRun:
    """How the search's MLflow parent run is made (a confirmation nests its own
    under the search it confirms)."""

    nested_in: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    # What continues it, in the stop messages (default: `stain-search resume NAME`)
    resume_command: str | None = None

    def continued_by(self, name: str) -> str:
        return self.resume_command or f"stain-search resume {name}"


def search_spec(spec: SearchSpec, sdir: SearchDir, *, tracking_uri: str | None = None,
                address: str | None = None, resume: bool = False,
                num_samples: int | None = None, max_concurrent: int | None = None,
                verbose: int = 1, live: bool = False, say=None,
                parent_run: ParentRun = ParentRun(),
                warm_start: SearchDir | None = None, shared_fs: bool = False,
                storage_source: str = "--storage") -> SearchOutcome:
    """:func:`run_search` on a parsed space, in the folder ``sdir``; ``warm_start``:
    the folder of the search a new one starts from; ``storage_source``: where
    the storage was named, for its errors."""
    say = say or (lambda line: None)
    if not verbose:
        quiet_libraries()
    if cluster.address_of(address):  # nothing listens there: one line in seconds, not minutes
        cluster.probe(cluster.address_of(address))
    # Pre-flight, writing nothing: the storage answers, the folder is not
    # another search's, no driver runs it, every image decodes, and the
    # tracking store answers.
    if sdir.remote is not None:
        sdir.remote.check_bucket()
        sdir.pull()
    saved = check_search_dir(spec, sdir, resume=resume)
    sdir.check_writable(source=storage_source)
    budget = resolve_budget(spec, saved, num_samples=num_samples, max_concurrent=max_concurrent)
    spec.search.num_samples, spec.search.max_concurrent = budget.num_samples, budget.max_concurrent
    if skipped := verify_data(spec):
        say(skipped)
    # The evaluation features, resolved once here: every trial then uses exactly
    # these, and no worker looks for weights or decides differently on a node
    # with other files.
    base_config = resolve_eval(spec.base_config())
    uri = tracking.resolve_tracking_uri(tracking_uri)
    warm = None
    if warm_start is not None and saved is not None:
        say(f"--warm-start {warm_start.name} ignored: search {spec.name!r} is resumed and its "
            f"study already holds its first trials")
    elif warm_start is not None:  # a missing search: one line, nothing written
        from stain_search.warm_start import plan_warm_start

        warm = plan_warm_start(spec, warm_start, limit=budget.num_samples, tracking_uri=uri)
    requested_port()  # a bad STAIN_SEARCH_STUDY_PORT: one line, here, nothing written
    # The cluster, still writing nothing: one that can never hold a trial is one
    # line, not a search that hangs; `fits` trials run at once (stain_search.cluster).
    started = init_ray(address, verbose=verbose) if cluster.address_of(address) else False
    try:
        fits = cluster.capacity(spec, say=say)
        if ray.is_initialized():
            check_shared_storage(sdir, shared_fs=shared_fs)
        client = tracking.client(uri)  # an unreachable store fails here, before anything is written
        if sdir.remote is not None:
            sdir.remote.check_writable()  # refused credentials: here, with nothing written
        with DriverLock(sdir.lock_file, sdir.driver_file, name=spec.name):
            if saved is None and sdir.record_file.exists():  # a driver started in the same instant
                raise ConfigError(f"{sdir.where}: search {spec.name!r} was started by another "
                                  f"driver a moment ago; `stain-search status {spec.name}` "
                                  f"shows it, --name starts a new one")
            return _drive(spec, sdir, saved, budget, base_config, client, uri,
                          address=address, verbose=verbose, live=live, say=say,
                          parent_run=parent_run, warm=warm, fits=fits)
    except OSError as err:
        if is_storage_error(err):
            raise StorageFull(f"search {spec.name!r}: {storage_error_message(err)} "
                              f"(`{parent_run.continued_by(spec.name)}`)") from None
        raise
    finally:
        if started:
            ray.shutdown()


def _record(spec: SearchSpec, sdir: SearchDir, saved: SearchRecord | None,
            budget: Budget, warm=None) -> SearchRecord:
    if saved is None:
        return sdir.create(spec, budget=budget, warm_start=warm.record() if warm else None)
    record = dataclasses.replace(saved, budget=budget)
    sdir.write_record(record)
    return record


def _drive(spec: SearchSpec, sdir: SearchDir, saved: SearchRecord | None, budget: Budget,
           base_config: Config, client, uri: str, *, address: str | None,
           verbose: int, live: bool, say, parent_run: ParentRun, warm=None,
           fits: int | None = None) -> SearchOutcome:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from stain_search.study import (create_study, fail_stale_trials, finished_count,
                                    serve_study, set_aside_torn_tail, unfinished_numbers)
    from stain_search.study_searcher import StudySearcher
    from stain_search.study_proxy import driver_host
    from stain_search.trainables.cyclegan import cyclegan_trial

    record = _record(spec, sdir, saved, budget, warm)
    experiment_id = tracking.get_or_create_experiment(client, spec.name, uri=uri)
    parent = tracking.start_search_run(
        client, experiment_id, search=spec.name, search_id=record.search_id,
        objective=[asdict(o) for o in spec.objectives], study=sdir.study_journal,
        search_dir=sdir.where, artifacts=[sdir.space_file, sdir.record_file],
        nested_in=parent_run.nested_in, run_name=parent_run.run_name, extra_tags=parent_run.tags)
    tracking.log_params(client, parent, {"space": str(spec.path), "git_commit": git_commit(),
                                         "num_samples": budget.num_samples,
                                         "algorithm": spec.search.algorithm,
                                         **({tracking.WARM_START: warm.source} if warm else {})}
                        if saved is None else {})
    torn = set_aside_torn_tail(sdir.study_journal)  # never append onto a partial line
    if torn:
        say(torn)
    study = create_study(spec, sdir.study_journal, warm=warm.points if warm else ())
    unfinished = unfinished_numbers(study)  # interrupted: continued first
    new = max(0, budget.num_samples - finished_count(study) - len(unfinished))
    stopper = Stopper()
    t0 = time.perf_counter()
    say(f"search {describe(spec)}")
    say(f"  {sdir.where}: " + (f"resumed, {len(unfinished)} interrupted trial(s) continue, "
                              f"{new} new" if saved is not None else f"{new} trial(s)"))
    for line in warm.lines() if warm else ():
        say(line)
    if unfinished or new:
        started = init_ray(address, verbose=verbose)
        say(f"logs: trials' output in {ray_log_dir() or 'the Ray cluster'}, Tune's in "
            f"{sdir.tune_location}")
        # Tune saves its experiment state at most every 10 s by default; its
        # state is a few KiB: every second costs nothing.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))

        def on_result(trial_id: str, result: dict) -> None:
            if result.get("storage_error"):
                stopper.request("storage", str(result["storage_error"]))

        def constrained(number: int) -> list[float] | None:
            values = constraint_values(sdir, spec, number)
            if values is not None:  # the run shows it too
                tracking.mark_feasibility(client, experiment_id, search_id=record.search_id,
                                          trial=trial_name(number), values=values)
            return values

        limit = min(budget.max_concurrent, fits or budget.max_concurrent)
        scheduler, param_space = None, None
        if spec.population_based:  # Tune's PBT/PB2 (stain_search.pbt_scheduler)
            from stain_search.pbt_scheduler import population_tuning

            search_alg, scheduler, recorder, param_space = population_tuning(
                spec, study, sdir, resumed=unfinished, new=new, max_concurrent=limit,
                stopping=lambda: stopper.stopping, on_result=on_result,
                told=lambda number: deploy_values(sdir, spec, number),
                constrained=constrained if spec.constraints else None)
        else:
            search_alg = ConcurrencyLimiter(StudySearcher(
                spec, sdir.study_journal, resume=unfinished,
                stopping=lambda: stopper.stopping, on_result=on_result,
                told=lambda number: deploy_values(sdir, spec, number),
                constrained=constrained if spec.constraints else None), max_concurrent=limit)
        # The study, served to the trials on every node while Tune runs (below).
        server = serve_study(sdir.study_journal, name=spec.name, host=driver_host(private=started))
        ctx = TrialContext(search=spec.name, search_id=record.search_id, search_dir=sdir,
                           tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent,
                           base_config=base_config, objectives=tuple(spec.objectives),
                           resources=spec.resources, study=server.access,
                           pruning=Pruning.of(spec.search.early_stopping, spec.objectives),
                           mutate=spec.mutate)
        trainable = tune.with_resources(tune.with_parameters(cyclegan_trial, ctx=ctx),
                                        trial_resources(spec.resources))
        first = spec.objectives[0]
        in_trial = spec.resources.resolved_executor == "in_trial"
        states = [t.state.name for t in study.trials]
        callbacks = [StopCallback(stopper),
                     ParentProgress(client, parent, first, finished_before=finished_count(study)),
                     *([recorder] if spec.population_based else [])]
        if not verbose:
            callbacks.append(SearchConsole(
                name=spec.name, objectives=spec.objectives, num_samples=budget.num_samples,
                max_concurrent=budget.max_concurrent, epochs=base_config.train.epochs,
                done_before={"complete": states.count("COMPLETE"),
                             "pruned": states.count("PRUNED"), "failed": states.count("FAIL")},
                live=live))
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=search_alg, scheduler=scheduler,
                num_samples=len(unfinished) + new, metric=first.metric, mode=first.mode,
                # in_trial: the next trial runs in the finished trial's process
                # (torch, CUDA context and data already loaded): ~5.7 s less per
                # trial on 2 CPU cores (bench/overhead.py).
                reuse_actors=in_trial,
                trial_name_creator=tune_trial_name, trial_dirname_creator=tune_trial_name),
            run_config=tune.RunConfig(
                name=next_tune_run(sdir), storage_path=sdir.tune_location,
                callbacks=callbacks,
                # PBT exploits through members' pointer checkpoints (a few bytes
                # each): Tune keeps every one. With num_to_keep, a donor's that an
                # exploit shares is deleted twice, and Tune logs errors.
                # in_trial: Tune restarts a lost trial (from its folder's
                # checkpoint); ray_train: Ray Train restarts lost workers.
                failure_config=tune.FailureConfig(
                    max_failures=spec.resources.max_failures if in_trial else 0,
                    fail_fast=False),
                verbose=verbose))
        try:
            with stopper, JournalSync(sdir), server:
                if not stopper.stopping:
                    tuner.fit()
        except BaseException:
            tracking.end_search_run(client, parent, status="FAILED")
            raise
        finally:
            for callback in callbacks:
                if isinstance(callback, SearchConsole):
                    callback.close()
            if started:
                ray.shutdown()
    elapsed = time.perf_counter() - t0
    resume = parent_run.continued_by(spec.name)
    if stopper.stopping:
        tracking.end_search_run(client, parent, status="KILLED")
        if stopper.reason.kind == "storage":
            raise StorageFull(f"search {spec.name!r} stopped: {stopper.reason.detail} "
                              f"(`{resume}`)")
        raise SearchInterrupted(spec.name, stopper.reason.detail, resume)
    # Every Tune trial ended normally: what is still RUNNING can never finish.
    fail_stale_trials(study, keep_numbers=set())
    tracking.fail_orphans(client, experiment_id, search=spec.name, search_id=record.search_id)
    selection = deploy_selection(sdir.pull(), uri)
    summary = summary_record(selection, elapsed)
    sdir.write_summary(summary)
    tracking.end_search_run(client, parent, summary=summary)
    return SearchOutcome(spec=spec, search_dir=sdir, record=record, tracking_uri=uri,
                         selection=selection, elapsed_s=elapsed)


# --- 5. the checkpoint to deploy ------------------------------------------------------------

def deployed_in(sdir: SearchDir, spec: SearchSpec, number: int):
    """The checkpoint the deploy rule would pick in trial ``number`` (its best
    kept epoch that meets the space's constraints, not its last)."""
    from stain_search.deploy.select import trial_best

    return trial_best(pull_trial(sdir, number), [(o.metric, o.mode) for o in spec.objectives],
                      spec.constraints)


def deploy_values(sdir: SearchDir, spec: SearchSpec, number: int) -> list[float] | None:
    """What the study is told for a finished trial: the objective values of
    :func:`deployed_in`, so the sampler learns the quantity the user deploys by."""
    best = deployed_in(sdir, spec, number)
    return None if best is None else best.values([(o.metric, o.mode) for o in spec.objectives])


def constraint_values(sdir: SearchDir, spec: SearchSpec, number: int) -> list[float] | None:
    """The space's constraints on the same checkpoint :func:`deploy_values` reads
    (Optuna's convention: ≤ 0 where one holds); None without a checkpoint."""
    best = deployed_in(sdir, spec, number)
    return None if best is None else [c.violation(best.metrics) for c in spec.constraints]


def deploy_selection(sdir: SearchDir, uri: str):
    from stain_search.deploy.select import select_dir

    return select_dir(sdir, tracking_uri=uri)
