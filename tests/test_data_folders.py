"""Dataset layouts: each recognised from a folder the test builds; errors say what to do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stain_search.data.folders import (LAYOUTS, detect_layout, resolve_dataset,
                                       split_by_name)
from stain_search.data.io import write_image
from stain_search.errors import ConfigError, DataError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-samples"


def images(folder: Path, names: list[str], *, size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    return [write_image(folder / n, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for n in names]


def build(root: Path, layout: str) -> Path:
    """A tiny dataset in ``layout``: train 3 + 2 images, test 2 + 2 (one shared name)."""
    dirs = {"cyclegan": ("trainA", "trainB", "testA", "testB"),
            "bci": ("HE/train", "IHC/train", "HE/test", "IHC/test"),
            "mist": ("TrainValAB/trainA", "TrainValAB/trainB", "TrainValAB/valA",
                     "TrainValAB/valB")}[layout]
    for folder, names in zip(dirs, (["a1.png", "a2.png", "a3.png"], ["b1.jpg", "b2.png"],
                                    ["t1.png", "t2.png"], ["t1.jpg", "t9.png"])):
        images(root / folder, names)
    return root


@pytest.mark.parametrize("layout", ["cyclegan", "bci", "mist"])
def test_split_layouts_detected_and_listed(tmp_path, layout):
    root = build(tmp_path / layout, layout)
    files = resolve_dataset(str(root))
    assert files.layout == layout and files.root == root
    assert [p.name for p in files.train_a] == ["a1.png", "a2.png", "a3.png"]
    assert [p.name for p in files.train_b] == ["b1.jpg", "b2.png"]
    assert [p.name for p in files.test_b] == ["t1.jpg", "t9.png"]
    assert [(a.name, b.name) for a, b in files.pairs] == [("t1.png", "t1.jpg")]  # by stem
    assert resolve_dataset(root, layout).key == files.key  # explicit = detected


def test_mist_without_trainvalab_folder(tmp_path):
    for folder in ("trainA", "trainB", "valA", "valB"):
        images(tmp_path / folder, ["x.png"])
    assert resolve_dataset(tmp_path).layout == "mist"


@pytest.mark.parametrize("names", [("A", "B"), ("HE", "IHC")])
def test_pair_layout_splits_by_name(tmp_path, names):
    stems = [f"img{i:02d}" for i in range(30)]
    images(tmp_path / names[0], [f"{s}.png" for s in stems])
    images(tmp_path / names[1], [f"{s}.png" for s in stems[:25]])
    files = resolve_dataset(tmp_path)
    assert files.layout == "pair"
    test_stems = {p.stem for p in files.test_a}
    assert 1 <= len(test_stems) <= 8  # ~10% of 30
    assert {p.stem for p in files.train_a}.isdisjoint(test_stems)
    assert {p.stem for p in files.test_b} <= test_stems  # a pair never straddles splits
    assert len(files.train_a) + len(files.test_a) == 30
    assert all(a.stem == b.stem for a, b in files.pairs)
    # Adding files moves none of the existing ones between splits.
    images(tmp_path / names[0], [f"new{i}.png" for i in range(10)])
    again = resolve_dataset(tmp_path)
    assert test_stems <= {p.stem for p in again.test_a}
    assert {p.stem for p in again.train_a} >= {p.stem for p in files.train_a}


def test_split_by_name_always_holds_out_one():
    assert len(split_by_name({"only_one", "two"}, test_fraction=1e-9)) == 1
    assert split_by_name(set(), test_fraction=0.1) == set()


def test_pair_layout_with_one_image_per_folder_explains(tmp_path):
    images(tmp_path / "A", ["x.png"])
    images(tmp_path / "B", ["x.png"])
    with pytest.raises(DataError, match="at least two images"):
        resolve_dataset(tmp_path)


def test_no_layout_lists_what_it_looked_for(tmp_path):
    images(tmp_path / "photos", ["x.png"])
    with pytest.raises(DataError) as err:
        resolve_dataset(tmp_path)
    message = str(err.value)
    assert "photos/" in message and all(name in message for name in LAYOUTS)


def test_ambiguous_layout_asks_for_data_layout(tmp_path):
    build(tmp_path, "cyclegan")
    images(tmp_path / "valA", ["v.png"])
    images(tmp_path / "valB", ["v.png"])
    with pytest.raises(DataError, match="cyclegan, mist.*data.layout"):
        detect_layout(tmp_path)
    assert resolve_dataset(tmp_path, "mist").test_a[0].name == "v.png"


def test_missing_split_folder_names_it_and_the_layout(tmp_path):
    images(tmp_path / "trainA", ["a.png"])
    images(tmp_path / "trainB", ["b.png"])
    images(tmp_path / "testA", ["t.png"])
    with pytest.raises(DataError, match=r"testB: missing folder for the cyclegan layout"):
        resolve_dataset(tmp_path)


def test_split_without_images_says_what_it_found(tmp_path):
    build(tmp_path, "cyclegan")
    for p in (tmp_path / "testB").iterdir():
        p.unlink()
    (tmp_path / "testB" / "readme.txt").write_text("images go here")
    with pytest.raises(DataError, match=r"testB: no images.*readme.txt"):
        resolve_dataset(tmp_path)
    (tmp_path / "testB" / "readme.txt").unlink()
    with pytest.raises(DataError, match=r"testB: no images.*empty"):
        resolve_dataset(tmp_path)


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        resolve_dataset(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        resolve_dataset(tmp_path / "file.png")


def test_unknown_layout_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cyclegan, bci, mist, pair"):
        resolve_dataset(tmp_path, "pix2pix")


def test_key_is_stable_and_follows_the_files(tmp_path):
    root = build(tmp_path, "cyclegan")
    key = resolve_dataset(root).key
    assert resolve_dataset(root).key == key
    target = root / "testB" / "t9.png"
    os.utime(target, ns=(1, 1))
    changed = resolve_dataset(root).key
    assert changed != key
    images(root / "testB", ["t10.png"])
    assert resolve_dataset(root).key not in (key, changed)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples (../shared) not available")
@pytest.mark.parametrize("name", ["bci", "mist"])
def test_real_samples_resolve_as_pairs(name):
    files = resolve_dataset(SAMPLES / name)
    assert files.layout == "pair"
    assert len(files.train_a) + len(files.test_a) == 8 and len(files.pairs) >= 1
    assert all(a.name == b.name for a, b in files.pairs)
