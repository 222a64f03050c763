"""Evaluation cost: what the per-epoch FID/SSIM evaluation costs, as a share
of a training epoch, and what the reference-statistics cache saves.

What is measured (all with the library's own code):

- **canonical share** — ``run_training`` for two epochs with the default
  settings; the loop's own ``time_eval_s`` (``Evaluator.evaluate`` +
  ``sample_grid``) against ``time_train_s`` of the second epoch;
- **reference statistics** — ``Evaluator.prepare_reference`` with an empty
  cache (computed) and again with the cache filled (read from disk);
- **the knobs** — ``data.eval_crops`` (the evaluation crop count) and
  ``eval.batch_size``, each combination timed directly with
  ``Evaluator.evaluate`` + ``sample_grid`` on a freshly built model.

Feature extractors (``--extractors``): ``random`` is the ``fd_random`` CNN
these machines use (no Inception weights here). ``inception-arch`` is
torch-fidelity's Inception-v3 *architecture with random weights*, for timing
only — the values it gives are not FID, but its cost is exactly what real
FID costs once the weights are installed (299² resize, 2048-d pool3).

    python bench/eval_cost.py --threads 1
    python bench/eval_cost.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
from stain_search.config import Config, apply_overrides, load_config  # noqa: E402
from stain_search.evaluate import Evaluator, sample_grid  # noqa: E402
from stain_search.gan import CycleGAN  # noqa: E402
from stain_search.metrics.frechet import FrechetDistance, random_spec  # noqa: E402
from stain_search.train import build_data, run_training  # noqa: E402

LAMBDA_BASE = {"data.crop": 64, "data.batch_size": 4, "model.depth": 4, "model.ngf": 16,
               "model.ndf": 16, "train.steps_per_epoch": 24}
TINY_BASE = {"data.crop": 32, "data.batch_size": 2, "model.depth": 3, "model.ngf": 8,
             "model.ndf": 8, "model.d_blocks": 2, "train.steps_per_epoch": 2}


class InceptionArchitecture(nn.Module):
    """torch-fidelity's Inception-v3 with random weights: FID's exact cost, not its values."""

    def __init__(self):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as tfi

        cls = tfi.FeatureExtractorInceptionV3
        with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None), \
                mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
            self.net = cls("inception-v3-compat", ["2048"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As stain_search.metrics.frechet.InceptionFeatures: [0, 1] → uint8 → (B, 2048)
        (features,) = self.net((x.clamp(0, 1) * 255).round().to(torch.uint8))
        return features.double()


def make_evaluator(config: Config, data, *, extractor: str, cache_dir: Path,
                   device: torch.device) -> Evaluator:
    ev = Evaluator(config.eval, dataset_key=data.dataset_key, has_pairs=data.has_pairs,
                   stain=data.stain, device=device, cache_dir=cache_dir)
    if extractor == "inception-arch":
        # Timing only: the statistics land in this run's private cache folder.
        ev.frechet = FrechetDistance(random_spec(), device=device, cache_dir=cache_dir,
                                     extractor=InceptionArchitecture().to(device).eval())
    return ev


def time_reference(config: Config, data, *, extractor: str, device: torch.device) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-eval-cache-") as tmp:
        cold = make_evaluator(config, data, extractor=extractor, cache_dir=Path(tmp), device=device)
        t0 = time.perf_counter()
        cold.prepare_reference(data.reference_batches)
        cold_s = time.perf_counter() - t0
        warm = make_evaluator(config, data, extractor=extractor, cache_dir=Path(tmp), device=device)
        t0 = time.perf_counter()
        warm.prepare_reference(data.reference_batches)
        return {"ref_cold_s": cold_s, "ref_cached_s": time.perf_counter() - t0}


def time_evaluation(config: Config, *, extractor: str, device: torch.device,
                    repeats: int) -> dict[str, Any]:
    """One evaluation as the loop runs it (evaluate + sample grid), median of repeats."""
    data = build_data(config)
    model = CycleGAN(config, device=device, seed=0)
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-cache-") as tmp:
        ev = make_evaluator(config, data, extractor=extractor, cache_dir=Path(tmp), device=device)
        ev.prepare_reference(data.reference_batches)
        for _ in range(repeats + 1):  # the first run warms up
            common.synchronize(device)
            t0 = time.perf_counter()
            ev.evaluate(model.G, model.F, data.eval_batches)
            sample_grid(model.G, model.F, data.eval_batches[0], rows=config.train.sample_images)
            common.synchronize(device)
            times.append(time.perf_counter() - t0)
    n = sum(b["A"].shape[0] for b in data.eval_batches)
    eval_s = statistics.median(times[1:])
    return {"eval_images": n, "eval_s": eval_s, "ms_per_image": 1000 * eval_s / n, **
            time_reference(config, data, extractor=extractor, device=device)}


class KeepMetrics:
    """A reporter that keeps each epoch's metrics and nothing else."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Any]] = []

    def report(self, metrics, *, checkpoint, grid) -> None:
        self.epochs.append(dict(metrics))


