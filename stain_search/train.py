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
the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from stain_search.checkpoint import (checkpoint_name, latest_checkpoint, read_checkpoint,
                                     store_checkpoint, write_checkpoint)
from stain_search.config import Config
from stain_search.data import EvalDataset, UnpairedDataset, check_files, resolve_dataset, write_image
from stain_search.evaluate import Evaluator, sample_grid
from stain_search.errors import ConfigError
from stain_search.gan import LOSS_NAMES, Batch, CycleGAN, world
from stain_search.optim import linear_decay

Log = Callable[[str], None]


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], *, checkpoint: Path | None,
               grid: np.ndarray | None) -> None:
        """Receive one epoch's results. ``checkpoint`` is a temporary folder
        that is deleted after this call: copy or move it to keep it."""


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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % 2**31


@dataclass
class DataBundle:
    train: UnpairedDataset
    eval_batches: list[dict[str, torch.Tensor]]
    reference_batches: list[torch.Tensor]  # real stain images (FD reference)
    dataset_key: str
    has_pairs: bool
    stain: str | None


def build_data(config: Config) -> DataBundle:
    """Resolve the dataset, check every file up front, build train/eval sets."""
    d = config.data
    files = resolve_dataset(d.path, d.layout)
    check_files(files.train_a + files.train_b, d.crop, load_size=d.load_size)
    eval_crop = d.eval_crop or d.crop
    pairs = files.pairs[: d.eval_images] if files.pairs else None
    eval_inputs = [a for a, _ in pairs] if pairs else files.test_a[: d.eval_images]
    reference = [b for _, b in pairs] if pairs else files.test_b[: d.eval_images]
    check_files(eval_inputs + reference, eval_crop, load_size=d.load_size)
    train = UnpairedDataset(files.train_a, files.train_b, crop=d.crop, load_size=d.load_size,
                            flip=d.flip, rot90=d.rot90, max_images=d.max_images,
                            seed=config.train.seed)
    eval_set = EvalDataset(eval_inputs, pairs=pairs, crop=eval_crop, load_size=d.load_size)
    eval_batches = list(DataLoader(eval_set, batch_size=config.eval.batch_size, shuffle=False,
                                   num_workers=0))
    ref_set = EvalDataset(reference, crop=eval_crop, load_size=d.load_size)
    reference_batches = [b["A"] for b in DataLoader(ref_set, batch_size=config.eval.batch_size,
                                                    shuffle=False, num_workers=0)]
    return DataBundle(train=train, eval_batches=eval_batches,
                      reference_batches=reference_batches,
                      dataset_key=f"{files.key}-{eval_crop}-{len(reference)}",
                      has_pairs=bool(pairs), stain=files.stain)


def epoch_loader(data: DataBundle, config: Config, *, epoch: int, steps: int) -> DataLoader:
    """This rank's shard of a fresh permutation, seeded by (seed, epoch)."""
    rank, size = world()
    g = torch.Generator().manual_seed(epoch_seed(config.train.seed, epoch, 0))
    order = torch.randperm(len(data.train), generator=g).tolist()
    need = steps * config.data.batch_size * size
    order = (order * math.ceil(need / len(order)))[:need]  # wrap when steps are capped high
    shard = order[rank::size]
    return DataLoader(data.train, batch_size=config.data.batch_size, sampler=shard,
                      num_workers=config.data.num_workers, drop_last=True,
                      generator=torch.Generator().manual_seed(epoch_seed(config.train.seed, epoch, rank)),
                      persistent_workers=False)


def steps_per_epoch(data: DataBundle, config: Config, *, extragradient: bool = False) -> int:
    _, size = world()
    steps = config.train.steps_per_epoch or max(1, len(data.train) // (config.data.batch_size * size))
    # Extragradient pairs a look-ahead with an update: an even count ends each
    # epoch on a real update, so evaluation never sees look-ahead weights.
    return steps + steps % 2 if extragradient else steps


def mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    _, size = world()
    if size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / size for k, v in zip(keys, t.tolist())}


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
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Train (or continue training) one CycleGAN; return the last epoch's metrics."""
    t, ev = config.train, config.eval
    rank, size = world()
    device = device or resolve_device(t.device)
    data = build_data(config)
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
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, t.epochs):
        seed_everything(epoch_seed(t.seed, epoch, rank))
        for opt, base in ((model.opt_g, config.optim.lr_g),
                          (model.opt_d, config.optim.lr_d or config.optim.lr_g)):
            for group in opt.param_groups:
                group["lr"] = base * schedule(epoch)
        model.train()
        t0 = time.perf_counter()
        losses, images = train_epoch(model, epoch_loader(data, config, epoch=epoch, steps=steps))
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
        with tempfile.TemporaryDirectory(prefix="stain-search-ckpt-") as tmp:
            folder = None
            if rank == 0 and ((epoch + 1) % t.checkpoint_every == 0 or last):
                t2 = time.perf_counter()
                folder = write_checkpoint(Path(tmp) / checkpoint_name(epoch + 1),
                                          state=model.state_dict_full(),
                                          meta={"epoch": epoch + 1, "metrics": metrics,
                                                "config": config.to_dict()})
                metrics["time_checkpoint_s"] = time.perf_counter() - t2
            reporter.report(metrics, checkpoint=folder, grid=grid)
        log(format_epoch(metrics, t.epochs))
        if should_stop is not None and should_stop():
            break
    return metrics


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    shown = [f"epoch {metrics['epoch']}/{epochs}"]
    for key in ("loss_G", "loss_F", "loss_D_X", "loss_D_Y", "loss_cycle", "fid", "fd_random",
                "ssim_structure", "ssim_gt", "psnr_gt", "ki67_f1"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4g}")
    shown.append(f"{metrics['images_per_s']:.2f} img/s")
    return "  ".join(shown)


class LocalReporter:
    """`stain-search train`'s reporter: a results folder a person can read.

        OUT/metrics.jsonl            one JSON line per epoch
        OUT/checkpoints/checkpoint_epoch_XXXX/
        OUT/samples/epoch_XXXX.png   input | G(x) | F(G(x)) | target
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)

    def report(self, metrics, *, checkpoint, grid):
        epoch = int(metrics["epoch"])
        if grid is not None:
            write_image(self.out / "samples" / f"epoch_{epoch:04d}.png", grid)
        if checkpoint is not None:
            store_checkpoint(checkpoint, self.out / "checkpoints")  # atomic
        # Metrics last: a line in metrics.jsonl means its checkpoint is in place.
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out / "checkpoints")
