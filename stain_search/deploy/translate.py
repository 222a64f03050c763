"""Translate tiles and whole slides with an exported generator G: H&E → stain.

A slide is far larger than a GPU batch, so it is translated in overlapping
tiles whose outputs are blended with a smooth window, the usual overlap-and-
blend scheme for fully convolutional networks on large images: every pixel
is the weighted mean Σ w_t·G(tile_t) / Σ w_t over the tiles that cover it.

Geometry. The image is reflect-padded at the bottom/right to a multiple of
2**depth (the U-Net halves it ``depth`` times) and tiles start on that same
2**depth grid, so each tile's strided convolutions sample exactly the grid
the whole image would. An output pixel of the U-Net depends on input pixels
up to R = 3·(2**depth - 1) px away (:func:`receptive_radius`), so within R
of a tile's inner border it sees the tile's padding instead of the
neighbour's pixels. The window therefore gives the outer R + 1 px of each
overlap (almost) no weight, ramps up across the rest with a raised cosine
(the neighbour's ramp is its mirror image: the two sum to one, so no seam)
and is flat on sides that lie on the image border, where whole-image
inference pads the same way. The default overlap, 2(R + 1) plus a 2**depth
ramp, makes that margin cover the receptive field (up to depth 7 at the
default tile sizes; the reference depth-8 U-Net sees 765 px, further than
its default overlap of half a 2048 px tile covers).

Instance norm. The reference U-Net normalises every feature map by its own
mean and variance (Ulyanov et al., 2016), so a tile's output depends on
everything else in the tile: translated tile by tile, neighbouring tiles get
different colours and the seams show — the problem KIN addresses (Ho et al.,
2022, "Ultra-High-Resolution Unpaired Stain Transformation via Kernelized
Instance Normalization"; also TIN, Chen et al., 2022). ``norm_stats`` picks
the statistics every tile is normalised with (``NORM_STATS``):

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

Background. Tiles with less tissue than ``min_tissue`` (the tissue mask of
``stain_search.data``, thresholded once on a thumbnail of the whole image)
are copied through untouched and left out of the statistics.

Memory. Large inputs are read region by region (TIFF/SVS: tile or strip
segments decoded on demand, a small cache); output rows are emitted as soon
as no later tile touches them, so the working set is one row of tiles, never
the slide. A ``.tif`` output is a tiled, pyramidal TIFF (SubIFDs, each level
half the size of the one above, written level by level from a spool file).
Every output is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from stain_search.atomic import atomic_dir
from stain_search.data.io import IMAGE_EXTENSIONS, is_image_file, read_image, to_rgb8, write_image
from stain_search.data.prepare import tissue_mask, tissue_threshold
from stain_search.errors import ConfigError, DataError

TIFF_SUFFIXES = (".tif", ".tiff", ".svs")
OUTPUT_TILE = 256  # tile size of the written TIFF (what slide viewers expect)
MAX_IN_MEMORY_PIXELS = 16384 * 16384  # non-TIFF outputs are built in memory
WINDOW_FLOOR = 1e-6  # weight of a tile's outer margin: ~0, never a 0/0
EMIT_ROWS = 64  # finished rows are normalised and handed on this many at a time
MIN_SEGMENT_CACHE = 16 * 2 ** 20  # decoded TIFF segments kept for overlapping tiles


# --- geometry: tiles, cores and the blending window ------------------------------

def receptive_radius(depth: int) -> int:
    """Pixels an output pixel of the U-Net can see to one side: 3·(2**depth - 1).

    Measured by back-propagating from single output pixels of every phase of
    the 2**depth grid (tests/test_translate.py checks it): each decoder level
    adds its stride to the encoder's field, and a pixel late in a stride
    block sees further than one at its start."""
    return 3 * (2 ** depth - 1)


def default_tile(depth: int) -> int:
    # Large against the receptive field (little overlap to recompute), small
    # enough for a GPU batch: 1024 px at the default depth 5.
    return int(np.clip(2 ** (depth + 5), 512, 2048))


def default_overlap(depth: int, tile: int) -> int:
    """Twice the receptive field plus a ramp of 2**depth px (then tiled = whole
    image), on the 2**depth grid, at most half a tile."""
    step = 2 ** depth
    exact = -(-(2 * (receptive_radius(depth) + 1) + step) // step) * step
    return min(exact, (tile // 2) // step * step)


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride``, the last flush with the end."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def ramp(overlap: int, margin: int) -> np.ndarray:
    """Weights across an overlap, outer edge first: ~0 on the outer ``margin``
    px (the tile's border effects reach that far), a raised cosine up to
    ``overlap - margin``, then 1. The neighbour's ramp is this one reversed,
    and the two sum to one; with no room for a ramp it is a cut in the middle."""
    t = np.arange(overlap) + 0.5
    width = overlap - 2 * margin
    u = np.clip((t - margin) / width, 0.0, 1.0) if width > 0 else (t > overlap / 2) * 1.0
    return np.maximum(0.5 - 0.5 * np.cos(np.pi * u), WINDOW_FLOOR)


def axis_window(starts: list[int], k: int, tile: int, margin: int) -> np.ndarray:
    """1-D window of tile k: ramps only towards neighbouring tiles."""
    w = np.ones(tile, np.float64)
    if k > 0:
        ov = starts[k - 1] + tile - starts[k]
        if ov > 0:
            w[:ov] *= ramp(ov, margin)
    if k < len(starts) - 1:
        ov = starts[k] + tile - starts[k + 1]
        if ov > 0:
            w[tile - ov:] *= ramp(ov, margin)[::-1]
    return w


def axis_cores(starts: list[int], tile: int, step: int) -> list[tuple[int, int]]:
    """Each tile's core along one axis, relative to the tile: cut halfway
    through every overlap, on the 2**depth grid; together they partition
    the axis."""
    cuts = [0]
    for a, b in zip(starts, starts[1:]):
        cuts.append(b + ((a + tile - b) // 2) // step * step)
    cuts.append(starts[-1] + tile)
    return [(lo - s, hi - s) for s, lo, hi in zip(starts, cuts, cuts[1:])]


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    y: int  # top-left in the padded image
    x: int
    core: tuple[int, int, int, int]  # (y0, y1, x0, x1) relative to the tile


@dataclass(frozen=True)
class Grid:
    """Tiles over an image of ``height`` × ``width`` (padded to the U-Net's step)."""

    height: int  # the image as given
    width: int
    padded_h: int
    padded_w: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    step: int
    margin: int  # window margin: the U-Net's receptive radius + 1

    @classmethod
    def build(cls, height: int, width: int, *, tile: int, overlap: int, depth: int) -> "Grid":
        step = 2 ** depth
        ph, pw = -(-height // step) * step, -(-width // step) * step
        th, tw = min(tile, ph), min(tile, pw)
        stride = tile - overlap
        return cls(height, width, ph, pw, th, tw, tuple(axis_starts(ph, th, stride)),
                   tuple(axis_starts(pw, tw, stride)), step, receptive_radius(depth) + 1)

    def tiles(self) -> list[Tile]:
        """Row-major, the order the blender needs."""
        cy = axis_cores(list(self.ys), self.tile_h, self.step)
        cx = axis_cores(list(self.xs), self.tile_w, self.step)
        return [Tile(r, c, y, x, (*cy[r], *cx[c]))
                for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)]

    def window(self, tile: Tile) -> np.ndarray:
        wy = axis_window(list(self.ys), tile.row, self.tile_h, self.margin)
        wx = axis_window(list(self.xs), tile.col, self.tile_w, self.margin)
        return np.outer(wy, wx).astype(np.float32)  # (tile_h, tile_w)


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


class _Stop(Exception):
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


# --- image sources: region reads -------------------------------------------------------

class ArraySource:
    """An image held in memory, (H, W, 3) uint8."""

    def __init__(self, pixels: np.ndarray, *, name: str = "image"):
        self.pixels, self.name = pixels, name
        self.height, self.width = pixels.shape[:2]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.pixels[y:y + h, x:x + w]

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        step = max(1, -(-max(self.height, self.width) // max_side))
        return self.pixels[::step, ::step]

    def close(self) -> None:
        pass


class TiffSource:
    """Level 0 of a TIFF/SVS read region by region: only the tiles or strips
    a region touches are decoded, and recently decoded ones are cached."""

    def __init__(self, path: Path):
        self.path = path
        self.tif = tifffile.TiffFile(path)
        try:
            self.series = self.tif.series[0]
            self.page = self.series.levels[0].pages[0].keyframe
            self.height, self.width = self.page.imagelength, self.page.imagewidth
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._cached = 0
            self.cache_bytes = MIN_SEGMENT_CACHE
        except Exception:
            self.tif.close()
            raise

    @staticmethod
    def supports(page) -> bool:
        """Contiguous samples, one plane: the layout region reads handle."""
        return (page.imagedepth == 1 and (page.planarconfig == 1 or page.samplesperpixel == 1)
                and page.shaped[0] == 1 and page.shaped[1] == 1)

    def _segment(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        page = self.page
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        fh = self.tif.filehandle
        if count:
            with fh.lock:
                fh.seek(offset)
                data = fh.read(count)
        else:
            data = None  # a sparse (never written) segment
        args = {"_fullsize": page.is_tiled}
        if page.jpegtables is not None:
            args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:
            args["jpegheader"] = page.jpegheader
        try:
            segment, _, shape = page.decode(data, index, **args)
        except Exception as err:  # imagecodecs/tifffile raise many types for bad data
            raise DataError(f"{self.path}: unreadable TIFF data in segment {index} "
                            f"({type(err).__name__}: {err})") from None
        if segment is None:
            segment = np.zeros(shape, page.dtype)
        segment = segment.reshape(shape)[0]  # (rows, cols, samples)
        self._cache[index] = segment
        self._cached += segment.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return segment

    def keep_rows(self, rows: int) -> None:
        """Size the segment cache to hold ``rows`` full-width rows (a row of
        tiles and its overlap): each segment is then decoded about once."""
        page = self.page
        seg_rows = page.tilelength if page.is_tiled else (page.rowsperstrip or self.height)
        row_bytes = self.width * page.samplesperpixel * page.dtype.itemsize
        self.cache_bytes = max(MIN_SEGMENT_CACHE, (rows + 2 * seg_rows) * row_bytes)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        page = self.page
        out = np.zeros((h, w, page.samplesperpixel), page.dtype)
        if page.is_tiled:
            th, tw = page.tilelength, page.tilewidth
            cols = -(-self.width // tw)
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    self._place(out, self._segment(ty * cols + tx), ty * th, tx * tw, y, x)
        else:
            rows = page.rowsperstrip or self.height
            for s in range(y // rows, (y + h - 1) // rows + 1):
                self._place(out, self._segment(s), s * rows, 0, y, x)
        return to_rgb8(out, self.path)

    @staticmethod
    def _place(out: np.ndarray, seg: np.ndarray, sy: int, sx: int, y: int, x: int) -> None:
        """Copy the part of segment ``seg`` (at sy, sx) that falls in ``out`` (at y, x)."""
        y0, x0 = max(sy, y), max(sx, x)
        y1 = min(sy + seg.shape[0], y + out.shape[0])
        x1 = min(sx + seg.shape[1], x + out.shape[1])
        if y1 > y0 and x1 > x0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - sy:y1 - sy, x0 - sx:x1 - sx]

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        """A strided preview: from the smallest pyramid level of at least 512 px
        if the file has one, else read from level 0 band by band."""
        for level in reversed(self.series.levels[1:]):
            page = level.pages[0].keyframe
            side = max(page.imagelength, page.imagewidth)
            if side >= 512:
                if side <= 2 * max_side and self.supports(page):
                    pixels = to_rgb8(page.asarray(), self.path)
                    return pixels[::max(1, -(-side // max_side)), ::max(1, -(-side // max_side))]
                break
        step = max(1, -(-max(self.height, self.width) // max_side))
        band = step * max(1, 256 // step)
        rows = [self.read(y, 0, min(band, self.height - y), self.width)[::step, ::step]
                for y in range(0, self.height, band)]
        return np.concatenate(rows, axis=0)

    def close(self) -> None:
        self.tif.close()


RGB_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def _check_channels(channels: int, path: Path) -> None:
    if channels not in (3, 4):
        raise DataError(f"{path}: {channels} channel(s); translation needs an RGB (or RGBA) "
                        f"H&E image — convert it to RGB first")


def _open_tiff(path: Path) -> ArraySource | TiffSource:
    try:
        source = TiffSource(path)
    except Exception as err:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
    try:
        _check_channels(source.page.samplesperpixel, path)
        if not TiffSource.supports(source.page):  # planar or multi-plane: decode whole
            source.close()
            return ArraySource(read_image(path), name=str(path))
        # Decode one region now: a damaged file fails here, not mid-slide.
        source.read(0, 0, min(16, source.height), min(16, source.width))
    except BaseException:
        source.close()
        raise
    return source


def open_source(path: str | Path) -> ArraySource | TiffSource:
    """Open an image for region reads; one clear DataError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        is_tiff = f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if is_tiff:
        return _open_tiff(path)
    try:
        with Image.open(path) as img:
            mode = img.mode
    except Exception:  # noqa: BLE001 - read_image below gives the precise message
        mode = "RGB"
    if mode not in RGB_MODES:
        raise DataError(f"{path}: {mode} image ({len(mode.split(';')[0])} channel(s)); "
                        f"translation needs an RGB (or RGBA) H&E image — convert it first")
    return ArraySource(read_image(path), name=str(path))


def read_padded(source, y: int, x: int, h: int, w: int) -> np.ndarray:
    """A region that may reach past the bottom/right border: the missing part
    reflected, as whole-image inference pads (np 'reflect' = torch 'reflect')."""
    h_in, w_in = min(h, source.height - y), min(w, source.width - x)
    block = source.read(y, x, h_in, w_in)
    if (h_in, w_in) == (h, w):
        return block
    return np.pad(block, ((0, h - h_in), (0, w - w_in), (0, 0)), mode="reflect")


# --- the tiled translation ---------------------------------------------------------------

Fixed = list  # per norm: (mean, var) of shape (B or 1, C), or None for own statistics


class _Blender:
    """Accumulates windowed tile outputs; emits rows no later tile touches."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.acc = np.zeros((grid.tile_h, grid.padded_w, 3), np.float32)
        self.weight = np.zeros((grid.tile_h, grid.padded_w), np.float32)
        self.y0 = 0  # image row of buffer row 0
        self.emitted = 0

    def add(self, tile: Tile, pixels: np.ndarray) -> Iterator[np.ndarray]:
        """``pixels``: (tile_h, tile_w, 3) float32 in [0, 255]."""
        if tile.y > self.y0:
            yield from self._emit(tile.y)
        w = self.grid.window(tile)
        r, th, tw = tile.y - self.y0, self.grid.tile_h, self.grid.tile_w
        self.acc[r:r + th, tile.x:tile.x + tw] += pixels * w[..., None]
        self.weight[r:r + th, tile.x:tile.x + tw] += w

    def close(self) -> Iterator[np.ndarray]:
        yield from self._emit(self.grid.padded_h)

    def _emit(self, until: int) -> Iterator[np.ndarray]:
        n, size = until - self.y0, len(self.acc)
        keep = min(n, self.grid.height - self.emitted)
        # In strips, so no temporary is ever the size of the buffer.
        for y in range(0, max(keep, 0), EMIT_ROWS):
            rows = slice(y, min(y + EMIT_ROWS, keep))
            block = self.acc[rows, :self.grid.width] / self.weight[rows, :self.grid.width, None]
            yield np.round(block).astype(np.uint8)
        self.emitted += max(keep, 0)
        # Shift the buffer up by n rows, n at a time (source and destination of
        # each copy never overlap); the rows coming into view start empty.
        for start in range(0, size - n, n):
            stop = min(start + n, size - n)
            self.acc[start:stop] = self.acc[start + n:stop + n]
            self.weight[start:stop] = self.weight[start + n:stop + n]
        self.acc[size - n:] = 0
        self.weight[size - n:] = 0
        self.y0 = until


@dataclass
class RunStats:
    """What one translation did (the benchmark reads it)."""

    tiles: int = 0
    tissue_tiles: int = 0
    passes: int = 0  # statistics passes before the output pass
    forwards: int = 0  # tile forwards, all passes
    seconds: float = 0.0


class _Run:
    """One source through one translator: tissue flags, passes, blending."""

    def __init__(self, tr: "Translator", source):
        self.tr, self.source = tr, source
        self.grid = Grid.build(source.height, source.width, tile=tr.tile, overlap=tr.overlap,
                               depth=tr.depth)
        self.tiles = self.grid.tiles()
        if isinstance(source, TiffSource):
            source.keep_rows(self.grid.tile_h)
        self.tissue: list[bool | None] = [None] * len(self.tiles)
        self.threshold = None
        if tr.min_tissue > 0:
            self.threshold = tissue_threshold(source.thumbnail())
        self.stats = RunStats(tiles=len(self.tiles))

    def pixels(self, tile: Tile) -> np.ndarray:
        return read_padded(self.source, tile.y, tile.x, self.grid.tile_h, self.grid.tile_w)

    def is_tissue(self, i: int, pixels: np.ndarray) -> bool:
        if self.tissue[i] is None:
            self.tissue[i] = self.threshold is None or \
                float(tissue_mask(pixels, threshold=self.threshold).mean()) >= self.tr.min_tissue
        return bool(self.tissue[i])

    def tissue_batches(self, desc: str) -> Iterator[tuple[list[Tile], np.ndarray]]:
        """Batches of tissue tiles (background ones skipped), with a progress bar."""
        batch: list[tuple[Tile, np.ndarray]] = []
        for i, tile in enumerate(self.tr.progress_bar(self.tiles, desc)):
            if self.tissue[i] is False:
                continue
            pixels = self.pixels(tile)
            if not self.is_tissue(i, pixels):
                continue
            batch.append((tile, pixels))
            if len(batch) == self.tr.batch_size:
                yield [t for t, _ in batch], np.stack([p for _, p in batch])
                batch = []
        if batch:
            yield [t for t, _ in batch], np.stack([p for _, p in batch])

    def forward(self, pixels: np.ndarray, fixed: Fixed) -> torch.Tensor | None:
        """(B, h, w, 3) uint8 → (B, h, w, 3) float32 in [0, 255] on the device;
        None when a hook stopped the pass early."""
        tr = self.tr
        # NCHW-contiguous, as to_tensor makes it: another memory layout may pick
        # another conv algorithm (and differ in the last float bit).
        x = torch.from_numpy(pixels).to(tr.device).permute(0, 3, 1, 2).contiguous()
        x = x.float() / 127.5 - 1.0
        for norm, stats in zip(tr.norms, fixed):
            norm.fixed = stats
        self.stats.forwards += len(pixels)
        try:
            y = tr.net(x)  # (B, 3, h, w) in [-1, 1]
        except _Stop:
            return None
        finally:
            for norm in tr.norms:
                norm.fixed = None
        return ((y.clamp(-1, 1) + 1.0) * 127.5).permute(0, 2, 3, 1)

    def statistics_pass(self, desc: str, fixed: Callable[[list[Tile]], Fixed],
                        hooks: dict[int, Callable[[torch.Tensor, list[Tile]], None]],
                        *, stop_after: int | None = None) -> None:
        self.stats.passes += 1
        current: list[Tile] = []
        for k, fn in hooks.items():
            def hook(x, fn=fn, k=k):
                fn(x, current)
                if k == stop_after:
                    raise _Stop
            self.tr.norms[k].hook = hook
        try:
            for tiles, pixels in self.tissue_batches(desc):
                current[:] = tiles
                self.forward(pixels, fixed(tiles))
        finally:
            for norm in self.tr.norms:
                norm.hook = None

    def output_rows(self, fixed: Callable[[list[Tile]], Fixed]) -> Iterator[np.ndarray]:
        """The translated image, as consecutive blocks of rows (uint8)."""
        blender = _Blender(self.grid)
        pending: list[tuple[Tile, np.ndarray, bool]] = []

        def run_pending() -> Iterator[np.ndarray]:
            todo = [i for i, (_, _, tissue) in enumerate(pending) if tissue]
            out = None
            if todo:
                tiles = [pending[i][0] for i in todo]
                out = self.forward(np.stack([pending[i][1] for i in todo]), fixed(tiles))
                out = out.cpu().numpy()
            j = 0
            for tile, pixels, tissue in pending:
                if tissue:
                    result, j = out[j], j + 1
                else:  # background: the input itself
                    result = pixels.astype(np.float32)
                yield from blender.add(tile, result)
            pending.clear()

        for i, tile in enumerate(self.tr.progress_bar(self.tiles, "translating")):
            pixels = self.pixels(tile)
            tissue = self.is_tissue(i, pixels)
            pending.append((tile, pixels, tissue))
            self.stats.tissue_tiles += tissue
            # Background tiles wait only for the tissue tiles before them; the
            # cap bounds how many pile up in a batch's wake.
            if sum(t for _, _, t in pending) == self.tr.batch_size \
                    or len(pending) >= 4 * self.tr.batch_size:
                yield from run_pending()
        yield from run_pending()
        yield from blender.close()


# --- where the statistics come from (NORM_STATS) -----------------------------------------

def global_statistics(run: _Run) -> Callable[[list[Tile]], Fixed]:
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


def kernel_statistics(run: _Run) -> Callable[[list[Tile]], Fixed]:
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


def tile_statistics(run: _Run) -> Callable[[list[Tile]], Fixed]:
    """Every tile its own statistics: plain instance norm, no extra pass."""
    return lambda tiles: [None] * len(run.tr.norms)


NORM_STATS: dict[str, Callable[[_Run], Callable[[list[Tile]], Fixed]]] = {
    "global": global_statistics,
    "kernel": kernel_statistics,
    "tile": tile_statistics,
}


# --- the translator ------------------------------------------------------------------------

def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device


class Translator:
    """G, ready to translate arrays, files and folders tile by tile.

    ``depth`` is the U-Net's (``model.depth``); ``tile``/``overlap`` default
    to :func:`default_tile`/:func:`default_overlap`; ``norm_stats`` is a key
    of ``NORM_STATS``; ``kernel`` the KIN neighbourhood in tiles;
    ``min_tissue`` the tissue fraction below which a tile passes through (0:
    translate every tile).
    """

    def __init__(self, generator: nn.Module, *, depth: int,
                 device: str | torch.device | None = None,
                 tile: int | None = None, overlap: int | None = None, norm_stats: str = "global",
                 kernel: int = 3, min_tissue: float = 0.01, batch_size: int = 4,
                 progress: bool = False, compression: str = "zlib"):
        self.depth, self.step = depth, 2 ** depth
        self.tile = default_tile(depth) if tile is None else tile
        self.overlap = default_overlap(depth, self.tile) if overlap is None else overlap
        self.check_options(norm_stats=norm_stats, kernel=kernel, min_tissue=min_tissue,
                           batch_size=batch_size, compression=compression)
        self.norm_stats, self.kernel, self.min_tissue = norm_stats, kernel, min_tissue
        self.batch_size, self.progress, self.compression = batch_size, progress, compression
        self.device = pick_device(device)
        self.net, self.norms = with_stats_norms(generator, step=self.step, device=self.device)
        self.last_run: RunStats | None = None

    def check_options(self, *, norm_stats: str, kernel: int, min_tissue: float,
                      batch_size: int, compression: str) -> None:
        step, tile, overlap = self.step, self.tile, self.overlap
        if tile < step or tile % step:
            raise ConfigError(f"--tile {tile}: must be a positive multiple of 2**model.depth "
                              f"= {step} (the U-Net halves the image that many times)")
        if overlap < 0 or overlap % step or overlap >= tile:
            raise ConfigError(f"--overlap {overlap}: must be a multiple of {step} between 0 and "
                              f"the tile size {tile} (exclusive)")
        if norm_stats not in NORM_STATS:
            raise ConfigError(f"--norm-stats {norm_stats!r}: unknown; known: "
                              f"{', '.join(NORM_STATS)}")
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"--kernel {kernel}: must be an odd number of tiles ≥ 1")
        if not 0.0 <= min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue {min_tissue}: must be a fraction in [0, 1]")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        if compression not in COMPRESSIONS:
            raise ConfigError(f"--compression {compression!r}: unknown; known: "
                              f"{', '.join(COMPRESSIONS)}")

    def progress_bar(self, items: list, desc: str) -> Iterable:
        if not self.progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="tile", leave=False, dynamic_ncols=True)

    # Rows of the translated image, top to bottom, for any source.
    def rows(self, source) -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        run = _Run(self, source)
        self.last_run = run.stats
        # One tile is the whole (padded) image: its own statistics are the
        # whole image's, exactly — no passes, and plain inference bit for bit.
        mode = "tile" if len(run.tiles) == 1 else self.norm_stats
        with torch.inference_mode():
            fixed = NORM_STATS[mode](run)
            for block in run.output_rows(fixed):
                # Updated before each yield: a consumer may stop at the last row.
                run.stats.seconds = time.perf_counter() - t0
                yield block

    def translate_array(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W, 3) uint8."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} "
                            f"{image.dtype}")
        return np.concatenate(list(self.rows(ArraySource(image))), axis=0)

    def translate_file(self, src: str | Path, dst: str | Path) -> Path:
        """One image file → ``dst`` (its extension picks the format; .tif: pyramidal)."""
        src, dst = Path(src), Path(dst)
        check_output_suffix(dst)
        source = open_source(src)
        try:
            if dst.suffix.lower() in TIFF_SUFFIXES:
                return write_pyramid(self.rows(source), dst, height=source.height,
                                     width=source.width, compression=self.compression)
            if source.height * source.width > MAX_IN_MEMORY_PIXELS:
                raise DataError(f"{src}: {source.width}x{source.height} px is too large to "
                                f"write as {dst.suffix}; write a .tif (pyramidal, streamed)")
            return write_image(dst, np.concatenate(list(self.rows(source)), axis=0))
        finally:
            source.close()


# --- writing: a pyramidal, tiled TIFF, level by level -----------------------------------------

COMPRESSIONS: dict[str, dict] = {
    "zlib": {"compression": "zlib", "predictor": True},  # lossless
    "jpeg": {"compression": "jpeg", "compressionargs": {"level": 90}},  # as scanners write
    "none": {},
}


def restrip(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Blocks of any height → strips of exactly ``rows`` rows (the last may be fewer)."""
    buffer: list[np.ndarray] = []
    have = 0
    for block in blocks:
        buffer.append(block)
        have += len(block)
        while have >= rows:
            joined = np.concatenate(buffer, axis=0)
            yield joined[:rows]
            rest = joined[rows:]
            buffer, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield np.concatenate(buffer, axis=0)


def halve(strip: np.ndarray) -> np.ndarray:
    """2x2 box down-sampling (odd edges repeat their last row/column)."""
    if len(strip) % 2 or strip.shape[1] % 2:
        strip = np.pad(strip, ((0, len(strip) % 2), (0, strip.shape[1] % 2), (0, 0)), mode="edge")
    s = strip.astype(np.uint16)
    total = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def _tiles(strips: Iterable[np.ndarray], *, width: int, tile: int) -> Iterator[np.ndarray]:
    for strip in strips:
        for x in range(0, width, tile):
            block = np.zeros((tile, tile, 3), np.uint8)
            part = strip[:, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            yield block


def _spooling(strips: Iterable[np.ndarray], spool) -> Iterator[np.ndarray]:
    """Pass strips on while appending their halves to ``spool`` (raw, row-major)."""
    for strip in strips:
        spool.write(halve(strip).tobytes())
        yield strip


def _spooled(path: Path, *, height: int, width: int, rows: int) -> Iterator[np.ndarray]:
    row_bytes = width * 3
    with open(path, "rb") as f:
        for y in range(0, height, rows):
            n = min(rows, height - y)
            yield np.frombuffer(f.read(n * row_bytes), np.uint8).reshape(n, width, 3)


def pyramid_shapes(height: int, width: int, *, tile: int = OUTPUT_TILE) -> list[tuple[int, int]]:
    """Level sizes: halving until the image fits in one output tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def temp_name(path: Path) -> Path:
    # Same folder (same file system: the final rename is atomic), hidden.
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def write_pyramid(rows: Iterable[np.ndarray], path: str | Path, *, height: int, width: int,
                  compression: str = "zlib", tile: int = OUTPUT_TILE) -> Path:
    """Stream rows into a tiled TIFF with SubIFD pyramid levels; atomic.

    Level 0 is written while its halves are spooled to a raw file; each
    further level is read back strip by strip from the spool of the level
    above (spooling the next one), so memory stays at one strip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = pyramid_shapes(height, width, tile=tile)
    options = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", metadata=None,
                   **COMPRESSIONS[compression])
    tmp = temp_name(path)
    spool_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.spool-", dir=path.parent))
    try:
        with tifffile.TiffWriter(tmp, bigtiff=height * width * 3 > 2 ** 31) as tif:
            strips: Iterable[np.ndarray] = restrip(rows, tile)
            for level, (h, w) in enumerate(shapes):
                last = level == len(shapes) - 1
                spool_path = spool_dir / f"level{level + 1}.raw"
                with open(spool_path, "wb") as spool:
                    level_strips = strips if last else _spooling(strips, spool)
                    extra = {"subifds": len(shapes) - 1} if level == 0 else {"subfiletype": 1}
                    tif.write(_tiles(level_strips, width=w, tile=tile), shape=(h, w, 3),
                              **options, **extra)
                (spool_dir / f"level{level}.raw").unlink(missing_ok=True)  # read: done
                if not last:
                    nh, nw = shapes[level + 1]
                    strips = _spooled(spool_path, height=nh, width=nw, rows=tile)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return path


def check_output_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS and suffix not in TIFF_SUFFIXES:
        raise DataError(f"{path}: cannot write {suffix or 'files without an extension'}; use "
                        f".tif (pyramidal) or one of {', '.join(sorted(IMAGE_EXTENSIONS))}")
    if suffix == ".svs":
        raise DataError(f"{path}: SVS is a scanner format; write a pyramidal .tif instead")


# --- files and folders ------------------------------------------------------------------------

def translate_path(translator: Translator, src: str | Path, dst: str | Path, *,
                   overwrite: bool = False) -> list[Path]:
    """A file → a file, or a folder of images → a folder (same names); all or nothing."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: the output would overwrite the input; pick another name")
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists; pass --overwrite or pick another name")
    if src.is_file():
        if dst.is_dir():
            raise DataError(f"{dst}: is a folder; give an output file name (e.g. out.tif)")
        return [translator.translate_file(src, dst)]
    files = sorted(p for p in src.iterdir() if is_image_file(p) or
                   (p.is_file() and p.suffix.lower() == ".svs"))
    if not files:
        raise DataError(f"{src}: no images to translate (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, .svs)")
    with atomic_dir(dst) as tmp:
        for path in files:
            name = path.with_suffix(".tif").name if path.suffix.lower() == ".svs" else path.name
            translator.translate_file(path, tmp / name)
    return [dst / (p.with_suffix(".tif").name if p.suffix.lower() == ".svs" else p.name)
            for p in files]


def translate(model: str | Path, src: str | Path, dst: str | Path, *,
              tracking_uri: str | None = None, overwrite: bool = False,
              device: str | None = None, **options) -> list[Path]:
    """`stain-search translate`: MODEL (an export folder or models:/name@alias)
    applied to a file or a folder. ``options`` go to :class:`Translator`."""
    from stain_search.deploy.export import load_model

    exported = load_model(model, tracking_uri=tracking_uri)
    dev = pick_device(device)
    translator = Translator(exported.generator(device=dev), depth=exported.model.depth,
                            device=dev, **options)
    return translate_path(translator, src, dst, overwrite=overwrite)
