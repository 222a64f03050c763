"""`stain-search run`: a search = Ray Tune trials, suggested by an Optuna study,
each trial a Ray Train CycleGAN job, everything tracked in MLflow.

Everything a search writes lives in one folder:

    <storage>/<name>/
        space.yaml      the space file as given        search.json  the parsed space
        study.journal   the Optuna study (optuna-dashboard opens it)
        tune/           Ray Tune's experiment state (what --resume restores)
        trials/<trial>/checkpoint_epoch_XXXX/   the best k checkpoints per trial
        summary.json    the best trial(s) when the search ends

Validation (space, data, objective, tracking store) happens before Ray
starts, so a mistake costs a second, not a cluster start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stain_search import tracking
from stain_search.errors import ConfigError
from stain_search.spaces import Resources, SearchSpec, load_space

DEFAULT_STORAGE = "stain-search-runs"
# The trial function only waits on its TorchTrainer; the workers hold the real
# CPUs/GPUs. Ray refuses an empty request, so the driver asks for a sliver.
TRIAL_DRIVER_CPU = 0.01
EXPERIMENT_STATE_PERIOD_S = 1


@dataclass
class TrialSummary:
    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    trial: str | None
    run_id: str | None
    checkpoints: str | None


def search_dir_for(storage: str | Path | None, name: str) -> Path:
    return (Path(storage or DEFAULT_STORAGE) / name).resolve()


def spec_record(spec: SearchSpec) -> dict[str, Any]:
    """What identifies a search: resuming with a different one is refused."""
    return {"name": spec.name, "base": spec.base, "params": [asdict(p) for p in spec.params],
            "objectives": [asdict(o) for o in spec.objectives],
            "search": asdict(spec.search), "resources": asdict(spec.resources)}


def check_search_dir(spec: SearchSpec, search_dir: Path, *, resume: bool) -> bool:
    """Refuse to mix two searches in one folder; True when it already exists.
    Writes nothing (runs before the tracking store is touched)."""
    record = json.loads(json.dumps(spec_record(spec), default=str))
    saved_path = search_dir / "search.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{saved_path}: unreadable ({err}); pass --name to start a "
                              f"new search") from None
        if saved != record:
            raise ConfigError(
                f"{search_dir}: a search named {spec.name!r} already exists with a different "
                f"space; pass --name to start a new search (results are never mixed)")
        if not resume:
            raise ConfigError(f"{search_dir}: search {spec.name!r} already exists; pass "
                              f"--resume to continue it or --name to start a new one")
        return True
    if resume:
        raise ConfigError(f"{search_dir}: no search named {spec.name!r} to resume")
    return False


def prepare_search_dir(spec: SearchSpec, search_dir: Path, *, resume: bool) -> None:
    if check_search_dir(spec, search_dir, resume=resume):
        return
    record = json.loads(json.dumps(spec_record(spec), default=str))
    saved_path = search_dir / "search.json"
    search_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, search_dir / "space.yaml")
    tmp = saved_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(saved_path)


def verify_data(spec: SearchSpec) -> None:
    from stain_search.data.datasets import verify_dataset

    d = spec.base_config().data
    verify_dataset(d.path, d.layout, d.crop, eval_crop=d.eval_crop, load_size=d.load_size)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def init_ray(address: str | None) -> bool:
    """Connect to a cluster (--address / RAY_ADDRESS) or start a local one."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A private local cluster: no token auth needed, no dashboard to start.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    return True


