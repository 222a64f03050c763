"""Stain-specific agreement on images made with known stain amounts, and on the phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from stain_search.data import resolve_dataset
from stain_search.data.eval_crops import eval_crops
from stain_search.data.stain import render
from stain_search.metrics.ssim import to_gray
from stain_search.metrics.stain import (POSITIVE_OD, STAIN_CHANNELS, crop_stain, stain_area_error,
                                        stain_channel, stain_od_r)


def tile(stain: str, amount: float, fraction: float, *, counterstain: str, counter: float = 0.3,
         size: int = 40) -> torch.Tensor:
    """(3, size, size) in [0, 1]: the left ``fraction`` of columns hold ``amount`` of ``stain``
    (on top of the counterstain), the rest only the counterstain."""
    conc = np.zeros((size, size, 2), np.float32)
    conc[..., 1] = counter
    conc[:, : round(fraction * size), 0] = amount
    rgb = render(conc, [stain, counterstain])
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("stain,dye,counterstain", [
    ("ki67", "dab", "haematoxylin"),
    ("trichrome", "methyl_blue", "ponceau_fuchsin"),
])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_known_amounts_give_known_area_and_od(stain, dye, counterstain, fraction):
    channel = stain_channel(stain)
    result = crop_stain(tile(dye, 0.6, fraction, counterstain=counterstain)[None], channel)
    assert result.area[0] == pytest.approx(fraction, abs=1e-9)
    # 8-bit rounding and the published vectors' few-% departure from unit length.
    assert result.od[0] == pytest.approx(0.6 * fraction, rel=0.05, abs=1e-9)


def test_faint_stain_below_the_threshold_is_negative():
    faint = tile("dab", POSITIVE_OD / 2, 1.0, counterstain="haematoxylin")[None]
    assert crop_stain(faint, stain_channel("her2")).area[0] == 0.0


@pytest.mark.parametrize("name", sorted(STAIN_CHANNELS))
def test_grey_is_no_stain_under_every_matrix(name):
    levels = torch.linspace(0.05, 0.95, 16)
    grey = levels.view(16, 1, 1, 1).expand(16, 3, 8, 8)  # 16 grey crops, dark to light
    assert crop_stain(grey, STAIN_CHANNELS[name]).area.max() == 0.0


def test_dataset_stains_map_to_channels():
    for stain in ("ki67", "Ki-67", "her2", "ihc", "dab"):
        assert stain_channel(stain) is STAIN_CHANNELS["dab"]
    assert stain_channel("trichrome") is STAIN_CHANNELS["methyl_blue"]
    assert stain_channel("pas") is STAIN_CHANNELS["pas"]
    assert stain_channel(None) is None and stain_channel("giemsa") is None


def test_od_r_is_pearson_and_zero_for_a_constant():
    rng = np.random.default_rng(0)
    a, b = rng.random(20), rng.random(20)
    assert stain_od_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert stain_od_r(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert stain_od_r(a, 2 * a + 1) == pytest.approx(1.0)
    assert stain_od_r(np.zeros(20), b) == 0.0
    with pytest.raises(ValueError, match="aligned"):
        stain_od_r(a, b[:10])


def test_area_error_is_the_difference_of_mean_areas():
    assert stain_area_error(np.array([0.2, 0.26]), np.array([0.27])) == pytest.approx(0.04)


@pytest.mark.parametrize("dataset", ["builtin:phantom-trichrome", "builtin:phantom-ki67"])
def test_a_grey_translation_scores_clearly_worse_than_the_true_stain(dataset):
    files = resolve_dataset(dataset)
    crops = eval_crops(crop=64, n=64, pairs=files.pairs)
    target = (crops.targets + 1) / 2
    channel = stain_channel(files.stain)
    real = crop_stain(target, channel)
    # A near-true translation: the target with mild noise. A failed one: its grey version,
    # which keeps the darkness (and so the plain mean OD) of the stain, not its colour.
    g = torch.Generator().manual_seed(0)
    near = (target + 0.02 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    grey = to_gray(target).expand(-1, 3, -1, -1)
    good, bad = crop_stain(near, channel), crop_stain(grey, channel)
    assert stain_area_error(good.area, real.area) < 0.02
    assert stain_area_error(bad.area, real.area) > 0.5 * real.area.mean() > 0
    assert stain_od_r(good.od, real.od) > 0.9
    assert stain_od_r(bad.od, real.od) < 0.5


def test_eval_stain_choices_are_the_registry():
    from typing import get_args, get_type_hints

    from stain_search.config import EvalConfig
    from stain_search.metrics.stain import DATASET_STAINS

    assert set(get_args(get_type_hints(EvalConfig)["stain"])) == {"auto", *DATASET_STAINS}