def canonical(config: Config, *, device: torch.device) -> dict[str, float]:
    """The loop's own timings: second epoch of a two-epoch run (the first warms up)."""
    keep = KeepMetrics()
    run_training(apply_overrides(config, {"train.epochs": 2}).validate(), reporter=keep,
                 device=device, log=lambda m: None)
    last = keep.epochs[-1]
    train_s, eval_s, ckpt_s = last["time_train_s"], last["time_eval_s"], last["time_checkpoint_s"]
    return {"time_train_s": train_s, "time_eval_s": eval_s, "time_checkpoint_s": ckpt_s,
            "eval_share": eval_s / (train_s + eval_s + ckpt_s)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--extractors", default="random,inception-arch")
    p.add_argument("--eval-images", type=ints, default=[8, 16, 32])
    p.add_argument("--eval-batches", type=ints, default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="default: bench/results/eval_cost.json")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    args.extractors = [e for e in args.extractors.split(",") if e]
    for e in args.extractors:
        if e not in ("random", "inception-arch"):
            raise SystemExit(f"unknown extractor {e!r}; known: random, inception-arch")
    if args.smoke_test:
        args.extractors, args.eval_images, args.eval_batches = ["random"], [4], [2]
        args.repeats, args.threads = 1, args.threads or 1
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = "cpu" if dev == "auto" else dev
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = common.begin("eval_cost", args.threads)
    base = TINY_BASE if args.smoke_test else LAMBDA_BASE
    config = load_config(None, base)
    canon = canonical(config, device=device)
    epoch_train_s = canon["time_train_s"]
    print(f"\nthe loop's own timings ({config.data.eval_crops or 'default'} evaluation crops, batch "
          f"{config.eval.batch_size}, fd_random):")
    print(common.format_table([canon], ["time_train_s", "time_eval_s", "time_checkpoint_s",
                                        "eval_share"],
                              headers=["train s/epoch", "eval s", "checkpoint s",
                                       "eval share of epoch"]))
    rows = []
    for extractor in args.extractors:
        for n in args.eval_images:
            for batch in args.eval_batches:
                cfg = load_config(None, {**base, "data.eval_crops": n, "eval.batch_size": batch})
                r = time_evaluation(cfg, extractor=extractor, device=device, repeats=args.repeats)
                r.update(extractor=extractor, eval_batch=batch,
                         share=r["eval_s"] / (epoch_train_s + r["eval_s"]),
                         loadavg_1m=(common.loadavg() or [None])[0])
                rows.append(r)
                print(f"  {extractor} images {r['eval_images']} batch {batch}: "
                      f"{r['eval_s']:.3f} s", flush=True)
    cols = ["extractor", "eval_images", "eval_batch", "eval_s", "ms_per_image", "share",
            "ref_cold_s", "ref_cached_s"]
    print(f"\nevaluation per epoch vs a {epoch_train_s:.2f} s training epoch "
          f"({config.train.steps_per_epoch} steps of batch {config.data.batch_size}, "
          f"{config.data.crop} px):")
    print(common.format_table(rows, cols, headers=["features", "images", "batch", "eval s",
                                                   "ms/image", "share of epoch",
                                                   "ref stats cold s", "ref stats cached s"]))
    common.finish("eval_cost", args.json, info, {
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "base": base,
        "canonical": canon, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
