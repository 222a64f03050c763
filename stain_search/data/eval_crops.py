"""Evaluation crops: a fixed, tissue-only sample of crops tiled from every test image.

One centre crop per test image gives three to sixteen samples on the data
users have, too few for any distribution distance. Instead every test image
is tiled on a regular grid, crops that are mostly glass are dropped with the
tissue mask of `stain-search data prepare` (:func:`~stain_search.data.prepare.tissue_mask`,
Otsu on saturation), and ``data.eval_crops`` crops are taken, spread as
evenly as the tissue allows over the images and, within an image, over its
tissue (every k-th tissue position in raster order). The grid starts at a
stride of one crop (no overlap) and is refined (stride ½, ¼ crop) only when
the images hold too few tissue crops for the count asked for.

The plan is a pure function of the images, the crop size and the count, so
every trial, epoch and rerun evaluates the same crops. Paired data are cut at
the same positions in the H&E image and its target (aligned crops, masked by
the H&E tissue as `data prepare` does, since pale IHC looks like glass);
unpaired real-stain images are sampled the same way on their own tissue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from stain_search.data.datasets import _load, to_tensor
from stain_search.data.prepare import tissue_mask
from stain_search.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Defaults of `data.eval_crops: null` (issue 11's sizes): 64 crops cost a few
# CPU-seconds per evaluation at the demo sizes; a GPU evaluates 512 in less.
# bench/eval_stability.py measures how stably each count ranks checkpoints.
CPU_CROPS = 64
GPU_CROPS = 512
MIN_TISSUE = 0.5  # a crop is tissue when at least half its pixels are
STRIDES = (1.0, 0.5, 0.25)  # grid strides tried, as fractions of the crop


def crop_count(requested: int | None, device: torch.device | str) -> int:
    """``data.eval_crops``, or its device-sized default when None."""
    if requested is not None:
        if requested < 2:
            raise ConfigError(f"`data.eval_crops` must be at least 2 (a distribution distance "
                              f"needs two samples), got {requested}")
        return requested
    return GPU_CROPS if torch.device(device).type == "cuda" else CPU_CROPS


@dataclass(frozen=True)
class CropPosition:
    image: int  # index into the image list the plan was made for
    y: int
    x: int


def grid(length: int, crop: int, stride: float) -> np.ndarray:
    """Start offsets of crops along one axis: evenly spaced, first and last flush with the edges."""
    if length < crop:
        return np.zeros(0, dtype=int)
    steps = int(np.ceil((length - crop) / max(stride, 1.0)))
    return np.unique(np.linspace(0, length - crop, steps + 1).round().astype(int))


def tissue_positions(mask: np.ndarray, crop: int, stride: float) -> list[tuple[int, int]]:
    """Grid positions (y, x) whose crop is at least :data:`MIN_TISSUE` tissue, raster order."""
    h, w = mask.shape
    # Summed-area table: each crop's tissue count in O(1).
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    ys, xs = grid(h, crop, stride), grid(w, crop, stride)
    if not len(ys) or not len(xs):
        return []
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    count = sat[yy + crop, xx + crop] - sat[yy, xx + crop] - sat[yy + crop, xx] + sat[yy, xx]
    keep = count >= MIN_TISSUE * crop * crop
    return [(int(y), int(x)) for y, x in zip(yy[keep], xx[keep])]


def allot(capacities: Sequence[int], n: int) -> list[int]:
    """Split ``n`` over images as evenly as their capacities allow (water filling)."""
    quota = [0] * len(capacities)
    left = n
    open_ = [i for i, c in enumerate(capacities) if c > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            take = min(share + (rank < extra), capacities[i] - quota[i])
            quota[i] += take
            left -= take
        open_ = [i for i in open_ if quota[i] < capacities[i]]
    return quota


def spread(items: Sequence, k: int) -> list:
    """``k`` of ``items``, evenly spaced (first and last included when k ≥ 2)."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[len(items) // 2]]
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, k).round()]


