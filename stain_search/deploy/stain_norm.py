"""Input stain normalisation: H&E from another lab or scanner brought to the
colours G was trained on, before G sees it (``translate --normalize``).

* ``macenko`` — Macenko et al. (2009), "A method for normalizing histology
  slides for quantitative analysis": the H and E optical-density vectors and
  the 99th-percentile concentrations of the slide are mapped onto the
  reference's.
* ``reinhard`` — Reinhard et al. (2001), "Color transfer between images":
  per-channel mean and standard deviation in CIELAB matched to the reference.
* ``none`` — as scanned.

Estimation is torchstain's (``NumpyMacenkoNormalizer``/``NumpyReinhardNormalizer``
``fit``). torchstain's ``normalize`` re-estimates the source on every call,
which on a slide would give every tile its own colours (seams), so the
source is estimated once per slide, on the tissue of its thumbnail, by the
same ``fit``, and every tile is then mapped with those fixed parameters —
a per-pixel map, so tiles stay seam-free.

The reference is an image (``--reference``) or the training set's statistics
that ``stain-search export`` stores in ``model.json`` (``stain_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stain_search.errors import ConfigError, DataError

IO = 240  # transmitted light (Macenko's and torchstain's default Io)
MAX_FIT_PIXELS = 2 ** 20  # tissue pixels the estimates are fitted on (a subsample)


def _torchstain():
    try:
        from torchstain.numpy import normalizers
    except ImportError:
        raise ConfigError("--normalize needs torchstain: pip install 'stain-search[slides]'") \
            from None
    return normalizers


def _as_image(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) tissue pixels → an (N, 1, 3) image, subsampled evenly, for ``fit``."""
    step = max(1, len(pixels) // MAX_FIT_PIXELS)
    return np.ascontiguousarray(pixels[::step][:, None, :])


def fit_macenko(pixels: np.ndarray) -> dict:
    norm = _torchstain().NumpyMacenkoNormalizer()
    norm.fit(_as_image(pixels), Io=IO)
    return {"HE": norm.HERef.tolist(), "maxC": norm.maxCRef.tolist()}


def fit_reinhard(pixels: np.ndarray) -> dict:
    norm = _torchstain().NumpyReinhardNormalizer()
    norm.fit(_as_image(pixels))
    return {"means": np.asarray(norm.target_means).tolist(),
            "stds": np.asarray(norm.target_stds).tolist()}


def apply_macenko(source: dict, target: dict) -> Callable[[np.ndarray], np.ndarray]:
    unmix = np.linalg.pinv(np.asarray(source["HE"]))  # (2, 3): OD → H, E concentrations
    scale = (np.asarray(target["maxC"]) / np.asarray(source["maxC"]))[:, None]
    mix = np.asarray(target["HE"])  # (3, 2)

    def fn(rgb: np.ndarray) -> np.ndarray:  # (..., 3) uint8
        od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1) / IO).T  # (3, N)
        out = IO * np.exp(-mix @ (scale * (unmix @ od)))
        return np.clip(out.T, 0, 255).astype(np.uint8).reshape(rgb.shape)
    return fn


def apply_reinhard(source: dict, target: dict) -> Callable[[np.ndarray], np.ndarray]:
    # torchstain's own colour conversions, so fit and apply share one CIELAB scaling
    from torchstain.numpy.utils import lab2rgb, lab_merge, lab_split, rgb2lab

    mu_s, sd_s = np.asarray(source["means"]), np.asarray(source["stds"])
    mu_t, sd_t = np.asarray(target["means"]), np.asarray(target["stds"])

    def fn(rgb: np.ndarray) -> np.ndarray:
        labs = lab_split(rgb2lab(rgb.astype(np.float32) / 255))
        mapped = [(c - ms) / max(ss, 1e-6) * st + mt
                  for c, ms, ss, mt, st in zip(labs, mu_s, sd_s, mu_t, sd_t)]
        out = lab2rgb(lab_merge(*mapped))
        return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    return fn


@dataclass(frozen=True)
class Method:
    fit: Callable[[np.ndarray], dict]  # tissue pixels (N, 3) uint8 → statistics
    apply: Callable[[dict, dict], Callable[[np.ndarray], np.ndarray]]  # (source, target) → map


METHODS: dict[str, Method] = {
    "macenko": Method(fit_macenko, apply_macenko),
    "reinhard": Method(fit_reinhard, apply_reinhard),
}


def reference_statistics(pixels: np.ndarray) -> dict:
    """Every method's statistics of these tissue pixels (what export stores)."""
    return {name: method.fit(pixels) for name, method in METHODS.items()}


TRAINING_SAMPLE = 16  # training H&E images the stored statistics are fitted on


def training_stain_statistics(path: str | None, layout: str = "auto") -> dict | None:
    """:func:`reference_statistics` of the training set's H&E (domain A) tissue,
    on up to :data:`TRAINING_SAMPLE` images spread over it; None without torchstain."""
    if not path:
        return None
    try:
        _torchstain()
    except ConfigError:
        return None
    from stain_search.data.folders import resolve_dataset
    from stain_search.data.io import read_image
    from stain_search.data.prepare import tissue_mask

    files = resolve_dataset(path, layout).train_a
    step = max(1, len(files) // TRAINING_SAMPLE)
    images = map(read_image, files[::step][:TRAINING_SAMPLE])
    pixels = [image[tissue_mask(image)] for image in images]
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
    if len(pixels) < 100:
        return None
    return reference_statistics(pixels)


@dataclass(frozen=True)
class Normalizer:
    """A method and its target; :meth:`for_slide` fits a slide and returns the map."""

    method: str
    target: dict

    def for_slide(self, tissue_pixels: np.ndarray, *, name: str = "slide"
                  ) -> Callable[[np.ndarray], np.ndarray]:
        if len(tissue_pixels) < 100:
            raise DataError(f"{name}: too little tissue to estimate its stain colours for "
                            f"--normalize {self.method}; use --normalize none")
        m = METHODS[self.method]
        try:
            source = m.fit(tissue_pixels)
        except (np.linalg.LinAlgError, ValueError, IndexError) as err:
            raise DataError(f"{name}: cannot estimate its stain colours for --normalize "
                            f"{self.method} ({err}); use --normalize none") from None
        return m.apply(source, self.target)


def build_normalizer(method: str, *, reference: str | Path | None = None,
                     stored: dict | None = None) -> Normalizer | None:
    """``--normalize``/``--reference`` → a :class:`Normalizer` (None for ``none``)."""
    if method == "none":
        if reference is not None:
            raise ConfigError("--reference without --normalize: pass --normalize macenko or "
                              "reinhard too")
        return None
    if method not in METHODS:
        raise ConfigError(f"--normalize {method!r}: unknown; known: none, {', '.join(METHODS)}")
    if reference is not None:
        from stain_search.data.io import read_image
        from stain_search.data.prepare import tissue_mask

        image = read_image(reference)
        pixels = image[tissue_mask(image)]
        if len(pixels) < 100:
            raise DataError(f"{reference}: the reference image shows no tissue; give an H&E "
                            f"field with tissue")
        return Normalizer(method, METHODS[method].fit(pixels))
    if stored and method in stored:
        return Normalizer(method, stored[method])
    raise ConfigError(f"--normalize {method}: no reference; pass --reference IMAGE (an H&E "
                      f"field of the training lab), or export the model again so model.json "
                      f"stores the training set's stain statistics")
