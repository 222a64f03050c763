"""The Evaluator and sample grid on tiny generators with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from skimage.color import hed2rgb
from skimage.draw import disk

from stain_search.config import EvalConfig
from stain_search.errors import ConfigError, TrainingDiverged
from stain_search.evaluate import (COUNT_KEYS, INFO_KEYS, Evaluator, eval_mode, metric_directions,
                                   output_diversity, reported_metrics, sample_grid,
                                   tile_grid)
from stain_search.metrics import frechet
from stain_search.storage import CACHE_ENV

RANDOM = EvalConfig(feature_extractor="random")


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(frechet.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def smooth_images(n: int, *, seed: int, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1], with structure (blurred noise), not pure noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False) * 2 - 1


def batches(a: torch.Tensor, b: torch.Tensor | None = None, *, batch_size: int = 4):
    out = []
    for i in range(0, len(a), batch_size):
        batch = {"A": a[i:i + batch_size]}
        if b is not None:
            batch["B"] = b[i:i + batch_size]
        out.append(batch)
    return out


def make_evaluator(tmp_path, *, has_pairs=True, stain=None, cfg=RANDOM, key="test-set"):
    return Evaluator(cfg, dataset_key=key, has_pairs=has_pairs, stain=stain, device="cpu",
                     cache_dir=tmp_path / "cache")


class Constant(nn.Module):
    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(0.2))

    def forward(self, x):
        return torch.full_like(x, 0.0) + self.value


def test_identity_generator_on_identical_pairs_scores_perfectly(tmp_path):
    x = smooth_images(8, seed=0)
    ev = make_evaluator(tmp_path)
    ev.prepare_reference([x[:4], x[4:]])
    m = ev.evaluate(nn.Identity(), nn.Identity(), batches(x, x.clone()))
    assert m["ssim_gt"] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim_structure"] == pytest.approx(1.0, abs=1e-6)
    assert m["ssim_cycle"] == pytest.approx(1.0, abs=1e-6)
    assert m["psnr_gt"] >= 99.0
    assert m["output_diversity"] == pytest.approx(1.0)
    assert m["fd_random"] == pytest.approx(0.0, abs=1e-6)  # outputs are the reference images
    assert "fid" not in m and "ki67_f1" not in m
    assert set(m) - set(COUNT_KEYS) - set(INFO_KEYS) == set(ev.metric_names)
    assert m["eval_crops"] == m["fd_n"] == 8
    assert m["kd_random"] == pytest.approx(0.0, abs=1e-3) and m["kd_random_std"] >= 0


def test_constant_generator_collapses_and_loses_structure(tmp_path):
    x = smooth_images(8, seed=1)
    ev = make_evaluator(tmp_path, has_pairs=False)
    ev.prepare_reference([smooth_images(8, seed=2)])
    m = ev.evaluate(Constant(), nn.Identity(), batches(x))
    assert m["output_diversity"] == pytest.approx(0.0, abs=1e-9)
    assert m["ssim_structure"] < 0.3  # identity scores 1
    assert "ssim_gt" not in m and "psnr_gt" not in m
    identity = ev.evaluate(nn.Identity(), nn.Identity(), batches(x))
    assert m["fd_random"] > identity["fd_random"] > 0  # real-looking outputs are closer


def test_every_reported_metric_has_a_direction():
    directions = metric_directions()
    assert set(directions.values()) <= {"min", "max"}
    assert directions["fid"] == directions["fd_random"] == "min"
    for has_pairs in (False, True):
        for stain in (None, "dab", "ki67", "trichrome"):
            assert set(reported_metrics(RANDOM, has_pairs=has_pairs, stain=stain)) <= set(directions)


def test_modes_are_restored_exactly_and_eval_is_used_inside(tmp_path):
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Dropout(0.5)
            self.frozen = nn.BatchNorm2d(3)

        def forward(self, x):
            seen.append((self.training, self.inner.training, self.frozen.training))
            return self.inner(x)

    g, f = Probe(), Probe()
    g.train()
    g.frozen.eval()  # a mixed state must come back as it was, not as all-train
    f.eval()
    x = smooth_images(4, seed=3)
    ev = make_evaluator(tmp_path)
    ev.prepare_reference([x])
    ev.evaluate(g, f, batches(x, x))
    sample_grid(g, f, {"A": x}, rows=2)
    assert seen and all(state == (False, False, False) for state in seen)
    assert (g.training, g.inner.training, g.frozen.training) == (True, True, False)
    assert (f.training, f.inner.training) == (False, False)


def test_eval_mode_restores_after_an_exception():
    m = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
    with pytest.raises(RuntimeError):
        with eval_mode(m):
            raise RuntimeError("boom")
    assert all(sub.training for sub in m.modules())


@pytest.mark.parametrize("with_target", [True, False])
def test_sample_grid_shape_and_content(with_target):
    x = smooth_images(5, seed=4)
    batch = {"A": x, "B": -x} if with_target else {"A": x}
    grid = sample_grid(nn.Identity(), nn.Identity(), batch, rows=3)
    cols = 4 if with_target else 3
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (32 + 2) + 2, cols * (32 + 2) + 2, 3)
    first = ((x[0].permute(1, 2, 0).numpy() + 1) / 2 * 255).round()
    np.testing.assert_allclose(grid[2:34, 2:34], first, atol=1)  # top-left tile: the input
    if with_target:
        target = ((-x[0].permute(1, 2, 0).numpy() + 1) / 2 * 255).round()
        np.testing.assert_allclose(grid[2:34, 2 + 3 * 34:34 + 3 * 34], target, atol=1)


def test_tile_grid_lays_tiles_out_as_torchvisions_make_grid():
    from torchvision.utils import make_grid

    tiles = torch.rand(3, 4, 3, 10, 7, generator=torch.Generator().manual_seed(0))
    expected = make_grid(tiles.flatten(0, 1), nrow=4, padding=2, pad_value=1.0)
    assert torch.equal(tile_grid(tiles), expected)


def dab_tile(centres, *, size=48) -> torch.Tensor:
    hed = np.zeros((size, size, 3))
    hed[..., 0] = 0.01
    for c in centres:
        rr, cc = disk(c, 4, shape=(size, size))
        hed[rr, cc, 2] = 0.08
    return torch.from_numpy(hed2rgb(hed)).permute(2, 0, 1).float() * 2 - 1  # (3, H, W) [-1, 1]


def test_ki67_f1_for_dab_stains_only(tmp_path):
    targets = torch.stack([dab_tile([(10, 10), (30, 30)]), dab_tile([(12, 36)])])
    inputs = torch.stack([dab_tile([]), dab_tile([])])  # counterstain only: nothing positive
    for stain, expected in (("her2", False), ("Ki-67", True), ("trichrome", False), (None, False)):
        ev = make_evaluator(tmp_path, stain=stain)
        ev.prepare_reference([targets])
        m = ev.evaluate(nn.Identity(), nn.Identity(), batches(targets, targets))
        assert ("ki67_f1" in m) is expected
        if expected:
            assert m["ki67_f1"] == 1.0
            missed = ev.evaluate(nn.Identity(), nn.Identity(), batches(inputs, targets))
            assert missed["ki67_f1"] == 0.0
    off = make_evaluator(tmp_path, stain="ki67", cfg=EvalConfig(feature_extractor="random", ki67_f1=False))
    off.prepare_reference([targets])
    assert "ki67_f1" not in off.evaluate(nn.Identity(), nn.Identity(), batches(targets, targets))


def test_reference_falls_back_to_batch_targets_and_is_cached(tmp_path):
    x, y = smooth_images(6, seed=6), smooth_images(6, seed=7)
    ev = make_evaluator(tmp_path, has_pairs=False, key="fallback")
    m = ev.evaluate(nn.Identity(), nn.Identity(), batches(x, y))
    assert m["fd_random"] > 0 and ev.frechet.reference.n == 6
    assert ev.frechet.stats_path(ev.reference_key).is_file()
    prepared = make_evaluator(tmp_path, has_pairs=False, key="fallback")
    prepared.prepare_reference([y])  # a cache hit: same statistics
    assert prepared.frechet.reference.n == 6
    again = prepared.evaluate(nn.Identity(), nn.Identity(), batches(x))
    assert again["fd_random"] == pytest.approx(m["fd_random"])


def test_prepare_reference_rejects_a_single_image(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_crops"):
        make_evaluator(tmp_path, key="one").prepare_reference([smooth_images(1, seed=8)])


def test_nan_outputs_raise_training_diverged(tmp_path):
    ev = make_evaluator(tmp_path)
    with pytest.raises(TrainingDiverged):
        ev.evaluate(lambda_module(lambda x: x * float("nan")), nn.Identity(),
                    batches(smooth_images(2, seed=9)))


def lambda_module(fn) -> nn.Module:
    class Lambda(nn.Module):
        def forward(self, x):
            return fn(x)

    return Lambda()


def test_output_diversity_is_scale_of_output_spread():
    x = smooth_images(6, seed=10)
    assert output_diversity(x, x * 0.5) == pytest.approx(0.5)
    assert output_diversity(x[:1], x[:1]) is None


def test_describe_says_what_the_features_are(tmp_path):
    ev = make_evaluator(tmp_path)
    ev.prepare_reference([smooth_images(4, seed=11)])
    text = ev.describe()
    assert "fd_random" in text and "NOT Inception" in text and "4 real-stain crops" in text
