"""One search trial = one CycleGAN training, in one of two executors.

Thin driver, fat worker (Ray's ``train_tune_interop`` pattern): the Tune
function ``cyclegan_trial`` opens the trial's MLflow child run and hands the
training to an executor (``resources.executor`` of the space):

- ``ray_train``: a ``TorchTrainer`` whose workers run ``train_worker`` —
  ``stain_search.train.run_training`` with a reporter that sends every epoch
  to Ray Train (checkpoint), MLflow (rank 0) and the Optuna pruner (rank 0).
  DDP across workers; Ray Train restarts a lost worker from its checkpoint.
- ``in_trial``: the same loop and reporter inside the Tune trial process,
  keeping checkpoints in the trial's folder itself; Tune restarts a lost
  trial, which continues from that folder. No worker group to start: this
  saves ~16 s per trial on 2 CPU cores (bench/overhead.py), and is what
  ``auto`` picks for single-worker trials.

Names come from the Tune trial id, never a timestamp: a resumed search finds
the same trial folder (and resumes from its last checkpoint) and the same
MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from stain_search import tracking
from stain_search.checkpoint import (CheckpointError, best_checkpoint_in, latest_checkpoint,
                                     prune_checkpoints, read_checkpoint, read_meta,
                                     store_checkpoint)
from stain_search.config import apply_overrides, from_dict
from stain_search.errors import TrainingDiverged
from stain_search.gan import world
from stain_search.spaces import Resources, load_space
from stain_search.study import OPTUNA_NUMBER, OPTUNA_TRIAL_ID, PARAMS, TrialPruning
from stain_search.train import run_training


KEEP_CHECKPOINTS = 2  # per trial, the best by the first objective (+ the newest, in_trial)


class TrialReporter:
    """Where a worker's epoch results go: MLflow, the pruner, and Ray — Ray
    Train (``ray_train``, which keeps the checkpoints) or Tune (``in_trial``,
    checkpoints kept in the trial folder here)."""

    def __init__(self, ctx: dict[str, Any], *, in_trial: bool = False):
        self.rank, self.size = world()
        self.ctx = ctx
        self.in_trial = in_trial
        self.pruned = False
        self.last: dict[str, Any] = {}
        self.client = tracking.client(ctx["tracking_uri"]) if self.rank == 0 else None
        # A restarted trial re-runs from its last checkpoint: epochs MLflow
        # already holds are not logged twice (an exact resume repeats them).
        self.logged = (tracking.last_logged_epoch(self.client, ctx["run_id"])
                       if self.client is not None else 0)
        self.pruning = (TrialPruning(load_space(ctx["space_path"], data=ctx.get("data")),
                                     Path(ctx["study_path"]), ctx[OPTUNA_TRIAL_ID])
                        if self.rank == 0 and ctx.get(OPTUNA_TRIAL_ID) is not None else None)

    def report(self, metrics, *, checkpoint, grid):
        epoch = int(metrics["epoch"])
        metrics = dict(metrics)
        if self.client is not None and epoch > self.logged:
            run_id = self.ctx["run_id"]
            tracking.log_epoch(self.client, run_id, metrics, epoch=epoch)
            if grid is not None:
                tracking.log_image(self.client, run_id, grid, f"samples/epoch_{epoch:04d}.png")
        _fault_injection(epoch, self.ctx)
        prune = self.pruning is not None and self.pruning.should_prune(metrics, epoch=epoch)
        self.pruned = self.agree(prune)
        if self.pruned:
            metrics["pruned"] = 1
        self.send(metrics, checkpoint)

    def send(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.last = metrics
        if not self.in_trial:
            ckpt = Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
            ray.train.report(metrics, checkpoint=ckpt,
                             checkpoint_dir_name=checkpoint.name if checkpoint is not None else None)
            return
        if checkpoint is not None:  # before Tune hears of the epoch, as Ray Train does
            first = self.ctx["objectives"][0]
            store_checkpoint(checkpoint, Path(self.ctx["trial_dir"]))
            prune_checkpoints(Path(self.ctx["trial_dir"]), keep=KEEP_CHECKPOINTS,
                              metric=first["metric"], mode=first["mode"])
        ray.tune.report(metrics)

    def agree(self, flag: bool) -> bool:
        """Rank 0 decides; every rank must stop at the same epoch."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.broadcast(t, src=0)
        return bool(t.item())

    def should_stop(self) -> bool:
        return self.pruned


