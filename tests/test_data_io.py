"""Image reading and writing: every odd file becomes RGB uint8 or a clear DataError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from stain_search.data import io as data_io
from stain_search.data.io import image_size, open_image, read_image, read_mask, write_image
from stain_search.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "data" / "real-samples"


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the once-per-kind conversion warnings anew."""
    data_io._warned_kinds.clear()
    yield
    data_io._warned_kinds.clear()


def rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- formats ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x.png", "x.bmp", "x.tif", "x.tiff"])
def test_lossless_round_trip(tmp_path, name):
    img = rgb()
    write_image(tmp_path / name, img)
    out = read_image(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, img)
    assert image_size(tmp_path / name) == (24, 32)


def test_format_is_detected_by_content_not_extension(tmp_path):
    img = np.full((16, 16, 3), (200, 80, 140), np.uint8)
    (tmp_path / "bci_style.png").write_bytes(encoded(img, "JPEG", quality=95))
    (tmp_path / "png_named.jpg").write_bytes(encoded(img, "PNG"))
    assert np.abs(read_image(tmp_path / "bci_style.png").astype(int) - img).max() <= 3
    np.testing.assert_array_equal(read_image(tmp_path / "png_named.jpg"), img)


def test_rgba_is_composited_on_white_with_one_warning(tmp_path):
    img = np.zeros((8, 8, 4), np.uint8)
    img[..., :3] = (10, 20, 30)
    img[:, :4, 3] = 255  # left half opaque, right half transparent
    img[:, 4:, 3] = 0
    for name in ("a.png", "b.png"):
        Image.fromarray(img, "RGBA").save(tmp_path / name)
    with pytest.warns(UserWarning, match="RGBA") as record:
        out = read_image(tmp_path / "a.png")
        read_image(tmp_path / "b.png")
    assert len([w for w in record if "RGBA" in str(w.message)]) == 1  # once per kind
    assert (out[:, :4] == (10, 20, 30)).all() and (out[:, 4:] == 255).all()


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    Image.fromarray(rgb(8, 8)).convert("P").save(tmp_path / "p.png")
    with pytest.warns(UserWarning, match="grayscale"):
        out = read_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3) and (out[..., 0] == gray).all() and (out[..., 2] == gray).all()
    with pytest.warns(UserWarning, match="palette"):
        pal = read_image(tmp_path / "p.png")
    assert pal.shape == (8, 8, 3) and pal.dtype == np.uint8


def test_16_bit_images_are_scaled_to_8_bits(tmp_path):
    gray16 = np.array([[0, 257, 65535, 32896]], np.uint16).repeat(4, 0)
    Image.fromarray(gray16).save(tmp_path / "g16.png")  # Pillow writes I;16 PNG
    rgb16 = (rgb(6, 5).astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "c16.tif", rgb16, photometric="rgb")
    with pytest.warns(UserWarning) as record:
        g = read_image(tmp_path / "g16.png")
    assert {"16-bit", "grayscale"} <= {k for w in record for k in ("16-bit", "grayscale")
                                       if k in str(w.message)}
    np.testing.assert_array_equal(g[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(read_image(tmp_path / "c16.tif"), rgb(6, 5))


def test_planar_tiff_channels_move_last(tmp_path):
    img = rgb(10, 12)
    tifffile.imwrite(tmp_path / "planar.tif", img.transpose(2, 0, 1), photometric="rgb",
                     planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), img)
    assert image_size(tmp_path / "planar.tif") == (10, 12)


def test_open_image_reads_regions_and_thumbnails(tmp_path):
    img = rgb(40, 50)
    write_image(tmp_path / "big.tif", img)
    src = open_image(tmp_path / "big.tif")
    assert (src.height, src.width) == (40, 50)
    np.testing.assert_array_equal(src.read(5, 7, 10, 20), img[5:15, 7:27])
    np.testing.assert_array_equal(src.thumbnail(max_side=25), img[::2, ::2])


def test_read_mask(tmp_path):
    mask = np.zeros((6, 6), bool)
    mask[2:4, 1:5] = True
    write_image(tmp_path / "m.png", mask.astype(np.uint8) * 255)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)


# --- broken files ----------------------------------------------------------------------

def broken_files(tmp_path: Path) -> dict[str, Path]:
    png, jpg = encoded(rgb(64, 64), "PNG"), encoded(rgb(64, 64), "JPEG")
    files = {"zero-byte": b"", "text-as-png": b"just some notes, not pixels\n",
             "truncated png": png[: len(png) // 2], "truncated jpeg": jpg[: len(jpg) * 2 // 3],
             "corrupt tiff": b"II*\x00" + b"\xff" * 40}
    paths = {}
    for i, (kind, data) in enumerate(files.items()):
        paths[kind] = tmp_path / (f"f{i}.tif" if "tiff" in kind else f"f{i}.png")
        paths[kind].write_bytes(data)
    return paths


@pytest.mark.parametrize("kind,reason", [
    ("zero-byte", "empty file"), ("text-as-png", "not an image"),
    ("truncated png", "truncated"), ("truncated jpeg", "truncated"),
    ("corrupt tiff", "unreadable TIFF")])
def test_broken_files_raise_data_error_naming_the_file(tmp_path, kind, reason):
    path = broken_files(tmp_path)[kind]
    with pytest.raises(DataError, match=reason) as err:
        read_image(path)
    assert str(path) in str(err.value)
    assert err.value.__cause__ is None  # one clean line, no chained library traceback


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_header_check_catches_non_images(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(DataError, match="notes.png"):
        image_size(tmp_path / "notes.png")


# --- atomic writes ------------------------------------------------------------------------

def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    write_image(tmp_path / "sub" / "a.png", rgb())
    write_image(tmp_path / "sub" / "a.png", rgb(seed=1))  # replace in place
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]
    np.testing.assert_array_equal(read_image(tmp_path / "sub" / "a.png"), rgb(seed=1))


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", rgb())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "a.png", rgb(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb())


def test_write_rejects_unknown_extension_and_bad_arrays(tmp_path):
    with pytest.raises(DataError, match=".xyz"):
        write_image(tmp_path / "a.xyz", rgb())
    with pytest.raises(ValueError):
        write_image(tmp_path / "a.png", rgb().astype(np.float32))
    assert list(tmp_path.iterdir()) == []


# --- real samples (only where ../shared exists) -------------------------------------------

@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples (../shared) not available")
def test_real_bci_png_files_are_jpeg_and_read():
    path = next(iter(sorted((SAMPLES / "bci" / "HE").glob("*.png"))))
    assert path.read_bytes()[:2] == b"\xff\xd8"  # JPEG data under a .png name
    img = read_image(path)
    assert img.shape == (1024, 1024, 3) and img.dtype == np.uint8
    assert 50 < img.mean() < 250  # a real, stained image


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples (../shared) not available")
def test_real_rgba_torchstain_sample():
    with pytest.warns(UserWarning, match="RGBA"):
        img = read_image(SAMPLES / "he-unpaired" / "target.png")
    assert img.shape == (441, 587, 3)
