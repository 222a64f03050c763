"""Slide readers (OpenSlide, tifffile, Pillow) behind one SlideSource, and the
two pyramid writers read back by tifffile and OpenSlide."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from stain_search.data.phantom import phantom_pair
from stain_search.data.slides import (ArraySource, OpenSlideSource, TiffSource, open_slide,
                                      read_padded)
from stain_search.deploy.pyramid import halve, pyramid_shapes
from stain_search.data.resolution import ResampledSource, plan_resolution
from stain_search.deploy.translate import Translator, translate_path
from stain_search.errors import ConfigError, DataError
from test_translate import DEPTH, tiny_generator

openslide = pytest.importorskip("openslide", reason="the `slides` extra (OpenSlide) is needed")

MPP = 0.25


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    a, b = phantom_pair("trichrome", 0, size=256)[1], phantom_pair("trichrome", 1, size=256)[1]
    top, bottom = np.concatenate([a, b], axis=1), np.concatenate([b[::-1], a[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, bottom], axis=0))  # (512, 512, 3)


def _tiles(image: np.ndarray, t: int):
    for y in range(0, image.shape[0], t):
        for x in range(0, image.shape[1], t):
            block = np.zeros((t, t, 3), np.uint8)
            part = image[y:y + t, x:x + t]
            block[:part.shape[0], :part.shape[1]] = part
            yield block


def write_pyramid_tiff(path, image: np.ndarray, *, description: str | None = None,
                       mpp: float | None = MPP, compression: str = "zlib") -> list[np.ndarray]:
    """A scanner-like pyramid: tiled levels in the main IFD chain; returns the levels."""
    levels = [image, halve(image)]
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            res = {} if mpp is None else {"resolution": (1e4 / (mpp * 2 ** i),) * 2,
                                          "resolutionunit": "CENTIMETER"}
            tif.write(_tiles(level, 128), shape=level.shape, dtype=np.uint8, tile=(128, 128),
                      photometric="rgb", compression=compression, subfiletype=1 if i else 0,
                      description=description if i == 0 else None, metadata=None, **res)
    return levels


APERIO = ("Aperio Image Library v12.0.15\r\n512x512 [0,0 512x512] (128x128) RGB|AppMag = 40"
          "|MPP = 0.2500")


# --- readers ------------------------------------------------------------------------------------

def test_openslide_reads_an_aperio_svs(tmp_path, he):
    path = tmp_path / "slide.svs"
    levels = write_pyramid_tiff(path, he, description=APERIO, mpp=None)
    assert openslide.OpenSlide.detect_format(str(path)) == "aperio"
    source = open_slide(path)
    try:
        assert isinstance(source, OpenSlideSource) and source.reader == "openslide"
        assert [(lv.height, lv.width) for lv in source.levels] == [(512, 512), (256, 256)]
        assert source.mpp == pytest.approx(0.25)  # openslide.mpp-x from the Aperio MPP
        assert np.array_equal(source.read(37, 51, 90, 70), he[37:127, 51:121])
        source.use_level(1)
        assert source.level_mpp(1) == pytest.approx(0.5)
        assert np.array_equal(source.read(10, 20, 64, 32), levels[1][10:74, 20:52])
    finally:
        source.close()


def test_openslide_source_reads_a_generic_tiff(tmp_path, he):
    path = tmp_path / "generic.tif"
    write_pyramid_tiff(path, he)
    source = OpenSlideSource(path)
    try:
        assert source.vendor == "generic-tiff" and source.mpp == pytest.approx(MPP)
        assert np.array_equal(source.read(100, 300, 50, 200), he[100:150, 300:500])
    finally:
        source.close()


def test_tifffile_reads_levels_and_resolution_tags(tmp_path, he):
    path = tmp_path / "pyramid.tif"
    levels = write_pyramid_tiff(path, he, mpp=0.5)
    source = open_slide(path)  # generic TIFF: tifffile, not OpenSlide
    try:
        assert isinstance(source, TiffSource)
        assert [lv.downsample for lv in source.levels] == [1.0, 2.0]
        assert source.mpp == pytest.approx(0.5)
        source.use_level(1)
        assert np.array_equal(read_padded(source, 200, 200, 64, 64)[:56, :56],
                              levels[1][200:256, 200:256])
        with pytest.raises(DataError, match="--level 2 does not exist.*2 level"):
            source.use_level(2)
    finally:
        source.close()


def test_tifffile_reads_ome_physical_size(tmp_path, he):
    path = tmp_path / "plain.ome.tif"
    tifffile.imwrite(path, he, photometric="rgb", metadata={
        "axes": "YXS", "PhysicalSizeX": 0.0005, "PhysicalSizeXUnit": "mm"})
    source = open_slide(path)
    try:
        assert source.reader == "tifffile" and source.mpp == pytest.approx(0.5)
        assert np.array_equal(source.read(0, 0, 512, 512), he)
    finally:
        source.close()


def test_plain_images_and_editor_resolutions(tmp_path, he):
    png = tmp_path / "field.png"
    Image.fromarray(he).save(png, dpi=(72, 72))  # an editor's default: not a scan
    source = open_slide(png)
    assert isinstance(source, ArraySource) and source.mpp is None
    assert np.array_equal(source.read(5, 6, 7, 8), he[5:12, 6:14])
    tif = tmp_path / "strips.tif"
    tifffile.imwrite(tif, he, photometric="rgb", rowsperstrip=16, resolution=(72, 72),
                     resolutionunit="INCH")
    source = open_slide(tif)
    assert isinstance(source, TiffSource) and source.mpp is None
    source.close()


def test_unreadable_formats_are_one_clear_line(tmp_path):
    fake = tmp_path / "scan.svs"
    fake.write_bytes(b"\x00" * 4096)
    with pytest.raises(DataError, match=r"scan.svs: cannot read this .svs slide: OpenSlide"):
        open_slide(fake)
    other = tmp_path / "notes.docx"
    other.write_bytes(b"PK\x03\x04 not a slide")
    with pytest.raises(DataError, match="not a slide or image"):
        open_slide(other)
    mrxs = tmp_path / "broken.mrxs"
    mrxs.write_text("[GENERAL]\n")
    with pytest.raises(DataError, match="broken.mrxs"):
        open_slide(mrxs)


# --- resolution --------------------------------------------------------------------------------

def test_level_and_resampling_follow_the_model_mpp(tmp_path, he):
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, he, mpp=0.25)
    source = open_slide(path)
    try:
        assert plan_resolution(source, model_mpp=0.5).level == 1  # level 1 is 0.5 µm/px
        plan = plan_resolution(source, model_mpp=0.4)
        assert (plan.level, plan.scale) == (0, pytest.approx(0.625)) and plan.mpp == 0.4
        plan = plan_resolution(source, model_mpp=1.0)  # coarser than any level: resample level 1
        assert (plan.level, plan.scale) == (1, pytest.approx(0.5))
        with pytest.raises(DataError, match=r"4x up-sampling"):
            plan_resolution(source, model_mpp=None, mpp=0.0625)
        assert plan_resolution(source, model_mpp=0.5, level=0).level == 0  # --level wins
        with pytest.raises(ConfigError, match="both given"):
            plan_resolution(source, model_mpp=None, mpp=0.5, level=0)
        with pytest.warns(UserWarning, match="neither the model nor --mpp"):
            plan_resolution(source, model_mpp=None)
    finally:
        source.close()


def test_resampled_regions_equal_the_whole_resampled_slide(he):
    inner = ArraySource(he)
    for scale in (0.625, 0.5, 1.5):
        src = ResampledSource(inner, scale)
        whole = src.read(0, 0, src.height, src.width)
        assert whole.shape == (round(512 * scale), round(512 * scale), 3)
        assert np.array_equal(src.read(40, 72, 96, 64), whole[40:136, 72:136])
    # Halving by resampling ≈ the 2×2 box level (both anti-aliased averages).
    half = ResampledSource(inner, 0.5).read(0, 0, 256, 256).astype(int)
    assert np.abs(half - halve(he).astype(int)).mean() < 6


# --- writers, read back --------------------------------------------------------------------------

def jpeg_round_trip(image: np.ndarray, quality: int = 95) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(image, level=quality))


def jpeg_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b|: the tolerance is what JPEG at that quality costs on its own
    (the tiny untrained G's output is high-frequency noise: ~5/255 at q95)."""
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.fixture(scope="module")
def translated(tmp_path_factory, he):
    """A 512² slide at 0.25 µm/px translated into both layouts (JPEG tiles)."""
    root = tmp_path_factory.mktemp("out")
    src = root / "slide.tif"
    write_pyramid_tiff(src, he, mpp=MPP)
    tr = Translator(tiny_generator(), depth=DEPTH, tile=128, overlap=56, min_tissue=0,
                    model_mpp=MPP, quality=95)
    outs = {kind: translate_path(tr, src, root / f"stained{kind}")[0]
            for kind in (".ome.tif", ".tif")}
    return outs, tr.translate_array(he)