# Fault injection for the tests (tests/test_faults.py): the worker SIGKILLs
# itself once, at this epoch, after MLflow has the epoch but before Ray Train
# has its checkpoint — the worst moment. "Once" is a marker file (it also
# names the run); without both variables set this does nothing.
KILL_AT_EPOCH_ENV, KILL_MARKER_ENV = "STAIN_SEARCH_TEST_KILL_AT_EPOCH", "STAIN_SEARCH_TEST_KILL_MARKER"


def _fault_injection(epoch: int, ctx: dict[str, Any]) -> None:
    at, marker = os.environ.get(KILL_AT_EPOCH_ENV), os.environ.get(KILL_MARKER_ENV)
    if not at or not marker or epoch != int(at):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # first worker only
    except FileExistsError:
        return
    os.write(fd, ctx["run_id"].encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def train_worker(ctx: dict[str, Any]) -> None:
    """The per-worker loop of one trial (runs on every Ray Train worker)."""
    reporter = TrialReporter(ctx)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    run_worker(ctx, reporter, checkpoint=ray.train.get_checkpoint(), device=device)


def run_in_trial(ctx: dict[str, Any]) -> TrialReporter:
    """The ``in_trial`` executor: the loop in this (Tune trial) process. A
    restarted trial continues from the newest checkpoint in its folder."""
    reporter = TrialReporter(ctx, in_trial=True)
    run_worker(ctx, reporter, checkpoint=None, device=None)
    return reporter


def run_worker(ctx: dict[str, Any], reporter: TrialReporter, *, checkpoint: Checkpoint | None,
               device: torch.device | None) -> None:
    """Train one trial's CycleGAN, continuing from the newest checkpoint there is."""
    config = from_dict(ctx["config"])
    try:
        with contextlib.ExitStack() as stack:
            registered = (Path(stack.enter_context(checkpoint.as_directory()))
                          if checkpoint is not None else None)
            resume = newest_checkpoint(registered, ctx.get("trial_dir"))
            if resume is not None and reporter.client is not None:  # a restarted trial
                tracking.note_restart(reporter.client, ctx["run_id"],
                                      epoch=read_meta(resume)["epoch"])
            meta = read_meta(resume) if resume is not None else None
            if meta is not None and int(meta["epoch"]) >= config.train.epochs:
                # Every epoch is done (the driver died before Tune saw the
                # end): hand the final result on again, train nothing.
                reporter.report(dict(meta["metrics"]), checkpoint=None, grid=None)
                return
            run_training(config, reporter=reporter, resume=resume, device=device,
                         should_stop=reporter.should_stop, log=_quiet)
    except TrainingDiverged as err:
        # Retrying a diverged GAN only diverges again: end the trial cleanly
        # with the reason, and let the driver record it as failed. Ray Train
        # keeps only checkpointed results, so the reason goes to MLflow too.
        if reporter.client is not None:
            tracking.note_diverged(reporter.client, ctx["run_id"], str(err))
        # Tune insists every result names the objective(s): NaN, never a score.
        reporter.send({"diverged": 1, "error": str(err), "epoch": -1,
                       **{o["metric"]: float("nan") for o in ctx["objectives"]}})


def newest_checkpoint(registered: Path | None, trial_dir: str | None) -> Path | None:
    """Where a (re)started worker continues from.

    Ray Train registers a reported checkpoint only when its controller next
    polls the worker; a worker killed before that (a busy node) loses it from
    Ray's view, though the folder is already on storage. The newest complete,
    readable checkpoint in the trial's folder wins over an older registered one.
    """
    best, best_epoch = registered, read_meta(registered)["epoch"] if registered else -1
    on_disk = latest_checkpoint(Path(trial_dir)) if trial_dir else None
    if on_disk is not None:
        try:
            read_checkpoint(on_disk)
            epoch = read_meta(on_disk)["epoch"]
        except CheckpointError:  # half-copied: ignore it
            return best
        if epoch > best_epoch:
            return on_disk
    return best


def _quiet(message: str) -> None:
    print(message, flush=True)


def cyclegan_trial(tune_config: dict[str, Any], *, ctx: dict[str, Any]) -> None:
    """The Tune function trainable: one trial (thin driver). ``ctx`` holds the
    search's fixed settings (``tune.with_parameters``), ``tune_config`` the
    values Optuna suggested."""
    params = tune_config[PARAMS]
    trial_id = ray.tune.get_context().get_trial_id()
    trial_name = f"trial_{trial_id}"
    config = apply_overrides(from_dict(ctx["base_config"]), params).validate()
    search_dir = Path(ctx["search_dir"])
    c = tracking.client(ctx["tracking_uri"])
    run_id = tracking.start_trial_run(
        c, ctx["experiment_id"], parent_run_id=ctx["parent_run_id"], search=ctx["search"],
        trial=trial_name, optuna_trial=tune_config.get(OPTUNA_NUMBER), params=config.flat(),
        searched=params.keys(), checkpoints=search_dir / "trials" / trial_name)
    worker_ctx = {**ctx, "config": config.to_dict(), "run_id": run_id,
                  "trial_dir": str(search_dir / "trials" / trial_name),
                  OPTUNA_TRIAL_ID: tune_config.get(OPTUNA_TRIAL_ID)}
    resources = Resources(**ctx["resources"])
    first = ctx["objectives"][0]
    in_trial = resources.resolved_executor == "in_trial"
    status, error = "finished", None
    try:
        if in_trial:
            final = run_in_trial(worker_ctx).last
            best = best_checkpoint_in(Path(worker_ctx["trial_dir"]), metric=first["metric"],
                                      mode=first["mode"])
        else:
            result = ray_train_fit(worker_ctx, resources, trial_name=trial_name,
                                   storage=search_dir / "trials")
            final = dict(result.metrics or {})
            best = best_checkpoint(result, metric=first["metric"], mode=first["mode"])
        diverged = tracking.diverged_error(c, run_id)
        if final.get("diverged") or diverged:
            status, error = "failed", diverged or str(final.get("error"))
        elif final.get("pruned"):
            status = "pruned"
        if best is not None:  # the one a user would deploy, beside the run's metrics
            tracking.log_checkpoint(c, run_id, best)
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised for Tune
        tracking.end_trial_run(c, run_id, status="failed",
                               error="".join(traceback.format_exception_only(err)).strip())
        raise
    tracking.end_trial_run(c, run_id, status=status, error=error)
    # A diverged trial ends as failed. Under ray_train the Tune trial errors
    # (Tune does not retry it: max_failures 0 there); in_trial, where Tune's
    # retries stand in for Ray Train's, raising would re-run a trial that can
    # only diverge again, so it ends normally with its `diverged` result, which
    # the searcher records as FAIL.
    if status == "failed" and not in_trial:
        raise RuntimeError(f"trial {trial_name} failed: {error}")


def ray_train_fit(ctx: dict[str, Any], resources: Resources, *, trial_name: str, storage: Path):
    """The ``ray_train`` executor: one TorchTrainer (DDP over its workers)."""
    use_gpu = resources.gpus_per_worker > 0
    first = ctx["objectives"][0]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=ctx,
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial, use_gpu=use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker,
                                  **({"GPU": resources.gpus_per_worker} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=trial_name, storage_path=str(storage),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=KEEP_CHECKPOINTS,
                checkpoint_score_attribute=first["metric"],
                checkpoint_score_order=first["mode"])),
    )
    return trainer.fit()


def best_checkpoint(result, *, metric: str, mode: str) -> Path | None:
    """The kept checkpoint with the best objective (Ray keeps the top k)."""
    scored = [(m.get(metric), Path(ck.path)) for ck, m in (result.best_checkpoints or [])
              if m.get(metric) is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda t: t[0])[1]
