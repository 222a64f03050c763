"""Which hyper-parameters mattered, per objective, from Optuna's evaluators.

- fANOVA (Hutter et al., 2014): a random forest fitted to (params →
  objective); a parameter's importance is the share of the forest's variance
  its marginal explains. Reliable from about ten trials.
- PED-ANOVA (Watanabe et al., 2023): how differently a parameter is
  distributed among the top trials than among all trials (Pearson
  divergence); cheap, and closed-form. Optuna's default top quantile (10 %)
  holds less than one trial in a small search, so the quantile here grows to
  keep at least ``TOP_TRIALS`` trials in the top group.

Only COMPLETE trials count: pruned trials' objectives are truncated and
failed ones have none. With fewer than ``MIN_TRIALS`` of them an importance
is noise, and ``NotEnoughTrials`` says so rather than print one.
"""

from __future__ import annotations

import warnings
from typing import Callable

import optuna

from stain_search.errors import StainSearchError
from stain_search.spaces import Objective

MIN_TRIALS = 5
TOP_TRIALS = 3


class NotEnoughTrials(StainSearchError):
    """Too few complete trials (or parameters that never varied) to rank parameters."""


def dashboard_note(study: optuna.Study) -> str | None:
    """optuna-dashboard charts parameter importance from any number of trials;
    the report leaves it out below ``MIN_TRIALS`` complete ones: one line saying
    so before the dashboard serves, or None."""
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if done >= MIN_TRIALS:
        return None
    return (f"note: {done} complete trial(s): the dashboard's parameter importance is "
            f"unreliable below {MIN_TRIALS} (`stain-search report` leaves it out until then)")


def _fanova(n_complete: int):
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def _ped_anova(n_complete: int):
    quantile = min(0.5, max(0.1, TOP_TRIALS / max(n_complete, 1)))
    return optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)


EVALUATORS: dict[str, Callable[[int], optuna.importance.BaseImportanceEvaluator]] = {
    "fanova": _fanova,
    "ped-anova": _ped_anova,
}


def complete_trials(study) -> list:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def objective_importance(study, objective: Objective, index: int, *, evaluator: str = "fanova",
                         min_trials: int = MIN_TRIALS) -> dict[str, float]:
    """param → importance (normalised to sum to 1, largest first) for one objective."""
    if evaluator not in EVALUATORS:
        raise StainSearchError(f"unknown importance evaluator {evaluator!r} "
                               f"(known: {', '.join(EVALUATORS)})")
    if study is None:
        raise NotEnoughTrials("no Optuna study (study.journal) for this search: "
                              "parameter importance needs it")
    n = len(complete_trials(study))
    if n < min_trials:
        raise NotEnoughTrials(f"{n} complete trial(s): parameter importance needs at least "
                              f"{min_trials} (run more trials: "
                              f"`stain-search resume {study.study_name} --num-samples N`)")
    sign = 1.0 if objective.mode == "min" else -1.0  # both evaluators rank for low targets
    with warnings.catch_warnings():
        # PED-ANOVA warns that it ranks for *low* targets: the sign above sees to that.
        warnings.filterwarnings("ignore", message=".*computes the importances of params.*")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=EVALUATORS[evaluator](n),
                target=lambda t: sign * t.values[index])
        except (ValueError, RuntimeError) as err:
            raise NotEnoughTrials(f"{objective.metric}: importance cannot be computed from "
                                  f"these trials ({err})") from None
    return {k: float(v) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])}


def importances(study, objectives: list[Objective], *, evaluator: str = "fanova",
                min_trials: int = MIN_TRIALS) -> dict[str, dict[str, float]]:
    """metric → {param → importance} for every objective of the search."""
    return {o.metric: objective_importance(study, o, i, evaluator=evaluator, min_trials=min_trials)
            for i, o in enumerate(objectives)}


def trends(table, *, params: list[str], metrics: list[str], min_trials: int = 4) -> list[dict]:
    """Spearman's rank correlation of each numeric parameter with each metric over
    complete trials: the *direction* of an effect, which importance leaves out
    ("more λ → lower Fréchet distance, higher ssim_structure")."""
    import numpy as np
    import pandas as pd
    from scipy.stats import spearmanr

    rows = table[table["state"] == "COMPLETE"] if "state" in table.columns else table
    out = []
    for key in params:
        x = pd.to_numeric(rows[key], errors="coerce") if key in rows.columns else None
        if x is None or x.notna().sum() < min_trials or x.nunique() < 2:
            continue
        for metric in metrics:
            if metric not in rows.columns:
                continue
            y = pd.to_numeric(rows[metric], errors="coerce")
            ok = x.notna() & y.notna()
            if ok.sum() < min_trials or y[ok].nunique() < 2:
                continue
            rho = float(spearmanr(x[ok], y[ok]).statistic)
            if np.isfinite(rho):
                out.append({"param": key, "metric": metric, "rho": rho, "n": int(ok.sum())})
    return out
