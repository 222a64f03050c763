"""Pareto fronts, their ranks and the deploy order, against brute force and Optuna."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from stain_search.pareto import deploy_order, pareto_mask, pareto_ranks

optuna.logging.set_verbosity(optuna.logging.WARNING)

# (fd ↓, ssim_structure ↑). Front: rows 0, 1, 2, 6 (row 6 duplicates row 1: equal
# points do not dominate each other). Row 3 is beaten by 1, row 4 by 2, row 5 by all.
POINTS = np.array([[10.0, 0.50], [20.0, 0.70], [40.0, 0.90], [25.0, 0.60],
                   [45.0, 0.85], [50.0, 0.40], [20.0, 0.70]])
MODES = ["min", "max"]
FRONT = [0, 1, 2, 6]


def brute_force(values, modes):
    v = values * np.array([1 if m == "min" else -1 for m in modes])
    return np.array([not any((v[j] <= v[i]).all() and (v[j] < v[i]).any()
                             for j in range(len(v))) for i in range(len(v))])


def test_known_front():
    assert list(np.flatnonzero(pareto_mask(POINTS, MODES))) == FRONT


def test_front_matches_optuna_best_trials():
    study = optuna.create_study(directions=["minimize", "maximize"])
    for fd, s in POINTS:
        study.add_trial(optuna.trial.create_trial(values=[fd, s], params={}, distributions={}))
    assert sorted(t.number for t in study.best_trials) == FRONT


@pytest.mark.parametrize("modes", list(itertools.product(["min", "max"], repeat=3)))
def test_random_fronts_match_brute_force(modes):
    rng = np.random.default_rng(len(modes) + sum(m == "max" for m in modes))
    values = rng.integers(0, 6, size=(40, 3)).astype(float)  # ties on purpose
    assert (pareto_mask(values, modes) == brute_force(values, modes)).all()


def test_ranks_are_non_dominated_sorting():
    # Front 0, 1, 2, 6; then 3 (beaten only by 1/6) and 4 (only by 2); then 5.
    assert list(pareto_ranks(POINTS, MODES)) == [1, 1, 1, 2, 2, 3, 1]
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=(30, 2)).astype(float)
    ranks = pareto_ranks(values, MODES)
    left = np.arange(len(values))
    for rank in range(1, ranks.max() + 1):  # peeling brute-force fronts gives the same
        front = left[brute_force(values[left], MODES)]
        assert set(np.flatnonzero(ranks == rank)) == set(front)
        left = np.setdiff1d(left, front)


def test_deploy_order_is_the_front_then_the_first_objective():
    order = list(deploy_order(POINTS, MODES))
    assert order[:4] == [0, 1, 6, 2]  # the front, by fd (ties keep row order)
    assert order[4:] == [3, 4, 5]
    # One objective: simply its order; a tie goes to the later epoch.
    assert list(deploy_order(POINTS[:, 1:], ["max"])) == [2, 4, 1, 6, 3, 0, 5]
    tied = np.array([[1.0], [1.0], [0.5]])
    assert list(deploy_order(tied, ["max"], tie_break=[3, 7, 9])) == [1, 0, 2]