def test_ome_tiff_reads_back_with_physical_size(translated):
    outs, expected = translated
    with tifffile.TiffFile(outs[".ome.tif"]) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == pyramid_shapes(512, 512) == \
            [(512, 512), (256, 256)]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert len(page.subifds) == 1  # reduced level as a SubIFD (Bio-Formats' layout)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert pixels["PhysicalSizeX"] == pytest.approx(MPP)
        assert pixels["PhysicalSizeXUnit"] == "µm" and pixels["SizeC"] == 3
        level0 = levels[0].asarray()
    assert jpeg_error(level0, expected) <= 1.05 * jpeg_error(jpeg_round_trip(expected), expected)


def test_generic_tiff_opens_in_openslide(translated):
    outs, expected = translated
    path = outs[".tif"]
    slide = openslide.OpenSlide(str(path))
    try:
        assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
        assert slide.level_count == 2 and slide.level_dimensions == ((512, 512), (256, 256))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        region = np.asarray(slide.read_region((0, 0), 0, (512, 512)))[..., :3]
        level1 = np.asarray(slide.read_region((0, 0), 1, (256, 256)))[..., :3]
    finally:
        slide.close()
    with tifffile.TiffFile(path) as tif:
        assert [lv.shape[:2] for lv in tif.series[0].levels] == [(512, 512), (256, 256)]
        assert tif.pages[0].tilewidth == 256
        assert tif.pages[0].resolution == pytest.approx((1e4 / MPP, 1e4 / MPP))
        ours = tif.series[0].levels[0].asarray()
    assert np.abs(region.astype(int) - ours.astype(int)).max() <= 2  # same JPEG, two decoders
    assert jpeg_error(region, expected) <= 1.05 * jpeg_error(jpeg_round_trip(expected), expected)
    half = halve(expected)
    assert jpeg_error(level1, half) <= 1.05 * jpeg_error(jpeg_round_trip(half), half)


