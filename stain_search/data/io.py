"""Reading and writing images: one place that knows file formats.

Histology images arrive in many shapes: JPEG data saved under a ``.png``
name (the BCI dataset), RGBA PNGs (torchstain's samples), 16-bit or planar
TIFFs from scanners, grayscale or palette images. Everything that leaves
:func:`read_image` is the same thing — an ``(H, W, 3)`` uint8 RGB array — so
no other module has to care. The format is detected from the file's content,
never from its name. Anything unreadable (empty, truncated, corrupt, not an
image) raises :class:`~stain_search.errors.DataError` naming the file and
the problem.

Writes are atomic (:func:`stain_search.atomic.atomic_path`: a temporary
name in the same folder, then ``os.replace``): an interrupted run never
leaves half an image behind.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from stain_search.atomic import atomic_path
from stain_search.errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

# TIFF (classic and BigTIFF, both byte orders) starts with one of these.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Conversions already announced: warn once per kind, not once per file (a
# dataset of 5,000 RGBA tiles should say so once).
_warned_kinds: set[str] = set()


def is_image_file(path: Path) -> bool:
    """A visible file whose extension is one we read."""
    return path.is_file() and not path.name.startswith(".") \
        and path.suffix.lower() in IMAGE_EXTENSIONS


def _warn_once(kind: str, path: Path, what: str) -> None:
    if kind in _warned_kinds:
        return
    _warned_kinds.add(kind)
    warnings.warn(f"{path}: {what} (further {kind} images are converted silently)",
                  stacklevel=3)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes) — re-copy or delete it")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); give this user read "
                        f"access (chmod a+r) or remove it from the folder") from None


# --- pixel conversion to (H, W, 3) uint8 --------------------------------------

def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Scale any integer/float/bool pixel type to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit (and PIL's int32 "I" mode, which holds 16-bit data): scale the
        # full 0..65535 range, so absolute intensities (and colour) survive.
        _warn_once("16-bit", path, f"{array.dtype} pixels scaled to 8 bits")
        scaled = np.clip(array, 0, 65535).astype(np.float32) / 257.0
        return np.round(scaled).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = array[np.isfinite(array)]
        if finite.size != array.size or finite.min(initial=0) < 0 or finite.max(initial=0) > 1:
            raise DataError(f"{path}: floating-point pixels outside [0, 1]; save the image "
                            f"as 8- or 16-bit integers")
        _warn_once("float", path, "floating-point pixels scaled to 8 bits")
        return np.round(array * 255.0).astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {array.dtype}")


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Transparent means glass: blend onto white with the alpha channel."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.round(rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def to_rgb8(array: np.ndarray, path: Path) -> np.ndarray:
    """Any (H, W), (H, W, 1|2|3|4) pixel array → (H, W, 3) uint8 RGB."""
    array = _to_uint8(np.asarray(array), path)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 2-D image, got pixel array of shape {array.shape}")
    channels = array.shape[2]
    if channels == 1:
        _warn_once("grayscale", path, "grayscale image converted to RGB")
        return np.repeat(array, 3, axis=2)
    if channels == 2:
        _warn_once("grayscale", path, "grayscale+alpha image composited on white")
        return np.repeat(_composite_on_white(array[..., :1], array[..., 1]), 3, axis=2)
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 4:
        _warn_once("rgba", path, "RGBA image composited on white")
        return _composite_on_white(array[..., :3], array[..., 3])
    raise DataError(f"{path}: {channels} channels; expected RGB, RGBA or grayscale")


# --- TIFF (tifffile) -----------------------------------------------------------

def _select_yxc(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reduce a TIFF series to (H, W[, C]): first plane of any extra axis
    (Z, T, pages), channels (S samples or C planes) moved last."""
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: TIFF has axes {axes!r}, no Y/X image plane")
    keep = [a for a in axes if a in "YXSC"]
    index = tuple(slice(None) if a in keep else 0 for a in axes)
    array, axes = array[index], "".join(keep)
    if "S" in axes and "C" in axes:  # both: C planes of S samples → keep the first C
        array, axes = np.take(array, 0, axis=axes.index("C")), axes.replace("C", "")
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a in "SC"]
    return np.transpose(array, order)


def _read_tiff(path: Path) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return _select_yxc(series.asarray(), series.axes, path)
    except DataError:
        raise
    except Exception as err:  # tifffile raises many types for damaged files
        raise DataError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None


# --- PIL (PNG, JPEG, BMP, WebP, ...) ---------------------------------------------

