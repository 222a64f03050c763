"""Pareto fronts and the chosen trial, against brute force and Optuna."""

from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest

from stain_search.analysis.pareto import compromise, pareto_mask, ranking

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


def test_compromise_is_the_balanced_front_member():
    # Scaled across the front, (20, 0.7) sits nearest the ideal (10, 0.9).
    assert compromise(POINTS, MODES) == 1
    # One objective: simply the best.
    assert compromise(POINTS[:, :1], ["min"]) == 0
    assert compromise(POINTS[:, 1:], ["max"]) == 2


def test_ranking_puts_fronts_in_order():
    order = list(ranking(POINTS, MODES))
    assert sorted(order) == list(range(len(POINTS)))
    assert order[0] == compromise(POINTS, MODES)
    assert set(order[:4]) == set(FRONT)  # the first front first
    assert order[-1] == 5  # dominated by every other point
    assert list(ranking(POINTS[:, :1], ["min"])) == [0, 1, 6, 3, 2, 4, 5]
