"""Fréchet distance between feature distributions: FID and its honest stand-in.

FID (Heusel et al., 2017, "GANs trained by a two time-scale update rule
converge to a local Nash equilibrium") is the Fréchet distance between two
Gaussians fitted to Inception-v3 pool features (2048-d) of real and
generated images, with the standard ``pt_inception-2015-12-05`` weights —
computed here, as by torchmetrics, with torch-fidelity's
``FeatureExtractorInceptionV3``. Only that is logged as ``fid``.

These machines have no internet, so the weights come from a local file:
``eval.fid_weights``, then ``$STAIN_SEARCH_FID_WEIGHTS``, then the file
torch-fidelity's download would have left in the torch hub cache. Nothing is
ever downloaded. Without weights, ``feature_extractor: auto`` falls back —
loudly — to a fixed, seeded random CNN and the metric is logged as
``fd_random``: a useful training signal, comparable only with other
``fd_random`` values (same code version), never with published FID.

The Fréchet distance of few samples (an evaluation set of 16–32 images in a
2048-d feature space) is biased upwards and its covariances are singular:
values are comparable only at equal sample counts and feature extractors.
The eigenvalue forms used below stay finite for singular covariances, where
pytorch-fid's ``sqrtm`` needs an ε·I offset, and exploit the low rank of a
small sample's covariance for speed.

Real-image ("reference") features are computed once per reference set and
cached as ``<cache>/fid_stats/<metric_name>-<key>.npz``, the key a hash of the
reference crops' pixels and the feature extractor's identity (so any change
of images, crop, ``data.load_size`` or extractor is a different file). The
features themselves are cached, not only their mean and covariance, because
the kernel distance (:mod:`stain_search.metrics.kernel`) needs them. The
cache folder is ``$STAIN_SEARCH_CACHE`` or ``~/.cache/stain-search``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

from stain_search.atomic import atomic_path
from stain_search.config import EvalConfig
from stain_search.errors import ConfigError
from stain_search.progress import progress
from stain_search.storage import cache_root

logger = logging.getLogger(__name__)

# torch-fidelity's download address and file name (feature_extractor_inceptionv3.URL_INCEPTION_V3;
# a test keeps the two in step). torchmetrics' FID downloads the same file.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "STAIN_SEARCH_FID_WEIGHTS"


# --- the distance itself ---------------------------------------------------------------

def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues → 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½), the Fréchet distance of two Gaussians.

    Tr((Σ1Σ2)^½) is the sum of square roots of the eigenvalues of
    Σ1^½ Σ2 Σ1^½ (similar to Σ1Σ2, but symmetric PSD), so the result is real
    and finite even when both covariances are singular. In float64 it equals
    scipy's ``sqrtm`` formula (pytorch-fid) to ~1e-9 on well-conditioned input.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {sigma1.shape} / {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("Fréchet distance of non-finite statistics (NaN/inf features)")
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1  # symmetric up to rounding
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclass(frozen=True)
class FrechetStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D), unbiased covariance as pytorch-fid
    n: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FrechetStats":
        """(N, D) features → Gaussian statistics; needs N ≥ 2 for a covariance."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"Fréchet statistics need at least 2 feature vectors, "
                             f"got shape {features.shape}")
        f = features.astype(np.float64)
        return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=f.shape[0])


