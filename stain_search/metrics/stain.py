"""Stain-specific agreement: does the translation put the stain where, and as much as, the real one?

What a pathologist reads off a special stain is the amount and extent of
one dye: brown DAB in IHC (Ki-67, HER2), blue methyl blue in Masson's
trichrome (collagen), magenta PAS. Colour deconvolution (Ruifrok &
Johnston, 2001) recovers each dye's optical density (OD) per pixel; the
matrices are scikit-image's (``hed_from_rgb``, ``bpx_from_rgb``,
``hpx_from_rgb``, from Landini's colour-deconvolution plugin).

A pixel is stain-positive when its stain's OD is at least
:data:`POSITIVE_OD` **and** at least :data:`DOMINANCE` of the pixel's
deconvolved OD: grey absorbs every colour and so deconvolves into a bit of
every dye (under the trichrome matrix, neutral grey is 0.93 methyl blue +
0.96 ponceau-fuchsin + 0.49 residual), which is why a plain channel mean
cannot tell a grey, failed translation from real trichrome. The dominance
rule makes grey negative for every stain here. Per crop:

- ``area`` — the stain-positive fraction of the crop's pixels;
- ``od`` — the stain OD the crop holds: the mean over its pixels of the
  stain's OD on positive pixels (0 elsewhere).

Metrics over an evaluation set:

- ``stain_od_r`` (paired; higher is better) — Pearson r of per-crop ``od``
  between outputs and their aligned targets; 0 when either side is
  constant (a constant explains none of the other's variation);
- ``stain_area_error`` (lower is better) — |mean ``area`` of outputs −
  mean ``area`` of real-stain crops|, e.g. collagen 23 % vs 27 % → 0.04.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.color import bpx_from_rgb, hed_from_rgb, hpx_from_rgb

from stain_search.data.stain import od_from_rgb

POSITIVE_OD = 0.15  # ≈30 % of the light absorbed by the dye: visibly stained, above glass
DOMINANCE = 0.5  # the stain must carry at least half of the pixel's deconvolved OD


@dataclass(frozen=True)
class StainChannel:
    label: str  # what the channel shows, for logs
    from_rgb: np.ndarray  # (3, 3) OD → dye amounts (scikit-image's deconvolution matrix)
    channel: int  # the dye read off


STAIN_CHANNELS: dict[str, StainChannel] = {
    "dab": StainChannel("DAB (haematoxylin-eosin-DAB matrix)", hed_from_rgb, 2),
    "methyl_blue": StainChannel("methyl blue, collagen (methyl blue / ponceau-fuchsin matrix)",
                                bpx_from_rgb, 0),
    "pas": StainChannel("PAS (haematoxylin-PAS matrix)", hpx_from_rgb, 1),
}

# A dataset's target stain (DatasetFiles.stain, or `eval.stain`) → the channel its metrics read.
DATASET_STAINS: dict[str, str] = {
    "ki67": "dab", "her2": "dab", "ihc": "dab", "dab": "dab",
    "trichrome": "methyl_blue", "pas": "pas",
}


def stain_channel(stain: str | None) -> StainChannel | None:
    """The channel read for a dataset's stain; None when it is unknown or has none."""
    if not stain:
        return None
    key = DATASET_STAINS.get(stain.lower().replace("-", "").replace("_", ""))
    return STAIN_CHANNELS[key] if key else None


def stain_maps(images: torch.Tensor, channel: StainChannel) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, H, W) in [0, 1] → the stain's OD (B, H, W) and its positive mask (B, H, W)."""
    rgb = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0
    amounts = od_from_rgb(rgb) @ channel.from_rgb.astype(np.float32)  # (B, H, W, K)
    od = amounts[..., channel.channel]
    total = np.clip(amounts, 0, None).sum(-1)
    positive = (od >= POSITIVE_OD) & (od >= DOMINANCE * total)
    return od, positive


@dataclass(frozen=True)
class CropStain:
    area: np.ndarray  # (B,) stain-positive fraction of each crop
    od: np.ndarray  # (B,) mean stain OD on positive pixels, 0 elsewhere


def crop_stain(images: torch.Tensor, channel: StainChannel) -> CropStain:
    """Per-crop positive-area fraction and stain OD of (B, 3, H, W) images in [0, 1]."""
    od, positive = stain_maps(images, channel)
    return CropStain(area=positive.mean(axis=(1, 2)).astype(np.float64),
                     od=np.where(positive, od, 0).mean(axis=(1, 2)).astype(np.float64))


def stain_od_r(output_od: np.ndarray, target_od: np.ndarray) -> float:
    """Pearson r of per-crop stain OD, output vs aligned target; 0 if either is constant."""
    a, b = np.asarray(output_od, np.float64), np.asarray(target_od, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"stain_od_r needs two aligned 1-d arrays of ≥ 2 crops, got "
                         f"{a.shape} and {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])  # scipy.stats' pearsonr, without its 0.6 s import


def stain_area_error(output_area: np.ndarray, real_area: np.ndarray) -> float:
    """|mean positive-area fraction of outputs − that of real-stain crops| (0…1)."""
    return float(abs(np.mean(output_area) - np.mean(real_area)))
