"""The top trials' generators run on the same validation tiles, for a
side-by-side look (input | each trial's G(input) | target).

Each trial's best checkpoint is found in its folder of the search
(``trials/<trial>/checkpoint_epoch_*``, the kept one with the best first
objective in its meta.json) or, when that folder is gone, in the run's
MLflow artifact ``best/``. G is rebuilt from the checkpoint's own config
(trials may differ in architecture) and loaded without pickle.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stain_search import tracking
from stain_search.checkpoint import CheckpointError, list_checkpoints, read_checkpoint, read_meta
from stain_search.config import from_dict, load_config
from stain_search.data import EvalDataset, resolve_dataset, to_image
from stain_search.models import build_generator
from stain_search.spaces import Objective


@dataclass
class Samples:
    inputs: np.ndarray  # (N, H, W, 3) uint8 H&E tiles
    targets: np.ndarray | None  # (N, H, W, 3) uint8 real stain (paired data only)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # label → (N, H, W, 3)
    notes: list[str] = field(default_factory=list)  # trials left out, and why


def validation_tiles(base: dict[str, Any], *, n: int = 4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` evaluation tiles of the search's dataset, as training evaluates
    them: ((N, 3, H, W), targets or None) in [-1, 1]."""
    config = load_config(None, base)
    d = config.data
    files = resolve_dataset(d.path, d.layout)
    pairs = files.pairs[:n] if files.pairs else None
    inputs = [a for a, _ in pairs] if pairs else files.test_a[:n]
    items = [EvalDataset(inputs, pairs=pairs, crop=d.eval_crop or d.crop,
                         load_size=d.load_size)[i] for i in range(len(inputs))]
    x = torch.stack([it["A"] for it in items])
    y = torch.stack([it["B"] for it in items]) if pairs else None
    return x, y


def best_local_checkpoint(folder: Path, objective: Objective) -> Path | None:
    """The kept checkpoint with the best ``objective`` in its meta.json."""
    scored = []
    for ck in list_checkpoints(folder):
        value = read_meta(ck).get("metrics", {}).get(objective.metric)
        if value is not None:
            scored.append((float(value), ck))
    if not scored:
        return None
    pick = min if objective.mode == "min" else max
    return pick(scored, key=lambda t: t[0])[1]


def find_checkpoint(search, trial: str, run_id: str | None, objective: Objective, *,
                    scratch: Path) -> Path | None:
    local = best_local_checkpoint(search.sdir.trials / trial, objective)
    if local is not None or run_id is None:
        return local
    c = tracking.client(search.tracking_uri)
    if "best" not in tracking.list_artifacts(c, run_id):
        return None
    best = tracking.download_artifacts(c, run_id, "best", scratch / trial)
    found = list_checkpoints(best)
    return found[-1] if found else None


@torch.no_grad()
def translate(folder: Path, x: torch.Tensor) -> np.ndarray:
    """G of a checkpoint applied to (N, 3, H, W) → (N, H, W, 3) uint8."""
    state, meta = read_checkpoint(folder)
    g = build_generator(from_dict(meta["config"]).model)
    g.load_state_dict(state["G"])
    g.eval()
    return to_image(g(x))


def top_trial_outputs(search, trials: list[dict[str, Any]], *, n_tiles: int = 4) -> Samples:
    """Run each listed trial ({"trial", "run_id", "label"}) on the same tiles."""
    x, y = validation_tiles(search.base, n=n_tiles)
    samples = Samples(inputs=to_image(x), targets=to_image(y) if y is not None else None)
    objective = search.objectives[0]
    with tempfile.TemporaryDirectory(prefix="stain-search-report-") as scratch:
        for t in trials:
            folder = find_checkpoint(search, t["trial"], t.get("run_id"), objective,
                                     scratch=Path(scratch))
            if folder is None:
                samples.notes.append(f"{t['trial']}: no checkpoint found (neither in "
                                     f"{search.search_dir / 'trials' / t['trial']} nor in MLflow)")
                continue
            try:
                meta = read_meta(folder)
                images = translate(folder, x)
            except (CheckpointError, RuntimeError, KeyError) as err:  # one odd trial is a note
                samples.notes.append(f"{t['trial']}: {folder} could not be run ({err})")
                continue
            value = meta.get("metrics", {}).get(objective.metric)
            shown = f": {objective.metric} {value:.4g}" if isinstance(value, (int, float)) else ""
            samples.outputs[f"{t['label']}{shown}\ncheckpoint of epoch {meta['epoch']}"] = images
    return samples
