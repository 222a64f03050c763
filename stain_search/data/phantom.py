"""The built-in dataset: a generated, paired "tissue phantom".

These machines carry no histology datasets, so the quickstart trains on a
phantom: a random tissue map — nuclei (ellipses with chromatin texture),
cytoplasm/stroma, collagen (curvy bands of fine fibres), lumen (holes) — is
rendered twice with a Beer–Lambert stain model (:mod:`stain_search.data.stain`,
Ruifrok & Johnston, 2001): as H&E and as a target stain.

- ``trichrome`` (Masson's): nuclei blue-black (iron haematoxylin), cytoplasm
  red (ponceau-fuchsin), collagen blue (methyl blue). In H&E the collagen is
  pink like the cytoplasm and only its fibrous texture tells them apart, as
  in real tissue, so a model must learn texture, not colour, to stain it blue.
- ``ki67``: haematoxylin counterstain with DAB-brown proliferating nuclei.
  Positive nuclei are larger, darker and more granular in H&E (as cycling
  cells' nuclei tend to be), so positivity is visible in the input and
  learnable.

Training images of the two domains come from different tissue maps
(unpaired, as CycleGAN assumes); test images are rendered from the same map
in both stains and share a file name, a ground truth for SSIM/PSNR and, for
Ki-67, a positive-nucleus mask (``testB_mask/``) for the detection F1.

Everything is a pure function of (seed, split, index): the same seed writes
byte-identical files. :func:`builtin_dataset` generates each named set once
into a cache folder keyed by its parameters and this generator's source, so
editing the generator regenerates rather than reusing a stale set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from stain_search.data import stain as stain_model
from stain_search.atomic import atomic_dir
from stain_search.data.io import write_image
from stain_search.errors import ConfigError, DataError
from stain_search.storage import cache_root

# Bump by hand for changes the source hash cannot see (e.g. a library's defaults).
PHANTOM_VERSION = 1

# Tissue classes of the map.
LUMEN, STROMA, COLLAGEN, NUCLEUS = 0, 1, 2, 3
CLASS_NAMES = ("lumen", "stroma", "collagen", "nucleus")


# --- random fields -------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian-filtered white noise, zero mean, unit std.

    Filtered in the Fourier domain (a periodic Gaussian blur): the cost does
    not grow with ``sigma``, and tissue-scale fields need large ones.
    """
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx * fx + fy * fy))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((size, size))) * kernel, s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-8)


def _band(rng: np.random.Generator, size: int, *, width: float) -> tuple[np.ndarray, np.ndarray]:
    """A curvy band along a level set of a smooth field.

    Returns the band mask and ``d``, the approximate signed distance (pixels)
    to the band's centre line: fibres are drawn as stripes of constant ``d``,
    so they run along the band like collagen bundles.
    """
    field = smooth_noise(rng, size, size / 5)
    gy, gx = np.gradient(field)
    grad = np.maximum(np.hypot(gy, gx), np.percentile(np.hypot(gy, gx), 20))
    d = (field - rng.uniform(-0.6, 0.6)) / grad
    return np.abs(d) < width / 2, d


# --- the tissue map --------------------------------------------------------------

@dataclass
class Tissue:
    """What is where in one phantom image; rendering turns it into pixels."""

    classes: np.ndarray  # (H, W) uint8 class ids (LUMEN, STROMA, COLLAGEN, NUCLEUS)
    nuclei: np.ndarray  # (H, W) int32 nucleus instance ids, 0 = none
    positive: np.ndarray  # (H, W) bool: pixels of Ki-67-positive nuclei
    chromatin: np.ndarray  # (H, W) float ≈1: nuclear stain density (texture)
    fibre: np.ndarray  # (H, W) float in [0, 1]: collagen fibre texture
    density: np.ndarray  # (H, W) float ≈1: slow variation in stain uptake

    def weights(self, *, softness: float = 0.6) -> np.ndarray:
        """(H, W, 4) soft class memberships: blurred one-hot, so edges are not aliased."""
        onehot = np.stack([(self.classes == k) for k in range(len(CLASS_NAMES))], -1)
        soft = ndimage.gaussian_filter(onehot.astype(np.float32), (softness, softness, 0))
        return soft / soft.sum(-1, keepdims=True)


