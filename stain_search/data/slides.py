"""Whole slides as labs have them, read region by region: one ``SlideSource``
interface over OpenSlide, tifffile and Pillow.

A source has pyramid ``levels`` (each its size and down-sample from level 0),
the level-0 physical pixel size ``mpp`` (µm/px, None when the file does not
say), and region reads at the level chosen with :meth:`SlideSource.use_level`.
Readers, tried in :data:`READERS` order:

* ``openslide`` — vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``/``.vms``,
  3DHISTECH ``.mrxs``, Leica ``.scn``, Philips TIFF, Ventana ``.bif``, DICOM,
  ...) through the PyPI packages ``openslide-python`` and ``openslide-bin``
  (the ``slides`` extra: no system library needed). µm/px from
  ``openslide.mpp-x``.
* ``tifffile`` — plain, OME- and generic pyramidal TIFF: only the tiles or
  strips a region touches are decoded, with a small cache. µm/px from the
  OME-XML ``PhysicalSizeX``, an Aperio description's ``MPP`` or the TIFF
  resolution tags.
* ``pillow`` — PNG, JPEG and the other tile formats, read whole.

A file none of them reads is one :class:`~stain_search.errors.DataError`
naming it and what would read it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tifffile
from PIL import Image

from stain_search.data.io import IMAGE_EXTENSIONS, TIFF_MAGIC, read_image, to_rgb8
from stain_search.errors import DataError

# Scanner formats OpenSlide reads (what a slide folder may hold besides TIFF).
OPENSLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif",
                                  ".svslide", ".dcm"})
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS | {".tif", ".tiff"}
# Pixel sizes a microscope scan has: 100x objectives (~0.05 µm/px) to
# low-power overviews (~10 µm/px). Resolution tags outside this range are an
# editor's default (72-300 dpi = 85-350 µm/px), not a scan.
MPP_RANGE = (0.01, 50.0)
MIN_SEGMENT_CACHE = 16 * 2 ** 20  # decoded TIFF segments kept for overlapping tiles
THUMB_CHUNK = 4096  # level-0 columns read at a time for a thumbnail (memory bound)
RGB_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


@dataclass(frozen=True)
class Level:
    height: int
    width: int
    downsample: float  # level-0 px per px of this level


def plausible_mpp(value: float | None) -> float | None:
    if value is None or not np.isfinite(value) or not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        return None
    return float(value)


class SlideSource:
    """Region reads of one pyramid level (``use_level``), as (h, w, 3) uint8 RGB."""

    name: str
    levels: tuple[Level, ...]
    mpp: float | None  # level 0, µm/px
    reader: str
    level: int = 0

    @property
    def height(self) -> int:
        return self.levels[self.level].height

    @property
    def width(self) -> int:
        return self.levels[self.level].width

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.levels[level].downsample

    def use_level(self, level: int) -> None:
        if not 0 <= level < len(self.levels):
            sizes = ", ".join(f"{i}: {lv.width}x{lv.height}" for i, lv in enumerate(self.levels))
            raise DataError(f"{self.name}: --level {level} does not exist; the slide has "
                            f"{len(self.levels)} level(s) ({sizes})")
        self.level = level

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        """A strided preview of the current level (for whole-slide thresholds),
        read in bounded chunks."""
        step = max(1, -(-max(self.height, self.width) // max_side))
        band = step * max(1, 256 // step)
        chunk = step * max(1, THUMB_CHUNK // step)
        rows = []
        for y in range(0, self.height, band):
            h = min(band, self.height - y)
            rows.append(np.concatenate(
                [self.read(y, x, h, min(chunk, self.width - x))[::step, ::step]
                 for x in range(0, self.width, chunk)], axis=1))
        return np.concatenate(rows, axis=0)

    def close(self) -> None:
        pass


class ArraySource(SlideSource):
    """An image held in memory, (H, W, 3) uint8: one level."""

    reader = "memory"

    def __init__(self, pixels: np.ndarray, *, name: str = "image", mpp: float | None = None):
        self.pixels, self.name, self.mpp = pixels, name, mpp
        self.levels = (Level(pixels.shape[0], pixels.shape[1], 1.0),)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.pixels[y:y + h, x:x + w]

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        step = max(1, -(-max(self.height, self.width) // max_side))
        return self.pixels[::step, ::step]


# --- tifffile ---------------------------------------------------------------------------

def tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """Level-0 µm/px: OME PhysicalSizeX, Aperio MPP, or the resolution tags."""
    page = tif.pages.first
    if tif.is_ome and tif.ome_metadata:
        pixels = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
        pixels = (pixels[0] if isinstance(pixels, list) else pixels).get("Pixels", {})
        size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        if size is not None and scale is not None:
            return plausible_mpp(float(size) * scale)
    if tif.is_svs:
        mpp = tifffile.svs_description_metadata(page.description).get("MPP")
        if mpp is not None:
            return plausible_mpp(float(mpp))
    res = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit else 2)  # µm per inch/cm
    if res is None or per_unit is None:
        return None
    num, den = res.value
    return plausible_mpp(per_unit * den / num) if num else None


class TiffSource(SlideSource):
    """A TIFF pyramid read region by region: only the tiles or strips a region
    touches are decoded, and recently decoded ones are cached."""

    reader = "tifffile"

    def __init__(self, path: Path):
        self.path, self.name = path, str(path)
        self.tif = tifffile.TiffFile(path)
        try:
            self.series = self.tif.series[0]
            pages = [lv.pages[0].keyframe for lv in self.series.levels]
            # Levels a region read can decode (planar or multi-plane ones cannot).
            self.pages = [pages[0]] + [p for p in pages[1:] if self.supports(p)]
            w0 = self.pages[0].imagewidth
            self.levels = tuple(Level(p.imagelength, p.imagewidth, w0 / p.imagewidth)
                                for p in self.pages)
            self.mpp = tiff_mpp(self.tif)
            self.page = self.pages[0]
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

    def use_level(self, level: int) -> None:
        super().use_level(level)
        self.page = self.pages[level]
        self._cache.clear()  # segment numbers are per level
        self._cached = 0

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

    def keep_region(self, rows: int, cols: int) -> None:
        """Size the segment cache to hold a ``rows`` × ``cols`` region and the
        segments around it (a row of tiles of one strip and its overlap): each
        segment is then decoded about once."""
        page = self.page
        seg_rows = page.tilelength if page.is_tiled else (page.rowsperstrip or self.height)
        seg_cols = page.tilewidth if page.is_tiled else self.width
        px = page.samplesperpixel * page.dtype.itemsize
        width = min(self.width, cols + 2 * seg_cols)
        self.cache_bytes = max(MIN_SEGMENT_CACHE, (rows + 2 * seg_rows) * width * px)

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
        """From the smallest coarser level of at least 512 px if the file has
        one, else strided reads of the current level."""
        for page in reversed(self.pages[self.level + 1:]):
            side = max(page.imagelength, page.imagewidth)
            if side >= 512:
                if side <= 2 * max_side:
                    pixels = to_rgb8(page.asarray(), self.path)
                    step = max(1, -(-side // max_side))
                    return pixels[::step, ::step]
                break
        return super().thumbnail(max_side=max_side)

    def close(self) -> None:
        self.tif.close()


def _check_channels(channels: int, path: Path) -> None:
    if channels not in (3, 4):
        raise DataError(f"{path}: {channels} channel(s); translation needs an RGB (or RGBA) "
                        f"H&E image — convert it to RGB first")


def open_tiff(path: Path) -> SlideSource:
    try:
        source = TiffSource(path)
    except Exception as err:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
    try:
        _check_channels(source.page.samplesperpixel, path)
        if not TiffSource.supports(source.page):  # planar or multi-plane: decode whole
            source.close()
            return ArraySource(read_image(path), name=str(path), mpp=source.mpp)
        # Decode one region now: a damaged file fails here, not mid-slide.
        source.read(0, 0, min(16, source.height), min(16, source.width))
    except BaseException:
        source.close()
        raise
    return source


# --- OpenSlide ----------------------------------------------------------------------------

def _openslide():
    try:
        import openslide
    except ImportError:  # the `slides` extra is not installed
        return None
    return openslide


def on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (alpha 0 where nothing was scanned) → RGB on white glass."""
    if (rgba[..., 3] == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    a = rgba[..., 3:].astype(np.float32) / 255
    return np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)


