"""Normalisation statistics across tiles: which instance-norm statistics each
tile of a slide is normalised with (``NORM_STATS``).

The reference U-Net normalises every feature map by its own mean and
variance (Ulyanov et al., 2016), so a tile's output depends on everything
else in the tile: translated tile by tile, neighbouring tiles get different
colours and the seams show — the problem KIN addresses (Ho et al., 2022,
"Ultra-High-Resolution Unpaired Stain Transformation via Kernelized Instance
Normalization"; also TIN, Chen et al., 2022). The strategies:

* ``global`` (default) — exactly the statistics whole-image inference uses.
  They are computed over the tiles without holding the image: pass k runs
  the tiles up to norm layer k, with layers < k fixed at their (already
  exact) whole-image statistics, and pools layer k's mean and variance over
  each tile's core — the part of the tile nearest to it, a partition of the
  image aligned to 2**depth, far from the tile's border (Chan et al.'s
  pairwise update, in float64). L norm layers take L such passes, each
  stopping at its layer, then one output pass: tiled output equals
  whole-image output (tests/test_translate.py measures it).
* ``kernel`` — KIN: one pass records each tile's own statistics, then every
  tile is normalised with the mean of its k×k neighbourhood's. Two passes
  whatever the depth; smooth, but not equal to whole-image inference.
* ``tile`` — each tile its own statistics (one pass): what G does to a crop
  the size of a tile; the window softens but cannot remove the differences.

Batch norm (eval: running statistics) and ``norm: none`` models are
tile-independent already. SAGAN self-attention at the bottleneck
(``model.attention`` self/both) attends across the whole tile, so no tiling
reproduces it exactly.

A strategy is a function of the translation run
(:class:`~stain_search.deploy.translate.Run`: its tiles, its passes)
returning, for a batch of tiles, the fixed (mean, var) per norm layer, or
None for a tile's own.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from stain_search.deploy.tiling import Tile
from stain_search.errors import DataError

Fixed = list  # per norm: (mean, var) of shape (B or 1, C), or None for own statistics


class Run(Protocol):
    """What a strategy needs of a translation run (``deploy.translate.Run``,
    which satisfies it): the translator (``tr``: ``norms``, ``kernel``,
    ``device``), the tile ``grid``, and a pass over the tiles."""

    tr: Any
    grid: Any

    def statistics_pass(self, desc: str, fixed: Callable[[list[Tile]], Fixed],
                        hooks: dict[int, Callable[[torch.Tensor, list[Tile]], None]],
                        *, stop_after: int | None = None) -> None: ...


# --- instance norm with statistics from outside -------------------------------------

class StatsNorm(nn.Module):
    """An instance norm (affine-free or not) whose statistics can be fixed
    from outside (``fixed`` = (mean, var), each (B or 1, C)) and whose input
    can be observed (``hook``); with neither it is ``F.instance_norm``."""

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hook: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        if self.hook is not None:
            self.hook(x)
        if self.fixed is None:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        mean, var = self.fixed
        y = (x - mean[..., None, None]) * torch.rsqrt(var[..., None, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y


class StopPass(Exception):
    """Raised by a hook once the layer a statistics pass needs has been seen."""


def with_stats_norms(generator: nn.Module, *, step: int, device: torch.device
                     ) -> tuple[nn.Module, list[StatsNorm]]:
    """A copy of ``generator`` (eval) whose per-image instance norms are
    :class:`StatsNorm`, and those norms in the order the forward pass meets them."""
    net = copy.deepcopy(generator).to(device).eval()

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            # Tracked running statistics (eval) are tile-independent already.
            if isinstance(child, nn.InstanceNorm2d) and not child.track_running_stats:
                setattr(module, name, StatsNorm(child))
            else:
                swap(child)

    swap(net)
    norms = [m for m in net.modules() if isinstance(m, StatsNorm)]
    order: list[StatsNorm] = []
    for norm in norms:
        norm.hook = lambda x, norm=norm: order.append(norm)
    with torch.inference_mode():
        net(torch.zeros(1, 3, 2 * step, 2 * step, device=device))
    for norm in norms:
        norm.hook = None
    return net, order


class Pooled:
    """Per-channel mean and (biased) variance pooled over regions, float64
    (Chan, Golub & LeVeque's pairwise update)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, region: torch.Tensor) -> None:  # (C, h, w)
        count = region.shape[1] * region.shape[2]
        if count == 0:
            return
        var, mean = torch.var_mean(region.double(), dim=(1, 2), unbiased=False)
        if self.mean is None:
            self.n, self.mean, self.m2 = count, mean, var * count
            return
        total = self.n + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + var * count + delta ** 2 * (self.n * count / total)
        self.n = total

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None:
            raise DataError("no tissue tile to take normalisation statistics from; lower "
                            "--min-tissue (0 translates every tile)")
        return self.mean.float()[None], (self.m2 / self.n).float()[None]  # (1, C) each



# --- where the statistics come from (NORM_STATS) -----------------------------------------

def global_statistics(run: "Run") -> Callable[[list[Tile]], Fixed]:
    """Whole-image statistics, one exact pass per norm layer (module docstring)."""
    norms = run.tr.norms
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k in range(len(norms)):
        pooled = Pooled()

        def record(x: torch.Tensor, tiles: list[Tile], pooled=pooled) -> None:
            s = run.grid.tile_h // x.shape[-2]  # this layer's down-sampling factor
            for b, tile in enumerate(tiles):
                y0, y1, x0, x1 = tile.core
                pooled.add(x[b, :, y0 // s:y1 // s, x0 // s:x1 // s])

        fixed_so_far = list(stats) + [None] * (len(norms) - k)
        run.statistics_pass(f"statistics {k + 1}/{len(norms)}", lambda tiles: fixed_so_far,
                            {k: record}, stop_after=k)
        stats.append(pooled.result())
    return lambda tiles: stats


def kernel_statistics(run: "Run") -> Callable[[list[Tile]], Fixed]:
    """KIN (Ho et al., 2022): each tile's own statistics, averaged (mean and
    standard deviation) over the ``kernel`` × ``kernel`` neighbouring tissue tiles."""
    norms, grid = run.tr.norms, run.grid
    rows, cols = len(grid.ys), len(grid.xs)
    seen = np.zeros((rows, cols), bool)
    tables = [None] * len(norms)  # per norm: (rows, cols, 2, C) float64 of mean, std

    def record(k: int):
        def fn(x: torch.Tensor, tiles: list[Tile]) -> None:
            var, mean = torch.var_mean(x.double(), dim=(2, 3), unbiased=False)  # (B, C)
            both = torch.stack([mean, var.sqrt()], 1).cpu().numpy()  # (B, 2, C)
            if tables[k] is None:
                tables[k] = np.zeros((rows, cols, 2, x.shape[1]))
            for b, tile in enumerate(tiles):
                tables[k][tile.row, tile.col] = both[b]
                seen[tile.row, tile.col] = True
        return fn

    run.statistics_pass("statistics (KIN)", lambda tiles: [None] * len(norms),
                        {k: record(k) for k in range(len(norms))})
    if not seen.any():
        return lambda tiles: [None] * len(norms)
    size = run.tr.kernel
    weight = ndimage.uniform_filter(seen.astype(np.float64), size=size, mode="constant")
    smooth = []
    for table in tables:
        avg = ndimage.uniform_filter(table * seen[..., None, None], size=(size, size, 1, 1),
                                     mode="constant") / np.maximum(weight, 1e-12)[..., None, None]
        smooth.append(torch.from_numpy(avg).float().to(run.tr.device))  # (rows, cols, 2, C)

    def fixed(tiles: list[Tile]) -> Fixed:
        r = torch.tensor([t.row for t in tiles])
        c = torch.tensor([t.col for t in tiles])
        return [(s[r, c, 0], s[r, c, 1] ** 2) for s in smooth]  # (B, C) each
    return fixed


def tile_statistics(run: "Run") -> Callable[[list[Tile]], Fixed]:
    """Every tile its own statistics: plain instance norm, no extra pass."""
    return lambda tiles: [None] * len(run.tr.norms)


NORM_STATS: dict[str, Callable[["Run"], Callable[[list[Tile]], Fixed]]] = {
    "global": global_statistics,
    "kernel": kernel_statistics,
    "tile": tile_statistics,
}

