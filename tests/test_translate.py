"""Tiled translation: seam-free blending, whole-image equality, background
pass-through, region reads, pyramidal TIFF out, clean failures."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn

from stain_search.config import load_config
from stain_search.data import to_image, to_tensor
from stain_search.data.phantom import phantom_pair
from stain_search.data.slides import TiffSource
from stain_search.data.slides import open_slide as open_source
from stain_search.deploy.pyramid import halve, pyramid_shapes
from stain_search.deploy.tiling import Grid, default_overlap, receptive_radius
from stain_search.deploy.translate import Translator, translate_path
from stain_search.errors import DataError
from stain_search.models import build_generator, init_weights

DEPTH = 3  # tiny U-Net: 2**3 = 8 px grid, receptive radius 21 px


def tiny_generator(depth: int = DEPTH, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = load_config(None, {"model.depth": depth, "model.ngf": 8, "data.crop": 2 ** depth * 4})
    return init_weights(build_generator(cfg.model)).eval()


def whole_image(g: nn.Module, image: np.ndarray, *, depth: int = DEPTH) -> np.ndarray:
    """G on the whole image at once (reflect-padded to the U-Net's grid)."""
    step = 2 ** depth
    h, w = image.shape[:2]
    padded = np.pad(image, ((0, -h % step), (0, -w % step), (0, 0)), mode="reflect")
    with torch.no_grad():
        return to_image(g(to_tensor(padded)[None])[0])[:h, :w]


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    return phantom_pair("trichrome", 0, size=256)[1]  # (256, 256, 3) uint8 H&E


# --- geometry --------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 3])
def test_receptive_radius_is_the_measured_one(depth):
    """Backprop from output pixels of every phase of the 2**depth grid: the
    farthest input pixel with a nonzero gradient is receptive_radius away."""
    g = tiny_generator(depth)
    for name, child in list(g.named_modules()):
        for cname, c in list(child.named_children()):
            if isinstance(c, nn.InstanceNorm2d):  # per-image statistics are global; the
                setattr(child, cname, nn.Identity())  # local field is what tiles see
    size = 2 ** depth * 12
    x = torch.randn(1, 3, size, size, requires_grad=True)
    y = g(x)
    c = size // 2
    reach = 0
    for phase in range(2 ** depth):
        x.grad = None
        y[0, :, c, c + phase].sum().backward(retain_graph=True)
        cols = (x.grad[0].abs().sum((0, 1)) > 0).nonzero()[:, 0] - (c + phase)
        reach = max(reach, int(cols.abs().max()))
    assert reach == receptive_radius(depth)


def test_windows_sum_to_one_and_cores_partition_the_image():
    grid = Grid.build(250, 230, tile=96, overlap=56, depth=DEPTH)
    total = np.zeros((grid.padded_h, grid.padded_w))
    cover = np.zeros_like(total, dtype=int)
    for t in grid.tiles():
        total[t.y:t.y + grid.tile_h, t.x:t.x + grid.tile_w] += grid.window(t)
        y0, y1, x0, x1 = t.core
        cover[t.y + y0:t.y + y1, t.x + x0:t.x + x1] += 1
        assert all(v % grid.step == 0 for v in t.core)  # on the U-Net's grid
    assert len(grid.ys) > 2 and len(grid.xs) > 2
    assert np.allclose(total, 1.0, atol=1e-5)  # no seam in the weighting itself
    assert (cover == 1).all()


# --- tiled = whole image ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 256), (250, 230)])
def test_tiled_output_matches_whole_image(he_image, shape):
    """The acceptance check: 3x3 overlapping tiles with whole-image instance-norm
    statistics give the whole-image output to within 1/255 at every pixel."""
    g = tiny_generator()
    image = np.ascontiguousarray(he_image[:shape[0], :shape[1]])
    tr = Translator(g, depth=DEPTH, tile=128, overlap=default_overlap(DEPTH, 128),
                    norm_stats="global", min_tissue=0, batch_size=4)
    tiled = tr.translate_array(image)
    assert tr.last_run.tiles == 9 and tr.last_run.passes == 3  # 3 norm layers, then output
    diff = np.abs(tiled.astype(int) - whole_image(g, image).astype(int))
    assert diff.max() <= 1, f"max |tiled - whole| = {diff.max()}/255"
    assert (diff > 0).mean() < 1e-3  # only rounding flips, at a handful of pixels


def test_per_tile_statistics_do_not_match(he_image):
    """Why `global` exists: with each tile's own instance-norm statistics the
    same tiling is visibly off (so the check above can fail)."""
    g = tiny_generator()
    tr = Translator(g, depth=DEPTH, tile=128, overlap=56, norm_stats="tile", min_tissue=0)
    diff = np.abs(tr.translate_array(he_image).astype(int) - whole_image(g, he_image).astype(int))
    assert diff.max() > 4


def test_kernel_statistics_use_neighbourhoods(he_image):
    g = tiny_generator()
    kin = Translator(g, depth=DEPTH, tile=64, overlap=16, norm_stats="kernel", kernel=3,
                     min_tissue=0)
    own = Translator(g, depth=DEPTH, tile=64, overlap=16, norm_stats="tile", min_tissue=0)
    a, b = kin.translate_array(he_image), own.translate_array(he_image)
    assert a.shape == he_image.shape and a.dtype == np.uint8
    assert kin.last_run.passes == 1
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # the smoothed stats were used


def test_single_tile_image_is_plain_inference(he_image):
    g = tiny_generator()
    small = np.ascontiguousarray(he_image[:64, :64])
    for mode in ("global", "tile", "kernel"):
        out = Translator(g, depth=DEPTH, norm_stats=mode, min_tissue=0).translate_array(small)
        assert np.array_equal(out, whole_image(g, small))


# --- background ------------------------------------------------------------------------------

def test_background_tiles_pass_through_untouched(he_image):
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(242, 2, (256, 128, 3)), 0, 255).astype(np.uint8)
    image = np.concatenate([glass, he_image[:, :128]], axis=1)  # glass | tissue
    tr = Translator(tiny_generator(), depth=DEPTH, tile=64, overlap=32, min_tissue=0.5)
    out = tr.translate_array(image)
    assert 0 < tr.last_run.tissue_tiles < tr.last_run.tiles
    # Columns only background tiles cover (left of the first tissue tile's reach).
    assert np.array_equal(out[:, :96], image[:, :96])
    assert np.abs(out[:, 160:].astype(int) - image[:, 160:].astype(int)).mean() > 5


