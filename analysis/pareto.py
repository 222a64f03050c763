"""Pareto fronts of multi-objective searches, and the one checkpoint to choose.

A trial is on the front when no other trial is at least as good on every
objective and strictly better on one (Pareto dominance; the front Optuna's
``study.best_trials`` returns, and NSGA-II, Deb et al. 2002, sorts by).

A pathologist deploys one model, not a front. The chosen trial is the
front's compromise point: each objective scaled to [0, 1] across the front
(0 = the front's best value), the member nearest the ideal point (0, ..., 0)
in Euclidean distance — the "compromise programming" rule (Zeleny, 1973).
With one objective it is simply the best trial.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_minimised(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(N, M) objective values with every "max" column negated: lower is better."""
    values = np.asarray(values, dtype=float)
    signs = np.array([1.0 if m == "min" else -1.0 for m in modes])
    return values * signs


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(N,) bool: True for the non-dominated rows of (N, M) ``values``."""
    v = as_minimised(values, modes)  # (N, M)
    if v.size == 0:
        return np.zeros(len(v), dtype=bool)
    no_worse = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # [j, i]: j is nowhere worse than i
    better = (v[:, None, :] < v[None, :, :]).any(axis=2)  # [j, i]: j is better somewhere
    dominated = (no_worse & better).any(axis=0)
    return ~dominated


def compromise(values: np.ndarray, modes: Sequence[str]) -> int:
    """Row index of the chosen point: the best for one objective, else the front's
    member nearest the ideal after scaling each objective across the front."""
    v = as_minimised(values, modes)
    if v.shape[1] == 1:
        return int(np.argmin(v[:, 0]))
    front = np.flatnonzero(pareto_mask(values, modes))
    f = v[front]  # (K, M)
    lo, hi = f.min(axis=0), f.max(axis=0)
    scaled = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
    return int(front[np.argmin(np.linalg.norm(scaled, axis=1))])


def ranking(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Row indices, best first: the front by compromise order, then the next front
    of what is left (non-dominated sorting), and so on. Its first entry is
    ``compromise(values, modes)``."""
    v = np.asarray(values, dtype=float)
    left = np.arange(len(v))
    order: list[int] = []
    while left.size:
        if v.shape[1] == 1:
            return left[np.argsort(as_minimised(v[left], modes)[:, 0], kind="stable")]
        mask = pareto_mask(v[left], modes)
        front = left[mask]
        f = as_minimised(v[front], modes)
        lo, hi = f.min(axis=0), f.max(axis=0)
        scaled = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
        order.extend(front[np.argsort(np.linalg.norm(scaled, axis=1), kind="stable")])
        left = left[~mask]
    return np.array(order, dtype=int)
