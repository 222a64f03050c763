"""Every figure is drawn, saved as a valid non-empty PNG, and readable
(log axes for log parameters, metric directions in the labels)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stain_search.analysis import plots
from stain_search.analysis.load import build_frame, trial_table
from stain_search.spaces import Objective

PARAMS = ["loss.lambda_cycle", "loss.lambda_identity", "model.attention"]
FD, SSIM = Objective("fd_random", "min"), Objective("ssim_structure", "max")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_frame(n_trials: int = 6, epochs: int = 4):
    """Trials whose FD falls with epochs and is lowest near λ = 7; one pruned."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n_trials):
        lam = float(np.exp(rng.uniform(0, np.log(50))))
        pruned = i == n_trials - 1
        fixed = {"trial": f"trial_{i:02d}", "number": i, "run_id": f"run{i}",
                 "status": "pruned" if pruned else "finished",
                 "state": "PRUNED" if pruned else "COMPLETE", "loss.lambda_cycle": lam,
                 "loss.lambda_identity": float(rng.uniform()),
                 "model.attention": ["none", "gates"][i % 2]}
        rows = []
        for e in range(1, (2 if pruned else epochs) + 1):
            rows.append({"epoch": e, "_ms": 1_000 * (10 * i + e),
                         "loss_D_X": 0.5 / e, "loss_D_Y": 0.6 / e, "loss_G": 1 + 0.1 * e,
                         "fd_random": 30 + (np.log(lam) - np.log(7)) ** 2 - e,
                         "ssim_structure": 0.5 + 0.02 * e, "output_diversity": 0.8})
        records.append((fixed, rows))
    return build_frame(records, param_keys=PARAMS)


@pytest.fixture(scope="module")
def frame():
    return synthetic_frame()


@pytest.fixture(scope="module")
def table(frame):
    return trial_table(frame, params=PARAMS, objectives=[FD])


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 200 and im.height > 150
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_frame_is_tidy(frame, table):
    assert len(frame) == 5 * 4 + 2  # one row per trial × epoch
    assert frame["epoch"].dtype == "Int64" and frame["number"].dtype == "Int64"
    assert list(frame.columns[:7]) == ["trial", "number", "run_id", "status", "state", "epoch", "time"]
    assert len(table) == 6
    pruned = table[table["state"] == "PRUNED"].iloc[0]
    assert pruned["epochs"] == 2 and pruned["best_epoch"] == 2
    assert (table["best_fd_random"] <= table["fd_random"] + 1e-12).all()


def test_param_effects_log_axis_for_log_params(tmp_path, table):
    fig = plots.param_effects(table, params=PARAMS, metrics=["fd_random", "ssim_structure"],
                              log_params=["loss.lambda_cycle"], categorical=["model.attention"],
                              ranges={"loss.lambda_cycle": (1, 50), "loss.lambda_identity": (0, 1)},
                              chosen="trial_01")
    axes = np.array(fig.axes).reshape(2, 3)
    assert axes[0, 0].get_xscale() == "log" and axes[0, 1].get_xscale() == "linear"
    assert axes[0, 0].get_xlim()[0] < 1 and axes[0, 0].get_xlim()[1] > 50  # the searched range
    assert [t.get_text() for t in axes[1, 2].get_xticklabels()] == ["gates", "none"]
    assert axes[0, 0].get_ylabel() == "fd_random ↓" and axes[1, 0].get_ylabel() == "ssim_structure ↑"
    assert "log scale" in axes[1, 0].get_xlabel()
    assert_png(plots.save(fig, tmp_path / "effects.png"))


def test_importance_bars(tmp_path):
    scores = {"fanova": {"fd_random": {"loss.lambda_cycle": 0.8, "loss.lambda_identity": 0.2}},
              "ped-anova": {"fd_random": {"loss.lambda_cycle": 0.7, "loss.lambda_identity": 0.3}}}
    fig = plots.importance_bars(scores, objectives=[FD])
    assert fig.axes[0].get_yticklabels()[0].get_text() == "cycle weight λ"  # largest on top
    assert_png(plots.save(fig, tmp_path / "importance.png"))


def test_pareto_draws_the_front_and_the_chosen_trial(tmp_path, table):
    t = table.copy()
    t["ssim_structure"] = np.linspace(0.9, 0.4, len(t))
    front = np.zeros(len(t), dtype=bool)
    front[[0, 2]] = True
    fig = plots.pareto(t, objectives=[FD, SSIM], front=front, chosen=t["trial"].iloc[2])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "fd_random ↓" and ax.get_ylabel() == "ssim_structure ↑"
    line = ax.get_lines()[0]  # the front, joined in order of the first objective
    assert sorted(line.get_xdata()) == sorted(t["fd_random"].iloc[[0, 2]])
    labels = ax.get_legend_handles_labels()[1]
    assert "Pareto front" in labels and any(lab.startswith("chosen") for lab in labels)
    assert_png(plots.save(fig, tmp_path / "pareto.png"))


