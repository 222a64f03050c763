"""Flags for structure lost while realism improved, and for mode collapse."""

from __future__ import annotations

import pandas as pd

from stain_search.analysis.flags import (all_flags, flags_frame, frechet_metric, mode_collapse,
                                         structure_across_trials, structure_within_trials)


def epochs(trial: str, fd: list[float], ssim: list[float], diversity: float = 0.9) -> list[dict]:
    return [{"trial": trial, "epoch": e + 1, "fd_random": f, "ssim_structure": s,
             "output_diversity": diversity} for e, (f, s) in enumerate(zip(fd, ssim))]


def test_structure_loss_within_a_trial():
    frame = pd.DataFrame(
        epochs("hallucinates", [40, 35, 30, 25], [0.60, 0.62, 0.55, 0.45])  # FD ↓, SSIM ↓ 0.17
        + epochs("healthy", [40, 35, 30, 25], [0.60, 0.61, 0.62, 0.60])
        + epochs("just_bad", [40, 45, 50, 55], [0.60, 0.50, 0.40, 0.30]))  # both worse: no trade
    flags = structure_within_trials(frame)
    assert [(f.trial, f.kind, f.epoch) for f in flags] == [("hallucinates", "structure_loss", 4)]
    assert "0.620 → 0.450" in flags[0].message and "epoch 2 → 4" in flags[0].message
    assert structure_within_trials(frame, drop=0.2) == []  # the threshold is respected


def test_structure_loss_across_trials():
    finals = pd.DataFrame({"trial": ["a", "b", "c", "d", "e"], "epochs": [4] * 5,
                           "fd_random": [20.0, 30, 31, 32, 33],
                           "ssim_structure": [0.30, 0.60, 0.62, 0.61, 0.59]})
    flags = structure_across_trials(finals)
    assert [f.trial for f in flags] == ["a"]
    assert structure_across_trials(finals.head(2)) == []  # no median from two trials


def test_mode_collapse_absolute_and_relative():
    finals = pd.DataFrame({"trial": ["collapsed", "weak", "ok1", "ok2", "ok3"], "epochs": [3] * 5,
                           "output_diversity": [0.05, 0.4, 0.95, 1.0, 1.05]})
    flags = {f.trial: f for f in mode_collapse(finals)}
    assert set(flags) == {"collapsed", "weak"}
    assert "below 0.25" in flags["collapsed"].message
    assert "median" in flags["weak"].message
    assert mode_collapse(finals, floor=0.01, relative=0.0) == []


def test_all_flags_and_frame():
    frame = pd.DataFrame(epochs("x", [40, 30], [0.7, 0.5], diversity=0.1))
    finals = frame.groupby("trial").last().reset_index().assign(epochs=2)
    flags = all_flags(frame, finals)
    assert sorted(f.kind for f in flags) == ["mode_collapse", "structure_loss"]
    table = flags_frame(flags)
    assert list(table.columns) == ["trial", "kind", "epoch", "message"] and len(table) == 2
    assert all_flags(frame.drop(columns=["fd_random", "output_diversity"]), finals.drop(
        columns=["fd_random", "output_diversity"])) == []


def test_frechet_metric_prefers_fid():
    assert frechet_metric(["fid", "fd_random"]) == "fid"
    assert frechet_metric(["fd_random"]) == "fd_random"
    assert frechet_metric(["ssim_structure"]) is None