# --- region reads and the pyramidal TIFF --------------------------------------------------------

def _tiles_of(image: np.ndarray, tile: int):
    for y in range(0, image.shape[0], tile):
        for x in range(0, image.shape[1], tile):
            yield image[y:y + tile, x:x + tile]


def write_slide(path, image: np.ndarray, *, tiled: bool = True) -> None:
    """A multi-page pyramidal TIFF like a scanner's: level 0, a reduced page, a
    thumbnail page (all pages, SVS-style, no SubIFDs)."""
    with tifffile.TiffWriter(path) as tif:
        if tiled:
            tif.write(_tiles_of(image, 64), shape=image.shape, dtype=np.uint8, tile=(64, 64),
                      photometric="rgb", compression="zlib")
        else:
            tif.write(image, photometric="rgb", rowsperstrip=16, compression="zlib")
        half = halve(image)
        tif.write(half, photometric="rgb", subfiletype=1, compression="zlib")
        tif.write(half[::4, ::4], photometric="rgb", compression="zlib")


def test_jpeg_tiles_decode_like_tifffile(tmp_path, he_image):
    """Scanner-style JPEG tiles (SVS): region reads decode them as tifffile does."""
    path = tmp_path / "jpeg.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_tiles_of(he_image, 64), shape=he_image.shape, dtype=np.uint8,
                  tile=(64, 64), photometric="rgb", compression="jpeg")
    whole = tifffile.imread(path)
    source = open_source(path)
    try:
        assert np.array_equal(source.read(10, 70, 150, 100), whole[10:160, 70:170])
    finally:
        source.close()


