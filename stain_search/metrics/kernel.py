"""Kernel distance (KID) between feature distributions, with its spread over subsets.

KID (Bińkowski et al., 2018, "Demystifying MMD GANs") is the squared
maximum mean discrepancy between real and generated features under the
cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, estimated without bias.
Unlike the Fréchet distance its expectation does not depend on the number
of samples, so values from small evaluation sets are comparable — noisier,
not shifted. The estimate is averaged over random subsets, whose standard
deviation is logged beside it as ``…_std``.

The estimator is torch-fidelity's (``metric_kid.kid_features_to_metric``,
the one its ``calculate_kid`` and torchmetrics' KID follow), run on the
features :mod:`stain_search.metrics.frechet` already extracts: ``kid`` on
Inception features, ``kd_random`` on the random CNN's. Its subsets are drawn
from a seeded NumPy generator, so a value repeats exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SUBSETS = 100  # torch-fidelity's kid_subsets
MAX_SUBSET_SIZE = 1000  # torch-fidelity's kid_subset_size
SUBSET_SEED = 2020  # torch-fidelity's rng_seed


@dataclass(frozen=True)
class KernelDistance:
    mean: float
    std: float  # over subsets
    subset_size: int
    subsets: int


def default_subset_size(n_fake: int, n_real: int) -> int:
    """Half the smaller set (so subsets differ and the spread means something), ≤ 1000, ≥ 2."""
    return max(2, min(MAX_SUBSET_SIZE, min(n_fake, n_real) // 2))


def kernel_distance(fake: np.ndarray, real: np.ndarray, *, subsets: int = DEFAULT_SUBSETS,
                    subset_size: int | None = None, seed: int = SUBSET_SEED) -> KernelDistance:
    """Unbiased polynomial-kernel MMD² of (N, D) and (M, D) features, mean ± std over subsets."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)

    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"kernel distance of mismatched features {fake.shape} and {real.shape}")
    if min(len(fake), len(real)) < 2:
        raise ValueError(f"kernel distance needs at least 2 samples on each side, got "
                         f"{len(fake)} and {len(real)}")
    if not (np.isfinite(fake).all() and np.isfinite(real).all()):
        raise ValueError("kernel distance of non-finite features (NaN/inf)")
    size = subset_size or default_subset_size(len(fake), len(real))
    size = min(size, len(fake), len(real))
    out = kid_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real),
                                 kid_subsets=subsets, kid_subset_size=size,
                                 kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return KernelDistance(out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size, subsets)
