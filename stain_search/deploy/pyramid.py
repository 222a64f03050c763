"""Slide output: tiled, pyramidal TIFFs a viewer opens, written with bounded memory.

Two writers, picked by the output's suffix (:data:`WRITERS`):

* ``.ome.tif`` / ``.ome.tiff`` — OME-TIFF: OME-XML with the physical pixel
  size (``PhysicalSizeX/Y`` in µm) and the RGB channel, reduced levels as
  SubIFDs — the pyramid layout Bio-Formats and QuPath read.
* ``.tif`` / ``.tiff`` — a generic tiled pyramid: every level a tiled page of
  the main IFD chain (reduced ones marked ``NewSubfileType`` 1), the pixel
  size in the resolution tags (px/cm) — the layout OpenSlide's generic-TIFF
  driver reads (it ignores SubIFDs), as do tifffile and most viewers.

Tiles are JPEG by default (quality 90), as in scanners' own files; ``zlib``
is lossless. Each level halves the one above (2×2 box) until it fits one
256 px tile. The translator hands level 0 over in column strips (see
:mod:`~stain_search.deploy.tiling`), not in file order, so its tiles go to a
losslessly compressed (Zstandard) spool beside the output first; each further level is
built tile by tile from four tiles of the level above; then the TIFF is
written level by level from the spool. Memory holds a strip band and a few
tiles, never a level. Everything is written under a temporary name and
renamed at the end; a full disk is one clear error and leaves nothing.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import imagecodecs
import numpy as np
import tifffile

from stain_search.atomic import atomic_path
from stain_search.data.io import IMAGE_EXTENSIONS
from stain_search.errors import ConfigError, DataError

OUTPUT_TILE = 256  # tile size of the written TIFF (what slide viewers expect)
DEFAULT_QUALITY = 90  # JPEG quality: what scanners typically write

Piece = tuple[int, int, np.ndarray]  # (y, x, (h, w, 3) uint8): part of level 0


def compression_options(name: str, *, quality: int = DEFAULT_QUALITY) -> dict:
    """tifffile arguments for a ``--compression`` name (:data:`COMPRESSIONS`)."""
    if name not in COMPRESSIONS:
        raise ConfigError(f"--compression {name!r}: unknown; known: {', '.join(COMPRESSIONS)}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality {quality}: JPEG quality must be in 1..100")
    return COMPRESSIONS[name](quality)


COMPRESSIONS: dict[str, Callable[[int], dict]] = {
    "jpeg": lambda q: {"compression": "jpeg", "compressionargs": {"level": q}},
    "zlib": lambda q: {"compression": "zlib", "predictor": True},  # lossless
    "none": lambda q: {},
}


def halve(strip: np.ndarray) -> np.ndarray:
    """2x2 box down-sampling (odd edges repeat their last row/column)."""
    if len(strip) % 2 or strip.shape[1] % 2:
        strip = np.pad(strip, ((0, len(strip) % 2), (0, strip.shape[1] % 2), (0, 0)), mode="edge")
    s = strip.astype(np.uint16)
    total = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def pyramid_shapes(height: int, width: int, *, tile: int = OUTPUT_TILE) -> list[tuple[int, int]]:
    """Level sizes: halving until the image fits in one output tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def restrip(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """Blocks of any height → bands of exactly ``rows`` rows (the last may be fewer)."""
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


# --- the tile spool --------------------------------------------------------------------------

class TileSpool:
    """Tiles of every level in one scratch file, Zstandard level 1 (lossless; on
    H&E about 3x faster than zlib's fastest, and smaller)."""

    def __init__(self, path: Path, *, tile: int):
        self.path, self.tile = path, tile
        self.file = open(path, "w+b")
        self.index: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}

    def put(self, level: int, ty: int, tx: int, pixels: np.ndarray) -> None:
        data = imagecodecs.zstd_encode(np.ascontiguousarray(pixels).tobytes(), level=1)
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(data)
        self.index[level, ty, tx] = (offset, len(data), *pixels.shape[:2])

    def get(self, level: int, ty: int, tx: int) -> np.ndarray:
        offset, size, h, w = self.index[level, ty, tx]
        self.file.seek(offset)
        data = imagecodecs.zstd_decode(self.file.read(size))
        return np.frombuffer(data, np.uint8).reshape(h, w, 3)

    def padded(self, level: int, ty: int, tx: int) -> np.ndarray:
        """A tile as the TIFF stores it: edge tiles zero-padded to full size."""
        pixels = self.get(level, ty, tx)
        if pixels.shape[:2] == (self.tile, self.tile):
            return pixels
        out = np.zeros((self.tile, self.tile, 3), np.uint8)
        out[:pixels.shape[0], :pixels.shape[1]] = pixels
        return out

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # flushing into a full disk: the file is deleted anyway
            pass


