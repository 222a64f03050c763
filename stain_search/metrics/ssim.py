"""SSIM and PSNR on image tensors, matching scikit-image.

SSIM follows Wang et al., 2004 ("Image quality assessment: from error
visibility to structural similarity") in scikit-image's configuration
``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1.0)``: an 11x11 Gaussian window
(σ = 1.5, truncated at 3.5σ), K1 = 0.01, K2 = 0.03, and the mean taken over
the pixels whose window lies wholly inside the image (skimage crops
(win_size - 1) // 2 pixels from each border). The window is applied as a
"valid" convolution, so no padding convention enters the result — this is
why we do not call torchmetrics' SSIM, which averages over the padded border
and differs from scikit-image by ~2e-4. Tests hold the two equal to 1e-4.

Every function takes images in [0, 1] as (B, C, H, W) tensors and returns
one value per image, (B,). Arithmetic is float64 for agreement with the
float64 reference; results come back as float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Luma weights of scikit-image's rgb2gray (ITU-R BT.709 primaries), chosen so
# the grayscale conversion itself has a reference to test against.
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)

K1, K2 = 0.01, 0.03  # Wang et al.'s stabilising constants
TRUNCATE = 3.5  # scikit-image truncates the Gaussian window at 3.5σ


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) luma, as skimage.color.rgb2gray."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"to_gray expects (B, 3, H, W) RGB, got {tuple(x.shape)}")
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def gaussian_window(sigma: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius int(3.5σ + 0.5), as scipy.ndimage builds it."""
    radius = int(TRUNCATE * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _blur_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur without padding: (B, C, H, W) → (B, C, H-2r, W-2r)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, *, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image, averaged over channels: (B, C, H, W) ×2 → (B,)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two (B, C, H, W) tensors of one shape, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    g = gaussian_window(sigma, dtype=torch.float64, device=x.device)
    if min(x.shape[-2:]) < g.numel():
        raise ValueError(f"ssim needs images of at least {g.numel()}x{g.numel()} pixels "
                         f"(the Gaussian window), got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    b = x.shape[0]
    # One blur pass over the five moments: (5B, C, H', W').
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.cat([x, y, x * x, y * y, x * y]), g).split(b)
    var_x = xx - mu_x * mu_x  # population (not sample) covariance, as skimage's default
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1).float()


def ssim_structure(input_rgb: torch.Tensor, output_rgb: torch.Tensor) -> torch.Tensor:
    """SSIM of the grayscale input H&E and the grayscale translation, (B,).

    Colour is expected to change under restaining; tissue architecture is not:
    a hallucinated or erased cell lowers this score.
    """
    return ssim(to_gray(input_rgb), to_gray(output_rgb))


def psnr(x: torch.Tensor, y: torch.Tensor, *, max_db: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for [0, 1] images, (B,).

    Equals skimage's ``peak_signal_noise_ratio(data_range=1)`` except that
    identical images give ``max_db`` instead of +inf, so that means over an
    evaluation set and the trackers that log them stay finite.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr expects tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    db = 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))
    return db.float()
