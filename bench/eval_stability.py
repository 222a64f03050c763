"""Evaluation stability: do two disjoint sets of evaluation crops rank the same checkpoints alike?

A metric can pick a checkpoint only if the ranking it gives does not depend
on which crops happened to be evaluated. For each dataset this script trains
a few tiny CycleGANs (two runs, every epoch kept: checkpoints that really
differ), cuts a pool of tissue crops with ``stain_search.data.eval_crops``,
and for each crop count n draws random disjoint halves of n crops each, scores
every checkpoint on both halves, and reports the Spearman rank correlation of
the two halves' scores over the checkpoints (mean over splits) for:

- ``fd_random`` — Fréchet distance on the random CNN's features;
- ``kd_random`` — kernel distance (KID) on the same features;
- ``ssim_structure`` — SSIM of grey input vs grey output;
- ``stain_area_error`` / ``stain_od_r`` — the stain-specific metrics.

Each half is scored as the Evaluator scores an evaluation set (its FD/KD
reference is the aligned real-stain crops of the same half). Outputs and
features are computed once per checkpoint over the pool, and halves are
subsets of it, so the whole study costs one pass per checkpoint.

It also times evaluation's share of an epoch at the CPU demo settings
(search_spaces/lambda.yaml's base) for several ``data.eval_crops``: the knob.

Datasets: the built-in trichrome phantom (32 test pairs of 128², so large
pools overlap), and, where ``../shared`` exists, the BCI and MIST samples
(8 pairs of 1024² each: all 8 pairs give evaluation crops, 7 of them also
train, which does not matter for stability). Run by hand::

    python bench/eval_stability.py                # ~5 minutes on 2 cores
    python bench/eval_stability.py --smoke-test   # seconds, what CI runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from stain_search.config import load_config  # noqa: E402
from stain_search.data import resolve_dataset  # noqa: E402
from stain_search.data.eval_crops import eval_crops  # noqa: E402
from stain_search.data.folders import list_images  # noqa: E402
from stain_search.evaluate import to_unit  # noqa: E402
from stain_search.gan import CycleGAN  # noqa: E402
from stain_search.metrics.frechet import (FrechetStats, build_feature_extractor,  # noqa: E402
                                          frechet_distance_to_samples, random_spec)
from stain_search.metrics.kernel import kernel_distance  # noqa: E402
from stain_search.metrics.ssim import ssim_structure  # noqa: E402
from stain_search.metrics.stain import crop_stain, stain_area_error, stain_channel, stain_od_r  # noqa: E402
from stain_search.checkpoint import read_checkpoint  # noqa: E402
from stain_search.train import run_training  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-samples"
REPO = Path(__file__).resolve().parents[1]
METRICS = ("fd_random", "kd_random", "ssim_structure", "stain_area_error", "stain_od_r")
TRAIN = {"data.crop": 64, "data.batch_size": 4, "model.depth": 4, "model.ngf": 8,
         "model.ndf": 8, "model.d_blocks": 2, "train.steps_per_epoch": 8, "train.epochs": 4,
         "data.eval_crops": 2, "eval.feature_extractor": "random", "train.keep_checkpoints": None}
RUNS = ({"loss.lambda_cycle": 10.0, "train.seed": 0}, {"loss.lambda_cycle": 2.0, "train.seed": 1})
SMOKE_TRAIN = {**TRAIN, "data.crop": 32, "model.depth": 3, "train.steps_per_epoch": 2,
               "train.epochs": 2}


class KeepWeights:
    """A reporter that keeps G's and F's weights of every epoch, nothing else."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def report(self, metrics, *, checkpoint, grid) -> None:
        if checkpoint is not None:
            state, _ = read_checkpoint(checkpoint)
            self.states.append({"G": state["G"], "F": state["F"], "epoch": metrics["epoch"]})


def checkpoints(path: str, train: dict, *, epochs_from: int) -> tuple[list[dict], Any]:
    """G/F weights of every epoch (from ``epochs_from`` on) of each run in RUNS."""
    keep, config = KeepWeights(), None
    for run in RUNS:
        config = load_config(None, {**train, **run, "data.path": path})
        run_training(config, reporter=keep, device=torch.device("cpu"), log=lambda m: None)
    return [s for s in keep.states if s["epoch"] >= epochs_from], config


def all_pairs(path: str) -> list[tuple[Path, Path]]:
    """Every (H&E, stain) pair of a pair-layout sample, train and test alike."""
    root = Path(path)
    b = {p.stem: p for p in list_images(root / "IHC")}
    return [(a, b[a.stem]) for a in list_images(root / "HE") if a.stem in b]


@torch.no_grad()
def per_crop(states: list[dict], config, crops, stain: str) -> dict[str, Any]:
    """Every checkpoint's per-crop outputs scored once: features, SSIM, stain amounts."""
    channel = stain_channel(stain)
    extractor = build_feature_extractor(random_spec(), "cpu")
    x01, y01 = to_unit(crops.inputs), to_unit(crops.targets)
    real = {"features": np.concatenate([extractor(b).numpy() for b in y01.split(64)]),
            "stain": crop_stain(y01, channel)}
    model = CycleGAN(config, device=torch.device("cpu"), seed=0)
    fakes = []
    for state in states:
        model.G.load_state_dict(state["G"])
        model.G.eval()
        out = torch.cat([to_unit(model.G(b)) for b in crops.inputs.split(64)])
        fakes.append({"features": np.concatenate([extractor(b).numpy() for b in out.split(64)]),
                      "ssim_structure": ssim_structure(x01, out).numpy(),
                      "stain": crop_stain(out, channel)})
    return {"real": real, "fakes": fakes}


