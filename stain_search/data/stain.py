"""Beer–Lambert stain model: optical density, stain vectors, mixing and unmixing.

Light passing through a stained section is attenuated exponentially in the
amount of each dye (Beer–Lambert law), so in optical density
``OD = -log10(I / I0)`` the dyes add up linearly: ``OD = Σ_k c_k · v_k`` with
``v_k`` the dye's unit OD vector over (R, G, B) and ``c_k`` its amount.
Colour deconvolution (Ruifrok & Johnston, 2001, "Quantification of
histochemical staining by color deconvolution") inverts that mix.

The vectors are the published ones shipped with scikit-image
(``skimage.color.rgb_from_hed`` for haematoxylin / eosin / DAB and
``rgb_from_bpx`` for Masson's trichrome methyl blue / ponceau-fuchsin, both
from Landini's colour-deconvolution plugin), plus one for Weigert's iron
haematoxylin, the near-black nuclear stain of trichrome, which has no
published vector: a broad absorber, slightly stronger in red (blue-black).
The tissue phantom renders with these functions, and the stain metrics start
from their optical density (``od_from_rgb``); ``unmix`` is called by none of
them yet (issue 26: one colour-deconvolution path).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from skimage.color import rgb_from_bpx, rgb_from_hed

from stain_search.errors import ConfigError


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# Unit optical-density vectors over (R, G, B): which colours each dye absorbs.
STAINS: dict[str, np.ndarray] = {
    "haematoxylin": _unit(rgb_from_hed[0]),  # absorbs red+green → blue-purple
    "eosin": _unit(rgb_from_hed[1]),  # absorbs green → pink
    "dab": _unit(rgb_from_hed[2]),  # absorbs blue most → brown
    "methyl_blue": _unit(rgb_from_bpx[0]),  # trichrome collagen: blue
    "ponceau_fuchsin": _unit(rgb_from_bpx[1]),  # trichrome cytoplasm / muscle: red
    "iron_haematoxylin": _unit([0.66, 0.60, 0.45]),  # Weigert's: blue-black nuclei
}

# 1/255 → OD ≈ 2.4: the darkest value an 8-bit camera distinguishes from black.
MAX_OD = float(-np.log10(1.0 / 255.0))


def stain_matrix(names: Sequence[str]) -> np.ndarray:
    """(K, 3) rows of unit OD vectors for the named dyes."""
    unknown = [n for n in names if n not in STAINS]
    if unknown:
        raise ConfigError(f"unknown stain {unknown[0]!r}; known: {', '.join(sorted(STAINS))}")
    return np.stack([STAINS[n] for n in names])


def od_from_rgb(rgb: np.ndarray, *, background: float | Sequence[float] = 255.0) -> np.ndarray:
    """(..., 3) uint8 RGB → (..., 3) float optical density (≥ 0)."""
    i0 = np.asarray(background, dtype=np.float32)
    intensity = np.clip(np.asarray(rgb, dtype=np.float32), 1.0, i0)  # log(0) guard
    return -np.log10(intensity / i0)


def rgb_from_od(od: np.ndarray, *, background: float | Sequence[float] = 255.0) -> np.ndarray:
    """(..., 3) optical density → (..., 3) float intensity (not yet rounded)."""
    i0 = np.asarray(background, dtype=np.float32)
    return i0 * np.power(10.0, -np.asarray(od, dtype=np.float32))


def mix(concentrations: np.ndarray, stains: Sequence[str]) -> np.ndarray:
    """(..., K) dye amounts → (..., 3) optical density, Beer–Lambert."""
    return np.asarray(concentrations, dtype=np.float32) @ stain_matrix(stains).astype(np.float32)


def render(concentrations: np.ndarray, stains: Sequence[str], *,
           background: float | Sequence[float] = 255.0) -> np.ndarray:
    """(..., K) dye amounts → (..., 3) uint8 RGB as a bright-field microscope sees it."""
    rgb = rgb_from_od(mix(concentrations, stains), background=background)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def unmix(rgb: np.ndarray, stains: Sequence[str], *,
          background: float | Sequence[float] = 255.0) -> np.ndarray:
    """(..., 3) uint8 RGB → (..., K) dye amounts by least squares (colour deconvolution).

    With K = 3 this is Ruifrok–Johnston's matrix inverse; with K = 2 the
    pseudo-inverse projects out what neither dye explains.
    """
    od = od_from_rgb(rgb, background=background)
    return od @ np.linalg.pinv(stain_matrix(stains)).astype(np.float32)