def frechet_distance_to_samples(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fitted to ``features`` (N, D) and N(μ, Σ).

    With few samples (N ≤ D: an evaluation set against 2048-d features) the
    sample covariance is S = AᵀA with A the (N, D) centred features / √(N−1),
    and the non-zero eigenvalues of SΣ = Aᵀ(AΣ) are those of the small
    (N, N) matrix AΣAᵀ: O(N·D²) instead of two D×D eigendecompositions,
    which take tens of seconds at D = 2048 on a busy CPU. Same value as
    ``frechet_distance`` of the fitted statistics to ~1e-7 relative, and the
    more accurate of the two: it never takes square roots of the rounding
    noise in a singular covariance's null space.
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"Fréchet statistics need at least 2 feature vectors, got shape {f.shape}")
    if n > d:
        fitted = FrechetStats.from_features(f)
        return frechet_distance(fitted.mu, fitted.sigma, mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"mismatched statistics: features {f.shape}, mu {mu.shape}, "
                         f"sigma {sigma.shape}")
    if not (np.isfinite(f).all() and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("Fréchet distance of non-finite statistics (NaN/inf features)")
    mean = f.mean(axis=0)
    a = (f - mean) / np.sqrt(n - 1)  # (N, D)
    small = a @ sigma @ a.T  # (N, N)
    eig = np.linalg.eigvalsh((small + small.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mean - mu
    return float(diff @ diff + (a * a).sum() + np.trace(sigma) - 2 * tr_covmean)


# --- feature extractors ------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureSpec:
    name: str  # "inception" | "random"
    metric_name: str  # "fid" | "fd_random"
    weights_path: str | None
    description: str  # what the features are, for logs and reports

    @property
    def kernel_name(self) -> str:
        """The kernel distance on the same features: "kid" | "kd_random"."""
        return _extractor(self.name).kernel_name


def hub_cache_weights() -> Path:
    """Where torch-fidelity's (and torchmetrics') download of the Inception weights lands."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def how_to_get_weights() -> str:
    return (f"FID needs the pt_inception-2015-12-05 weights that torch-fidelity uses: "
            f"`stain-search weights fetch` downloads them (or download {INCEPTION_URL} on a "
            f"machine with internet and point `eval.fid_weights` or ${WEIGHTS_ENV} at the file, "
            f"or copy it to {hub_cache_weights()}). Or set `eval.feature_extractor: random` to "
            f"log `fd_random` instead of FID.")


def find_inception_weights(eval_cfg: EvalConfig) -> tuple[Path | None, str]:
    """(path, where it came from) in resolution order; a named path that is missing is an error."""
    for where, value in (("`eval.fid_weights`", eval_cfg.fid_weights),
                         (f"${WEIGHTS_ENV}", os.environ.get(WEIGHTS_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"{where} = {value}: no such file. {how_to_get_weights()}")
            return path, where
    cached = hub_cache_weights()
    return (cached, "torch hub cache") if cached.is_file() else (None, "")


def load_inception_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (weights_only), or say plainly why the file is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user problem
        raise ConfigError(f"{path}: not a readable PyTorch weights file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}). "
                          f"{how_to_get_weights()}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state dict of tensors. {how_to_get_weights()}")
    return dict(state)


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 ("inception-v3-compat"), pool3 2048-d features.

    torch-fidelity takes uint8 (B, 3, H, W) and resizes to 299² itself, as the
    TensorFlow original did. We hand it the state dict we loaded with
    ``weights_only=True`` by standing in for its downloader: its own loader
    would fully unpickle a local path, or fetch the URL.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as tfi  # slow import: only when used

        state = load_inception_state(weights_path)
        with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: state):
            try:
                self.net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            except RuntimeError as err:  # load_state_dict: missing/unexpected keys, wrong shapes
                raise ConfigError(f"{weights_path}: not the Inception-v3 weights torch-fidelity "
                                  f"expects ({str(err).splitlines()[0]}). {how_to_get_weights()}") from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W); round: exact for 8-bit data
        (features,) = self.net(u8)
        return features.double()  # (B, 2048)


class RandomConvFeatures(nn.Module):
    """A fixed, seeded, randomly initialised CNN — NOT Inception.

    Four conv3x3-ReLU-avgpool blocks; the global mean of every block's output
    is concatenated (32+64+128+256 = 480-d), so the features see colour
    (early blocks) and texture (late ones). Weights are drawn from a private
    generator with He scaling, independent of the global RNG and of torch's
    default initialisers, so two instantiations — on any machine — agree.
    """

    WIDTHS = (32, 64, 128, 256)

    def __init__(self, *, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], 3
        for c_out in self.WIDTHS:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2 / (c_in * 9)) ** 0.5)
                conv.bias.zero_()
            convs.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * 2 - 1  # (B, 3, H, W) in [-1, 1]
        pooled = []
        for conv in self.convs:
            h = torch.relu(conv(h))
            pooled.append(h.mean(dim=(2, 3)))  # (B, C_i)
            h = nn.functional.avg_pool2d(h, 2, ceil_mode=True)
        return torch.cat(pooled, dim=1).double()  # (B, 480)


@dataclass(frozen=True)
class Extractor:
    metric_name: str  # the Fréchet distance on these features
    kernel_name: str  # the kernel distance (KID) on these features
    identity: str  # what the cached reference features depend on
    build: Callable[[FeatureSpec], nn.Module]


RANDOM_SEED = 0
FEATURE_EXTRACTORS: dict[str, Extractor] = {
    "inception": Extractor("fid", "kid", "inception-v3-compat/pt_inception-2015-12-05/pool3",
                           lambda spec: InceptionFeatures(spec.weights_path)),
    "random": Extractor("fd_random", "kd_random", f"random-conv-v1/seed{RANDOM_SEED}",
                        lambda spec: RandomConvFeatures(seed=RANDOM_SEED)),
}


def _extractor(name: str) -> Extractor:
    if name not in FEATURE_EXTRACTORS:
        raise ConfigError(f"`eval.feature_extractor`: unknown {name!r} "
                          f"(known: auto, {', '.join(FEATURE_EXTRACTORS)})")
    return FEATURE_EXTRACTORS[name]


def random_spec(*, reason: str = "") -> FeatureSpec:
    return FeatureSpec(
        "random", "fd_random", None,
        f"{reason}fixed random CNN features (random-conv-v1, seed {RANDOM_SEED}, 480-d), NOT "
        f"Inception: `fd_random` is comparable only with other fd_random values, never with FID")


_WARNED: list[bool] = []


def resolve_feature_extractor(eval_cfg: EvalConfig) -> FeatureSpec:
    """Decide which features the Fréchet metric uses — and so whether it may be called FID."""
    choice = eval_cfg.feature_extractor
    if choice == "random":
        return random_spec()
    if choice != "auto":
        _extractor(choice)
    weights, where = find_inception_weights(eval_cfg)
    if weights is not None:
        return FeatureSpec("inception", "fid", str(weights),
                           f"Inception-v3 pool3 (2048-d), pt_inception-2015-12-05 weights from "
                           f"{weights} ({where})")
    if choice == "inception":
        raise ConfigError(f"`eval.feature_extractor` is 'inception' but no weights were found "
                          f"(`eval.fid_weights` unset, ${WEIGHTS_ENV} unset, nothing at "
                          f"{hub_cache_weights()}). {how_to_get_weights()}")
    spec = random_spec(reason="no Inception weights found; ")
    if _WARNED:  # once per process: validation and training both resolve
        return spec
    _WARNED.append(True)
    # One sentence, once per process (the driver resolves for every trial).
    logger.warning("FID unavailable (no Inception weights found): logging `fd_random` on random "
                   "features instead; `stain-search weights fetch` gets the weights")
    return spec


def build_feature_extractor(spec: FeatureSpec, device: torch.device | str) -> nn.Module:
    """A frozen module mapping (B, 3, H, W) images in [0, 1] to (B, D) float64 features."""
    return _extractor(spec.name).build(spec).to(device).eval()


# --- the stateful metric -----------------------------------------------------------------

def reference_key(images: Iterable[torch.Tensor], identity: str) -> str:
    """Hash of the reference crops' 8-bit pixels (and shapes) and the extractor's identity."""
    h = hashlib.sha256(identity.encode())
    for batch in images:  # (B, 3, H, W) in [0, 1]
        u8 = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        for crop in u8.numpy():  # per crop, so how the crops are batched leaves the key alone
            h.update(str(crop.shape).encode())
            h.update(crop.tobytes())
    return h.hexdigest()


class FrechetDistance:
    """Accumulates features of generated (and optionally real) images; ``compute()`` → FD.

    Reference features of the real images come either from ``update(...,
    real=True)`` or, cached by content, from ``reference_stats``.
    """

    def __init__(self, spec: FeatureSpec, *, device: torch.device | str = "cpu",
                 cache_dir: str | Path | None = None, extractor: nn.Module | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.extractor = extractor if extractor is not None else build_feature_extractor(spec, self.device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        self.reference: FrechetStats | None = None
        self.reference_features: np.ndarray | None = None  # (N, D), for the kernel distance
        self.reference_key: str | None = None
        self._fake: list[np.ndarray] = []
        self._real: list[np.ndarray] = []

    @property
    def metric_name(self) -> str:
        return self.spec.metric_name

    @property
    def identity(self) -> str:
        return _extractor(self.spec.name).identity

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) in [0, 1] → (B, D) float64."""
        return self.extractor(images.to(self.device, torch.float32)).cpu().numpy()

    def update(self, images: torch.Tensor, real: bool) -> None:
        (self._real if real else self._fake).append(self.features(images))

    def reset(self) -> None:
        """Forget accumulated features; cached reference statistics stay."""
        self._fake, self._real = [], []

    def fake_features(self) -> np.ndarray:
        if not self._fake:
            raise ValueError("FrechetDistance: no generated images yet (update(real=False))")
        return np.concatenate(self._fake)

    def real_features(self) -> np.ndarray:
        """Features of the real images: those updated with real=True, else the reference's."""
        if self._real:
            return np.concatenate(self._real)
        if self.reference_features is not None:
            return self.reference_features
        raise ValueError("FrechetDistance has no real-image statistics: call "
                         "update(images, real=True) or reference_stats(...) first")

    def compute(self) -> float:
        if not self._fake:
            raise ValueError("FrechetDistance.compute() before any update(real=False)")
        if self._real:
            real = FrechetStats.from_features(np.concatenate(self._real))
        elif self.reference is not None:
            real = self.reference
        else:
            raise ValueError("FrechetDistance has no real-image statistics: call "
                             "update(images, real=True) or reference_stats(...) first")
        return frechet_distance_to_samples(np.concatenate(self._fake), real.mu, real.sigma)

    def stats_path(self, key: str) -> Path:
        return self.cache_dir / "fid_stats" / f"{self.metric_name}-{key[:32]}.npz"

    def reference_stats(self, images: Sequence[torch.Tensor]) -> FrechetStats:
        """Real-image statistics of these (B, 3, H, W) batches in [0, 1], cached by content.

        The images are hashed on every call (cheap); features are extracted
        only when no cached file has the same pixels and extractor — with a
        progress bar at a terminal ("fid reference features … 12/32 crops"),
        silent elsewhere and in Ray trials.
        """
        key = reference_key(images, self.identity)
        path = self.stats_path(key)
        features = self._load(path, key)
        if features is None:
            feats = []
            with progress(f"{self.metric_name} reference features",
                          total=sum(b.shape[0] for b in images), unit="crops") as advance:
                for batch in images:
                    feats.append(self.features(batch))
                    advance(batch.shape[0])
            features = np.concatenate(feats) if feats else np.zeros((0, 0))
            stats = FrechetStats.from_features(features)  # checks N ≥ 2 before caching
            self._save(path, features, key=key)
        else:
            stats = FrechetStats.from_features(features)
        self.reference, self.reference_features, self.reference_key = stats, features, key
        return stats

    @staticmethod
    def _load(path: Path, key: str) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:  # a 32-hex-digit prefix collision, or an old format
                    logger.warning("%s holds other reference images: recomputing", path)
                    return None
                return np.asarray(z["features"], np.float64)
        except (OSError, KeyError, ValueError) as err:
            logger.warning("unreadable reference statistics %s (%s): recomputing", path, err)
            return None

    @staticmethod
    def _save(path: Path, features: np.ndarray, *, key: str) -> None:
        """Write atomically: concurrent trials on one dataset may race to the same file."""
        try:
            with atomic_path(path) as tmp, open(tmp, "xb") as fh:
                np.savez(fh, features=features, key=key)
        except OSError as err:  # a read-only cache costs time, not correctness
            logger.warning("could not cache reference statistics at %s: %s", path, err)