# --- bad input ---------------------------------------------------------------------------------

def test_bad_slide_inputs_leave_nothing(tmp_path, he):
    tr = Translator(tiny_generator(), depth=DEPTH, tile=128, overlap=56, min_tissue=0.1,
                    model_mpp=MPP)
    src = tmp_path / "slide.tif"
    write_pyramid_tiff(src, he, mpp=MPP)
    glass = tmp_path / "glass.tif"
    rng = np.random.default_rng(0)
    write_pyramid_tiff(glass, np.clip(rng.normal(242, 2, he.shape), 0, 255).astype(np.uint8))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no tissue anywhere"):
        translate_path(tr, glass, out / "a.ome.tif")
    with pytest.raises(DataError, match="--level 5 does not exist"):
        translate_path(tr, src, out / "b.tif", level=5)
    with pytest.raises(DataError, match="up-sampling"):
        translate_path(tr, src, out / "c.tif", mpp=0.1)
    with pytest.raises(DataError, match="cannot write .xyz"):
        translate_path(tr, src, out / "d.xyz")
    with pytest.raises(DataError, match="SVS is a scanner format"):
        translate_path(tr, src, out / "e.svs")
    assert not out.exists() or list(out.iterdir()) == []


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, he, monkeypatch):
    """A 512 KiB tmpfs (as root), else an injected ENOSPC: the spool or the TIFF
    fills it; the error names the output, and the folder is left empty."""
    import errno
    import os
    import subprocess

    from stain_search.deploy import pyramid

    src = tmp_path / "slide.tif"
    write_pyramid_tiff(src, he, mpp=MPP)
    full = tmp_path / "full"
    full.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(full)],
        capture_output=True).returncode == 0
    if not mounted:
        real = pyramid.TileSpool.put

        def put(self, level, ty, tx, pixels):
            if len(self.index) > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, level, ty, tx, pixels)
        monkeypatch.setattr(pyramid.TileSpool, "put", put)
    try:
        tr = Translator(tiny_generator(), depth=DEPTH, tile=128, overlap=56, min_tissue=0,
                        model_mpp=MPP, compression="none")
        with pytest.raises(DataError, match=r"stained.ome.tif: the disk is full"):
            translate_path(tr, src, full / "stained.ome.tif")
        assert list(full.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], check=True)