def _fibres(rng: np.random.Generator, d: np.ndarray, size: int) -> np.ndarray:
    """Fine wavy fibres parallel to a band: stripes of constant distance ``d``,
    wobbled and broken into lengths so they read as fibres, not a grating."""
    period = rng.uniform(2.6, 3.6)
    wobble = 0.5 * smooth_noise(rng, size, 3.0)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * (d / period + wobble))
    breaks = np.clip(0.6 + 0.5 * smooth_noise(rng, size, 1.2), 0, 1)
    return np.clip(stripes * breaks, 0, 1)


def _ellipse(r: int, c: int, radii: tuple[float, float], angle: float, shape: tuple[int, int],
             *, grow: float = 0.0) -> tuple[tuple[slice, slice], np.ndarray]:
    """An ellipse as (window slices, boolean mask within the window), clipped to the image.
    ``grow`` widens both radii (for a gap around a nucleus)."""
    a, b = radii[0] + grow, radii[1] + grow
    reach = int(np.ceil(max(a, b)))
    y0, y1 = max(r - reach, 0), min(r + reach + 1, shape[0])
    x0, x1 = max(c - reach, 0), min(c + reach + 1, shape[1])
    ys = np.arange(y0 - r, y1 - r, dtype=np.float64)[:, None]
    xs = np.arange(x0 - c, x1 - c, dtype=np.float64)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (ys * cos + xs * sin) / a
    v = (xs * cos - ys * sin) / b
    return (slice(y0, y1), slice(x0, x1)), u * u + v * v <= 1.0


def _place_nuclei(rng: np.random.Generator, classes: np.ndarray, orientation: np.ndarray, *,
                  positive_fraction: float) -> tuple[np.ndarray, list[bool]]:
    """Non-overlapping elliptical nuclei, dense in stroma, sparse and
    elongated along the fibres in collagen (fibroblasts). Positive nuclei
    (Ki-67) are drawn 30% larger.

    Candidates sit on a jittered grid (cells pack, but not in rows), thinned
    by a smooth cellularity field so some areas are crowded and some sparse.
    """
    size = classes.shape[0]
    spacing = rng.uniform(10.0, 12.5)
    centres = np.arange(spacing / 2, size, spacing)
    ys, xs = (g.ravel() for g in np.meshgrid(centres, centres, indexing="ij"))
    jitter = rng.uniform(-0.4, 0.4, (2, ys.size)) * spacing
    points = np.clip(np.round(np.stack([ys, xs]) + jitter), 0, size - 1).astype(int).T
    points = points[rng.permutation(len(points))]
    cellularity = np.clip(0.75 + 0.35 * smooth_noise(rng, size, size / 6), 0.2, 1.0)

    labels = np.zeros(classes.shape, np.int32)
    occupied = np.zeros(classes.shape, bool)
    positive: list[bool] = []
    for r, c in points:
        where = classes[r, c]
        keep = 0.12 if where == COLLAGEN else cellularity[r, c]
        if where == LUMEN or occupied[r, c] or rng.random() > keep:
            continue
        # Fibroblasts are never positive: the positive trait is a round, large nucleus.
        is_pos = where != COLLAGEN and bool(rng.random() < positive_fraction)
        scale = 1.3 if is_pos else 1.0
        if where == COLLAGEN:  # fibroblast: thin axis across the fibres, long axis along
            radii, angle = (rng.uniform(1.4, 2.0), rng.uniform(4.0, 6.0)), orientation[r, c]
        else:
            radii = (rng.uniform(2.8, 4.0) * scale, rng.uniform(3.5, 5.2) * scale)
            angle = rng.uniform(0, np.pi)
        window, inside = _ellipse(r, c, radii, angle, classes.shape)
        if occupied[window][inside].any():
            continue
        positive.append(is_pos)
        labels[window][inside] = len(positive)
        # Reserve a one-pixel gap so touching nuclei stay separate objects.
        gap_window, gap = _ellipse(r, c, radii, angle, classes.shape, grow=1.0)
        occupied[gap_window] |= gap
    return labels, positive


