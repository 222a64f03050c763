"""Resolution: which slide level is read, and how it is resampled, so that G
sees the µm/px it was trained at (``translate``) or tiles are cut at a
chosen µm/px (``data prepare --mpp``).

The target µm/px is ``--mpp`` if given, else the model's (``model.json``
``data.mpp``, recorded at training). The slide level used is the coarsest
whose µm/px is at most the target (within :data:`MPP_TOLERANCE`, scanners
round), resampled down to the target; a target finer than level 0 is
up-sampled, at most :data:`MAX_UPSAMPLE` ×, since more invents detail G
never saw. ``--level N`` takes level N as it is. When neither the model nor
``--mpp`` says, or the slide does not say its own µm/px, level 0 is used as
is, with a warning.

Resampling is separable linear interpolation at each output pixel's centre
in global coordinates, after a Gaussian anti-aliasing blur when shrinking
(σ = (1/scale − 1)/2, scikit-image's rule for ``resize``), both computed on
a region read with enough margin — so a tile read alone equals the same
pixels of the whole resampled slide, and tiles still blend seam-free.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from stain_search.data.slides import Level, SlideSource
from stain_search.errors import ConfigError, DataError

MPP_TOLERANCE = 0.05  # levels within 5 % of the target count as it (scanner rounding)
MAX_UPSAMPLE = 2.0  # beyond this, up-sampling invents detail rather than matching scale


@dataclass(frozen=True)
class Plan:
    level: int
    scale: float  # output px per level px (1: as stored)
    mpp: float | None  # µm/px of what G sees


def plan_resolution(source: SlideSource, *, model_mpp: float | None, mpp: float | None = None,
                    level: int | None = None) -> Plan:
    """The level and scale for ``source`` (see the module docstring)."""
    if mpp is not None and level is not None:
        raise ConfigError("--mpp and --level both given; give one (--level N reads level N "
                          "as stored, --mpp X resamples to X µm/px)")
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"--mpp {mpp}: must be a positive number of µm per pixel")
    if level is not None:
        source.use_level(level)
        return Plan(level, 1.0, source.level_mpp(level))
    target = mpp if mpp is not None else model_mpp
    if target is None:
        # No file name: said once for a folder of slides, not once per slide.
        warnings.warn("neither the model nor --mpp says what µm/px G was trained at; "
                      "translating each slide's level 0 as stored. Pass --mpp or --level",
                      stacklevel=3)
        return Plan(0, 1.0, source.mpp)
    if source.mpp is None:
        if mpp is not None:
            raise DataError(f"{source.name}: the slide does not say its µm/px, so --mpp "
                            f"{mpp} cannot be matched; choose a level with --level N")
        warnings.warn(f"{source.name}: the slide does not say its µm/px; translating level 0 "
                      f"as if it were the model's {target:g} µm/px", stacklevel=3)
        return Plan(0, 1.0, target)
    fits = [i for i in range(len(source.levels))
            if source.level_mpp(i) <= target * (1 + MPP_TOLERANCE)]
    chosen = max(fits, key=source.level_mpp) if fits else 0
    scale = source.level_mpp(chosen) / target
    if scale > MAX_UPSAMPLE:
        raise DataError(f"{source.name}: {target:g} µm/px would need {scale:.2g}x up-sampling "
                        f"of level 0 ({source.mpp:g} µm/px), more than {MAX_UPSAMPLE:g}x; "
                        f"use a model trained at {source.mpp:g} µm/px or coarser, or pass "
                        f"--level 0 to translate as stored")
    if abs(scale - 1) <= MPP_TOLERANCE:
        scale = 1.0
    source.use_level(chosen)
    return Plan(chosen, scale, target if scale != 1.0 else source.level_mpp(chosen))


class ResampledSource(SlideSource):
    """``inner`` (at its current level) scaled by ``scale``, region by region."""

    def __init__(self, inner: SlideSource, scale: float):
        self.inner, self.scale = inner, scale
        self.name, self.reader = inner.name, inner.reader
        self.levels = (Level(max(1, round(inner.height * scale)),
                             max(1, round(inner.width * scale)), 1.0),)
        inner_mpp = inner.level_mpp(inner.level)
        self.mpp = None if inner_mpp is None else inner_mpp / scale
        self.sigma = max(0.0, (1 / scale - 1) / 2)

    def _axis(self, start: int, n: int, length: int) -> tuple[int, int, np.ndarray, np.ndarray,
                                                              np.ndarray]:
        """Source span [lo, hi) to read, and per output pixel the two source
        indices (relative to lo) and the weight of the second."""
        centres = (np.arange(start, start + n) + 0.5) / self.scale - 0.5
        base = np.floor(centres)
        frac = (centres - base).astype(np.float32)
        i0 = np.clip(base, 0, length - 1).astype(int)
        i1 = np.clip(base + 1, 0, length - 1).astype(int)
        margin = math.ceil(3 * self.sigma) + 1
        lo, hi = max(0, int(i0[0]) - margin), min(length, int(i1[-1]) + margin + 1)
        return lo, hi, i0 - lo, i1 - lo, frac

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        ylo, yhi, y0, y1, fy = self._axis(y, h, self.inner.height)
        xlo, xhi, x0, x1, fx = self._axis(x, w, self.inner.width)
        block = self.inner.read(ylo, xlo, yhi - ylo, xhi - xlo).astype(np.float32)
        if self.sigma > 0:
            # truncate=3: the kernel reaches exactly the margin read around the region
            block = ndimage.gaussian_filter(block, (self.sigma, self.sigma, 0), mode="nearest",
                                            truncate=3.0)
        rows = block[y0] * (1 - fy)[:, None, None] + block[y1] * fy[:, None, None]
        out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    def thumbnail(self, *, max_side: int = 2048) -> np.ndarray:
        return self.inner.thumbnail(max_side=max_side)  # for thresholds: scale does not matter

    def close(self) -> None:
        self.inner.close()
