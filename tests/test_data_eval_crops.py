"""Evaluation crops: deterministic, tissue only, evenly spread, aligned across pairs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from stain_search.data.eval_crops import (CPU_CROPS, GPU_CROPS, allot, crop_count, eval_crops, grid,
                                          plan_crops)
from stain_search.data.io import write_image
from stain_search.errors import ConfigError, DataError


def field(h: int, w: int, *, tissue_cols: slice = slice(None), seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: white glass, with pink 'tissue' in the given columns."""
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 242, np.uint8) + rng.integers(0, 4, (h, w, 3)).astype(np.uint8)
    pink = np.array([220, 120, 190]) + rng.integers(-20, 20, (h, w, 3))
    image[:, tissue_cols] = np.clip(pink[:, tissue_cols], 0, 255)
    return image


def test_grid_is_flush_with_both_edges():
    assert grid(100, 32, 32).tolist() == [0, 23, 45, 68]
    assert grid(64, 64, 64).tolist() == [0]
    assert grid(63, 64, 64).tolist() == []


def test_allot_is_even_and_respects_capacity():
    assert allot([10, 10, 10], 7) == [3, 2, 2]
    assert allot([1, 10, 10], 9) == [1, 4, 4]
    assert allot([0, 2, 2], 9) == [0, 2, 2]


def test_default_count_follows_the_device():
    assert crop_count(None, "cpu") == CPU_CROPS == 64
    assert crop_count(None, torch.device("cuda")) == GPU_CROPS == 512
    assert crop_count(8, "cuda") == 8
    with pytest.raises(ConfigError, match="data.eval_crops"):
        crop_count(1, "cpu")


def test_glass_is_dropped_and_crops_spread_evenly():
    from stain_search.data.prepare import tissue_mask

    images = [field(256, 256, tissue_cols=slice(0, 128), seed=i) for i in range(3)]
    masks = [tissue_mask(im) for im in images]
    plan = plan_crops(masks, 32, 30)
    assert len(plan) == 30
    assert Counter(p.image for p in plan) == {0: 10, 1: 10, 2: 10}
    assert all(p.x + 32 <= 128 + 16 for p in plan)  # at least half of each crop is tissue
    assert plan == plan_crops(masks, 32, 30)  # deterministic
    rows = {p.y for p in plan if p.image == 0}
    assert len(rows) >= 4  # spread over the image, not the first rows only


def test_an_image_without_tissue_gives_its_share_to_the_others():
    from stain_search.data.prepare import tissue_mask

    images = [field(128, 128), field(128, 128, tissue_cols=slice(0, 0)), field(128, 128, seed=2)]
    plan = plan_crops([tissue_mask(im) for im in images], 32, 20)
    assert Counter(p.image for p in plan) == {0: 10, 2: 10}


def test_finer_grid_only_when_needed_and_fewer_crops_when_even_that_is_short():
    mask = np.ones((64, 64), bool)
    assert len(plan_crops([mask], 32, 4)) == 4  # stride 32: exactly the 4 tiles
    assert len(plan_crops([mask], 32, 9)) == 9  # stride 16: 3 x 3
    assert len(plan_crops([mask], 32, 1000)) == 25  # stride 8 is the finest: 5 x 5


def test_no_tissue_anywhere_is_one_clear_error():
    with pytest.raises(DataError, match="no 32x32 evaluation crop"):
        plan_crops([np.zeros((64, 64), bool)], 32, 4)


def test_pairs_are_cut_at_the_same_positions(tmp_path):
    pairs = []
    for i in range(2):
        he = field(160, 160, tissue_cols=slice(0, 96), seed=i)
        a, b = tmp_path / "A" / f"t{i}.png", tmp_path / "B" / f"t{i}.png"
        write_image(a, he)
        write_image(b, 255 - he)  # a 'target' whose pixels tell where they came from
        pairs.append((a, b))
    crops = eval_crops(crop=32, n=12, pairs=pairs)
    assert crops.n == 12 and crops.images == 2
    torch.testing.assert_close(crops.targets, -crops.inputs, atol=1e-6, rtol=0)
    assert crops.reference is crops.targets


def test_unpaired_reference_is_sampled_from_test_b_on_its_own_tissue(tmp_path):
    test_a, test_b = [], []
    for i in range(2):
        test_a.append(write_image(tmp_path / "testA" / f"a{i}.png", field(128, 128, seed=i)))
        test_b.append(write_image(tmp_path / "testB" / f"b{i}.png",
                                  field(128, 128, tissue_cols=slice(64, 128), seed=10 + i)))
    crops = eval_crops(crop=32, n=8, test_a=test_a, test_b=test_b)
    assert crops.targets is None and crops.n == 8 and crops.reference.shape == (8, 3, 32, 32)
    # Reference crops lie on test B's tissue (its right half): mostly pink, not glass.
    assert float(crops.reference[:, 1].mean()) < 0.3  # green channel low: pink, not white
