"""One CycleGAN training run: the per-worker loop.

The same loop serves `stain-search train` (one process) and every Ray Train
worker of a search trial: it unpacks the config at the top, restores from a
checkpoint if given one, trains epoch by epoch, and hands each epoch's
metrics, checkpoint folder and sample grid to a ``Reporter`` — the single
place where results leave the loop (a local folder here, ``ray.train.report``
+ MLflow in ``stain_search.trainables``).

Every source of randomness is re-seeded from (seed, epoch, rank) at the
start of each epoch, and the image pools carry their own generators in the
checkpoint, so a run resumed from epoch k's checkpoint continues exactly as
the uninterrupted run would have. The training DataLoader is built once per
run (:mod:`stain_search.data.loader`): its workers, and the decoded images
they cache, live across epochs, and its sampler alone decides each crop.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from stain_search.atomic import atomic_path
from stain_search.checkpoint import (checkpoint_name, latest_checkpoint, prune_checkpoints,
                                     read_checkpoint, store_checkpoint, write_checkpoint)
from stain_search.config import Config, apply_overrides
from stain_search.data import UnpairedDataset, check_files, resolve_dataset, write_image
from stain_search.data.eval_crops import crop_count, eval_crops
from stain_search.data.loader import build_train_loader, epoch_seed
from stain_search.distributed import mean_over_workers, world
from stain_search.evaluate import Evaluator, sample_grid
from stain_search.errors import ConfigError
from stain_search.gan import LOSS_NAMES, Batch, CycleGAN
from stain_search.optim import linear_decay
from stain_search.pbt import MUTABLE, values_at

Log = Callable[[str], None]


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], *, checkpoint: Path | None,
               grid: np.ndarray | None) -> None:
        """Receive one epoch's results. ``checkpoint`` is the epoch's folder: in
        the reporter's ``checkpoint_root`` if it has that attribute (written
        there directly, kept), else a temporary folder deleted after this call."""


def resolve_device(preference: str) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("`train.device` is 'cuda' but no CUDA device is visible; "
                          "use 'auto' or 'cpu'")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DataBundle:
    train: UnpairedDataset
    eval_batches: list[dict[str, torch.Tensor]]  # {"A": H&E, "B": aligned target if paired}
    reference_batches: list[torch.Tensor]  # real-stain crops (FD/KD reference, stain areas)
    dataset_key: str  # a label for logs; the reference cache keys on the crops' pixels
    has_pairs: bool
    stain: str | None
    eval_crops: int  # crops evaluated (data.eval_crops, or fewer if the tissue holds fewer)


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


def build_data(config: Config, *, device: torch.device | None = None) -> DataBundle:
    """Resolve the dataset, check every file up front, build train/eval sets.

    ``device`` sizes the default evaluation set (``data.eval_crops: null``).
    """
    d = config.data
    files = resolve_dataset(d.path, d.layout)
    check_files(files.train_a + files.train_b, d.crop, load_size=d.load_size)
    eval_crop = d.eval_crop or d.crop
    check_files([p for pair in files.pairs for p in pair] or files.test_a + files.test_b,
                eval_crop, load_size=d.load_size)
    train = UnpairedDataset(files.train_a, files.train_b, crop=d.crop, load_size=d.load_size,
                            flip=d.flip, rot90=d.rot90, max_images=d.max_images,
                            seed=config.train.seed, hed_jitter=d.hed_jitter)
    n = crop_count(d.eval_crops, device or resolve_device(config.train.device))
    crops = eval_crops(crop=eval_crop, n=n, load_size=d.load_size, pairs=files.pairs or None,
                       test_a=files.test_a, test_b=files.test_b)
    size = config.eval.batch_size
    inputs = _batches(crops.inputs, size)
    targets = _batches(crops.targets, size) if crops.targets is not None else None
    eval_batches = [{"A": a, "B": b} for a, b in zip(inputs, targets)] if targets \
        else [{"A": a} for a in inputs]
    stain = files.stain if config.eval.stain == "auto" else config.eval.stain
    return DataBundle(train=train, eval_batches=eval_batches,
                      reference_batches=_batches(crops.reference, size),
                      dataset_key=f"{files.key}-{eval_crop}-{crops.n}crops",
                      has_pairs=crops.targets is not None, stain=stain, eval_crops=crops.n)


def steps_per_epoch(data: DataBundle, config: Config, *, extragradient: bool = False) -> int:
    _, size = world()
    steps = config.train.steps_per_epoch or max(1, len(data.train) // (config.data.batch_size * size))
    # Extragradient pairs a look-ahead with an update: an even count ends each
    # epoch on a real update, so evaluation never sees look-ahead weights.
    return steps + steps % 2 if extragradient else steps


def train_epoch(model: CycleGAN, loader: DataLoader) -> tuple[dict[str, float], int]:
    sums = {name: 0.0 for name in LOSS_NAMES}
    n = 0
    for batch in loader:
        x = batch["A"].to(model.device, non_blocking=True)
        y = batch["B"].to(model.device, non_blocking=True)
        for k, v in model.train_step(Batch(x=x, y=y)).items():
            sums[k] += v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}, n * loader.batch_size


def run_training(config: Config, *, reporter: Reporter, resume: Path | None = None,
                 device: torch.device | None = None, log: Log = print,
                 should_stop: Callable[[], bool] | None = None,
                 meta_extra: dict[str, Any] | None = None,
                 replay: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Train (or continue training) one CycleGAN; return the last epoch's metrics.
    ``meta_extra``: more keys for every checkpoint's meta.json (a PBT member's schedule).
    ``replay``: a PBT schedule to replay (``stain_search.pbt``): each epoch trains
    with the mutable values in force then (the networks' shapes stay ``config``'s)."""
    t, ev = config.train, config.eval
    rank, size = world()
    device = device or resolve_device(t.device)
    data = build_data(config, device=device)
    model = CycleGAN(config, device=device, seed=t.seed)
    start_epoch = 0
    if resume is not None:
        state, meta = read_checkpoint(resume, map_location=device)
        model.load_state_dict_full(state)
        start_epoch = int(meta["epoch"])
        log(f"resumed from {resume} (epoch {start_epoch})")
    model.broadcast()
    schedule = linear_decay(t.epochs, t.decay_epochs)
    evaluator = Evaluator(ev, dataset_key=data.dataset_key, has_pairs=data.has_pairs,
                          stain=data.stain, device=device) if rank == 0 else None
    if evaluator is not None:
        evaluator.prepare_reference(data.reference_batches)
        log(f"evaluation: {evaluator.describe()}")
    steps = steps_per_epoch(data, config, extragradient=model.extragradient)
    loader = build_train_loader(data.train, config.data, samples=steps * config.data.batch_size * size,
                                seed=t.seed, rank=rank, world=size, device=device)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, t.epochs):
        seed_everything(epoch_seed(t.seed, epoch, rank))
        if replay:  # read by the step (λ, γ) and just below (learning rates)
            model.config = replayed(config, replay, epoch + 1)
        now = model.config.optim
        for opt, base in ((model.opt_g, now.lr_g), (model.opt_d, now.lr_d or now.lr_g)):
            for group in opt.param_groups:
                group["lr"] = base * schedule(epoch)
        model.train()
        t0 = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        losses, images = train_epoch(model, loader)
        train_s = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, **mean_over_workers(losses, device),
                   "lr_g": model.opt_g.param_groups[0]["lr"],
                   "images_per_s": images * size / max(train_s, 1e-9), "time_train_s": train_s}
        last = epoch + 1 == t.epochs
        grid = None
        if evaluator is not None and ((epoch + 1) % t.eval_every == 0 or last):
            t1 = time.perf_counter()
            metrics.update(evaluator.evaluate(model.G, model.F, data.eval_batches))
            grid = sample_grid(model.G, model.F, data.eval_batches[0], rows=t.sample_images)
            metrics["time_eval_s"] = time.perf_counter() - t1
        # A reporter that keeps checkpoints in a folder of its own gets them
        # written there, once (atomically); otherwise into a temporary folder.
        root = getattr(reporter, "checkpoint_root", None)
        with tempfile.TemporaryDirectory(prefix="stain-search-ckpt-") as tmp:
            folder = None
            if rank == 0 and ((epoch + 1) % t.checkpoint_every == 0 or last):
                t2 = time.perf_counter()
                folder = write_checkpoint(Path(root or tmp) / checkpoint_name(epoch + 1),
                                          state=model.state_dict_full(),
                                          meta={"epoch": epoch + 1, "metrics": metrics,
                                                "config": model.config.to_dict(),
                                                **(meta_extra or {})})
                metrics["time_checkpoint_s"] = time.perf_counter() - t2
            reporter.report(metrics, checkpoint=folder, grid=grid)
        log(format_epoch(metrics, t.epochs))
        if should_stop is not None and should_stop():
            break
    return metrics


