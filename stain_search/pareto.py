"""Pareto dominance and the deploy order, in one place (selection and the report).

A point is on the front when no other point is at least as good on every
objective and strictly better on one (Pareto dominance: the front Optuna's
``study.best_trials`` returns). Non-dominated sorting (Deb et al., 2002,
"A fast and elitist multiobjective genetic algorithm: NSGA-II") gives every
point its front: 1 is the Pareto front, 2 the front once the first is
removed, and so on.

The deploy order (``stain_search.deploy.select`` documents the rule) is: the
front first, and within a front the best first objective. With one
objective it is simply that objective's order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_minimised(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(N, M) objective values with every "max" column negated: lower is better."""
    values = np.asarray(values, dtype=float).reshape(-1, len(modes))
    signs = np.array([1.0 if m == "min" else -1.0 for m in modes])
    return values * signs


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(N,) bool: True for the non-dominated rows of (N, M) ``values``."""
    v = as_minimised(values, modes)  # (N, M)
    if v.size == 0:
        return np.zeros(len(v), dtype=bool)
    no_worse = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # [j, i]: j nowhere worse than i
    better = (v[:, None, :] < v[None, :, :]).any(axis=2)  # [j, i]: j better somewhere
    dominated = (no_worse & better).any(axis=0)
    return ~dominated


def pareto_ranks(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """(N,) int: the front of each row, 1 = the Pareto front (non-dominated sorting)."""
    v = np.asarray(values, dtype=float).reshape(-1, len(modes))
    ranks = np.zeros(len(v), dtype=int)
    left = np.arange(len(v))
    rank = 1
    while left.size:
        mask = pareto_mask(v[left], modes)
        ranks[left[mask]] = rank
        left = left[~mask]
        rank += 1
    return ranks


def deploy_order(values: np.ndarray, modes: Sequence[str], *,
                 tie_break: Sequence[float] | None = None) -> np.ndarray:
    """Row indices, best first: by front, then by the first objective, then by
    ``tie_break`` (higher first: the later epoch wins a tie)."""
    v = as_minimised(values, modes)
    ranks = pareto_ranks(values, modes) if v.shape[1] > 1 else np.ones(len(v), dtype=int)
    later = -np.asarray(tie_break, dtype=float) if tie_break is not None else np.zeros(len(v))
    return np.lexsort((later, v[:, 0] if len(v) else later, ranks)).astype(int)