def spool_level0(pieces: Iterable[Piece], spool: TileSpool, *, height: int, width: int) -> None:
    """Cut level 0, given as column strips (each top to bottom, starting on a
    tile column), into the spool's tiles."""
    t = spool.tile
    done = 0
    for x0, strip in itertools.groupby(pieces, key=lambda piece: piece[1]):
        if x0 % t:
            raise ValueError(f"strip at x={x0} is not on the {t} px tile grid")
        for ty, band in enumerate(restrip((block for _, _, block in strip), t)):
            for k in range(0, band.shape[1], t):
                spool.put(0, ty, (x0 + k) // t, band[:, k:k + t])
                done += 1
    expected = -(-height // t) * -(-width // t)
    if done != expected:  # a bug upstream, never bad input
        raise RuntimeError(f"level 0 came with {done} tiles, expected {expected}")


def spool_reduced(spool: TileSpool, shapes: list[tuple[int, int]]) -> None:
    """Levels 1.. into the spool: each tile the halves of four tiles above."""
    t = spool.tile
    for level in range(1, len(shapes)):
        h, w = shapes[level]
        above_h, above_w = shapes[level - 1]
        for ty in range(-(-h // t)):
            for tx in range(-(-w // t)):
                rows = [np.concatenate([spool.get(level - 1, 2 * ty + dy, 2 * tx + dx)
                                        for dx in (0, 1) if (2 * tx + dx) * t < above_w], axis=1)
                        for dy in (0, 1) if (2 * ty + dy) * t < above_h]
                spool.put(level, ty, tx, halve(np.concatenate(rows, axis=0)))


def level_tiles(spool: TileSpool, level: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    t = spool.tile
    for ty in range(-(-shape[0] // t)):
        for tx in range(-(-shape[1] // t)):
            yield spool.padded(level, ty, tx)


# --- the two layouts --------------------------------------------------------------------------

@dataclass(frozen=True)
class SlideMeta:
    """What the written file says about its pixels."""

    mpp: float | None = None  # level 0, µm/px
    name: str = "stained"
    icc_profile: bytes | None = None  # the source's colour profile, carried over


def _page_options(meta: SlideMeta, downsample: int, compression: dict, tile: int) -> dict:
    opts = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", **compression)
    if meta.mpp:
        px_per_cm = 1e4 / (meta.mpp * downsample)
        opts.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    if meta.icc_profile and downsample == 1:
        opts["extratags"] = [(34675, 7, len(meta.icc_profile), meta.icc_profile, True)]
    return opts


def write_generic(tif_path: Path, spool: TileSpool, shapes, meta: SlideMeta,
                  compression: dict) -> None:
    """Every level a tiled page of the main IFD chain (OpenSlide's generic TIFF)."""
    with tifffile.TiffWriter(tif_path, bigtiff=_big(shapes)) as tif:
        for level, shape in enumerate(shapes):
            tif.write(level_tiles(spool, level, shape), shape=(*shape, 3), metadata=None,
                      subfiletype=1 if level else 0,
                      **_page_options(meta, 2 ** level, compression, spool.tile))


def write_ome(tif_path: Path, spool: TileSpool, shapes, meta: SlideMeta,
              compression: dict) -> None:
    """OME-TIFF: OME-XML with the physical size; reduced levels as SubIFDs."""
    ome = {"axes": "YXS", "Name": meta.name, "Channel": {"Name": ["RGB"]}}
    if meta.mpp:
        ome.update(PhysicalSizeX=meta.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=meta.mpp,
                   PhysicalSizeYUnit="µm")
    with tifffile.TiffWriter(tif_path, bigtiff=_big(shapes), ome=True) as tif:
        for level, shape in enumerate(shapes):
            extra = ({"subifds": len(shapes) - 1, "metadata": ome} if level == 0
                     else {"subfiletype": 1, "metadata": None})
            tif.write(level_tiles(spool, level, shape), shape=(*shape, 3), **extra,
                      **_page_options(meta, 2 ** level, compression, spool.tile))


def _big(shapes) -> bool:
    return sum(h * w for h, w in shapes) * 3 > 2 ** 31  # past classic TIFF's 4 GiB offsets


# suffix → writer; longest suffix first when matching
WRITERS: dict[str, Callable[..., None]] = {
    ".ome.tiff": write_ome, ".ome.tif": write_ome, ".tiff": write_generic, ".tif": write_generic,
}


def pyramid_writer(path: Path) -> Callable[..., None] | None:
    name = path.name.lower()
    for suffix in sorted(WRITERS, key=len, reverse=True):
        if name.endswith(suffix):
            return WRITERS[suffix]
    return None


def check_output_suffix(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".svs":
        raise DataError(f"{path}: SVS is a scanner format; write a pyramidal .tif (OpenSlide) "
                        f"or .ome.tif (QuPath, Bio-Formats) instead")
    if pyramid_writer(path) is None and suffix not in IMAGE_EXTENSIONS:
        raise DataError(f"{path}: cannot write {suffix or 'files without an extension'}; use "
                        f".ome.tif or .tif (pyramidal) or one of "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS - {'.tif', '.tiff'}))}")


def write_pyramid(pieces: Iterable[Piece], path: str | Path, *, height: int, width: int,
                  meta: SlideMeta = SlideMeta(), compression: str = "jpeg",
                  quality: int = DEFAULT_QUALITY, tile: int = OUTPUT_TILE) -> Path:
    """Level 0 as column-strip pieces → a pyramidal TIFF at ``path`` (layout
    from its suffix); atomic (:func:`~stain_search.atomic.atomic_path`), bounded memory."""
    path = Path(path)
    writer = pyramid_writer(path)
    if writer is None:
        raise DataError(f"{path}: not a pyramidal TIFF name; use .ome.tif or .tif")
    options = compression_options(compression, quality=quality)
    shapes = pyramid_shapes(height, width, tile=tile)
    try:
        with atomic_path(path) as tmp:
            spool = TileSpool(tmp.with_name(tmp.name + ".spool"), tile=tile)
            try:
                spool_level0(pieces, spool, height=height, width=width)
                spool_reduced(spool, shapes)
                writer(tmp, spool, shapes, meta, options)
            finally:
                spool.close()
                spool.path.unlink(missing_ok=True)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"{path}: the disk is full (writing {width}x{height} px with its "
                            f"pyramid); free space or write elsewhere — nothing was "
                            f"written") from None
        raise
    return path


def assemble(pieces: Iterable[Piece], *, height: int, width: int) -> np.ndarray:
    """Pieces → the whole (H, W, 3) image (for outputs written in one go)."""
    out = np.empty((height, width, 3), np.uint8)
    for y, x, block in pieces:
        out[y:y + len(block), x:x + block.shape[1]] = block
    return out