def replayed(config: Config, schedule: list[dict[str, Any]], epoch: int) -> Config:
    """``config`` with the schedule's mutable values for ``epoch`` (1-based)."""
    values = {k: v for k, v in values_at(schedule, epoch).items() if k in MUTABLE}
    return apply_overrides(config, values).validate() if values else config


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    shown = [f"epoch {metrics['epoch']}/{epochs}"]
    for key in ("loss_G", "loss_F", "loss_D_X", "loss_D_Y", "loss_cycle", "fid", "fd_random",
                "kid", "kd_random", "ssim_structure", "ssim_gt", "psnr_gt", "ki67_f1",
                "stain_area_error", "stain_od_r"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4g}")
    shown.append(f"{metrics['images_per_s']:.2f} img/s")
    return "  ".join(shown)


@dataclass(frozen=True)
class Retention:
    """Which full checkpoints a local run keeps: the ``keep`` best by
    ``metric`` (``mode``: min/max) plus the newest, which a resume needs;
    ``keep=None`` keeps every one."""

    keep: int | None = None
    metric: str = "fd_random"
    mode: str = "min"


def retention_for(config: Config) -> Retention:
    """``train.keep_checkpoints`` / ``train.keep_metric`` resolved and checked
    (the metric must be one that this run's evaluation reports)."""
    from stain_search.evaluate import metric_directions
    from stain_search.objectives import frechet_metric_name, reported_metrics, why_not_reported

    t = config.train
    if t.keep_checkpoints is None:
        return Retention()
    directions = metric_directions()
    metric = frechet_metric_name(config) if t.keep_metric == "frechet" else t.keep_metric
    if metric not in directions:
        raise ConfigError(f"`train.keep_metric`: {metric!r} is not an evaluation metric "
                          f"(known: frechet, {', '.join(sorted(directions))})")
    if metric not in reported_metrics(config):
        raise ConfigError(f"`train.keep_metric`: no epoch reports {metric!r} on "
                          f"{config.data.path}: {why_not_reported(metric)}")
    return Retention(keep=t.keep_checkpoints, metric=metric, mode=directions[metric])