def score(fake: dict, real: dict, idx: np.ndarray) -> dict[str, float]:
    """One checkpoint's metrics on the crops ``idx``, as the Evaluator computes them."""
    ff, rf = fake["features"][idx], real["features"][idx]
    ref = FrechetStats.from_features(rf)
    return {"fd_random": frechet_distance_to_samples(ff, ref.mu, ref.sigma),
            "kd_random": kernel_distance(ff, rf).mean,
            "ssim_structure": float(fake["ssim_structure"][idx].mean()),
            "stain_area_error": stain_area_error(fake["stain"].area[idx], real["stain"].area[idx]),
            "stain_od_r": stain_od_r(fake["stain"].od[idx], real["stain"].od[idx])}


def split_half(scored: dict, *, n: int, splits: int, seed: int = 0) -> dict[str, float]:
    """Mean Spearman ρ over random splits of the pool into two disjoint halves of n."""
    pool = len(scored["real"]["features"])
    rng = np.random.default_rng(seed)
    rhos: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(splits):
        perm = rng.permutation(pool)
        halves = [[score(f, scored["real"], perm[h * n:(h + 1) * n]) for f in scored["fakes"]]
                  for h in (0, 1)]
        for m in METRICS:
            a, b = [np.array([s[m] for s in half]) for half in halves]
            rho = stats.spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
            rhos[m].append(float(rho))
    return {m: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
            for m, v in rhos.items()}


def stability(name: str, path: str, *, counts: list[int], splits: int, train: dict,
              pairs: list | None) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    states, config = checkpoints(path, train, epochs_from=1)
    train_s = time.perf_counter() - t0
    files = resolve_dataset(path)
    crops = eval_crops(crop=config.data.crop, n=2 * max(counts), pairs=pairs or files.pairs)
    scored = per_crop(states, config, crops, files.stain)
    rows = []
    for n in counts:
        if 2 * n > crops.n:
            print(f"  {name}: only {crops.n} crops, skipping n={n}")
            continue
        rows.append({"dataset": name, "stain": files.stain, "checkpoints": len(states),
                     "crops_per_half": n, "pool": crops.n, "images": crops.images,
                     **split_half(scored, n=n, splits=splits)})
    print(f"  {name}: {len(states)} checkpoints trained in {train_s:.0f} s, pool of "
          f"{crops.n} crops from {crops.images} images, scored in "
          f"{time.perf_counter() - t0 - train_s:.0f} s", flush=True)
    return rows


class KeepTimes:
    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def report(self, metrics, *, checkpoint, grid) -> None:
        self.epochs.append(dict(metrics))


def eval_share(counts: list[int], *, smoke: bool) -> list[dict[str, Any]]:
    """Evaluation's share of epoch 2 of a 2-epoch run at the demo base, per eval_crops."""
    base = yaml.safe_load((REPO / "search_spaces" / "lambda.yaml").read_text())["base"]
    if smoke:
        base = {**base, **SMOKE_TRAIN}
    rows = []
    for n in counts:
        keep = KeepTimes()
        config = load_config(None, {**base, "train.epochs": 2, "data.eval_crops": n,
                                    "train.keep_checkpoints": None})
        run_training(config, reporter=keep, device=torch.device("cpu"), log=lambda m: None)
        last = keep.epochs[-1]
        total = last["time_train_s"] + last["time_eval_s"] + last.get("time_checkpoint_s", 0.0)
        rows.append({"eval_crops": last["eval_crops"], "train_s": last["time_train_s"],
                     "eval_s": last["time_eval_s"], "share": last["time_eval_s"] / total})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=ints, default=[16, 64, 256], help="crops per half")
    p.add_argument("--splits", type=int, default=10, help="random splits per count")
    p.add_argument("--share-counts", type=ints, default=[16, 64, 256],
                   help="data.eval_crops values whose epoch share is timed")
    p.add_argument("--datasets", default="phantom,bci,mist")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="default: bench/results/eval_stability.json")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.counts, args.splits, args.share_counts = [4], 2, [4]
        args.datasets, args.threads = "phantom", args.threads or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = common.begin("eval_stability", args.threads)
    train = SMOKE_TRAIN if args.smoke_test else TRAIN
    sources = {"phantom": ("builtin:phantom-trichrome", None),
               "bci": (str(SHARED / "bci"), "pairs"), "mist": (str(SHARED / "mist"), "pairs")}
    rows = []
    for name in [d for d in args.datasets.split(",") if d]:
        path, pairs = sources[name]
        if name != "phantom" and not Path(path).is_dir():
            print(f"  {name}: {path} not found, skipped")
            continue
        rows += stability(name, path, counts=args.counts, splits=args.splits, train=train,
                          pairs=all_pairs(path) if pairs else None)
    print("\nsplit-half Spearman ρ of checkpoint rankings (mean over "
          f"{args.splits} random splits; 1 = the same ranking from disjoint crops):")
    print(common.format_table(rows, ["dataset", "checkpoints", "crops_per_half", *METRICS]))
    share = eval_share(args.share_counts, smoke=args.smoke_test)
    print("\nevaluation's share of an epoch at the CPU demo settings (lambda.yaml base):")
    print(common.format_table(share, ["eval_crops", "train_s", "eval_s", "share"],
                              headers=["data.eval_crops", "train s/epoch", "eval s",
                                       "eval share"]))
    common.finish("eval_stability", args.json, info,
                  {"args": vars(args), "train": train, "runs": RUNS, "stability": rows,
                   "eval_share": share})
    return 0


if __name__ == "__main__":
    sys.exit(main())
