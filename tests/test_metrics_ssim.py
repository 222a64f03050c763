"""SSIM, grayscale and PSNR against scikit-image, the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.color import rgb2gray
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from stain_search.metrics.ssim import psnr, ssim, ssim_structure, to_gray

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def chw(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (H, W) numpy → (1, C, H, W) float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float()
    return (t.permute(2, 0, 1) if t.dim() == 3 else t[None])[None]


def image_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Random and structured RGB pairs in [0, 1], (H, W, 3) float32."""
    rng = np.random.default_rng(0)
    noise = rng.random((40, 52, 3)).astype(np.float32)
    astro = skdata.astronaut()[100:164, 180:244].astype(np.float32) / 255
    ihc = skdata.immunohistochemistry()[:48, :48].astype(np.float32) / 255
    yy, xx = np.mgrid[:48, :64]
    rings = (0.5 + 0.5 * np.sin(np.hypot(yy - 24, xx - 30) / 2.0))[..., None].repeat(3, 2)
    checker = (((yy // 8) + (xx // 8)) % 2).astype(np.float32)[..., None].repeat(3, 2)
    blurred = np.clip(astro + rng.normal(0, 0.08, astro.shape), 0, 1).astype(np.float32)
    return [
        ("noise-vs-noise", noise, rng.random(noise.shape).astype(np.float32)),
        ("noise-vs-noisier", noise,
         np.clip(noise + rng.normal(0, 0.1, noise.shape), 0, 1).astype(np.float32)),
        ("astronaut-vs-noisy", astro, blurred),
        ("ihc-vs-shifted", ihc, np.roll(ihc, 2, axis=1)),
        ("rings-vs-checker", rings.astype(np.float32), checker),
        ("constant-vs-constant", np.full((24, 24, 3), 0.3, np.float32),
         np.full((24, 24, 3), 0.3, np.float32)),
    ]


@pytest.mark.parametrize("name,a,b", image_pairs(), ids=[p[0] for p in image_pairs()])
def test_ssim_matches_skimage_rgb_and_gray(name, a, b):
    ours = ssim(chw(a), chw(b)).item()
    ref = structural_similarity(a.astype(np.float64), b.astype(np.float64), channel_axis=-1, **SK_SSIM)
    assert ours == pytest.approx(ref, abs=1e-4)
    ga, gb = rgb2gray(a.astype(np.float64)), rgb2gray(b.astype(np.float64))
    assert ssim(chw(ga), chw(gb)).item() == pytest.approx(structural_similarity(ga, gb, **SK_SSIM), abs=1e-4)


def test_ssim_is_per_image_and_symmetric():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (3,)
    torch.testing.assert_close(s, ssim(y, x))
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    assert (s < 0.99).all()
    for i in range(3):  # each entry is that image's own SSIM, not a batch mean
        assert s[i].item() == pytest.approx(ssim(x[i:i + 1], y[i:i + 1]).item(), abs=1e-6)


def test_ssim_rejects_too_small_or_mismatched():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 17))


def test_to_gray_matches_skimage_rgb2gray():
    rgb = skdata.astronaut()[:32, :40].astype(np.float64) / 255
    ours = to_gray(chw(rgb).double())[0, 0].numpy()
    np.testing.assert_allclose(ours, rgb2gray(rgb), atol=1e-12)


def test_ssim_structure_ignores_colour_but_not_structure():
    torch.manual_seed(0)
    he = skdata.immunohistochemistry()[:48, :48].astype(np.float32) / 255
    x = chw(he)
    gray = to_gray(x)
    recoloured = gray.expand(-1, 3, -1, -1).clone()  # same luma, no colour: structure kept
    scrambled = recoloured[..., torch.randperm(48), :]  # rows shuffled: structure destroyed
    assert ssim_structure(x, recoloured).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim_structure(x, scrambled).item() < 0.5


@pytest.mark.parametrize("sigma_noise", [0.01, 0.1, 0.3])
def test_psnr_matches_skimage(sigma_noise):
    rng = np.random.default_rng(1)
    a = rng.random((20, 24, 3))
    b = np.clip(a + rng.normal(0, sigma_noise, a.shape), 0, 1)
    ours = psnr(chw(a).double(), chw(b).double()).item()
    assert ours == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)


def test_psnr_of_identical_images_is_capped_not_infinite():
    x = torch.rand(2, 3, 16, 16)
    out = psnr(x, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((2,), 100.0))
