"""The search's figures, as matplotlib Figures (saved as PNG by ``save``).

Each figure reads on its own, without this code: axis labels carry the
metric's name and its direction (↓ lower is better, ↑ higher is better),
parameters sampled on a log scale get a log axis, and every figure says in
its title what one mark is. Pure functions of pandas frames (``analysis.load``);
no pyplot state, so they are safe in threads, tests and servers.

- ``param_effects``   objective (and ssim_structure) against each parameter
- ``importance_bars`` fANOVA / PED-ANOVA importance per objective
- ``pareto``          the front of a multi-objective search, chosen trial marked
- ``loss_curves``     D_X, D_Y and G losses per trial (the CycleGAN paper's
                      training plots), coloured by the most important parameter
- ``best_so_far``     best objective against cumulative compute
- ``image_grid``      input | each top trial's output | target
- ``confirmation``    the top configurations' mean ± std over new seeds (error bars)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from stain_search.evaluate import metric_directions
from stain_search.spaces import Objective

ARROWS = {"min": "↓", "max": "↑"}
# Paper names beside config keys, so a reader of the plot need not know our keys.
PARAM_NAMES = {
    "loss.lambda_cycle": "cycle weight λ",
    "loss.lambda_identity": "identity weight (× λ)",
    "loss.r1_gamma": "R1 penalty γ",
    "optim.lr_g": "learning rate of G, F",
    "optim.lr_d": "learning rate of D",
    "model.attention": "attention",
}
STATE_STYLE = {  # how a trial's outcome is drawn in scatter plots
    "COMPLETE": dict(marker="o", color="#1f77b4", label="complete"),
    "PRUNED": dict(marker="o", facecolors="none", edgecolors="#7f7f7f", label="pruned (truncated)"),
    "RUNNING": dict(marker="^", facecolors="none", edgecolors="#ff7f0e", label="running"),
    "FAIL": dict(marker="x", color="#d62728", label="failed (last value before it stopped)"),
}
CHOSEN_STYLE = dict(marker="*", s=260, color="#d62728", edgecolors="black", linewidths=0.6,
                    zorder=5)
LOSSES = ("loss_D_X", "loss_D_Y", "loss_G")
DPI = 110


def metric_label(metric: str) -> str:
    """"fd_random ↓" — the name and whether lower or higher is better."""
    direction = metric_directions().get(metric)
    return f"{metric} {ARROWS[direction]}" if direction else metric


def objective_label(objective: Objective) -> str:
    return f"{objective.metric} {ARROWS[objective.mode]}"


def param_label(key: str, *, log: bool = False) -> str:
    name = PARAM_NAMES.get(key)
    text = f"{key}\n({name})" if name else key
    return text + (" — log scale" if log else "")


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png", facecolor="white")
    return path


def _grid(rows: int, cols: int, *, w: float = 3.6, h: float = 3.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(w * cols, 4.5), h * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _states(table: pd.DataFrame) -> pd.Series:
    state = table["state"].fillna(table["status"].map(
        {"finished": "COMPLETE", "pruned": "PRUNED", "running": "RUNNING"}))
    return state.fillna("RUNNING")


def _positions(values: pd.Series, *, categorical: bool) -> tuple[np.ndarray, list[str] | None]:
    """x positions: the values, or category indices with their names."""
    if not categorical:
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float), None
    names = sorted({str(v) for v in values.dropna()})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index.get(str(v), np.nan) if pd.notna(v) else np.nan for v in values]), names


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _param_axis(ax, *, log: bool, span: tuple[float, float] | None) -> None:
    if log:
        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps: "5e-4", "10", never "7×10⁰" crowding the axis.
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if span is not None and span[0] is not None and span[1] is not None and span[1] > span[0]:
        lo, hi = float(span[0]), float(span[1])
        pad = (hi / lo) ** 0.04 if log and lo > 0 else None
        ax.set_xlim((lo / pad, hi * pad) if pad else (lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)))


# --- parameters → objectives ----------------------------------------------------

def param_effects(table: pd.DataFrame, *, params: Sequence[str], metrics: Sequence[str],
                  log_params: Sequence[str] = (), categorical: Sequence[str] = (),
                  ranges: dict[str, tuple[float, float]] | None = None,
                  chosen: str | None = None) -> Figure:
    """One panel per (metric, parameter): a point per trial at its final epoch.
    ``ranges`` (param → (low, high), the searched range) sets the x limits, so a
    reader sees where in the space the trials landed."""
    params, metrics = list(params), list(metrics)
    fig, axes = _grid(max(len(metrics), 1), max(len(params), 1))
    states = _states(table)
    for r, metric in enumerate(metrics):
        for col, key in enumerate(params):
            ax = axes[r, col]
            if metric not in table.columns or key not in table.columns:
                _empty(ax, f"no {metric} logged")
                continue
            x, names = _positions(table[key], categorical=key in categorical)
            y = table[metric].to_numpy(dtype=float)
            for state, style in STATE_STYLE.items():
                m = (states == state).to_numpy() & np.isfinite(x) & np.isfinite(y)
                if m.any():
                    ax.scatter(x[m], y[m], s=36, alpha=0.85, **style)
            if chosen is not None:
                m = (table["trial"] == chosen).to_numpy() & np.isfinite(x) & np.isfinite(y)
                if m.any():
                    ax.scatter(x[m], y[m], label=f"chosen ({chosen})", **CHOSEN_STYLE)
            if names is not None:
                ax.set_xticks(range(len(names)), names, rotation=20)
                ax.set_xlim(-0.5, len(names) - 0.5)
            else:
                _param_axis(ax, log=key in log_params, span=(ranges or {}).get(key))
            ax.grid(alpha=0.3)
            if r == len(metrics) - 1:
                ax.set_xlabel(param_label(key, log=key in log_params))
            if col == 0:
                ax.set_ylabel(metric_label(metric))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:  # the union of what any panel drew
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle("Each parameter against each metric — one point per trial (its last epoch)")
    return fig


def _n_params(scores) -> int:
    return max([len(p) for per in scores.values() for p in per.values()] or [1])


def importance_bars(scores: dict[str, dict[str, dict[str, float]]], *,
                    objectives: Sequence[Objective]) -> Figure:
    """scores: evaluator → metric → {param → importance}; grouped bars per objective."""
    evaluators = list(scores)
    fig, axes = _grid(1, max(len(objectives), 1), w=4.8, h=0.5 + 0.45 * _n_params(scores))
    for col, objective in enumerate(objectives):
        ax = axes[0, col]
        per = {e: scores[e].get(objective.metric, {}) for e in evaluators}
        params = sorted({p for s in per.values() for p in s},
                        key=lambda p: -max(s.get(p, 0.0) for s in per.values()))
        if not params:
            _empty(ax, "not computed")
            continue
        height = 0.8 / max(len(evaluators), 1)
        for i, e in enumerate(evaluators):
            ys = np.arange(len(params)) + (i - (len(evaluators) - 1) / 2) * height
            ax.barh(ys, [per[e].get(p, 0.0) for p in params], height=height, label=e)
        ax.set_yticks(range(len(params)), [PARAM_NAMES.get(p, p) for p in params])
        ax.invert_yaxis()  # most important on top
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the objective's variation (sums to 1)")
        ax.set_title(f"for {objective_label(objective)}")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle("Which parameters mattered (complete trials only)")
    return fig


# --- multi-objective ---------------------------------------------------------------

def pareto(table: pd.DataFrame, *, objectives: Sequence[Objective], front: np.ndarray,
           chosen: str | None = None, constraints: Sequence = (),
           feasible: np.ndarray | None = None) -> Figure:
    """One panel per pair of objectives; the front joined in order, the chosen trial
    starred. ``front`` is a bool mask over ``table``'s rows. With the space's
    ``constraints``, a bound on a plotted objective shades the side of the axis
    it excludes (the feasible region stays clear), and ``feasible`` (a bool mask
    over the rows) crosses out the trials that miss any constraint."""
    pairs = [(a, b) for i, a in enumerate(objectives) for b in objectives[i + 1:]]
    fig, axes = _grid(1, max(len(pairs), 1), w=5.0, h=4.2)
    for col, (a, b) in enumerate(pairs):
        ax = axes[0, col]
        x, y = table[a.metric].to_numpy(dtype=float), table[b.metric].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok & ~front], y[ok & ~front], s=30, color="#bbbbbb", label="dominated")
        order = np.argsort(x[front])
        fx, fy = x[front][order], y[front][order]
        ax.plot(fx, fy, "-", color="#1f77b4", alpha=0.6)
        ax.scatter(fx, fy, s=46, color="#1f77b4", label="Pareto front", zorder=3)
        for xi, yi, n in zip(x[ok], y[ok], table["number"][ok]):
            ax.annotate(f"#{n}", (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=8)
        if feasible is not None and (ok & ~feasible).any():
            ax.scatter(x[ok & ~feasible], y[ok & ~feasible], s=90, marker="x", color="#d62728",
                       zorder=4, label="misses a constraint")
        if chosen is not None:
            m = (table["trial"] == chosen).to_numpy() & ok
            ax.scatter(x[m], y[m], label=f"chosen ({chosen})", **CHOSEN_STYLE)
        _shade_infeasible(ax, constraints, x_metric=a.metric, y_metric=b.metric)
        ax.set_xlabel(objective_label(a))
        ax.set_ylabel(objective_label(b))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Pareto front — no trial on it can improve one objective without losing on "
                 "another")
    return fig


def _shade_infeasible(ax, constraints: Sequence, *, x_metric: str, y_metric: str) -> None:
    """Grey hatching over what a bound on an axis's metric excludes."""
    labelled = False
    for c in constraints:
        for metric, span, limits in ((x_metric, ax.axvspan, ax.get_xlim()),
                                     (y_metric, ax.axhspan, ax.get_ylim())):
            if c.metric != metric:
                continue
            lo, hi = limits
            start, end = (min(lo, c.value), c.value) if c.bound == "min" else (c.value, max(hi, c.value))
            span(start, end, color="#888888", alpha=0.15, hatch="//", lw=0,
                 label=None if labelled else "outside the constraints")
            labelled = True
            (ax.set_xlim if span is ax.axvspan else ax.set_ylim)(min(lo, start), max(hi, end))