class LocalReporter:
    """`stain-search train`'s reporter: a results folder a person can read.

        OUT/metrics.jsonl            one JSON line per epoch
        OUT/checkpoints/checkpoint_epoch_XXXX/   as ``retention`` keeps them
        OUT/generators/G_epoch_XXXX.safetensors  with ``generator_snapshots``
        OUT/samples/epoch_XXXX.png   input | G(x) | F(G(x)) | target

    Retention prunes only after the new checkpoint and its metrics line are
    in place, and never the newest checkpoint: a run stopped at any moment
    resumes from the last epoch it finished.
    """

    def __init__(self, out: Path, *, retention: Retention = Retention(),
                 generator_snapshots: bool = False):
        self.out = Path(out)
        self.retention = retention
        self.generator_snapshots = generator_snapshots
        # run_training writes checkpoints here directly (atomically): at the
        # reference widths a copy would move another 1.3 GB per epoch.
        self.checkpoint_root = self.out / "checkpoints"
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)

    def report(self, metrics, *, checkpoint, grid):
        epoch = int(metrics["epoch"])
        if grid is not None:
            write_image(self.out / "samples" / f"epoch_{epoch:04d}.png", grid)
        if checkpoint is not None:
            if Path(checkpoint).parent != self.checkpoint_root:
                store_checkpoint(checkpoint, self.checkpoint_root)  # atomic
            if self.generator_snapshots and grid is not None:  # an evaluated epoch
                self._snapshot_generator(checkpoint, epoch, metrics)
        # Metrics after the checkpoint: a line in metrics.jsonl means its
        # checkpoint was in place (retention may have pruned it since).
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if checkpoint is not None and self.retention.keep is not None:
            prune_checkpoints(self.out / "checkpoints", keep=self.retention.keep,
                              metric=self.retention.metric, mode=self.retention.mode)

    def _snapshot_generator(self, checkpoint: Path, epoch: int, metrics: dict) -> None:
        """G alone (no F, no discriminators, no optimiser state), safetensors."""
        from safetensors.torch import save_file

        state, _ = read_checkpoint(checkpoint)
        tensors = {k: v.contiguous() for k, v in state["G"].items()}
        meta = {k: str(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        with atomic_path(self.out / "generators" / f"G_epoch_{epoch:04d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out / "checkpoints")