@pytest.mark.parametrize("tiled", [True, False])
def test_tiff_region_reads(tmp_path, he_image, tiled):
    path = tmp_path / "slide.tif"
    write_slide(path, he_image[:200, :180], tiled=tiled)
    source = open_source(path)
    try:
        assert isinstance(source, TiffSource) and (source.height, source.width) == (200, 180)
        assert np.array_equal(source.read(37, 51, 90, 70), he_image[37:127, 51:121])
        if tiled:  # only the segments the region touches were decoded
            assert sorted(source._cache) == [0, 1, 3, 4]  # tile rows 0-1 × cols 0-1 (of 4x3)
    finally:
        source.close()


def test_pyramidal_tiff_round_trip(tmp_path, he_image):
    image = np.ascontiguousarray(np.concatenate([he_image, he_image[:, ::-1]], axis=1)[:, :300])
    src, dst = tmp_path / "slide.tif", tmp_path / "out" / "stained.tif"
    write_slide(src, image)
    tr = Translator(tiny_generator(), depth=DEPTH, tile=128, overlap=56, min_tissue=0,
                    compression="zlib")
    translate_path(tr, src, dst)
    expected = tr.translate_array(image)
    with tifffile.TiffFile(dst) as tif:
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == pyramid_shapes(256, 300) == \
            [(256, 300), (128, 150)]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        level0, level1 = levels[0].asarray(), levels[1].asarray()
    assert np.array_equal(level0, expected)  # lossless, streamed tile by tile
    assert np.array_equal(level1, halve(expected))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["stained.tif"]  # no temp left


def test_pyramid_levels_down_to_one_tile():
    assert pyramid_shapes(1000, 3000) == [(1000, 3000), (500, 1500), (250, 750), (125, 375),
                                          (63, 188)]


# --- bad input: one clear error, nothing half-written ---------------------------------------------

def test_bad_inputs_give_one_clear_error(tmp_path, he_image):
    tr = Translator(tiny_generator(), depth=DEPTH, min_tissue=0)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    gray = tmp_path / "gray.png"
    Image.fromarray(he_image[..., 0]).save(gray)
    broken = tmp_path / "broken.tif"
    write_slide(broken, he_image[:128, :128])
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated: tile data gone
    with pytest.raises(DataError, match="garbage.png"):
        translate_path(tr, garbage, tmp_path / "a.png")
    with pytest.raises(DataError, match="1 channel"):
        translate_path(tr, gray, tmp_path / "b.png")
    with pytest.raises(DataError, match="broken.tif"):
        translate_path(tr, broken, tmp_path / "c.tif")
    with pytest.raises(DataError, match="cannot write"):
        translate_path(tr, gray, tmp_path / "d.xyz")
    with pytest.raises(DataError, match="expected an"):
        tr.translate_array(he_image[..., :2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tif", "garbage.png",
                                                          "gray.png"]


def test_folder_is_all_or_nothing(tmp_path, he_image):
    tr = Translator(tiny_generator(), depth=DEPTH, min_tissue=0)
    src = tmp_path / "tiles"
    src.mkdir()
    Image.fromarray(he_image[:64, :64]).save(src / "a.png")
    Image.fromarray(he_image[64:128, :96]).save(src / "b.png")
    outputs = translate_path(tr, src, tmp_path / "out")
    assert [p.name for p in outputs] == ["a.png", "b.png"]
    assert np.asarray(Image.open(outputs[1])).shape == (64, 96, 3)
    with pytest.raises(DataError, match="already exists"):
        translate_path(tr, src, tmp_path / "out")
    (src / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="c.png"):
        translate_path(tr, src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
