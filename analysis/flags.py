"""Flags for what a pathologist would worry about in a trial's outputs.

- **Structure lost** (hallucination): the Fréchet distance (realism of the
  stain) improves while ``ssim_structure`` (does the output keep the input's
  tissue architecture?) falls. A CycleGAN can make a more convincing stain by
  inventing or erasing cells — the failure Cohen et al. (MICCAI 2018,
  "Distribution matching losses can hallucinate features") warn about.
  Checked within each trial over its epochs (against its own best structure
  so far) and across trials (a better-than-median Fréchet distance bought
  with a clearly worse-than-median structure).
- **Mode collapse**: outputs that barely vary across inputs. The evaluator
  logs ``output_diversity`` = mean pairwise L1 distance between outputs /
  the same between inputs; near 0 means one image for every input. Flagged
  below an absolute floor, or well below the search's typical trial.

Thresholds are keyword arguments; the defaults are deliberately loose (a
flag is a prompt to look at the trial's sample grid, not a verdict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

STRUCTURE_DROP = 0.1  # SSIM points lost from the best seen; SSIM lives in [-1, 1]
DIVERSITY_FLOOR = 0.25  # outputs differ a quarter as much as the inputs do
DIVERSITY_RELATIVE = 0.5  # ... or half as much as the search's median trial


@dataclass(frozen=True)
class Flag:
    trial: str
    kind: str  # "structure_loss" | "mode_collapse"
    epoch: int | None
    message: str


def frechet_metric(columns) -> str | None:
    """The Fréchet metric a search logged: ``fid`` with Inception weights, else ``fd_random``."""
    return next((m for m in ("fid", "fd_random") if m in columns), None)


def _epochs(frame: pd.DataFrame, trial: str, cols: list[str]) -> pd.DataFrame:
    rows = frame[frame["trial"] == trial].dropna(subset=cols)
    return rows.sort_values("epoch")


def structure_within_trials(frame: pd.DataFrame, *, drop: float = STRUCTURE_DROP) -> list[Flag]:
    """Epochs where the Fréchet distance beat the epoch of the trial's best structure
    so far while ssim_structure fell at least ``drop`` below it (worst epoch per trial)."""
    fd = frechet_metric(frame.columns)
    if fd is None or "ssim_structure" not in frame.columns:
        return []
    flags = []
    for trial in frame["trial"].unique():
        rows = _epochs(frame, trial, [fd, "ssim_structure"])
        ssim, dist, epochs = (rows["ssim_structure"].to_numpy(), rows[fd].to_numpy(),
                              rows["epoch"].to_numpy())
        worst = None
        for e in range(1, len(rows)):
            ref = int(np.argmax(ssim[: e + 1]))  # the best structure up to here
            lost = ssim[ref] - ssim[e]
            if dist[e] < dist[ref] and lost >= drop and (worst is None or lost > worst[0]):
                worst = (lost, ref, e)
        if worst is not None:
            lost, ref, e = worst
            flags.append(Flag(str(trial), "structure_loss", int(epochs[e]),
                              f"{fd} improved {dist[ref]:.4g} → {dist[e]:.4g} (epoch "
                              f"{epochs[ref]} → {epochs[e]}) while ssim_structure fell "
                              f"{ssim[ref]:.3f} → {ssim[e]:.3f}: realism bought with tissue "
                              f"structure (possible hallucination)"))
    return flags


def structure_across_trials(finals: pd.DataFrame, *, drop: float = STRUCTURE_DROP) -> list[Flag]:
    """Trials with a better-than-median Fréchet distance and an ssim_structure at
    least ``drop`` below the median trial's (final values, one row per trial)."""
    fd = frechet_metric(finals.columns)
    if fd is None or "ssim_structure" not in finals.columns:
        return []
    rows = finals.dropna(subset=[fd, "ssim_structure"])
    if len(rows) < 3:  # a median of two says nothing
        return []
    med_fd, med_ssim = rows[fd].median(), rows["ssim_structure"].median()
    bad = rows[(rows[fd] < med_fd) & (rows["ssim_structure"] <= med_ssim - drop)]
    return [Flag(str(r["trial"]), "structure_loss", _int(r.get("epochs")),
                 f"{fd} {r[fd]:.4g} beats the search's median ({med_fd:.4g}) but "
                 f"ssim_structure {r['ssim_structure']:.3f} is well below its median "
                 f"({med_ssim:.3f}): check its samples for invented or erased cells")
            for _, r in bad.iterrows()]


def mode_collapse(finals: pd.DataFrame, *, floor: float = DIVERSITY_FLOOR,
                  relative: float = DIVERSITY_RELATIVE) -> list[Flag]:
    """Trials whose final output_diversity is below ``floor``, or below ``relative``
    × the median trial's (with at least 3 trials to take a median of)."""
    if "output_diversity" not in finals.columns:
        return []
    rows = finals.dropna(subset=["output_diversity"])
    median = rows["output_diversity"].median() if len(rows) >= 3 else None
    flags = []
    for _, r in rows.iterrows():
        d = float(r["output_diversity"])
        if d < floor:
            why = f"below {floor:g}: outputs differ {d:.2f}× as much as the inputs do"
        elif median is not None and d < relative * median:
            why = f"under {relative:g}× the search's median ({median:.3f})"
        else:
            continue
        flags.append(Flag(str(r["trial"]), "mode_collapse", _int(r.get("epochs")),
                          f"output_diversity {d:.3f} is {why} — the generator may give "
                          f"(nearly) the same image for every input (mode collapse)"))
    return flags


def all_flags(frame: pd.DataFrame, finals: pd.DataFrame, *, drop: float = STRUCTURE_DROP,
              floor: float = DIVERSITY_FLOOR, relative: float = DIVERSITY_RELATIVE) -> list[Flag]:
    """Every flag for a search: ``frame`` is trial × epoch, ``finals`` one row per trial."""
    return (structure_within_trials(frame, drop=drop) + structure_across_trials(finals, drop=drop)
            + mode_collapse(finals, floor=floor, relative=relative))


def flags_frame(flags: list[Flag]) -> pd.DataFrame:
    return pd.DataFrame([asdict(f) for f in flags], columns=["trial", "kind", "epoch", "message"])


def _int(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)
