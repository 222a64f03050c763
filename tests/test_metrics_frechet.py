"""Fréchet distance against scipy, feature-extractor resolution, weights loading, stats cache."""

from __future__ import annotations

import logging
import socket
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from stain_search.config import EvalConfig
from stain_search.errors import ConfigError
from stain_search.metrics import frechet
from stain_search.storage import CACHE_ENV
from stain_search.metrics.frechet import (FeatureSpec, FrechetDistance, build_feature_extractor,
                                          frechet_distance, frechet_distance_to_samples,
                                          reference_key, resolve_feature_extractor)


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The pytorch-fid formula, scipy's sqrtm, real part."""
    with warnings.catch_warnings():  # singular products (n ≤ d) warn; the value is still compared
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def random_spd(rng, d: int, *, floor: float) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + floor * np.eye(d)


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    """No real weights, cache or network can leak in from the machine running the tests."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(frechet.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


# --- the distance ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_equals_scipy_sqrtm_formula_on_64d_gaussians(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    s1, s2 = random_spd(rng, 64, floor=0.1), random_spd(rng, 64, floor=0.05)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), abs=1e-6)


def test_frechet_diagonal_covariances_analytic():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def test_frechet_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(4)
    mu, s = rng.normal(size=16), random_spd(rng, 16, floor=0.0)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_frechet_small_sample_singular_covariances_stay_finite_and_agree():
    rng = np.random.default_rng(5)
    f1, f2 = rng.normal(size=(16, 64)), rng.normal(size=(16, 64)) + 0.3  # n < d: rank ≤ 15
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ours = frechet_distance(f1.mean(0), s1, f2.mean(0), s2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(scipy_frechet(f1.mean(0), s1, f2.mean(0), s2), rel=1e-5)


@pytest.mark.parametrize("n,d", [(2, 64), (16, 64), (63, 64), (64, 64), (100, 32)])
def test_frechet_to_samples_equals_fitted_statistics_formula(n, d):
    rng = np.random.default_rng(n + d)
    features = rng.normal(size=(n, d)) * rng.uniform(0.2, 2, d) + 0.5
    mu, sigma = rng.normal(size=d), random_spd(rng, d, floor=0.05)
    fitted_mu, fitted_sigma = features.mean(0), np.cov(features, rowvar=False)
    expected = frechet_distance(fitted_mu, fitted_sigma, mu, sigma)
    # Relative 1e-7, not 1e-6 absolute: for n ≤ d the fitted covariance is singular and the
    # D×D route takes square roots of rounding noise (~√eps per null direction); the low-rank
    # route never forms them and is the more accurate one (checked against 40-digit mpmath).
    assert frechet_distance_to_samples(features, mu, sigma) == pytest.approx(expected, rel=1e-7)
    assert expected == pytest.approx(scipy_frechet(fitted_mu, fitted_sigma, mu, sigma), rel=1e-6)


def test_frechet_to_two_samples_analytic():
    # Two samples: S = v vᵀ with v = (f1 − f2)/2·√2, so against N(μ, diag(c))
    # Tr((SΣ)^½) = √(Σ c_j v_j²) and FD = ‖mean − μ‖² + ‖v‖² + Σc − 2√(Σ c_j v_j²).
    rng = np.random.default_rng(7)
    f, mu, c = rng.normal(size=(2, 40)), rng.normal(size=40), rng.uniform(0.1, 3, 40)
    v = (f[0] - f[1]) / np.sqrt(2)
    expected = np.sum((f.mean(0) - mu) ** 2) + v @ v + c.sum() - 2 * np.sqrt(np.sum(c * v ** 2))
    assert frechet_distance_to_samples(f, mu, np.diag(c)) == pytest.approx(expected, abs=1e-10)


def test_frechet_rejects_non_finite_and_mismatched():
    s = np.eye(3)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0, 0]), s, np.zeros(3), s)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance_to_samples(np.array([[np.inf, 0, 0], [0, 0, 0]]), np.zeros(3), s)


# --- which features ----------------------------------------------------------------------

def test_url_matches_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert frechet.INCEPTION_URL == URL_INCEPTION_V3


def test_auto_without_weights_falls_back_to_fd_random_loudly(caplog, monkeypatch):
    monkeypatch.setattr(frechet, "_WARNED", [])  # warned once per process: maybe already
    with caplog.at_level(logging.WARNING):
        spec = resolve_feature_extractor(EvalConfig())
    assert (spec.name, spec.metric_name, spec.weights_path) == ("random", "fd_random", None)
    assert "NOT Inception" in spec.description and "no Inception weights found" in spec.description
    assert any("fd_random" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_explicit_random_ignores_weights(tmp_path):
    spec = resolve_feature_extractor(EvalConfig(feature_extractor="random",
                                                fid_weights=str(tmp_path / "absent.pth")))
    assert spec.metric_name == "fd_random"


def test_inception_without_weights_is_a_config_error_saying_how_to_fix():
    with pytest.raises(ConfigError) as err:
        resolve_feature_extractor(EvalConfig(feature_extractor="inception"))
    assert frechet.INCEPTION_URL in str(err.value) and "fid_weights" in str(err.value)


def test_configured_missing_path_is_a_config_error_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(ConfigError, match="eval.fid_weights") as err:
        resolve_feature_extractor(EvalConfig(fid_weights=str(missing)))
    assert str(missing) in str(err.value) and frechet.INCEPTION_URL in str(err.value)
    monkeypatch.setenv(frechet.WEIGHTS_ENV, str(missing))
    with pytest.raises(ConfigError, match=frechet.WEIGHTS_ENV):
        resolve_feature_extractor(EvalConfig())


def test_weights_resolution_order(tmp_path, monkeypatch):
    cfg_file, env_file = tmp_path / "cfg.pth", tmp_path / "env.pth"
    cached = frechet.hub_cache_weights()
    for p in (cfg_file, env_file, cached):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    monkeypatch.setenv(frechet.WEIGHTS_ENV, str(env_file))
    assert resolve_feature_extractor(EvalConfig(fid_weights=str(cfg_file))).weights_path == str(cfg_file)
    assert resolve_feature_extractor(EvalConfig()).weights_path == str(env_file)
    monkeypatch.delenv(frechet.WEIGHTS_ENV)
    spec = resolve_feature_extractor(EvalConfig())
    assert (spec.metric_name, spec.weights_path) == ("fid", str(cached))
    assert cached.name == frechet.INCEPTION_URL.rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's Inception architecture with random weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # build the architecture without loading anything
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("weights") / "inception-random.pth"
    state = net.state_dict()
    torch.save(state, path)
    return path, state


def test_inception_loads_local_weights_and_computes_fd(inception_weights):
    path, state = inception_weights
    spec = resolve_feature_extractor(EvalConfig(fid_weights=str(path), feature_extractor="inception"))
    assert spec.metric_name == "fid"
    net = build_feature_extractor(spec, "cpu")
    torch.testing.assert_close(net.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    torch.manual_seed(1)
    fake, real = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 0.5
    fd = FrechetDistance(spec, extractor=net)
    feats = fd.features(fake)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    fd.update(fake, real=False)
    fd.update(real, real=True)
    value = fd.compute()
    assert np.isfinite(value) and value > 0


@pytest.mark.parametrize("content,match", [(b"not a torch file", "not a readable PyTorch weights"),
                                           ("wrong-keys", "not the Inception-v3 weights")])
def test_bad_weights_file_is_a_config_error_naming_the_path(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content == "wrong-keys":
        torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(content)
    spec = resolve_feature_extractor(EvalConfig(fid_weights=str(path)))
    with pytest.raises(ConfigError, match=match) as err:
        build_feature_extractor(spec, "cpu")
    assert str(path) in str(err.value) and frechet.INCEPTION_URL in str(err.value)


def test_unknown_extractor_lists_known_ones():
    with pytest.raises(ConfigError, match="inception, random"):
        build_feature_extractor(FeatureSpec("vgg", "fd_vgg", None, ""), "cpu")


# --- fd_random and the stateful metric -----------------------------------------------------

def random_spec() -> FeatureSpec:
    return resolve_feature_extractor(EvalConfig(feature_extractor="random"))


def test_fd_random_extractor_is_deterministic_across_instantiations():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    a = build_feature_extractor(random_spec(), "cpu")(x)
    torch.manual_seed(456)  # the global RNG must not matter
    b = build_feature_extractor(random_spec(), "cpu")(x)
    assert a.shape == (3, 480) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.std(dim=0).sum() > 0  # the features do depend on the image


def test_fd_random_separates_distributions():
    g = torch.Generator().manual_seed(0)
    fd = FrechetDistance(random_spec())
    real = [torch.rand(8, 3, 32, 32, generator=g) for _ in range(2)]
    near = [torch.rand(8, 3, 32, 32, generator=g) for _ in range(2)]
    far = [torch.rand(8, 3, 32, 32, generator=g) * 0.3 + 0.6 for _ in range(2)]
    for images in real:
        fd.update(images, real=True)
    for images in near:
        fd.update(images, real=False)
    d_near = fd.compute()
    fd.reset()
    for images in real:
        fd.update(images, real=True)
    for images in far:
        fd.update(images, real=False)
    assert fd.compute() > 5 * d_near


def test_reference_stats_cache_hit_returns_identical_numbers_without_recomputing(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)]
    first = FrechetDistance(random_spec(), cache_dir=tmp_path / "c")
    stats = first.reference_stats(real)
    assert first.stats_path(first.reference_key).is_file()
    assert first.stats_path(first.reference_key).name.startswith("fd_random-")

    second = FrechetDistance(random_spec(), cache_dir=tmp_path / "c")

    def must_not_be_called(images):
        raise AssertionError("cache miss: features were extracted again")

    second.features = must_not_be_called
    again = second.reference_stats(real)
    np.testing.assert_array_equal(stats.mu, again.mu)
    np.testing.assert_array_equal(stats.sigma, again.sigma)
    np.testing.assert_array_equal(first.reference_features, second.reference_features)
    assert again.n == 8
    # The cached reference gives the same distance as feeding the real images directly.
    del second.features
    fake = torch.rand(8, 3, 32, 32, generator=g)
    second.update(fake, real=False)
    direct = FrechetDistance(random_spec(), cache_dir=tmp_path / "unused")
    direct.update(fake, real=False)
    for images in real:
        direct.update(images, real=True)
    assert second.compute() == pytest.approx(direct.compute(), abs=1e-9)


def test_reference_key_is_the_pixels_and_the_extractor():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(4, 3, 16, 16, generator=g)]
    key = reference_key(images, "random-conv-v1/seed0")
    assert key == reference_key([images[0].clone()], "random-conv-v1/seed0")
    assert key != reference_key(images, "inception-v3-compat/pt_inception-2015-12-05/pool3")
    changed = images[0].clone()
    changed[0, 0, 0, 0] = 1 - changed[0, 0, 0, 0]  # one pixel, one channel
    assert key != reference_key([changed], "random-conv-v1/seed0")
    assert key == reference_key([images[0][:2], images[0][2:]], "random-conv-v1/seed0")  # batching
    assert key != reference_key([images[0][:, :, :8]], "random-conv-v1/seed0")


def test_a_cache_file_for_other_images_is_recomputed(tmp_path):
    fd = FrechetDistance(random_spec(), cache_dir=tmp_path)
    images = torch.rand(4, 3, 32, 32)
    path = fd.stats_path(reference_key([images], fd.identity))
    path.parent.mkdir(parents=True)
    np.savez(path, features=np.zeros((9, 480)), key="something-else")
    stats = fd.reference_stats([images])
    assert stats.n == 4
    np.testing.assert_allclose(stats.mu, fd.features(images).mean(0))


def test_compute_needs_reference_and_two_samples():
    fd = FrechetDistance(random_spec())
    with pytest.raises(ValueError, match="before any update"):
        fd.compute()
    fd.update(torch.rand(2, 3, 32, 32), real=False)
    with pytest.raises(ValueError, match="no real-image statistics"):
        fd.compute()
    fd.update(torch.rand(1, 3, 32, 32), real=True)
    with pytest.raises(ValueError, match="at least 2"):
        fd.compute()
