"""Image-translation metrics: SSIM/PSNR, Fréchet distance (FID or fd_random), positive-nucleus F1.

Every metric is a pure function tested against its reference implementation
(scikit-image, scipy) plus, where accumulation is needed, a thin stateful
wrapper. Images are (B, 3, H, W) tensors in [0, 1].
"""

from stain_search.metrics.frechet import (FeatureSpec, FrechetDistance, FrechetStats,
                                          build_feature_extractor, frechet_distance,
                                          frechet_distance_to_samples, resolve_feature_extractor)
from stain_search.metrics.nuclei import PositiveNucleiF1, positive_nuclei, positive_nuclei_f1
from stain_search.metrics.ssim import psnr, ssim, ssim_structure, to_gray

__all__ = [
    "FeatureSpec", "FrechetDistance", "FrechetStats", "PositiveNucleiF1", "build_feature_extractor",
    "frechet_distance", "frechet_distance_to_samples", "positive_nuclei", "positive_nuclei_f1",
    "psnr", "resolve_feature_extractor", "ssim", "ssim_structure", "to_gray",
]
