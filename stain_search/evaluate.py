"""Evaluation of a CycleGAN's stain translation G: X→Y (H&E → stain), once per epoch.

What each number means (DESIGN.md, "Metrics"):

- ``fid`` / ``fd_random`` — Fréchet distance between G's outputs and real
  stained images (Heusel et al., 2017); ``fid`` only with the standard
  Inception weights, else ``fd_random`` (see :mod:`stain_search.metrics.frechet`).
  Small evaluation sets bias it upwards: compare only at equal set sizes.
- ``ssim_structure`` — SSIM of grayscale input vs grayscale output: is the
  tissue architecture kept?
- ``ssim_gt``, ``psnr_gt`` — output vs the paired real stain (paired data only).
- ``ki67_f1`` — positive-nucleus detection F1 of output vs paired target, for
  nuclear DAB stains (:mod:`stain_search.metrics.nuclei`).
- ``ssim_cycle`` — RGB SSIM of the reconstruction F(G(x)) vs x (Zhu et al.,
  2017's cycle consistency, measured rather than optimised).
- ``output_diversity`` — mean pairwise L1 distance between outputs of
  different inputs, divided by the same for the inputs: near 0 means mode
  collapse (one image for every input), about 1 means outputs differ from
  each other as much as the inputs do.

Images arrive as the training code holds them, (B, 3, H, W) in [-1, 1]; the
metrics take [0, 1]. The evaluation set is small by design
(``data.eval_images``), so outputs are kept in memory for the diversity
measure (at most ``DIVERSITY_IMAGES`` of them).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn as nn
from torchvision.utils import make_grid

from stain_search.config import EvalConfig
from stain_search.errors import ConfigError, TrainingDiverged
from stain_search.metrics.frechet import FeatureSpec, FrechetDistance, resolve_feature_extractor
from stain_search.metrics.nuclei import PositiveNucleiF1
from stain_search.metrics.ssim import psnr, ssim, ssim_structure

logger = logging.getLogger(__name__)

Direction = Literal["min", "max"]
METRIC_DIRECTIONS: dict[str, Direction] = {
    "fid": "min",
    "fd_random": "min",
    "ssim_structure": "max",
    "ssim_gt": "max",
    "psnr_gt": "max",
    "ki67_f1": "max",
    "ssim_cycle": "max",
    "output_diversity": "max",
}

# Target stains whose positive cells are DAB-brown nuclei. HER2 (BCI, MIST) stains
# membranes, where a nucleus detector would measure blob overlap under a false name.
NUCLEAR_DAB_STAINS = ("ki67",)
DIVERSITY_IMAGES = 64  # pairwise distances grow as N²; this many are plenty for a ratio


def metric_directions() -> dict[str, Direction]:
    """Every metric this module can report → whether lower or higher is better."""
    return dict(METRIC_DIRECTIONS)


def _normalise_stain(stain: str | None) -> str | None:
    return stain.lower().replace("-", "").replace("_", "") if stain else None


def reported_metrics(eval_cfg: EvalConfig, *, has_pairs: bool, stain: str | None,
                     spec: FeatureSpec | None = None) -> list[str]:
    """The metric names an Evaluator with these settings reports (≥ 2 evaluation images)."""
    spec = spec or resolve_feature_extractor(eval_cfg)
    names = [spec.metric_name, "ssim_structure", "ssim_cycle", "output_diversity"]
    if has_pairs:
        names += ["ssim_gt", "psnr_gt"]
        if eval_cfg.ki67_f1 and _normalise_stain(stain) in NUCLEAR_DAB_STAINS:
            names.append("ki67_f1")
    return names


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped (generators with a tanh head stay inside anyway)."""
    return (x.float().clamp(-1, 1) + 1) / 2


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode; afterwards restore every submodule's own flag."""
    states = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, was_training in states:  # parents come before children: children win
            m.train(was_training)


def mean_pairwise_l1(x: torch.Tensor) -> float:
    """Mean over pairs i < j of mean |x_i − x_j|, for (N, ...) with N ≥ 2."""
    flat = x.flatten(1).double()  # (N, D)
    n = flat.shape[0]
    total = sum((flat[i + 1:] - flat[i]).abs().mean(dim=1).sum() for i in range(n - 1))
    return float(total) / (n * (n - 1) / 2)