def _pil_array(img: Image.Image, path: Path) -> np.ndarray:
    """PIL image in any mode → pixel array (channel handling left to to_rgb8)."""
    if img.mode == "P" or img.mode == "PA":
        has_alpha = img.mode == "PA" or "transparency" in img.info
        _warn_once("palette", path, "palette image converted to RGB")
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        _warn_once(img.mode, path, f"{img.mode} image converted to RGB")
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        # Pillow's 16-bit grayscale: read as native uint16.
        return np.asarray(img, dtype=np.uint16)
    return np.asarray(img)


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()  # decodes now: truncation shows up here, not later
            return _pil_array(img, path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or an unsupported format); "
                        f"supported: {', '.join(sorted(IMAGE_EXTENSIONS))}") from None
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from None


# Pillow refuses to decode an image over twice this many pixels (its guard against
# "decompression bombs"); a lab with bigger flat images raises it on purpose.
MAX_PIXELS_ENV = "STAIN_SEARCH_MAX_IMAGE_PIXELS"
if os.environ.get(MAX_PIXELS_ENV, "").isdigit():
    Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS_ENV])


def _too_large(path: Path, err: Exception) -> DataError:
    pixels = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(pixels.group(1)):,} pixels, " if pixels else ""
    return DataError(
        f"{path}: {size}over Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} "
        f"pixels; cut it into tiles with `stain-search data prepare`, or, if you trust the "
        f"file, raise the limit with {MAX_PIXELS_ENV}=<pixels>")


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as an (H, W, 3) uint8 RGB array."""
    path = Path(path)
    _check_file(path)
    raw = _read_tiff(path) if _is_tiff(path) else _read_pil(path)
    return to_rgb8(raw, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding pixels."""
    path = Path(path)
    _check_file(path)
    if _is_tiff(path):
        try:
            with tifffile.TiffFile(path) as tif:
                axes, shape = tif.series[0].axes, tuple(tif.series[0].shape)
        except Exception as err:
            raise DataError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None
        if "Y" not in axes or "X" not in axes:
            raise DataError(f"{path}: TIFF has axes {axes!r}, no Y/X image plane")
        return shape[axes.index("Y")], shape[axes.index("X")]
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt image header ({err})") from None
    return height, width


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask image (e.g. the phantom's positive nuclei) → (H, W) bool."""
    path = Path(path)
    _check_file(path)
    pixels = _to_uint8(_read_pil(path), path)
    return (pixels if pixels.ndim == 2 else pixels[..., 0]) > 127


# --- large images, tile by tile ------------------------------------------------

@dataclass
class ImageSource:
    """A (possibly huge) image read region by region as (h, w, 3) uint8 RGB.

    TIFFs are decoded once into a disk-backed memory map, so a slide larger
    than memory can still be tiled; other formats are read whole.
    """

    path: Path
    pixels: np.ndarray  # (H, W[, C]) as stored: a memmap for TIFFs

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return to_rgb8(self.pixels[y:y + h, x:x + w], self.path)

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        """A strided (nearest-neighbour) preview, for whole-image statistics."""
        step = max(1, -(-max(self.height, self.width) // max_side))
        return to_rgb8(self.pixels[::step, ::step], self.path)


def open_image(path: str | Path) -> ImageSource:
    """Open an image for region reads (see :class:`ImageSource`)."""
    path = Path(path)
    _check_file(path)
    if not _is_tiff(path):
        return ImageSource(path, _read_pil(path))
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return ImageSource(path, _select_yxc(series.asarray(out="memmap"), series.axes, path))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})") from None


# --- writing -------------------------------------------------------------------

def _pil_format(suffix: str, path: Path) -> str:
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot write images with extension {suffix!r}; "
                        f"use one of {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return fmt


def write_image(path: str | Path, array: np.ndarray, *, fsync: bool = True) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array; format from the extension.

    Atomic: written under a temporary name in the same folder, then renamed.
    ``fsync=False`` for the tiles of a folder built by ``atomic_dir``, which
    is renamed into place as a whole (see :func:`stain_search.atomic.atomic_path`).
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) \
            or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"write_image expects (H, W[, 1|3|4]) uint8, got "
                         f"{array.shape} {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    suffix = path.suffix.lower()
    is_tiff = suffix in (".tif", ".tiff")
    fmt = None if is_tiff else _pil_format(suffix, path)
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "xb") as f:
        if is_tiff:
            tifffile.imwrite(f, array, photometric="rgb" if array.ndim == 3 else None)
        else:
            Image.fromarray(array).save(f, format=fmt)
    return path
