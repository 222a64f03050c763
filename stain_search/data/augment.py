"""HED colour augmentation of H&E training crops (Tellez et al., 2018,
"Whole-slide mitosis detection in H&E breast histology using PHH3 as a
reference to train distilled stain-invariant convolutional networks").

The crop is unmixed into haematoxylin, eosin and DAB optical densities
(Ruifrok & Johnston's colour deconvolution, scikit-image's ``rgb2hed``), each
channel scaled by α ~ U(1 − σ, 1 + σ) and shifted by β ~ U(−σ, σ), and mixed
back: the staining-intensity differences between labs, which a generator
should tolerate. σ is ``data.hed_jitter`` (0: off).
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed


def hed_jitter(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 → the same, HED-perturbed; unchanged (no draw) at σ = 0."""
    if sigma <= 0:
        return image
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3)
    hed = rgb2hed(image) * alpha + beta  # β in scikit-image's HED units, as Tellez et al.
    return np.clip(np.round(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)