def output_diversity(inputs: torch.Tensor, outputs: torch.Tensor) -> float | None:
    """Pairwise output spread relative to input spread; None when undefined (N < 2, equal inputs)."""
    if inputs.shape[0] < 2:
        return None
    spread_in = mean_pairwise_l1(inputs)
    return mean_pairwise_l1(outputs) / spread_in if spread_in > 0 else None


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class Evaluator:
    """Per-epoch metrics for one dataset; reference statistics are prepared once."""

    def __init__(self, eval_cfg: EvalConfig, *, dataset_key: str, has_pairs: bool,
                 stain: str | None, device: torch.device | str,
                 cache_dir: str | Path | None = None):
        self.cfg = eval_cfg
        self.dataset_key = dataset_key
        self.has_pairs = has_pairs
        self.stain = stain
        self.device = torch.device(device)
        self.spec = resolve_feature_extractor(eval_cfg)
        self.frechet = FrechetDistance(self.spec, device=self.device, cache_dir=cache_dir)
        self.ki67 = has_pairs and eval_cfg.ki67_f1 and _normalise_stain(stain) in NUCLEAR_DAB_STAINS

    @property
    def metric_names(self) -> list[str]:
        return reported_metrics(self.cfg, has_pairs=self.has_pairs, stain=self.stain, spec=self.spec)

    def describe(self) -> str:
        ref = self.frechet.reference
        refs = f"{ref.n} real images" if ref is not None else "not prepared yet"
        return (f"{self.spec.metric_name} on {self.spec.description}; reference statistics: "
                f"{refs} ({self.dataset_key}); metrics: {', '.join(self.metric_names)}")

    def prepare_reference(self, reference_batches: Iterable[torch.Tensor]) -> None:
        """Statistics of the real stained images ((B, 3, H, W) in [-1, 1]), cached on disk."""
        batches = list(reference_batches)
        n = sum(b.shape[0] for b in batches)
        if n < 2:
            raise ConfigError(f"the Fréchet distance needs at least 2 real evaluation images of "
                              f"{self.dataset_key}, got {n}: raise `data.eval_images` or add "
                              f"test images")
        self.frechet.reference_stats(self.dataset_key, (to_unit(b) for b in batches))

    def evaluate(self, generator_g: nn.Module, generator_f: nn.Module,
                 batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Run G (and F for the cycle) over the evaluation batches; return mean metrics.

        Each batch is {"A": H&E, "B": real stain (optional)}, (B, 3, H, W) in
        [-1, 1]; "B" is the paired target when the dataset has pairs. Without
        ``prepare_reference``, the "B" images seen here become the reference.
        """
        per_image: dict[str, list[torch.Tensor]] = {}
        kept_inputs, kept_outputs, real_b = [], [], []
        nuclei = PositiveNucleiF1() if self.ki67 else None
        self.frechet.reset()

        def add(name: str, values: torch.Tensor) -> None:
            per_image.setdefault(name, []).append(values.cpu())

        with eval_mode(generator_g, generator_f), torch.no_grad():
            for batch in batches:
                x = batch["A"].to(self.device)
                fake = generator_g(x)
                if not torch.isfinite(fake).all():
                    raise TrainingDiverged("G produced NaN/inf images at evaluation: the "
                                           "trial diverged (try a lower `optim.lr_g`)")
                x01, y01 = to_unit(x), to_unit(fake)
                add("ssim_structure", ssim_structure(x01, y01))
                add("ssim_cycle", ssim(to_unit(generator_f(fake)), x01))
                self.frechet.update(y01, real=False)
                if sum(t.shape[0] for t in kept_inputs) < DIVERSITY_IMAGES:
                    kept_inputs.append(x01.cpu())
                    kept_outputs.append(y01.cpu())
                if "B" in batch:
                    target = to_unit(batch["B"].to(self.device))
                    if self.frechet.reference is None:
                        real_b.append(target.cpu())
                    if self.has_pairs:
                        add("ssim_gt", ssim(y01, target))
                        add("psnr_gt", psnr(y01, target))
                        if nuclei is not None:
                            nuclei.update(y01, target)

        metrics = {name: float(torch.cat(values).mean()) for name, values in per_image.items()}
        if self.frechet.reference is None and sum(b.shape[0] for b in real_b) >= 2:
            self.frechet.reference_stats(self.dataset_key, iter(real_b))
        n_fake = sum(b.shape[0] for b in kept_inputs)
        if self.frechet.reference is not None and n_fake >= 2:
            metrics[self.spec.metric_name] = self.frechet.compute()
        else:
            logger.warning("%s not computed: %s", self.spec.metric_name,
                           "need at least 2 evaluation images" if n_fake < 2
                           else "no real stained images (call prepare_reference)")
        if kept_inputs:
            diversity = output_diversity(torch.cat(kept_inputs)[:DIVERSITY_IMAGES],
                                         torch.cat(kept_outputs)[:DIVERSITY_IMAGES])
            if diversity is not None:
                metrics["output_diversity"] = diversity
        if nuclei is not None:
            metrics["ki67_f1"] = nuclei.compute()["f1"]
        return metrics


def sample_grid(generator_g: nn.Module, generator_f: nn.Module,
                batch: Mapping[str, torch.Tensor], *, rows: int,
                device: torch.device | str | None = None) -> np.ndarray:
    """Image grid, one row per input: input | G(input) | F(G(input)) | target (if "B").

    Returns (H, W, 3) uint8 with 2-px white gutters (torchvision's make_grid).
    """
    x = batch["A"][:rows]
    device = torch.device(device) if device is not None else _device_of(generator_g)
    with eval_mode(generator_g, generator_f), torch.no_grad():
        fake = generator_g(x.to(device))
        rec = generator_f(fake)
    columns = [x, fake, rec] + ([batch["B"][:rows]] if "B" in batch else [])
    tiles = torch.stack([to_unit(torch.nan_to_num(c.detach().cpu())) for c in columns], dim=1)
    grid = make_grid(tiles.flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)  # (3, H, W)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