class OpenSlideSource(SlideSource):
    """A slide OpenSlide reads; transparent (unscanned) areas come back as white glass."""

    reader = "openslide"

    def __init__(self, path: Path):
        openslide = _openslide()
        self.path, self.name = path, str(path)
        self.slide = openslide.OpenSlide(str(path))
        self.vendor = openslide.OpenSlide.detect_format(str(path))
        self.levels = tuple(Level(h, w, float(d)) for (w, h), d in
                            zip(self.slide.level_dimensions, self.slide.level_downsamples))
        props = self.slide.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = plausible_mpp(float(mpp)) if mpp else None

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        d = self.levels[self.level].downsample
        # OpenSlide takes the top-left in level-0 pixels, the size in level pixels.
        rgba = np.asarray(self.slide.read_region((round(x * d), round(y * d)), self.level, (w, h)))
        return on_white(rgba)

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        side = max(self.height, self.width)
        if self.level == 0 or side > max_side:
            return np.asarray(self.slide.get_thumbnail((max_side, max_side)).convert("RGB"))
        return self.read(0, 0, self.height, self.width)

    def close(self) -> None:
        self.slide.close()


def open_openslide(path: Path) -> SlideSource:
    try:
        source = OpenSlideSource(path)
    except Exception as err:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise DataError(f"{path}: OpenSlide cannot read it ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unknown error'})") from None
    try:
        source.read(0, 0, min(16, source.height), min(16, source.width))
    except Exception as err:
        source.close()
        raise DataError(f"{path}: unreadable slide data ({type(err).__name__}: {err})") from None
    return source