def plan_crops(masks: Sequence[np.ndarray], crop: int, n: int) -> list[CropPosition]:
    """Where to cut ``n`` crops from images with these tissue masks ((H, W) bool each).

    Fewer than ``n`` come back only when even the finest grid holds fewer
    tissue crops; none at all is an error.
    """
    for stride in STRIDES:
        positions = [tissue_positions(m, crop, stride * crop) for m in masks]
        if sum(map(len, positions)) >= n:
            break
    quota = allot([len(p) for p in positions], n)
    plan = [CropPosition(i, y, x) for i, (pos, k) in enumerate(zip(positions, quota))
            for y, x in spread(pos, k)]
    if not plan:
        raise DataError(f"no {crop}x{crop} evaluation crop of the {len(masks)} test images is "
                        f"at least {MIN_TISSUE:.0%} tissue: check the test images (blank "
                        f"glass?) or lower `data.eval_crop`")
    return plan


@dataclass
class EvalCrops:
    """The evaluation set: (N, 3, crop, crop) tensors in [-1, 1], row i of each aligned."""

    inputs: torch.Tensor  # H&E crops (G's inputs)
    targets: torch.Tensor | None  # paired real-stain crops at the same positions
    reference: torch.Tensor  # real-stain crops: the targets when paired, else from test B
    plan: list[CropPosition]
    images: int  # test images the crops were cut from

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])


def _cut(image: np.ndarray, plan: Sequence[CropPosition], index: int, crop: int) -> list[torch.Tensor]:
    return [to_tensor(image[p.y:p.y + crop, p.x:p.x + crop]) for p in plan if p.image == index]


def _sample(paths: Sequence[Path], crop: int, n: int, load_size: int | None,
            partners: Sequence[Path] | None = None):
    """Crops of ``paths`` (masked on them) and, if given, of ``partners`` at the same positions."""
    images = [_load(Path(p), crop, load_size) for p in paths]
    plan = plan_crops([tissue_mask(im) for im in images], crop, n)
    cut = [c for i, im in enumerate(images) for c in _cut(im, plan, i, crop)]
    if partners is None:
        return plan, torch.stack(cut), None
    paired = []
    for i, path in enumerate(partners):
        other = _load(Path(path), crop, load_size)
        if other.shape != images[i].shape:
            raise DataError(f"{path}: {other.shape[1]}x{other.shape[0]} px, but its H&E partner "
                            f"{paths[i]} is {images[i].shape[1]}x{images[i].shape[0]}: paired "
                            f"evaluation crops need images of one size")
        paired += _cut(other, plan, i, crop)
    return plan, torch.stack(cut), torch.stack(paired)


def _evenly(paths: Sequence, n: int) -> list:
    """At most ``n`` items, evenly spread: with more images than crops, one crop per image."""
    return spread(list(paths), n)


def eval_crops(*, crop: int, n: int, load_size: int | None = None,
               pairs: Sequence[tuple[Path, Path]] | None = None,
               test_a: Sequence[Path] = (), test_b: Sequence[Path] = ()) -> EvalCrops:
    """The evaluation set for a dataset: aligned pairs where it has them, else test A and B."""
    if pairs:
        chosen = _evenly(pairs, n)
        plan, inputs, targets = _sample([a for a, _ in chosen], crop, n, load_size,
                                        partners=[b for _, b in chosen])
        result = EvalCrops(inputs, targets, targets, plan, len(chosen))
    else:
        if not test_a or not test_b:
            raise DataError("evaluation needs test images in both domains (testA and testB)")
        chosen = _evenly(test_a, n)
        plan, inputs, _ = _sample(chosen, crop, n, load_size)
        _, reference, _ = _sample(_evenly(test_b, n), crop, n, load_size)
        result = EvalCrops(inputs, None, reference, plan, len(chosen))
    if result.n < n:
        logger.warning("only %d tissue crops of %dx%d in %d test images (asked for %d by "
                       "`data.eval_crops`): evaluating on %d", result.n, crop, crop,
                       result.images, n, result.n)
    return result