# --- over training ----------------------------------------------------------------------

def _colour_scale(values: pd.Series, *, log: bool):
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0 or (log and (v <= 0).any()):
        return None
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return None
    return mcolors.LogNorm(lo, hi) if log else mcolors.Normalize(lo, hi)


def loss_curves(frame: pd.DataFrame, *, losses: Sequence[str] = LOSSES,
                colour_by: str | None = None, log_colour: bool = False,
                chosen: str | None = None) -> Figure:
    """One panel per loss, one line per trial over its epochs, coloured by a parameter."""
    losses = [name for name in losses if name in frame.columns] or list(LOSSES[:1])
    fig, axes = _grid(1, len(losses), w=4.2, h=3.4)
    norm = _colour_scale(frame[colour_by], log=log_colour) if colour_by in frame.columns else None
    cmap = matplotlib.colormaps["viridis"]
    trials = list(dict.fromkeys(frame["trial"]))
    for col, name in enumerate(losses):
        ax = axes[0, col]
        if name not in frame.columns:
            _empty(ax, f"no {name} logged")
            continue
        for i, trial in enumerate(trials):
            rows = frame[frame["trial"] == trial].dropna(subset=[name, "epoch"]).sort_values("epoch")
            if rows.empty:
                continue
            if norm is not None and pd.notna(rows[colour_by].iloc[0]):
                colour = cmap(norm(float(rows[colour_by].iloc[0])))
            else:
                colour = f"C{i % 10}"
            bold = trial == chosen
            ax.plot(rows["epoch"].astype(float), rows[name], marker="." if len(rows) < 12 else None,
                    color=colour, lw=2.6 if bold else 1.1, alpha=1.0 if bold else 0.75,
                    zorder=4 if bold else 2,
                    label=f"#{rows['number'].iloc[0]}" if norm is None else None)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} (train, epoch mean)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if norm is not None:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes.flat), shrink=0.9,
                           label=param_label(colour_by, log=log_colour))
        if log_colour:
            bar.ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    elif len(trials) <= 12:
        axes[0, -1].legend(title="trial", fontsize="small")
    note = f"; thick line: chosen {chosen}" if chosen else ""
    fig.suptitle(f"Training losses per trial (D_X, D_Y: discriminators; G: H&E → stain){note}")
    return fig