def run_search(space: str | Path, *, data: str | None = None, name: str | None = None,
               storage: str | Path | None = None, tracking_uri: str | None = None,
               address: str | None = None, resume: bool = False,
               num_samples: int | None = None, max_concurrent: int | None = None,
               verbose: int = 1) -> list[TrialSummary]:
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from stain_search.study import StudySearcher, fail_stale_trials
    from stain_search.trainables.cyclegan import cyclegan_trial

    spec = load_space(space, data=data)
    if name:
        spec.name = name
    if num_samples is not None:
        spec.search.num_samples = num_samples
    if max_concurrent is not None:
        spec.search.max_concurrent = max_concurrent
    search_dir = search_dir_for(storage, spec.name)
    # Pre-flight, writing nothing: the folder is not another search's, every
    # image decodes, and the tracking store answers.
    check_search_dir(spec, search_dir, resume=resume)
    verify_data(spec)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)  # an unreachable store fails here, before anything is written
    prepare_search_dir(spec, search_dir, resume=resume)
    study_path = search_dir / "study.journal"
    experiment_id = tracking.get_or_create_experiment(c, spec.name, uri=uri)
    parent = tracking.start_search_run(
        c, experiment_id, search=spec.name, objective=[asdict(o) for o in spec.objectives],
        study=study_path, search_dir=search_dir,
        artifacts=[search_dir / "space.yaml", search_dir / "search.json"])
    if not resume:
        tracking.log_params(c, parent, {"space": str(spec.path), "git_commit": git_commit(),
                                        "num_samples": spec.search.num_samples,
                                        "algorithm": spec.search.algorithm})
    else:
        tracking.fail_orphans(c, experiment_id, search=spec.name)
    ctx = {"search": spec.name, "search_dir": str(search_dir),
           "space_path": str(search_dir / "space.yaml"), "data": spec.base.get("data.path"), "study_path": str(study_path), "tracking_uri": uri,
           "experiment_id": experiment_id, "parent_run_id": parent,
           "base_config": spec.base_config().to_dict(),
           "objectives": [asdict(o) for o in spec.objectives],
           "resources": asdict(spec.resources)}
    started = init_ray(address)
    # Tune saves its experiment state at most every 10 s by default; a driver
    # killed in that window forgets trials it had started (the study then
    # holds them as orphans, failed on resume). Its state is a few KiB: save
    # it every second instead (the environment can still say otherwise).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_PERIOD_S))
    try:
        searcher = StudySearcher(spec, study_path)
        tune_dir = search_dir / "tune"
        trainable = tune.with_resources(tune.with_parameters(cyclegan_trial, ctx=ctx),
                                        trial_resources(spec.resources))
        if resume and tune.Tuner.can_restore(str(tune_dir)):
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable,
                                       resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            first = spec.objectives[0]
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent),
                    num_samples=spec.search.num_samples, metric=first.metric, mode=first.mode,
                    # in_trial: the next trial runs in the finished trial's
                    # process (torch, CUDA context and data already loaded):
                    # ~5.7 s less per trial on 2 CPU cores (bench/overhead.py).
                    reuse_actors=spec.resources.resolved_executor == "in_trial",
                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(search_dir),
                    # in_trial: Tune restarts a lost trial (from its folder's
                    # checkpoint); ray_train: Ray Train restarts lost workers.
                    failure_config=tune.FailureConfig(
                        max_failures=(spec.resources.max_failures
                                      if spec.resources.resolved_executor == "in_trial" else 0),
                        fail_fast=False),
                    verbose=verbose))
        t0 = time.perf_counter()
        tuner.fit()
        elapsed = time.perf_counter() - t0
        # Every Tune trial has ended: a study trial still RUNNING was asked for
        # by a driver that died before Tune recorded it. It will never finish.
        fail_stale_trials(searcher.study, keep_numbers=set())
    except BaseException:
        tracking.end_search_run(c, parent, status="FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    summary = summarize(spec, search_dir, c, experiment_id)
    tracking.end_search_run(c, parent, summary={"best": [asdict(s) for s in summary],
                                                "elapsed_s": elapsed})
    (search_dir / "summary.json").write_text(json.dumps([asdict(s) for s in summary], indent=2))
    return summary


def trial_resources(resources: Resources) -> dict[str, float]:
    """What one Tune trial holds: the worker itself (in_trial), or only a
    sliver for the thin driver that waits on its TorchTrainer (ray_train)."""
    if resources.resolved_executor == "ray_train":
        return {"CPU": TRIAL_DRIVER_CPU}
    return {"CPU": resources.cpus_per_worker,
            **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker > 0 else {})}


def trial_name(trial) -> str:
    # Short and deterministic (the default embeds every config value).
    return f"trial_{trial.trial_id}"


def summarize(spec: SearchSpec, search_dir: Path, c, experiment_id: str) -> list[TrialSummary]:
    """The best trial (or the Pareto front), joined with MLflow and checkpoints."""
    import optuna

    from stain_search.study import load_study

    study = load_study(spec, search_dir / "study.journal")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    best = study.best_trials if spec.multi_objective else [study.best_trial]
    runs = {r.data.tags.get(tracking.OPTUNA_TRIAL): r
            for r in tracking.trial_runs(c, experiment_id, search=spec.name)}
    out = []
    for t in best:
        run = runs.get(str(t.number))
        tags = run.data.tags if run else {}
        out.append(TrialSummary(number=t.number, state=t.state.name, values=list(t.values),
                                params=t.params, trial=tags.get(tracking.TRIAL),
                                run_id=run.info.run_id if run else None,
                                checkpoints=tags.get(tracking.CHECKPOINTS)))
    return out


def format_summary(spec: SearchSpec, summary: list[TrialSummary], *, uri: str) -> str:
    if not summary:
        return "no trial completed: nothing to rank (see the trial table above and MLflow)"
    names = [o.metric for o in spec.objectives]
    title = "Pareto front" if spec.multi_objective else "best trial"
    lines = [f"{title} of search {spec.name!r} ({', '.join(f'{o.metric} {o.mode}' for o in spec.objectives)}):"]
    for s in summary:
        vals = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, s.values or []))
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in s.params.items())
        lines.append(f"  #{s.number} {s.trial}: {vals}  [{params}]")
        lines.append(f"      checkpoints: {s.checkpoints}")
        lines.append(f"      mlflow run:  {s.run_id}")
    lines.append(f"MLflow store: {uri}  (stain-search ui)")
    return "\n".join(lines)