def sample_tissue(rng: np.random.Generator, *, size: int = 128,
                  positive_fraction: float = 0.0) -> Tissue:
    """Draw one random tissue map of ``size`` × ``size`` pixels."""
    classes = np.full((size, size), STROMA, np.uint8)

    # Collagen: one or two curvy bands of fibres.
    collagen = np.zeros((size, size), bool)
    fibre = np.zeros((size, size), np.float32)
    orientation = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 3)):
        band, d = _band(rng, size, width=rng.uniform(10, 26) * size / 128)
        fibre = np.where(band, _fibres(rng, d, size), fibre)
        gy, gx = np.gradient(d)
        orientation = np.where(band, np.arctan2(gx, gy), orientation)  # across the fibres
        collagen |= band
    classes[collagen] = COLLAGEN

    # Lumen: a few holes where a smooth field peaks (none in some images).
    holes = smooth_noise(rng, size, size / 9)
    lumen = holes > np.quantile(holes, 1 - rng.uniform(0.0, 0.12))
    classes[lumen] = LUMEN

    labels, positive_ids = _place_nuclei(rng, classes, orientation,
                                         positive_fraction=positive_fraction)
    classes[labels > 0] = NUCLEUS
    is_positive = np.array([False] + positive_ids)
    positive = is_positive[labels]

    # Chromatin: granular within nuclei; coarser and denser in positive ones.
    grain = smooth_noise(rng, size, 0.8)
    chromatin = np.where(positive, 1.35 + 0.45 * grain, 1.0 + 0.18 * grain)
    density = 1.0 + 0.12 * smooth_noise(rng, size, size / 8) + 0.06 * smooth_noise(rng, size, 1.0)
    return Tissue(classes=classes, nuclei=labels, positive=positive,
                  chromatin=chromatin.astype(np.float32), fibre=fibre,
                  density=density.astype(np.float32))


# --- stainings: tissue → dye amounts ------------------------------------------------

@dataclass(frozen=True)
class Staining:
    """A staining protocol: its dyes and how much of each every class takes up."""

    stains: tuple[str, ...]
    amounts: Callable[[Tissue], np.ndarray]  # → (H, W, 4 classes, K dyes)


def _per_class(tissue: Tissue, table: dict[int, list]) -> np.ndarray:
    """Dye amounts per class; each entry a scalar or an (H, W) field."""
    h, w = tissue.classes.shape
    out = [np.stack([np.broadcast_to(np.asarray(v, np.float32), (h, w)) for v in table[k]], -1)
           for k in range(len(CLASS_NAMES))]
    return np.stack(out, -2)  # (H, W, classes, K)


def _he(t: Tissue) -> np.ndarray:
    # Dyes: haematoxylin, eosin. Collagen takes as much eosin as cytoplasm on
    # average (fibre texture ≈ 0.285 in the bands: 0.12 + 0.56·0.285 ≈ 0.28),
    # so only its fibres set it apart.
    return _per_class(t, {
        LUMEN: [0.0, 0.02],
        STROMA: [0.07 * t.density, 0.28 * t.density],
        COLLAGEN: [0.03, 0.12 + 0.56 * t.fibre],
        NUCLEUS: [0.95 * t.chromatin, 0.18],
    })


def _trichrome(t: Tissue) -> np.ndarray:
    # Dyes: iron haematoxylin, ponceau-fuchsin (red), methyl blue (collagen).
    return _per_class(t, {
        LUMEN: [0.0, 0.0, 0.02],
        STROMA: [0.04, 0.70 * t.density, 0.03],
        COLLAGEN: [0.0, 0.04, 0.15 + 0.70 * t.fibre],
        NUCLEUS: [0.95 * t.chromatin, 0.12, 0.05],
    })


def _ki67(t: Tissue) -> np.ndarray:
    # Dyes: haematoxylin counterstain, DAB on positive nuclei only.
    pos = t.positive.astype(np.float32)
    return _per_class(t, {
        LUMEN: [0.0, 0.0],
        STROMA: [0.07 * t.density, 0.0],
        COLLAGEN: [0.02 + 0.08 * t.fibre, 0.0],
        NUCLEUS: [(0.55 - 0.35 * pos) * t.chromatin, 0.75 * pos * t.chromatin],
    })


