"""The kernel distance (KID) against torchmetrics' estimator and a case worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.kid import poly_mmd

from stain_search.metrics.frechet import FrechetStats, frechet_distance_to_samples
from stain_search.metrics.kernel import default_subset_size, kernel_distance


def test_hand_computed_case():
    # d = 1, k(x, y) = (x·y + 1)³. X = {0, 1}: off-diagonal k(0,1) twice → 2;
    # Y = {1, 2}: k(1,2) = 27 twice → 54; cross: 1 + 1 + 8 + 27 = 37.
    # Unbiased MMD² = (2 + 54) / (2·1) − 2·37 / 2² = 28 − 18.5 = 9.5.
    kd = kernel_distance(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), subset_size=2)
    assert kd.mean == pytest.approx(9.5, abs=1e-12)
    assert kd.std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_matches_torchmetrics_on_whole_sets():
    rng = np.random.default_rng(0)
    fake, real = rng.normal(size=(40, 16)), rng.normal(0.3, 1.2, size=(40, 16))
    kd = kernel_distance(fake, real, subset_size=40, subsets=5)
    # A subset of all 40 is a permutation, and MMD² does not depend on order.
    expected = float(poly_mmd(torch.from_numpy(real), torch.from_numpy(fake)))
    assert kd.mean == pytest.approx(expected, rel=1e-9)


def test_subsets_are_seeded_and_spread_is_reported():
    rng = np.random.default_rng(1)
    fake, real = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    a, b = kernel_distance(fake, real), kernel_distance(fake, real)
    assert (a.mean, a.std) == (b.mean, b.std)
    assert a.subset_size == default_subset_size(64, 64) == 32 and a.std > 0


def test_unbiased_where_the_frechet_distance_is_not():
    # Two samples of one distribution, 16 points in 64-d: the Fréchet distance
    # is far from its true 0 (bias ~ d/N), the kernel distance is not.
    rng = np.random.default_rng(2)
    kids, fds = [], []
    for _ in range(20):
        fake, real = rng.normal(size=(16, 64)), rng.normal(size=(16, 64))
        kids.append(kernel_distance(fake, real, subsets=20).mean)
        stats = FrechetStats.from_features(real)
        fds.append(frechet_distance_to_samples(fake, stats.mu, stats.sigma))
    assert abs(np.mean(kids)) < 2 * np.std(kids) / np.sqrt(len(kids)) + 1e-3
    assert np.mean(fds) > 10 * np.std(fds) / np.sqrt(len(fds))


@pytest.mark.parametrize("fake,real,match", [
    (np.zeros((4, 3)), np.zeros((4, 2)), "mismatched"),
    (np.zeros((1, 3)), np.zeros((4, 3)), "at least 2"),
    (np.full((4, 3), np.nan), np.zeros((4, 3)), "non-finite"),
])
def test_bad_inputs_are_refused(fake, real, match):
    with pytest.raises(ValueError, match=match):
        kernel_distance(fake, real)
