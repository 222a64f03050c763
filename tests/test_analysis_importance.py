"""Parameter importance on studies whose structure we know."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from stain_search.analysis.importance import (EVALUATORS, MIN_TRIALS, NotEnoughTrials,
                                              importances, trends)
from stain_search.errors import StainSearchError
from stain_search.spaces import Objective

optuna.logging.set_verbosity(optuna.logging.WARNING)

DISTRIBUTIONS = {
    "loss.lambda_cycle": FloatDistribution(1.0, 50.0, log=True),
    "loss.lambda_identity": FloatDistribution(0.0, 1.0),
    "model.attention": CategoricalDistribution(["none", "gates"]),
}
FD = Objective("fd_random", "min")
SSIM = Objective("ssim_structure", "max")


def sample(rng: np.random.Generator) -> dict:
    return {"loss.lambda_cycle": float(np.exp(rng.uniform(0, np.log(50)))),
            "loss.lambda_identity": float(rng.uniform()),
            "model.attention": ["none", "gates"][int(rng.integers(2))]}


def fd_of(p: dict, rng) -> float:
    # Only λ matters: a valley at λ = 7 (log scale), plus a little noise.
    return float((np.log(p["loss.lambda_cycle"]) - np.log(7.0)) ** 2 + 0.02 * rng.normal())


def ssim_of(p: dict, rng) -> float:
    # Only the identity weight matters, and higher is better: peaks at 0.8.
    return float(0.9 - (p["loss.lambda_identity"] - 0.8) ** 2 + 0.005 * rng.normal())


def lambda_only_study(n: int = 24, *, seed: int = 0, pruned: int = 0) -> optuna.Study:
    rng = np.random.default_rng(seed)
    study = optuna.create_study(directions=["minimize"])
    for _ in range(n):
        p = sample(rng)
        study.add_trial(optuna.trial.create_trial(params=p, distributions=DISTRIBUTIONS,
                                                  values=[fd_of(p, rng)]))
    for _ in range(pruned):
        study.add_trial(optuna.trial.create_trial(params=sample(rng), distributions=DISTRIBUTIONS,
                                                  state=optuna.trial.TrialState.PRUNED))
    return study


def two_objective_study(n: int = 24, *, seed: int = 1) -> optuna.Study:
    rng = np.random.default_rng(seed)
    study = optuna.create_study(directions=["minimize", "maximize"])
    for _ in range(n):
        p = sample(rng)
        study.add_trial(optuna.trial.create_trial(params=p, distributions=DISTRIBUTIONS,
                                                  values=[fd_of(p, rng), ssim_of(p, rng)]))
    return study


@pytest.mark.parametrize("evaluator", sorted(EVALUATORS))
def test_importance_ranks_lambda_first_when_only_lambda_matters(evaluator):
    scores = importances(lambda_only_study(), [FD], evaluator=evaluator)["fd_random"]
    assert list(scores)[0] == "loss.lambda_cycle"
    assert scores["loss.lambda_cycle"] > 0.5
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert set(scores) == set(DISTRIBUTIONS)


@pytest.mark.parametrize("evaluator", sorted(EVALUATORS))
def test_each_objective_gets_its_own_ranking_with_its_direction(evaluator):
    scores = importances(two_objective_study(), [FD, SSIM], evaluator=evaluator)
    assert list(scores["fd_random"])[0] == "loss.lambda_cycle"
    # A maximised objective: the evaluator must look at *high* values (PED-ANOVA
    # ranks for low targets; a wrong sign would favour the worst trials).
    assert list(scores["ssim_structure"])[0] == "loss.lambda_identity"


def test_too_few_complete_trials_says_so_and_how_to_fix():
    study = lambda_only_study(MIN_TRIALS - 1, pruned=6)  # pruned trials do not count
    with pytest.raises(NotEnoughTrials) as err:
        importances(study, [FD])
    msg = str(err.value)
    assert f"{MIN_TRIALS - 1} complete trial(s)" in msg
    assert f"at least {MIN_TRIALS}" in msg
    assert "--num-samples" in msg


def test_no_study_and_unknown_evaluator_are_clear_errors():
    with pytest.raises(NotEnoughTrials, match="study.journal"):
        importances(None, [FD])
    with pytest.raises(StainSearchError, match="known: fanova, ped-anova"):
        importances(lambda_only_study(), [FD], evaluator="shap")


def test_trends_give_the_direction_importance_leaves_out():
    rng = np.random.default_rng(0)
    lam = np.exp(rng.uniform(0, np.log(50), 12))
    table = pd.DataFrame({"state": ["COMPLETE"] * 12 + ["PRUNED"],
                          "loss.lambda_cycle": list(lam) + [3.0],
                          "loss.lambda_identity": list(rng.uniform(size=12)) + [0.5],
                          "fd_random": list(30 - np.log(lam)) + [99.0],  # more λ → lower FD
                          "ssim_structure": list(0.2 + 0.01 * np.log(lam)) + [0.0]})
    found = {(t["param"], t["metric"]): t for t in trends(
        table, params=["loss.lambda_cycle", "loss.lambda_identity"],
        metrics=["fd_random", "ssim_structure"])}
    assert found[("loss.lambda_cycle", "fd_random")]["rho"] == pytest.approx(-1.0)
    assert found[("loss.lambda_cycle", "ssim_structure")]["rho"] == pytest.approx(1.0)
    assert found[("loss.lambda_cycle", "fd_random")]["n"] == 12  # the pruned trial is left out
    assert abs(found[("loss.lambda_identity", "fd_random")]["rho"]) < 0.7


def test_ped_anova_looks_at_the_good_end_of_a_maximised_objective():
    # The best trials differ in the identity weight (> 0.8), the worst ones in λ
    # (> 25): ranking the wrong end would put λ first.
    rng = np.random.default_rng(3)
    study = optuna.create_study(directions=["maximize"])
    for _ in range(40):
        p = sample(rng)
        value = (2 * max(0.0, p["loss.lambda_identity"] - 0.8)
                 - 2 * max(0.0, np.log(p["loss.lambda_cycle"]) - np.log(25)) + 1e-4 * rng.normal())
        study.add_trial(optuna.trial.create_trial(params=p, distributions=DISTRIBUTIONS,
                                                  values=[value]))
    scores = importances(study, [SSIM], evaluator="ped-anova")["ssim_structure"]
    assert list(scores)[0] == "loss.lambda_identity"