STAININGS: dict[str, Staining] = {
    "he": Staining(("haematoxylin", "eosin"), _he),
    "trichrome": Staining(("iron_haematoxylin", "ponceau_fuchsin", "methyl_blue"), _trichrome),
    "ki67": Staining(("haematoxylin", "dab"), _ki67),
}


def render(tissue: Tissue, staining: str, rng: np.random.Generator) -> np.ndarray:
    """Tissue map → (H, W, 3) uint8 micrograph in the given staining.

    Beer–Lambert mixing of the dyes, then what a microscope adds: a slight
    per-slide stain-strength and white-balance variation, optical blur and
    camera noise.
    """
    if staining not in STAININGS:
        raise ConfigError(f"unknown staining {staining!r}; known: {', '.join(STAININGS)}")
    spec = STAININGS[staining]
    amounts = (tissue.weights()[..., None] * spec.amounts(tissue)).sum(-2)  # (H, W, K)
    amounts *= rng.uniform(0.9, 1.1, len(spec.stains)).astype(np.float32)  # batch variation
    od = stain_model.mix(amounts, spec.stains)  # (H, W, 3)
    od = ndimage.gaussian_filter(od, (0.5, 0.5, 0))  # optics
    white = rng.uniform(238, 252) + rng.uniform(-3, 3, 3)  # lamp / white balance
    rgb = stain_model.rgb_from_od(od, background=white)
    rgb += rng.normal(0.0, 1.8, rgb.shape)  # camera noise
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# --- writing a dataset -----------------------------------------------------------

@dataclass(frozen=True)
class PhantomKind:
    staining: str  # the target (domain B) staining; domain A is always H&E
    positive_fraction: float  # share of Ki-67-positive nuclei (0: no trait)
    stain: str  # what stain-specific metrics look for: "ki67" or "trichrome"


PHANTOM_KINDS: dict[str, PhantomKind] = {
    "trichrome": PhantomKind(staining="trichrome", positive_fraction=0.0, stain="trichrome"),
    "ki67": PhantomKind(staining="ki67", positive_fraction=0.3, stain="ki67"),
}

# Sub-seeds per split: a pure function of (seed, split, index), so changing
# n_train does not change any test image.
_SPLIT_IDS = {"trainA": 1, "trainB": 2, "test": 3}


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index, stream])


def phantom_pair(kind: str, index: int, *, size: int = 128, seed: int = 0
                 ) -> tuple[Tissue, np.ndarray, np.ndarray]:
    """Test pair ``index``: its tissue map, the H&E image and the target image."""
    spec = _kind(kind)
    tissue = sample_tissue(_rng(seed, "test", index, 0), size=size,
                           positive_fraction=spec.positive_fraction)
    return (tissue, render(tissue, "he", _rng(seed, "test", index, 1)),
            render(tissue, spec.staining, _rng(seed, "test", index, 2)))


def _kind(kind: str) -> PhantomKind:
    if kind not in PHANTOM_KINDS:
        raise ConfigError(f"unknown phantom kind {kind!r}; known: {', '.join(PHANTOM_KINDS)}")
    return PHANTOM_KINDS[kind]


def _write_splits(root: Path, kind: str, *, n_train: int, n_test: int, size: int,
                  seed: int) -> None:
    spec = _kind(kind)

    def save(path: Path, image: np.ndarray) -> None:
        # ``root`` is renamed into place whole (atomic_dir): no fsync per tile.
        write_image(path, image, fsync=False)

    for split, staining in [("trainA", "he"), ("trainB", spec.staining)]:
        for i in range(n_train):
            tissue = sample_tissue(_rng(seed, split, i, 0), size=size,
                                   positive_fraction=spec.positive_fraction)
            save(root / split / f"tile_{i:04d}.png",
                 render(tissue, staining, _rng(seed, split, i, 1)))
    for i in range(n_test):
        tissue, he, target = phantom_pair(kind, i, size=size, seed=seed)
        name = f"tile_{i:04d}.png"
        save(root / "testA" / name, he)
        save(root / "testB" / name, target)
        if spec.positive_fraction > 0:
            save(root / "testB_mask" / name, tissue.positive.astype(np.uint8) * 255)