SCHEDULE_PREFIX = "schedule/"  # a PBT member's mutated values per epoch (trainables.cyclegan)


def schedule_keys(frame: pd.DataFrame) -> list[str]:
    return [c[len(SCHEDULE_PREFIX):] for c in frame.columns if str(c).startswith(SCHEDULE_PREFIX)]


def schedules(frame: pd.DataFrame, *, log_keys: Sequence[str] = (),
              chosen: str | None = None) -> Figure:
    """A PBT search: one panel per mutated key, each member's value over its
    epochs (a step where it exploited another member and explored)."""
    keys = schedule_keys(frame)
    cols = min(3, max(1, len(keys)))
    rows = -(-max(1, len(keys)) // cols)
    fig, axes = _grid(rows, cols, w=4.2, h=3.2)
    trials = list(dict.fromkeys(frame["trial"]))
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        column = SCHEDULE_PREFIX + key
        for i, trial in enumerate(trials):
            member = frame[frame["trial"] == trial].dropna(subset=[column, "epoch"]).sort_values("epoch")
            if member.empty:
                continue
            bold = trial == chosen
            epochs, values = member["epoch"].astype(float).to_numpy(), member[column].to_numpy()
            ax.step(epochs, values, where="post", color=f"C{i % 10}", lw=2.6 if bold else 1.2,
                    alpha=1.0 if bold else 0.8, zorder=4 if bold else 2,
                    label=f"#{member['number'].iloc[0]}")
            changed = np.flatnonzero(np.diff(values) != 0) + 1  # explored after an exploit
            ax.scatter(epochs[changed], values[changed], color=f"C{i % 10}", marker="o",
                       s=22, zorder=5)
        if key in log_keys:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if keys and len(trials) <= 12:
        axes.flat[len(keys) - 1].legend(title="member", fontsize="small")
    note = f"; thick line: chosen {chosen}" if chosen else ""
    fig.suptitle(f"Hyper-parameter schedules of the population (dots: after an exploit){note}")
    return fig


def best_so_far(frame: pd.DataFrame, *, objectives: Sequence[Objective]) -> Figure:
    """Best objective seen (any trial, any epoch) against trial-epochs spent, in the
    order the epochs finished: how fast the search found what it found."""
    fig, axes = _grid(1, max(len(objectives), 1), w=5.0, h=3.6)
    for col, objective in enumerate(objectives):
        ax = axes[0, col]
        if objective.metric not in frame.columns:
            _empty(ax, f"no {objective.metric} logged")
            continue
        rows = frame.dropna(subset=["epoch"]).sort_values("time", kind="stable")
        compute = np.arange(1, len(rows) + 1)  # one trial-epoch per row
        y = rows[objective.metric].to_numpy(dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            _empty(ax, f"no {objective.metric} logged yet")
            continue
        acc = np.fmin.accumulate if objective.mode == "min" else np.fmax.accumulate
        best = acc(np.where(ok, y, np.nan))
        ax.scatter(compute[ok], y[ok], s=14, color="#999999", label="an evaluated epoch")
        ax.step(compute, best, where="post", color="#d62728", lw=2, label="best so far")
        ax.set_xlabel("cumulative compute (trial-epochs, all trials, in finishing order)")
        ax.set_ylabel(objective_label(objective))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Search progress: best objective against compute spent")
    return fig


# --- images ---------------------------------------------------------------------------

def image_grid(inputs: np.ndarray, outputs: dict[str, np.ndarray],
               targets: np.ndarray | None = None) -> Figure:
    """Rows = validation tiles; columns = input | each trial's output | target."""
    columns = [("input (H&E)", inputs), *outputs.items()]
    if targets is not None:
        columns.append(("target (real stain)", targets))
    rows = len(inputs)
    size = 1.9
    fig = Figure(figsize=(size * len(columns), size * rows + 0.8), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, len(columns), squeeze=False))
    for c, (title, images) in enumerate(columns):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(images[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle("Top trials on the same validation tiles")
    return fig


# --- over seeds ----------------------------------------------------------------------------

def confirmation(conf) -> Figure:
    """One panel per metric of a confirmation (``stain_search.deploy.confirmed``):
    each configuration's mean ± std over the new seeds as an error bar, every
    seed run as a dot, the search's own run (left out of the mean) as a hollow
    diamond. Best-confirmed first, left to right."""
    configs = [c for c in conf.configs if c.n > 0]
    metrics = conf.metrics
    fig, axes = _grid(1, max(len(metrics), 1), w=3.4, h=3.2)
    x = np.arange(len(configs))
    for col, m in enumerate(metrics):
        ax = axes[0, col]
        if not configs:
            _empty(ax, "no confirmation run has finished yet")
            continue
        for i, c in enumerate(configs):
            seeds = [r.best.metrics.get(m) for r in c.runs if r.best is not None]
            seeds = np.array([v for v in seeds if isinstance(v, (int, float))], dtype=float)
            ax.scatter(np.full(len(seeds), i) + np.linspace(-0.12, 0.12, len(seeds)), seeds,
                       s=14, color="#7f7f7f", zorder=2, label="a seed run" if i == 0 else None)
            std = c.std.get(m, np.nan)
            ax.errorbar([i], [c.mean.get(m, np.nan)], yerr=[0 if not np.isfinite(std) else std],
                        fmt="o", color="#1f77b4", capsize=5, zorder=3,
                        label="mean ± std over seeds" if i == 0 else None)
            original = c.original.get(m)
            if isinstance(original, (int, float)):
                ax.scatter([i + 0.25], [original], marker="D", s=30, facecolors="none",
                           edgecolors="#d62728", zorder=3,
                           label="the search's run" if i == 0 else None)
        ax.set_xticks(x, [f"#{c.number}" for c in configs])
        ax.set_xlim(-0.6, len(configs) - 0.4)
        ax.set_ylabel(metric_label(m))
        ax.grid(alpha=0.3, axis="y")
    if configs:  # below the panels: inside, it would hide a point
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center",
                   ncols=3, fontsize="small")
    fig.suptitle(f"Top configurations re-trained with train.seed "
                 f"{', '.join(map(str, conf.seeds))} — best confirmed mean on the left")
    return fig
