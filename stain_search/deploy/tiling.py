"""Tiling geometry and blending: overlapping tiles over a slide, the window
that weights them, and the blender that sums them into finished pixels.

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

Memory. The slide is cut into column strips (:meth:`Grid.strips`, about
:data:`STRIP_PX` wide, on output-tile boundaries); each strip is blended top
to bottom in a buffer one tile high and one strip (plus a tile each side)
wide, so the working set does not grow with the slide's width or height.
A tile that straddles a strip boundary is run once for each strip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

WINDOW_FLOOR = 1e-6  # weight of a tile's outer margin: ~0, never a 0/0
EMIT_ROWS = 64  # finished rows are normalised and handed on this many at a time
# Output columns per strip: ~8 default tiles, so the tiles run twice (one
# column per strip boundary) cost about an eighth more, while the blending
# buffer stays near 1024 × 10 k px × 16 B ≈ 160 MiB whatever the slide.
STRIP_PX = 8192
STRIP_ALIGN = 256  # strip boundaries fall on output-tile boundaries (the writer's tiles)


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
        """Row-major."""
        cy = axis_cores(list(self.ys), self.tile_h, self.step)
        cx = axis_cores(list(self.xs), self.tile_w, self.step)
        return [Tile(r, c, y, x, (*cy[r], *cx[c]))
                for r, y in enumerate(self.ys) for c, x in enumerate(self.xs)]

    def window(self, tile: Tile) -> np.ndarray:
        wy = axis_window(list(self.ys), tile.row, self.tile_h, self.margin)
        wx = axis_window(list(self.xs), tile.col, self.tile_w, self.margin)
        return np.outer(wy, wx).astype(np.float32)  # (tile_h, tile_w)

    def strips(self, *, width: int = STRIP_PX) -> list["Strip"]:
        """Column strips of about ``width`` output px that partition the image's
        columns, with the tile columns each needs (see the module docstring)."""
        bounds = [0]
        while self.width - bounds[-1] > width:
            lo = bounds[-1] + max(STRIP_ALIGN, width // 2 // STRIP_ALIGN * STRIP_ALIGN)
            hi = bounds[-1] + max(STRIP_ALIGN, width // STRIP_ALIGN * STRIP_ALIGN)
            # Where fewest tiles straddle the cut (ideally one: a tile's own
            # part between its overlaps), so fewest run twice; the widest such.
            cut = min(range(hi, lo - 1, -STRIP_ALIGN), key=self._straddling)
            bounds.append(cut)
        bounds.append(self.width)
        out = []
        for x0, x1 in zip(bounds, bounds[1:]):
            cols = tuple(c for c, x in enumerate(self.xs) if x < x1 and x + self.tile_w > x0)
            out.append(Strip(x0, x1, cols, self.xs[cols[0]], self.xs[cols[-1]] + self.tile_w))
        return out

    def _straddling(self, cut: int) -> int:
        return sum(x < cut < x + self.tile_w for x in self.xs)


@dataclass(frozen=True)
class Strip:
    """Output columns [x0, x1) of the image, blended from tile columns ``cols``,
    whose pixels span [bx0, bx1) of the padded image (the blending buffer)."""

    x0: int
    x1: int
    cols: tuple[int, ...]
    bx0: int
    bx1: int


# --- blending ----------------------------------------------------------------------

class Blender:
    """Accumulates windowed tile outputs of one strip, top to bottom, and emits
    its finished rows, (y, x, block) with block (h, x1 - x0, 3) uint8, as soon
    as no later tile touches them."""

    def __init__(self, grid: Grid, strip: Strip):
        self.grid, self.strip = grid, strip
        self.acc = np.zeros((grid.tile_h, strip.bx1 - strip.bx0, 3), np.float32)
        self.weight = np.zeros((grid.tile_h, strip.bx1 - strip.bx0), np.float32)
        self.y0 = 0  # image row of buffer row 0
        self.emitted = 0

    def add(self, tile: Tile, pixels: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """``pixels``: (tile_h, tile_w, 3) float32 in [0, 255]; tiles row by row."""
        if tile.y > self.y0:
            yield from self._emit(tile.y)
        w = self.grid.window(tile)
        r, th, tw = tile.y - self.y0, self.grid.tile_h, self.grid.tile_w
        x = tile.x - self.strip.bx0
        self.acc[r:r + th, x:x + tw] += pixels * w[..., None]
        self.weight[r:r + th, x:x + tw] += w

    def close(self) -> Iterator[tuple[int, int, np.ndarray]]:
        yield from self._emit(self.grid.padded_h)

    def _emit(self, until: int) -> Iterator[tuple[int, int, np.ndarray]]:
        n, size = until - self.y0, len(self.acc)
        keep = min(n, self.grid.height - self.emitted)
        c0, c1 = self.strip.x0 - self.strip.bx0, self.strip.x1 - self.strip.bx0
        # In blocks of rows, so no temporary is ever the size of the buffer.
        for y in range(0, max(keep, 0), EMIT_ROWS):
            rows = slice(y, min(y + EMIT_ROWS, keep))
            block = self.acc[rows, c0:c1] / self.weight[rows, c0:c1, None]
            yield self.emitted + y, self.strip.x0, np.round(block).astype(np.uint8)
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
