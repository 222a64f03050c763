"""Evaluation of a CycleGAN's stain translation G: X→Y (H&E → stain), once per epoch.

What each number means (the README's "Metrics" section says the same for users):

- ``fid`` / ``fd_random`` — Fréchet distance between G's outputs and real
  stained images (Heusel et al., 2017); ``fid`` only with the standard
  Inception weights, else ``fd_random`` (see :mod:`stain_search.metrics.frechet`).
  Small evaluation sets bias it upwards: compare only at equal set sizes,
  which is why ``fd_n`` (its sample count) is reported beside it.
- ``kid`` / ``kd_random`` — kernel distance (KID, Bińkowski et al., 2018) on
  the same features, unbiased at any sample size, with ``…_std`` its spread
  over random subsets (:mod:`stain_search.metrics.kernel`).
- ``stain_area_error``, ``stain_od_r`` — does the output hold as much of the
  target stain, and in the same crops, as the real stain
  (:mod:`stain_search.metrics.stain`); only where the dataset's stain is known.
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
metrics take [0, 1]. The evaluation set is ``data.eval_crops`` tissue crops
(:mod:`stain_search.data.eval_crops`); outputs are kept in memory for the
diversity measure (at most ``DIVERSITY_IMAGES`` of them).

Besides metrics, ``evaluate`` returns the sample counts of :data:`COUNT_KEYS`
(``eval_crops``, ``fd_n``) and the stain areas of :data:`INFO_KEYS`: numbers
to log beside the metrics (as run params, for the counts), never objectives.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.nn as nn

from stain_search.config import EvalConfig
from stain_search.errors import ConfigError, TrainingDiverged
from stain_search.metrics.frechet import FeatureSpec, FrechetDistance, resolve_feature_extractor
from stain_search.metrics.kernel import kernel_distance
from stain_search.metrics.nuclei import PositiveNucleiF1
from stain_search.metrics.ssim import psnr, ssim, ssim_structure
from stain_search.metrics.stain import crop_stain, stain_area_error, stain_channel, stain_od_r

logger = logging.getLogger(__name__)

Direction = Literal["min", "max"]
METRIC_DIRECTIONS: dict[str, Direction] = {
    "fid": "min",
    "fd_random": "min",
    "kid": "min",
    "kid_std": "min",
    "kd_random": "min",
    "kd_random_std": "min",
    "stain_area_error": "min",
    "stain_od_r": "max",
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
# Reported beside the metrics, without a direction: how many crops each number is over
# (log them as run params), and the two stain areas stain_area_error compares.
COUNT_KEYS = ("eval_crops", "fd_n")
INFO_KEYS = ("stain_area_output", "stain_area_real")


def metric_directions() -> dict[str, Direction]:
    """Every metric this module can report → whether lower or higher is better."""
    return dict(METRIC_DIRECTIONS)


def _normalise_stain(stain: str | None) -> str | None:
    return stain.lower().replace("-", "").replace("_", "") if stain else None


def reported_metrics(eval_cfg: EvalConfig, *, has_pairs: bool, stain: str | None,
                     spec: FeatureSpec | None = None) -> list[str]:
    """The metric names an Evaluator with these settings reports (≥ 2 evaluation images)."""
    spec = spec or resolve_feature_extractor(eval_cfg)
    names = [spec.metric_name, spec.kernel_name, f"{spec.kernel_name}_std", "ssim_structure",
             "ssim_cycle", "output_diversity"]
    has_channel = stain_channel(stain) is not None
    if has_channel:
        names.append("stain_area_error")
    if has_pairs:
        names += ["ssim_gt", "psnr_gt"]
        if has_channel:
            names.append("stain_od_r")
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
        self.dataset_key = dataset_key  # a label for logs
        self.has_pairs = has_pairs
        self.stain = stain
        self.device = torch.device(device)
        self.spec = resolve_feature_extractor(eval_cfg)
        self.frechet = FrechetDistance(self.spec, device=self.device, cache_dir=cache_dir)
        self.ki67 = has_pairs and eval_cfg.ki67_f1 and _normalise_stain(stain) in NUCLEAR_DAB_STAINS
        self.channel = stain_channel(stain)
        self.reference_area: np.ndarray | None = None  # per real-stain crop positive area

    @property
    def metric_names(self) -> list[str]:
        return reported_metrics(self.cfg, has_pairs=self.has_pairs, stain=self.stain, spec=self.spec)

    @property
    def reference_key(self) -> str | None:
        """The reference cache's key (pixels + extractor), once prepared."""
        return self.frechet.reference_key

    def describe(self) -> str:
        ref = self.frechet.reference
        refs = f"{ref.n} real-stain crops" if ref is not None else "not prepared yet"
        stain = (f"; stain metrics on {self.channel.label}" if self.channel is not None
                 else f"; no stain metrics (stain {self.stain!r} unknown: set `eval.stain`)")
        return (f"{self.spec.metric_name} and {self.spec.kernel_name} on {self.spec.description}; "
                f"reference: {refs} ({self.dataset_key}){stain}; "
                f"metrics: {', '.join(self.metric_names)}")

    def _set_reference(self, batches: list[torch.Tensor]) -> None:
        """batches: (B, 3, H, W) in [0, 1]."""
        self.frechet.reference_stats(batches)
        if self.channel is not None:
            self.reference_area = np.concatenate([crop_stain(b, self.channel).area for b in batches])

    def prepare_reference(self, reference_batches: Iterable[torch.Tensor]) -> None:
        """Statistics of the real stained crops ((B, 3, H, W) in [-1, 1]), cached on disk."""
        batches = [to_unit(b) for b in reference_batches]
        n = sum(b.shape[0] for b in batches)
        if n < 2:
            raise ConfigError(f"the Fréchet and kernel distances need at least 2 real "
                              f"evaluation crops of {self.dataset_key}, got {n}: raise "
                              f"`data.eval_crops` or add test images")
        self._set_reference(batches)

    def evaluate(self, generator_g: nn.Module, generator_f: nn.Module,
                 batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
        """Run G (and F for the cycle) over the evaluation batches; return mean metrics.

        Each batch is {"A": H&E, "B": real stain (optional)}, (B, 3, H, W) in
        [-1, 1]; "B" is the aligned target when the dataset has pairs. Without
        ``prepare_reference``, the "B" images seen here become the reference.
        """
        per_image: dict[str, list[torch.Tensor]] = {}
        kept_inputs, kept_outputs, real_b = [], [], []
        out_stain, target_stain = [], []
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
                if self.channel is not None:
                    out_stain.append(crop_stain(y01, self.channel))
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
                        if self.channel is not None:
                            target_stain.append(crop_stain(target, self.channel))
                        if nuclei is not None:
                            nuclei.update(y01, target)

        metrics = {name: float(torch.cat(values).mean()) for name, values in per_image.items()}
        if self.frechet.reference is None and sum(b.shape[0] for b in real_b) >= 2:
            self._set_reference(real_b)
        n_fake = sum(f.shape[0] for f in self.frechet._fake)
        metrics["eval_crops"] = n_fake
        if self.frechet.reference is not None and n_fake >= 2:
            metrics.update(self._distances())
        else:
            logger.warning("%s and %s not computed: %s", self.spec.metric_name,
                           self.spec.kernel_name, "need at least 2 evaluation crops"
                           if n_fake < 2 else "no real stained images (call prepare_reference)")
        if out_stain:
            metrics.update(self._stain_metrics(out_stain, target_stain))
        if kept_inputs:
            diversity = output_diversity(torch.cat(kept_inputs)[:DIVERSITY_IMAGES],
                                         torch.cat(kept_outputs)[:DIVERSITY_IMAGES])
            if diversity is not None:
                metrics["output_diversity"] = diversity
        if nuclei is not None:
            metrics["ki67_f1"] = nuclei.compute()["f1"]
        return metrics

    def _distances(self) -> dict[str, float]:
        """FD and KD of this evaluation's outputs to the reference, with their sample count."""
        fake, real = self.frechet.fake_features(), self.frechet.real_features()
        kd = kernel_distance(fake, real, subsets=self.cfg.kid_subsets,
                             subset_size=self.cfg.kid_subset_size)
        name = self.spec.kernel_name
        return {self.spec.metric_name: self.frechet.compute(), "fd_n": len(fake),
                name: kd.mean, f"{name}_std": kd.std}

    def _stain_metrics(self, outputs: list, targets: list) -> dict[str, float]:
        area = np.concatenate([s.area for s in outputs])
        metrics: dict[str, float] = {"stain_area_output": float(area.mean())}
        if self.reference_area is not None:
            metrics["stain_area_real"] = float(self.reference_area.mean())
            metrics["stain_area_error"] = stain_area_error(area, self.reference_area)
        if targets and len(area) >= 2:
            metrics["stain_od_r"] = stain_od_r(np.concatenate([s.od for s in outputs]),
                                               np.concatenate([s.od for s in targets]))
        return metrics


def sample_grid(generator_g: nn.Module, generator_f: nn.Module,
                batch: Mapping[str, torch.Tensor], *, rows: int,
                device: torch.device | str | None = None) -> np.ndarray:
    """Image grid, one row per input: input | G(input) | F(G(input)) | target (if "B").

    Returns (H, W, 3) uint8 with 2-px white gutters, as torchvision's ``make_grid``
    lays them out (tests/test_evaluate.py compares the two).
    """
    x = batch["A"][:rows]
    device = torch.device(device) if device is not None else _device_of(generator_g)
    with eval_mode(generator_g, generator_f), torch.no_grad():
        fake = generator_g(x.to(device))
        rec = generator_f(fake)
    columns = [x, fake, rec] + ([batch["B"][:rows]] if "B" in batch else [])
    tiles = torch.stack([to_unit(torch.nan_to_num(c.detach().cpu())) for c in columns], dim=1)
    grid = tile_grid(tiles)  # (3, H, W)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def tile_grid(tiles: torch.Tensor, *, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(rows, cols, C, h, w) tiles → one (C, H, W) image, ``padding`` px of
    ``pad_value`` around and between them: ``torchvision.utils.make_grid``'s
    layout. Not torchvision's own: importing torchvision loads torch._dynamo
    with it (2-4 s on 2 cores), in every trial process and every CLI command
    that resolves an objective, for a few lines of indexing."""
    rows, cols, channels, h, w = tiles.shape
    grid = tiles.new_full((channels, rows * (h + padding) + padding,
                           cols * (w + padding) + padding), pad_value)
    for r in range(rows):
        for c in range(cols):
            top, left = padding + r * (h + padding), padding + c * (w + padding)
            grid[:, top:top + h, left:left + w] = tiles[r, c]
    return grid