def generate_phantom(out_dir: str | Path, *, kind: str = "trichrome", n_train: int = 96,
                     n_test: int = 32, size: int = 128, seed: int = 0) -> Path:
    """Write a phantom dataset in CycleGAN layout (trainA/ trainB/ testA/ testB/).

    ``testB_mask/`` holds positive-nucleus masks (Ki-67 only) and
    ``phantom.json`` the parameters. Written to a temporary sibling folder and
    renamed at the end: an interrupted run leaves no partial dataset.
    """
    spec = _kind(kind)
    if n_train < 1 or n_test < 1 or size < 32:
        raise ConfigError(f"phantom needs n_train ≥ 1, n_test ≥ 1 and size ≥ 32; got "
                          f"n_train={n_train}, n_test={n_test}, size={size}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not empty; choose a new folder or "
                        f"delete it")
    # overwrite=False: of several processes generating the same dataset at
    # once, the first rename wins and the others fail (see builtin_dataset).
    with atomic_dir(out, overwrite=False) as tmp:
        _write_splits(tmp, kind, n_train=n_train, n_test=n_test, size=size, seed=seed)
        meta = {"generator": "stain_search.data.phantom", "version": PHANTOM_VERSION,
                "kind": kind, "stain": spec.stain,
                "staining": {"A": "he", "B": spec.staining},
                "stains": {"A": list(STAININGS["he"].stains),
                           "B": list(STAININGS[spec.staining].stains)},
                "n_train": n_train, "n_test": n_test, "size": size, "seed": seed,
                "positive_fraction": spec.positive_fraction, "classes": list(CLASS_NAMES),
                "masks": "testB_mask" if spec.positive_fraction > 0 else None}
        (tmp / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# --- built-in, cached datasets ---------------------------------------------------

@dataclass(frozen=True)
class BuiltinDataset:
    kind: str
    n_train: int = 96  # per domain, 128² px each: generated in a few seconds
    n_test: int = 32  # paired
    size: int = 128
    seed: int = 0


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "builtin:phantom-trichrome": BuiltinDataset(kind="trichrome"),
    "builtin:phantom-ki67": BuiltinDataset(kind="ki67"),
    # The bundled spaces' `gpu` profile (256 px crops): 512² fields, so a crop
    # is a random window, as the reference's 256 of 286; 48 of them hold ~200
    # crop-sized fields and generate in about a minute.
    "builtin:phantom-trichrome-512": BuiltinDataset(kind="trichrome", n_train=48, size=512),
}


def _generator_fingerprint(spec: BuiltinDataset) -> str:
    """Parameters + version + this generator's source: any change → a new folder."""
    h = hashlib.sha256(json.dumps({"version": PHANTOM_VERSION, **asdict(spec)},
                                  sort_keys=True).encode())
    for module_file in (__file__, stain_model.__file__):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()[:12]


def builtin_dataset(name: str, *, cache_dir: str | Path | None = None) -> Path:
    """Folder of the named built-in dataset, generated on first use.

    Safe when several processes (Ray workers) ask at once: each generates
    into its own temporary folder, the first rename wins and the others
    discard theirs — the content is identical by construction.
    """
    full = name if name.startswith("builtin:") else f"builtin:{name}"
    if full not in BUILTIN_DATASETS:
        raise ConfigError(f"unknown built-in dataset {name!r}; known: "
                          f"{', '.join(BUILTIN_DATASETS)}")
    spec = BUILTIN_DATASETS[full]
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    target = root / "datasets" / f"{full.removeprefix('builtin:')}-{_generator_fingerprint(spec)}"
    if (target / "phantom.json").is_file():
        return target
    try:
        generate_phantom(target, kind=spec.kind, n_train=spec.n_train, n_test=spec.n_test,
                         size=spec.size, seed=spec.seed)
    except (DataError, OSError):
        if not (target / "phantom.json").is_file():  # not a lost race: a real failure
            raise
    return target
