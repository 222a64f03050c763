"""Training and evaluation datasets: shapes, ranges, determinism, early size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stain_search.data.datasets import (EvalDataset, UnpairedDataset, check_files, to_image,
                                        to_tensor)
from stain_search.data.io import write_image
from stain_search.errors import DataError


def make(folder: Path, n: int, *, size: tuple[int, int] = (40, 48), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [write_image(folder / f"im{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            for i in range(n)]


def test_tensor_image_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = to_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    np.testing.assert_array_equal(to_image(t), img)
    np.testing.assert_array_equal(to_image(torch.stack([t, t])), np.stack([img, img]))
    assert to_image(torch.full((3, 2, 2), 5.0)).max() == 255  # clamped


def test_unpaired_items(tmp_path):
    a, b = make(tmp_path / "A", 3), make(tmp_path / "B", 5, seed=1)
    ds = UnpairedDataset(a, b, crop=32)
    assert len(ds) == 5  # the larger domain
    item = ds[4]
    assert item["A"].shape == item["B"].shape == (3, 32, 32)
    assert -1 <= item["A"].min() and item["A"].max() <= 1
    assert item["A_path"] == str(a[4 % 3])
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["A"].shape == (2, 3, 32, 32)


def test_unpaired_is_reproducible_under_torch_seed(tmp_path):
    a, b = make(tmp_path / "A", 2), make(tmp_path / "B", 6, seed=1)
    ds = UnpairedDataset(a, b, crop=16)

    def draw(seed):
        torch.manual_seed(seed)
        return [(ds[i]["A"], ds[i]["B_path"]) for i in range(len(ds))]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(first, again))
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, other))


def test_crop_comes_from_the_image_with_augmentations(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    path = write_image(tmp_path / "a.png", img)
    ds = UnpairedDataset([path], [path], crop=20)  # crop = whole image: only flips/rotations
    variants = {tuple(to_image(ds[0]["A"]).ravel()) for _ in range(40)}
    expected = set()
    for k in range(4):
        for flipped in (img, img[:, ::-1], img[::-1], img[::-1, ::-1]):
            expected.add(tuple(np.rot90(flipped, k).ravel()))
    assert variants <= expected and len(variants) > 2
    plain = UnpairedDataset([path], [path], crop=20, flip=False, rot90=False)
    np.testing.assert_array_equal(to_image(plain[0]["A"]), img)


def test_max_images_and_load_size(tmp_path):
    a, b = make(tmp_path / "A", 4), make(tmp_path / "B", 4, seed=1)
    ds = UnpairedDataset(a, b, crop=16, max_images=2)
    assert ds.files_a == a[:2] and len(ds) == 2
    small = UnpairedDataset(a, b, crop=16, load_size=20)  # 40x48 → 20x24, crop 16 fits
    assert small[0]["A"].shape == (3, 16, 16)


def test_smaller_than_crop_fails_early_and_lazily(tmp_path):
    ok = make(tmp_path / "ok", 2, size=(64, 64))
    tiny = make(tmp_path / "tiny", 1, size=(30, 50), seed=2)
    with pytest.raises(DataError, match=r"im0.png: image is 50x30 px, smaller than the 32x32"):
        check_files(ok + tiny, 32)
    check_files(ok + tiny, 30)
    with pytest.raises(DataError, match="load_size"):
        check_files(ok, 32, load_size=24)
    ds = UnpairedDataset(tiny, ok, crop=32)
    with pytest.raises(DataError, match="smaller than the 32x32 crop"):
        ds[0]


def test_check_files_reads_headers_only_and_flags_non_images(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(DataError, match="fake.png"):
        check_files([tmp_path / "fake.png"], 8)


def test_eval_dataset_centre_crops_with_pairs_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    tgt = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    a = write_image(tmp_path / "A" / "x.png", img)
    lone = write_image(tmp_path / "A" / "lone.png", img)
    b = write_image(tmp_path / "B" / "x.png", tgt)
    mask = np.zeros((40, 48), np.uint8)
    mask[20, 24] = 255
    m = write_image(tmp_path / "M" / "x.png", mask)

    ds = EvalDataset([a, lone], pairs=[(a, b)], crop=16, masks={"x": m})
    assert len(ds) == 1  # the unpaired file is skipped
    item = ds[0]
    assert item["name"] == "x"
    np.testing.assert_array_equal(to_image(item["A"]), img[12:28, 16:32])
    np.testing.assert_array_equal(to_image(item["B"]), tgt[12:28, 16:32])
    assert item["mask"].shape == (1, 16, 16) and item["mask"].sum() == 1 and item["mask"][0, 8, 8]
    plain = EvalDataset([a, lone], crop=None)
    assert len(plain) == 2 and "B" not in plain[1] and plain[1]["A"].shape == (3, 40, 48)
    with pytest.raises(DataError, match="paired"):
        EvalDataset([lone], pairs=[(a, b)], crop=16)
    half = EvalDataset([a], pairs=[(a, b)], crop=16, load_size=20, masks={"x": m})[0]
    assert half["A"].shape == half["B"].shape == (3, 16, 16)  # 40x48 → 20x24, then cropped
    assert half["mask"].shape == (1, 16, 16) and half["mask"].sum() <= 1
