"""One search trial = one CycleGAN training, in one of two executors.

Thin driver, fat worker (Ray's ``train_tune_interop`` pattern): the Tune
function ``cyclegan_trial`` receives the search's
:class:`~stain_search.context.TrialContext` whole, opens the trial's MLflow
child run and hands the training to an executor (``resources.executor``):

- ``in_trial``: the loop inside the Tune trial process. Tune restarts a lost
  trial, which continues from the newest checkpoint in its folder. No worker
  group to start: ~16 s less per trial on 2 CPU cores (bench/overhead.py),
  and what ``auto`` picks for single-worker trials.
- ``ray_train``: a ``TorchTrainer`` whose workers run ``train_worker``, DDP
  across them; Ray Train restarts lost workers, which continue from the same
  folder.

Either way rank 0 writes each epoch's checkpoint once, straight into the
trial's folder ``trials/trial_NNN/`` (NNN: the Optuna trial number), keeps
the best k plus the newest, and reports the epoch to MLflow and the study's
pruner. A resumed search finds the same folder and MLflow run by that
number; nothing is named after a timestamp or re-read from the space file.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import traceback
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
import torch
import torch.distributed as dist

from stain_search import tracking
from stain_search.cluster import unplaced_message, worker_group_retries
from stain_search.checkpoint import (CheckpointError, best_checkpoint_in, latest_checkpoint,
                                     prune_checkpoints, read_checkpoint, read_meta)
from stain_search.config import apply_overrides
from stain_search.context import TrialContext, WorkerContext, trial_folder
from stain_search.distributed import world
from stain_search.errors import TrainingDiverged
from stain_search.evaluate import COUNT_KEYS
from stain_search.mirror import pull_checkpoint, pull_trial_scratch, push_checkpoint
from stain_search.pbt import read_pointer, write_pointer
from stain_search.search_dir import trial_name
from stain_search.stopping import is_storage_error, storage_error_message
from stain_search.study import (OPTUNA_NUMBER, OPTUNA_TRIAL_ID, PARAMS, REPLAY, TAGS,
                                TrialPruning)
from stain_search.train import run_training

KEEP_CHECKPOINTS = 2  # per trial, the best by the first objective (+ the newest)
SCHEDULE_PREFIX = "schedule/"  # MLflow metrics of a PBT member's mutated values, per epoch
POINTER_EPOCH = "pbt_checkpoint_epoch"  # a result whose epoch a PBT member checkpointed


def report_to_tune(metrics: dict[str, Any], wctx: WorkerContext) -> None:
    """A result to Tune; a PBT member's checkpointed epoch with the pointer
    Tune's scheduler exploits it through (``stain_search.pbt``: the weights
    stay in the search's folder; Tune copies a few bytes)."""
    epoch = metrics.get(POINTER_EPOCH)
    if epoch is None:
        ray.tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="stain-search-member-") as tmp:
        write_pointer(Path(tmp), trial=wctx.trial_name, number=wctx.number, epoch=int(epoch))
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