def test_pareto_shades_what_the_constraints_exclude_and_crosses_out_misses(tmp_path, table):
    from stain_search.constraints import Constraint

    t = table.copy()
    t["ssim_structure"] = np.linspace(0.9, 0.4, len(t))
    front = np.zeros(len(t), dtype=bool)
    front[[0, 2]] = True
    feasible = (t["ssim_structure"] >= 0.6).to_numpy()
    fig = plots.pareto(t, objectives=[FD, SSIM], front=front, chosen=t["trial"].iloc[0],
                       constraints=[Constraint("ssim_structure", "min", 0.6),
                                    Constraint("nuclei_f1", "min", 0.5)],  # not on an axis
                       feasible=feasible)
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert labels.count("outside the constraints") == 1 and "misses a constraint" in labels
    shade = handles[labels.index("outside the constraints")]
    ys = shade.get_path().transformed(shade.get_patch_transform()).vertices[:, 1]
    # ssim ≥ 0.6 holds above the line: the shaded band is below it, down to the axis.
    assert max(ys) == pytest.approx(0.6) and min(ys) <= t["ssim_structure"].min()
    crosses = ax.collections[[c.get_label() for c in ax.collections].index("misses a constraint")]
    assert len(crosses.get_offsets()) == int((~feasible).sum())
    assert_png(plots.save(fig, tmp_path / "pareto_constraints.png"))


def test_loss_curves_one_line_per_trial_coloured_by_log_param(tmp_path, frame):
    fig = plots.loss_curves(frame, colour_by="loss.lambda_cycle", log_colour=True, chosen="trial_00")
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["loss_D_X", "loss_D_Y", "loss_G"]
    assert len(fig.axes[0].get_lines()) == 6
    assert fig.axes[-1].get_yscale() == "log"  # the colour bar follows the log space
    assert_png(plots.save(fig, tmp_path / "losses.png"))


def test_best_so_far_ends_at_the_best_value(tmp_path, frame):
    fig = plots.best_so_far(frame, objectives=[FD])
    ax = fig.axes[0]
    step = ax.get_lines()[0]
    assert step.get_ydata()[-1] == pytest.approx(frame["fd_random"].min())
    assert np.all(np.diff(step.get_ydata()) <= 0)  # best-so-far never gets worse
    assert step.get_xdata()[-1] == len(frame)  # every trial-epoch counted
    assert_png(plots.save(fig, tmp_path / "progress.png"))


def test_image_grid_columns(tmp_path):
    rng = np.random.default_rng(0)
    tiles = lambda: rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    fig = plots.image_grid(tiles(), {"#0": tiles(), "#1": tiles()}, tiles())
    assert len(fig.axes) == 3 * 4
    assert [ax.get_title() for ax in fig.axes[:4:1]][0] == "input (H&E)"
    assert_png(plots.save(fig, tmp_path / "grid.png"))


def test_schedules_one_panel_per_mutated_key_and_a_dot_per_exploit(tmp_path):
    """A PBT search's `schedule/<key>` metrics: each member's value over epochs."""
    records = []
    for i, (before, after) in enumerate([(10.0, 10.0), (2.0, 12.0)]):  # member 1 exploits at 3
        fixed = {"trial": f"trial_{i:03d}", "number": i, "run_id": f"r{i}", "status": "finished",
                 "state": "COMPLETE", "loss.lambda_cycle": before}
        rows = [{"epoch": e, "_ms": 1_000 * (10 * i + e), "fd_random": 30.0 - e,
                 "schedule/loss.lambda_cycle": before if e <= 2 else after,
                 "schedule/optim.lr_g": 2e-4} for e in range(1, 5)]
        records.append((fixed, rows))
    frame = build_frame(records, param_keys=["loss.lambda_cycle"])
    assert plots.schedule_keys(frame) == ["loss.lambda_cycle", "optim.lr_g"]
    fig = plots.schedules(frame, log_keys=["optim.lr_g"], chosen="trial_001")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss.lambda_cycle", "optim.lr_g"]
    assert panels[1].get_yscale() == "log"
    dots = [c for c in panels[0].collections if len(c.get_offsets())]
    assert [tuple(o) for c in dots for o in c.get_offsets()] == [(3.0, 12.0)]
    path = plots.save(fig, tmp_path / "schedules.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
