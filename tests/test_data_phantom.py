"""The built-in tissue phantom: deterministic, paired where it should be, plausible colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from stain_search.data import phantom
from stain_search.data.folders import resolve_dataset
from stain_search.data.io import read_image, read_mask
from stain_search.data.phantom import (COLLAGEN, NUCLEUS, STROMA, BuiltinDataset,
                                       builtin_dataset, generate_phantom, phantom_pair)
from stain_search.data.stain import STAINS, od_from_rgb, render, unmix
from stain_search.errors import ConfigError, DataError

SMALL = dict(n_train=3, n_test=2, size=64)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- the dataset on disk ---------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate_phantom(tmp_path / "a", kind="ki67", seed=3, **SMALL)
    b = generate_phantom(tmp_path / "b", kind="ki67", seed=3, **SMALL)
    c = generate_phantom(tmp_path / "c", kind="ki67", seed=4, **SMALL)
    assert tree(a) == tree(b)
    ta, tc = tree(a), tree(c)
    assert ta.keys() == tc.keys()
    assert all(ta[k] != tc[k] for k in ta if k.endswith(".png") and "mask" not in k)


def test_layout_pairs_and_metadata(tmp_path):
    root = generate_phantom(tmp_path / "ki", kind="ki67", **SMALL)
    names = {d: sorted(p.name for p in (root / d).iterdir())
             for d in ("trainA", "trainB", "testA", "testB", "testB_mask")}
    assert len(names["trainA"]) == len(names["trainB"]) == 3
    assert names["testA"] == names["testB"] == names["testB_mask"]  # paired by file name
    meta = json.loads((root / "phantom.json").read_text())
    assert (meta["kind"], meta["stain"], meta["size"]) == ("ki67", "ki67", 64)
    assert read_image(root / "testA" / names["testA"][0]).shape == (64, 64, 3)
    # Training domains come from different tissue maps: unpaired.
    a = read_image(root / "trainA" / names["trainA"][0])
    b = read_image(root / "trainB" / names["trainB"][0])
    assert np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1] < 0.5
    tri = generate_phantom(tmp_path / "tri", kind="trichrome", **SMALL)
    assert not (tri / "testB_mask").exists()


def test_test_pairs_share_structure(tmp_path):
    tissue, he, target = phantom_pair("trichrome", 0, size=96)
    # Same tissue map: darkness of the two stainings correlates strongly.
    assert np.corrcoef(he.mean(-1).ravel(), target.mean(-1).ravel())[0, 1] > 0.5


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = phantom.write_image

    def failing_write(path, array, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real_write(path, array, **kwargs)

    monkeypatch.setattr(phantom, "write_image", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_phantom(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_phantom(tmp_path / "out", **SMALL)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# --- colours follow the stain model ----------------------------------------------------

def class_mean(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[mask].astype(float).mean(0)  # (R, G, B)


@pytest.mark.parametrize("index", range(3))
def test_trichrome_colours(index):
    tissue, he, tri = phantom_pair("trichrome", index)
    core = {k: ndimage.binary_erosion(tissue.classes == k, iterations=2)
            for k in (STROMA, COLLAGEN, NUCLEUS)}
    r, g, b = class_mean(he, core[COLLAGEN])
    assert r > g and b > g  # H&E collagen is pink (eosin) ...
    sr, sg, sb = class_mean(he, core[STROMA])
    assert sr > sg and sb > sg  # ... like the cytoplasm,
    assert abs(g - sg) < 20  # about as strongly,
    texture = ndimage.generic_filter(he[..., 1].astype(float), np.std, size=5)
    assert texture[core[COLLAGEN]].mean() > 1.5 * texture[core[STROMA]].mean()  # but fibrous.
    r, g, b = class_mean(tri, core[COLLAGEN])
    assert b > r and b > g  # trichrome collagen: blue
    r, g, b = class_mean(tri, core[STROMA])
    assert r > g + 40 and r > b + 40  # cytoplasm: red
    assert class_mean(tri, core[NUCLEUS]).mean() < class_mean(tri, core[STROMA]).mean() - 30


@pytest.mark.parametrize("index", range(3))
def test_ki67_positive_nuclei_are_brown_and_visible_in_he(index):
    tissue, he, ki = phantom_pair("ki67", index)
    pos = ndimage.binary_erosion(tissue.positive, iterations=1)
    neg = ndimage.binary_erosion((tissue.classes == NUCLEUS) & ~tissue.positive, iterations=1)
    assert pos.any() and neg.any()
    r, g, b = class_mean(ki, pos)
    assert r > g > b  # DAB brown
    r, g, b = class_mean(ki, neg)
    assert b > r  # haematoxylin blue
    dab = unmix(ki, ("haematoxylin", "dab"))[..., 1]
    assert dab[pos].mean() > 4 * max(dab[neg].mean(), 0.02)
    # The H&E trait that predicts positivity: larger and darker nuclei.
    labels = tissue.nuclei
    ids_pos = np.unique(labels[tissue.positive])
    ids_neg = np.setdiff1d(np.unique(labels[labels > 0]), ids_pos)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.r_[ids_pos, ids_neg])
    assert areas[:len(ids_pos)].mean() > 1.3 * areas[len(ids_pos):].mean()
    od = od_from_rgb(he).sum(-1)  # darkness as optical density (Beer–Lambert)
    assert od[pos].mean() > 1.15 * od[neg].mean()
    assert od[pos].std() > 1.5 * od[neg].std()  # coarser chromatin


def test_render_is_beer_lambert():
    # One unit of a dye along its unit OD vector: intensity 255·10^(-v).
    rgb = render(np.array([[[1.0, 0.0]]]), ("haematoxylin", "eosin"))
    np.testing.assert_allclose(rgb[0, 0], np.round(255 * 10 ** -STAINS["haematoxylin"]), atol=1)
    amounts = np.array([[[0.3, 0.6]]])
    np.testing.assert_allclose(unmix(render(amounts, ("haematoxylin", "eosin")),
                                     ("haematoxylin", "eosin")), amounts, atol=0.02)


# --- built-in, cached --------------------------------------------------------------------

@pytest.fixture
def tiny_builtins(monkeypatch, tmp_path):
    monkeypatch.setitem(phantom.BUILTIN_DATASETS, "builtin:phantom-trichrome",
                        BuiltinDataset(kind="trichrome", **SMALL))
    monkeypatch.setitem(phantom.BUILTIN_DATASETS, "builtin:phantom-ki67",
                        BuiltinDataset(kind="ki67", **SMALL))
    monkeypatch.setenv("STAIN_SEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builtin_is_generated_once_and_cached(tiny_builtins):
    first = builtin_dataset("builtin:phantom-trichrome")
    assert first.is_relative_to(tiny_builtins)
    stamp = (first / "phantom.json").stat().st_mtime_ns
    assert builtin_dataset("phantom-trichrome") == first  # short name too
    assert (first / "phantom.json").stat().st_mtime_ns == stamp  # not regenerated


def test_builtin_key_follows_parameters(tiny_builtins, monkeypatch):
    first = builtin_dataset("builtin:phantom-trichrome")
    monkeypatch.setitem(phantom.BUILTIN_DATASETS, "builtin:phantom-trichrome",
                        BuiltinDataset(kind="trichrome", **{**SMALL, "seed": 1}))
    second = builtin_dataset("builtin:phantom-trichrome")
    assert second != first and second.parent == first.parent


def test_builtin_lost_race_uses_the_winner(tiny_builtins, monkeypatch):
    real = phantom.generate_phantom

    def lose_race(out, **kw):
        real(out, **kw)  # another worker finishes first ...
        raise OSError(39, "Directory not empty")  # ... so our own rename fails

    monkeypatch.setattr(phantom, "generate_phantom", lose_race)
    target = builtin_dataset("builtin:phantom-ki67")
    assert (target / "phantom.json").is_file()


def test_builtin_real_failure_is_raised(tiny_builtins, monkeypatch):
    def fail(out, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phantom, "generate_phantom", fail)
    with pytest.raises(OSError, match="No space"):
        builtin_dataset("builtin:phantom-ki67")


def test_unknown_builtin_lists_known():
    with pytest.raises(ConfigError, match="builtin:phantom-trichrome"):
        builtin_dataset("builtin:phantom-he")


def test_resolve_builtin(tiny_builtins):
    files = resolve_dataset("builtin:phantom-ki67")
    assert files.layout == "cyclegan" and files.stain == "ki67"
    assert len(files.pairs) == 2 and set(files.masks) == {a.stem for a, _ in files.pairs}
    tissue, _, _ = phantom_pair("ki67", 0, size=64)
    np.testing.assert_array_equal(read_mask(files.masks["tile_0000"]), tissue.positive)
    with pytest.raises(ConfigError, match="cyclegan"):
        resolve_dataset("builtin:phantom-ki67", "bci")