class TrialReporter:
    """Where a worker's epoch results go: MLflow and the pruner (rank 0), and
    Ray: Tune (``in_trial``) or Ray Train (``ray_train``), which forwards to Tune."""

    def __init__(self, wctx: WorkerContext, *, in_trial: bool = False):
        self.rank, self.size = world()
        self.wctx = wctx
        self.in_trial = in_trial
        self.pruned = False
        self.last: dict[str, Any] = {}
        ctx = wctx.trial
        self.client = tracking.client(ctx.tracking_uri) if self.rank == 0 else None
        if self.client is not None:  # where the cluster put the trial (its rank 0)
            tracking.note_node(self.client, wctx.run_id, ray.get_runtime_context().get_node_id())
        # A restarted trial re-runs from its last checkpoint: epochs MLflow
        # already holds are not logged twice (an exact resume repeats them).
        self.logged = (tracking.last_logged_epoch(self.client, wctx.run_id)
                       if self.client is not None else 0)
        # Every epoch goes to the study (its learning curve), pruner or not.
        # The study is the driver's, served over gRPC: reached from any node.
        self.pruning = (TrialPruning(ctx.study, wctx.study_trial_id, ctx.pruning)
                        if self.rank == 0 else None)
        # run_training writes rank 0's checkpoints here directly (written once).
        self.checkpoint_root = wctx.trial_dir if self.rank == 0 else None
        # Sample counts are params (one value per run, comparable at a glance);
        # a restarted trial has logged them already.
        self.counted = self.logged > 0
        # A PBT member: its mutated values at every epoch (its schedule in MLflow).
        flat = wctx.config.flat()
        self.schedule = {f"{SCHEDULE_PREFIX}{k}": flat[k] for k in ctx.mutate}

    def report(self, metrics, *, checkpoint, grid):
        epoch = int(metrics["epoch"])
        metrics = dict(metrics)
        if self.client is not None and epoch > self.logged:
            run_id = self.wctx.run_id
            counts = {k: int(metrics[k]) for k in COUNT_KEYS if k in metrics}
            if counts and not self.counted:  # how many crops the metrics rest on
                tracking.log_params(self.client, run_id, counts)
                self.counted = True
            tracking.log_epoch(self.client, run_id, {**metrics, **self.schedule}, epoch=epoch)
            if grid is not None:
                tracking.log_image(self.client, run_id, grid, f"samples/epoch_{epoch:04d}.png")
        _fault_injection(epoch, self.wctx)
        prune = self.pruning is not None and self.pruning.should_prune(metrics, epoch=epoch)
        self.pruned = self.agree(prune)
        if self.pruned:
            metrics["pruned"] = 1
        self.send(metrics, checkpoint)

    def send(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.last = metrics
        if checkpoint is not None:  # kept in the trial folder: the best k + the newest
            first = self.wctx.trial.first_objective
            keep = dict(keep=KEEP_CHECKPOINTS, metric=first.metric, mode=first.mode)
            if self.wctx.trial_remote is not None:  # in the store before Tune hears of it
                push_checkpoint(self.wctx.trial_remote, self.wctx.trial_dir, checkpoint, **keep)
            else:
                prune_checkpoints(self.wctx.trial_dir, **keep)
        if checkpoint is not None and self.wctx.trial.mutate:
            metrics[POINTER_EPOCH] = int(metrics.get("epoch", 0))  # PBT may exploit this one
        if self.in_trial:
            report_to_tune(metrics, self.wctx)
        else:
            ray.train.report(metrics)

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
# itself once, at this epoch, after MLflow has the epoch but before Ray has
# it — the worst moment. "Once" is a marker file (it also names the run);
# without both variables set this does nothing.
KILL_AT_EPOCH_ENV, KILL_MARKER_ENV = "STAIN_SEARCH_TEST_KILL_AT_EPOCH", "STAIN_SEARCH_TEST_KILL_MARKER"


def _fault_injection(epoch: int, wctx: WorkerContext) -> None:
    at, marker = os.environ.get(KILL_AT_EPOCH_ENV), os.environ.get(KILL_MARKER_ENV)
    if not at or not marker or epoch != int(at):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # first worker only
    except FileExistsError:
        return
    os.write(fd, wctx.run_id.encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker loop of one ``ray_train`` trial (every Ray Train worker)."""
    wctx: WorkerContext = loop_config["ctx"]
    reporter = TrialReporter(wctx)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    run_worker(wctx, reporter, device=device)


def run_in_trial(wctx: WorkerContext) -> TrialReporter:
    """The ``in_trial`` executor: the loop in this (Tune trial) process. A
    restarted trial continues from the newest checkpoint in its folder."""
    reporter = TrialReporter(wctx, in_trial=True)
    run_worker(wctx, reporter, device=None)
    return reporter


def run_worker(wctx: WorkerContext, reporter: TrialReporter, *,
               device: torch.device | None) -> None:
    """Train one trial's CycleGAN, continuing from the newest checkpoint there is."""
    config = wctx.config
    objectives = wctx.trial.objectives
    try:
        folder = wctx.trial_dir
        if wctx.trial_remote is not None:  # it may have run elsewhere: from the store
            # Every rank resumes from the same checkpoint, each from its own copy
            # (ranks other than 0 only read it; two ranks may share a node).
            if reporter.rank > 0:
                folder = folder.with_name(f"{folder.name}.rank{reporter.rank}")
            pull_trial_scratch(wctx.trial_remote, folder)
        resume = newest_checkpoint(folder)
        if resume is not None and reporter.client is not None:  # a restarted trial
            tracking.note_restart(reporter.client, wctx.run_id, epoch=read_meta(resume)["epoch"])
        meta = read_meta(resume) if resume is not None else None
        if meta is not None and reporter.pruning is not None:
            reporter.pruning.record(dict(meta["metrics"]), epoch=int(meta["epoch"]))
        if meta is not None and int(meta["epoch"]) >= config.train.epochs:
            # Every epoch is done (the driver stopped before Tune saw the end):
            # hand the final result on again, train nothing.
            reporter.report(dict(meta["metrics"]), checkpoint=None, grid=None)
            return
        schedule = list(wctx.schedule or wctx.replay)
        run_training(config, reporter=reporter, resume=resume, device=device,
                     should_stop=reporter.should_stop, log=_quiet,
                     meta_extra={"schedule": schedule} if schedule else None,
                     replay=list(wctx.replay) or None)
    except TrainingDiverged as err:
        # Retrying a diverged GAN only diverges again: end the trial cleanly
        # with the reason, and let the driver record it as failed.
        if reporter.client is not None:
            tracking.note_diverged(reporter.client, wctx.run_id, str(err))
        # Tune insists every result names the objective(s): NaN, never a score.
        reporter.send({"diverged": 1, "error": str(err), "epoch": -1,
                       **{o.metric: float("nan") for o in objectives}})
    except OSError as err:
        if not is_storage_error(err):
            raise
        # A full disk fails every trial the same way: tell the driver, which
        # stops the search. The trial stays resumable (nothing is marked).
        reporter.send({"storage_error": storage_error_message(err, wctx.trial_dir),
                       "epoch": -1, **{o.metric: float("nan") for o in objectives}})


def newest_checkpoint(trial_dir: Path) -> Path | None:
    """Where a (re)started worker continues from: the newest complete, readable
    checkpoint in the trial's folder (a half-written one is skipped)."""
    newest = latest_checkpoint(trial_dir)
    if newest is None:
        return None
    try:
        read_checkpoint(newest)
    except CheckpointError:
        return None
    return newest


def _quiet(message: str) -> None:
    print(message, flush=True)


def cyclegan_trial(tune_config: dict[str, Any], *, ctx: TrialContext) -> None:
    """The Tune function trainable: one trial (thin driver). ``ctx`` is the
    search's (``tune.with_parameters``), ``tune_config`` what the study suggested."""
    params = tune_config[PARAMS]
    number = int(tune_config[OPTUNA_NUMBER])
    name = trial_name(number)
    # A PBT member exploiting another takes its newest checkpoint first.
    member = start_pbt_member(ctx, number, name, params) if ctx.mutate else None
    if member is not None:
        params = member.params
    config = apply_overrides(ctx.base_config, params).validate()
    client = tracking.client(ctx.tracking_uri)
    run_id = tracking.start_trial_run(
        client, ctx.experiment_id, parent_run_id=ctx.parent_run_id, search=ctx.search,
        search_id=ctx.search_id, trial=name, optuna_trial=number, params=config.flat(),
        searched=params.keys(), checkpoints=ctx.search_dir.trial_location(number),
        tune_trial_id=ray.tune.get_context().get_trial_id(),
        run_name=tracking.trial_run_name(number, params), extra_tags=tune_config.get(TAGS))
    if member is not None:
        if member.exploit is not None:
            tracking.note_exploit(client, run_id, member.exploit)
        from stain_search.exploit import unrecorded

        for late in unrecorded(member.schedule, trial=name,
                               recorded=tracking.recorded_exploits(client, run_id)):
            tracking.note_exploit(client, run_id, late)  # made before the driver died
    wctx = WorkerContext(trial=ctx, config=config, trial_name=name, number=number,
                         study_trial_id=int(tune_config[OPTUNA_TRIAL_ID]), run_id=run_id,
                         schedule=tuple(member.schedule) if member is not None else (),
                         replay=tuple(tune_config.get(REPLAY) or ()))
    first = ctx.first_objective
    in_trial = ctx.resources.resolved_executor == "in_trial"
    status, error = "finished", None
    try:
        if in_trial:
            final = run_in_trial(wctx).last
        else:
            final = dict(ray_train_fit(wctx).metrics or {})
        if final.get("storage_error"):
            return  # the driver stops the search; the run stays resumable
        diverged = tracking.diverged_error(client, run_id)
        if final.get("diverged") or diverged:
            status, error = "failed", diverged or str(final.get("error"))
        elif final.get("pruned"):
            status = "pruned"
        if wctx.trial_remote is not None:  # ray_train: rank 0 may have run on another node
            pull_trial_scratch(wctx.trial_remote, wctx.trial_dir)
        best = best_checkpoint_in(wctx.trial_dir, metric=first.metric, mode=first.mode)
        if best is not None:  # the one a user would deploy, beside the run's metrics
            tracking.log_checkpoint(client, run_id, best)
    except Exception as err:  # noqa: BLE001 - recorded, then re-raised for Tune
        tracking.end_trial_run(client, run_id, status="failed",
                               error="".join(traceback.format_exception_only(err)).strip())
        raise
    tracking.end_trial_run(client, run_id, status=status, error=error)
    # A diverged trial ends as failed. Under ray_train the Tune trial errors
    # (Tune does not retry it: max_failures 0 there); in_trial, where Tune's
    # retries stand in for Ray Train's, raising would re-run a trial that can
    # only diverge again, so it ends normally with its `diverged` result, which
    # the searcher records as FAIL.
    if status == "failed" and not in_trial:
        raise RuntimeError(f"trial {name} failed: {error}")


def start_pbt_member(ctx: TrialContext, number: int, name: str, params: dict[str, Any]):
    """A PBT member's start (``stain_search.exploit``): its own checkpoints, or,
    when Tune restarted it with another member's pointer, that member's newest."""
    from stain_search.exploit import scored_or_newest, start_member

    sdir = ctx.search_dir
    folder = trial_folder(ctx, number)
    remote = sdir.trial_remote(number)
    if remote is not None:
        pull_trial_scratch(remote, folder)
    pointer = pointer_id = None
    given = ray.tune.get_checkpoint()
    if given is not None:
        with given.as_directory() as where:
            pointer = read_pointer(Path(where))
        pointer_id = given.path

    def donor_checkpoint(donor: int, epoch: int, scratch: Path) -> Path | None:
        if sdir.trial_remote(donor) is not None:
            return pull_checkpoint(sdir.trial_remote(donor), scratch, epoch=epoch)
        for _ in range(3):  # the donor trains on: a checkpoint may be retired mid-copy
            source = scored_or_newest(sdir.trial(donor), epoch)
            if source is None:
                return None
            try:
                return Path(shutil.copytree(source, scratch / source.name))
            except (FileNotFoundError, shutil.Error):
                shutil.rmtree(scratch / source.name, ignore_errors=True)
        return None

    first = ctx.first_objective
    keep = dict(keep=KEEP_CHECKPOINTS, metric=first.metric, mode=first.mode)
    return start_member(
        trial=name, number=number, folder=folder, params=params, mutate=ctx.mutate,
        pointer=pointer, pointer_id=pointer_id, donor_checkpoint=donor_checkpoint,
        publish=(lambda c: push_checkpoint(remote, folder, c, **keep)) if remote else None,
        retire=(lambda c: remote.delete(c.name)) if remote else None)


def ray_train_fit(wctx: WorkerContext):
    """The ``ray_train`` executor: one TorchTrainer (DDP over its workers).

    Ray Train's TorchTrainer and callbacks are imported here, not above: an
    ``in_trial`` trial process (the default) and the driver never load them
    (~1.5-3 s of imports on 2 cores)."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from stain_search.trainables.member_results import MemberResults

    resources = wctx.trial.resources
    use_gpu = resources.gpus_per_worker > 0
    # A PBT member's results come back through this trial, which hands Tune
    # the pointer checkpoint (Ray's TuneReportCallback forwards no checkpoint).
    forward = MemberResults() if wctx.trial.mutate else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"ctx": wctx},
        scaling_config=ScalingConfig(
            num_workers=resources.workers_per_trial, use_gpu=use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker,
                                  **({"GPU": resources.gpus_per_worker} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=wctx.trial_name, storage_path=f"{wctx.trial.search_dir.tune_location}/train",
            callbacks=[forward if forward is not None else TuneReportCallback()],
            # A worker group Ray cannot place is retried for a bounded time
            # (stain_search.cluster), not forever.
            failure_config=FailureConfig(max_failures=resources.max_failures,
                                         controller_failure_limit=worker_group_retries())),
    )
    try:
        if forward is None:
            return trainer.fit()
        return forward.fit(trainer, report=lambda metrics: report_to_tune(metrics, wctx))
    except ray.train.ControllerError as err:
        if type(err.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        raise RuntimeError(f"{wctx.trial_name}: {unplaced_message(resources)}") from None
