"""Checkerboard artefacts of the two U-Net upsamplings, after equal training.

A stride-2 transposed convolution with a 4x4 kernel gives even and odd
output pixels different sums of its weights: a period-2 pattern, i.e.
energy at the Nyquist frequency (Odena et al., 2016, "Deconvolution and
Checkerboard Artifacts"). ``model.upsample: resize`` (bilinear x2, then a
3x3 conv) cannot produce it by construction. This script trains both
variants with the same config, seeds and steps (``run_training``), then
translates the held-out test images with G and measures, per image,

    nyquist share = energy of the grey-level spectrum on the Nyquist lines
                    (row H/2 and column W/2) / all non-DC energy
    checkerboard score = share(G(x)) / share(x)

1 means the output has the input's share of Nyquist energy; above 1 is
added period-2 pattern. The same ratio on the H/4, W/4 lines (period 4, the
next decoder level's pattern) is reported beside it, and each run's final
evaluation (fd_random or fid, SSIM) shows that the lower score is not
bought with a worse translation. Untrained (epoch 0) scores are listed too.

    python bench/checkerboard.py --threads 2
    python bench/checkerboard.py --data /path/to/bci --crop 128
    python bench/checkerboard.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from stain_search.checkpoint import read_checkpoint  # noqa: E402
from stain_search.config import load_config  # noqa: E402
from stain_search.data import resolve_dataset, to_tensor  # noqa: E402
from stain_search.data.datasets import centre_crop  # noqa: E402
from stain_search.data.io import read_image  # noqa: E402
from stain_search.models import UPSAMPLERS, build_generator, init_weights  # noqa: E402
from stain_search.train import run_training  # noqa: E402

# The bundled spaces' demo size (spaces/lambda.yaml's base).
DEMO = {"data.crop": 64, "data.batch_size": 4, "model.depth": 4, "model.ngf": 16,
        "model.ndf": 16, "train.epochs": 4, "train.steps_per_epoch": 24,
        "train.keep_checkpoints": None}
SMOKE = {"data.crop": 32, "data.batch_size": 2, "model.depth": 3, "model.ngf": 8,
         "model.ndf": 8, "model.d_blocks": 2, "data.eval_crops": 4, "train.epochs": 1,
         "train.steps_per_epoch": 2, "train.keep_checkpoints": None}


def line_share(image: np.ndarray, divisor: int) -> float:
    """Share of non-DC grey-level spectral energy on the H/divisor and W/divisor lines."""
    grey = image.astype(np.float64).mean(-1)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    h, w = grey.shape
    rows = {h // divisor, (h - h // divisor) % h}  # ±f: the same line twice for Nyquist
    cols = {w // divisor, (w - w // divisor) % w}
    mask = np.zeros_like(power, dtype=bool)
    mask[list(rows), :] = True
    mask[:, list(cols)] = True
    return float(power[mask].sum() / max(power.sum(), 1e-12))


def translate(generator: torch.nn.Module, images: list[np.ndarray]) -> list[np.ndarray]:
    generator.eval()
    out = []
    with torch.no_grad():
        for image in images:
            y = generator(to_tensor(image)[None])[0]  # (3, H, W) in [-1, 1]
            out.append(((y.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy())
    return out


def scores(generator: torch.nn.Module, images: list[np.ndarray]) -> dict[str, float]:
    outputs = translate(generator, images)
    result = {}
    for name, divisor in (("nyquist", 2), ("period4", 4)):
        ratios = [line_share(y, divisor) / max(line_share(x.astype(np.float64), divisor), 1e-12)
                  for x, y in zip(images, outputs)]
        result[f"{name}_ratio"] = statistics.mean(ratios)
        result[f"{name}_share_out"] = statistics.mean(line_share(y, divisor) for y in outputs)
    return result


def test_images(data: str, *, size: int, step: int, limit: int) -> list[np.ndarray]:
    """Centre crops of the test A images: the largest multiple of ``step`` up to ``size``."""
    files = resolve_dataset(data)
    images = []
    for path in files.test_a[:limit]:
        image = read_image(path)
        side = min(size, *image.shape[:2]) // step * step
        images.append(np.ascontiguousarray(centre_crop(image, side)))
    return images


class LastGenerator:
    """A reporter that keeps the last epoch's metrics and G weights."""

    def __init__(self):
        self.metrics: dict[str, Any] = {}
        self.g_state: dict[str, torch.Tensor] | None = None

    def report(self, metrics, *, checkpoint, grid):
        self.metrics = dict(metrics)
        if checkpoint is not None:
            self.g_state = read_checkpoint(checkpoint)[0]["G"]