# --- Pillow --------------------------------------------------------------------------------

def open_pillow(path: Path) -> SlideSource:
    mpp = None
    try:
        with Image.open(path) as img:
            mode = img.mode
            dpi = img.info.get("dpi")
            mpp = plausible_mpp(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
    except Exception:  # noqa: BLE001 - read_image below gives the precise message
        mode = "RGB"
    if mode not in RGB_MODES:
        raise DataError(f"{path}: {mode} image ({len(mode.split(';')[0])} channel(s)); "
                        f"translation needs an RGB (or RGBA) H&E image — convert it first")
    return ArraySource(read_image(path), name=str(path), mpp=mpp)


# --- choosing a reader -------------------------------------------------------------------------

def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _vendor(path: Path) -> str | None:
    """OpenSlide's name for a vendor format it reads (not its generic TIFF)."""
    openslide = _openslide()
    if openslide is None:
        return None
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file is not a vendor slide
        return None
    return fmt if fmt not in (None, "generic-tiff") else None


@dataclass(frozen=True)
class Reader:
    claims: Callable[[Path], bool]
    open: Callable[[Path], SlideSource]


# Vendor layouts first (OpenSlide knows their levels, offsets and MPP), then
# any TIFF (tifffile: OME, generic pyramids, plain), then Pillow's formats.
READERS: dict[str, Reader] = {
    "openslide": Reader(lambda p: _vendor(p) is not None, open_openslide),
    "tifffile": Reader(_is_tiff, open_tiff),
    "pillow": Reader(lambda p: p.suffix.lower() in IMAGE_EXTENSIONS, open_pillow),
}


def open_slide(path: str | Path) -> SlideSource:
    """Open a slide or image for region reads; one clear DataError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    for reader in READERS.values():
        if reader.claims(path):
            return reader.open(path)
    if path.suffix.lower() in OPENSLIDE_EXTENSIONS:
        hint = ("install the `slides` extra (pip install 'stain-search[slides]') for OpenSlide"
                if _openslide() is None else "OpenSlide does not recognise it (damaged, or "
                "not a slide)")
        raise DataError(f"{path}: cannot read this {path.suffix} slide: {hint}")
    raise DataError(f"{path}: not a slide or image that OpenSlide, tifffile or Pillow reads; "
                    f"use a scanner format ({', '.join(sorted(OPENSLIDE_EXTENSIONS))}), a TIFF, "
                    f"or one of {', '.join(sorted(IMAGE_EXTENSIONS))}")


def read_padded(source: SlideSource, y: int, x: int, h: int, w: int) -> np.ndarray:
    """A region that may reach past the bottom/right border: the missing part
    reflected, as whole-image inference pads (np 'reflect' = torch 'reflect')."""
    h_in, w_in = min(h, source.height - y), min(w, source.width - x)
    block = source.read(y, x, h_in, w_in)
    if (h_in, w_in) == (h, w):
        return block
    return np.pad(block, ((0, h - h_in), (0, w - w_in), (0, 0)), mode="reflect")