def run_one(overrides: dict, images: list[np.ndarray], upsample: str, seed: int) -> list[dict]:
    config = load_config(None, {**overrides, "model.upsample": upsample, "train.seed": seed})
    torch.manual_seed(seed)
    untrained = init_weights(build_generator(config.model))
    rows = [{"upsample": upsample, "seed": seed, "epoch": 0, **scores(untrained, images)}]
    keep = LastGenerator()
    run_training(config, reporter=keep, log=lambda m: None)
    trained = build_generator(config.model)
    trained.load_state_dict(keep.g_state)
    quality = {k: keep.metrics.get(k) for k in ("fid", "fd_random", "ssim_structure", "ssim_gt")}
    rows.append({"upsample": upsample, "seed": seed, "epoch": config.train.epochs,
                 **scores(trained, images), **{k: v for k, v in quality.items() if v is not None},
                 "time_train_s": keep.metrics.get("time_train_s")})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for upsample in sorted({r["upsample"] for r in rows}):
        for epoch in sorted({r["epoch"] for r in rows}):
            group = [r for r in rows if r["upsample"] == upsample and r["epoch"] == epoch]
            if not group:
                continue
            row = {"upsample": upsample, "epoch": epoch, "runs": len(group)}
            for key in ("nyquist_ratio", "period4_ratio", "fid", "fd_random", "ssim_structure",
                        "ssim_gt"):
                values = [r[key] for r in group if r.get(key) is not None]
                if values:
                    row[key] = statistics.mean(values)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="builtin:phantom-trichrome")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch")
    parser.add_argument("--crop", type=int, default=None, help="training crop")
    parser.add_argument("--eval-size", type=int, default=256, help="translated crop side")
    parser.add_argument("--images", type=int, default=8, help="test images translated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)

    info = common.begin("checkerboard", args.threads)
    overrides = {**(SMOKE if args.smoke_test else DEMO), "data.path": args.data}
    for key, value in (("train.epochs", args.epochs), ("train.steps_per_epoch", args.steps),
                       ("data.crop", args.crop)):
        if value is not None:
            overrides[key] = value
    seeds = args.seeds[:1] if args.smoke_test else args.seeds
    step = 2 ** overrides["model.depth"]
    images = test_images(args.data, size=64 if args.smoke_test else args.eval_size, step=step,
                         limit=2 if args.smoke_test else args.images)
    print(f"{len(images)} test images of {images[0].shape[1]}x{images[0].shape[0]} px from "
          f"{args.data}; {overrides['train.epochs']} epochs x {overrides['train.steps_per_epoch']} "
          f"steps at {overrides['data.crop']} px, seeds {seeds}")
    rows = []
    for seed in seeds:
        for upsample in sorted(UPSAMPLERS):
            rows += run_one(overrides, images, upsample, seed)
            print(f"  {upsample} seed {seed}: nyquist ratio {rows[-1]['nyquist_ratio']:.3g}")
    summary = summarise(rows)
    print()
    print(common.format_table(summary, ["upsample", "epoch", "runs", "nyquist_ratio",
                                        "period4_ratio", "fd_random", "fid", "ssim_structure",
                                        "ssim_gt"]))
    final = [r for r in summary if r["epoch"] == overrides["train.epochs"]]
    best = min(final, key=lambda r: r["nyquist_ratio"])
    print(f"\nlower checkerboard score after equal training: {best['upsample']}")
    common.finish("checkerboard", args.json, info, {
        "settings": {**vars(args), "overrides": overrides, "seeds": seeds,
                     "image_size": list(images[0].shape[:2]), "images": len(images)},
        "rows": rows, "summary": summary, "better": best["upsample"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
