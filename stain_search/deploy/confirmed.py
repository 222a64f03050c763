"""What `stain-search confirm` found: the top configurations over new seeds.

A GAN's score moves with its seed (the CycleGAN reference reports FID 51.9;
others reproduced 66.5 and 70.8), so one run per configuration cannot tell
apart configurations closer than that. A confirmation re-trains the search's
top-K trials with N new ``train.seed`` values (``stain_search.confirm``, in
the search folder's ``confirm/``, a search of its own). This module reads it
back, for ``confirm``'s own table, ``best --confirmed``, ``export
--confirmed`` and the report:

- Each confirmation run counts by the deploy rule within that run
  (:func:`~stain_search.deploy.select.trial_best`: its best kept checkpoint),
  the same quantity the search ranked its trials by.
- Per configuration: mean ± std (sample std, n − 1) of each objective and of
  the stain and structure metrics, over the *new* seeds only. The search's
  own run is shown beside them but left out of the mean: it was picked for
  being best, so its score is biased upwards (the winner's curse).
- Configurations are ranked by their mean (one objective), or by the deploy
  order of their mean vectors (a Pareto search: front, then first objective).
- The ranking "holds" when the confirmed order is the search's order and
  every neighbour's gap in the first objective exceeds the larger of their
  seed stds; otherwise a note says which pair is within noise.
- The checkpoint to deploy after a confirmation: the deploy rule over the
  kept checkpoints of the best-confirmed configuration (its search run and
  its confirmation runs).

Every seed is the same for every configuration (common random numbers), so
two configurations are compared on the same seeds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stain_search.deploy.select import (Candidate, gather_trial, mlflow_trials, rank,
                                        select_dir, study_trials, trial_best)
from stain_search.pareto import deploy_order
from stain_search.search_dir import SearchDir
from stain_search.tracking import CONFIRMS, CONFIRMS_NUMBER, SEED

# Shown beside the objectives when every run reports them: tissue kept, stain right.
ALSO_SHOWN = ("ssim_structure", "stain_area_error", "stain_od_r")


@dataclass
class ConfirmedRun:
    trial: str  # the confirmation run's folder (confirm/trials/trial_NNN)
    seed: int
    state: str  # Optuna state of the run: COMPLETE, FAIL, RUNNING, WAITING
    best: Candidate | None  # its deploy-rule checkpoint


@dataclass
class ConfirmedConfig:
    trial: str  # the search's trial confirmed
    number: int | None
    params: dict[str, Any]
    original: dict[str, float]  # the search run's deploy-rule metrics (not in the mean)
    runs: list[ConfirmedRun]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    n: int = 0  # finished confirmation runs counted
    rank: int = 0  # 1 = best by confirmed mean (0: nothing finished yet)
    run_id: str | None = None  # the search run's MLflow run

    @property
    def failed(self) -> int:
        return sum(r.state == "FAIL" for r in self.runs)


@dataclass
class Confirmation:
    search: str
    objectives: list[tuple[str, str]]
    metrics: list[str]  # objectives, then ALSO_SHOWN that every run reports
    seeds: list[int]
    configs: list[ConfirmedConfig]  # ranked by confirmed mean, best first
    search_order: list[str]  # the confirmed trials in the search's order
    holds: bool | None  # the search's top-K order survives the seed spread (None: too few)
    notes: list[str]
    deploy: Candidate | None  # the checkpoint to deploy after the confirmation

    @property
    def expected(self) -> int:
        return sum(len(c.runs) for c in self.configs)

    @property
    def finished(self) -> int:
        return sum(c.n for c in self.configs)

    def to_dict(self) -> dict[str, Any]:
        def candidate(c: Candidate | None) -> dict[str, Any] | None:
            return None if c is None else {**asdict(c), "checkpoint": str(c.checkpoint)}

        return {
            "search": self.search, "seeds": self.seeds, "holds": self.holds,
            "objectives": [{"metric": m, "mode": mode} for m, mode in self.objectives],
            "metrics": self.metrics, "search_order": self.search_order, "notes": self.notes,
            "runs_expected": self.expected, "runs_finished": self.finished,
            "configurations": [{
                "rank": c.rank, "trial": c.trial, "number": c.number, "params": c.params,
                "n": c.n, "failed": c.failed, "mean": c.mean, "std": c.std,
                "original": c.original,
                "runs": [{"trial": r.trial, "seed": r.seed, "state": r.state,
                          "best": candidate(r.best)} for r in c.runs]}
                for c in self.configs],
            "deploy": candidate(self.deploy),
        }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def confirmation(sdir: SearchDir, *, tracking_uri: str | None = None) -> Confirmation | None:
    """The confirmation of the search in ``sdir``, or None if it has none."""
    cdir = sdir.confirmation
    if not cdir.exists():
        return None
    record = sdir.read_record()
    objectives = [(o.metric, o.mode) for o in record.objectives]
    search = select_dir(sdir, tracking_uri=tracking_uri, per_trial=True)
    searched = {c.trial: c for c in search.candidates}
    configs: dict[str, ConfirmedConfig] = {}
    seeds: list[int] = []
    run_ids = mlflow_trials(record.name, cdir.read_record().search_id, tracking_uri, [])
    for t in sorted(study_trials(cdir, record.name), key=lambda t: t.number):
        attrs = t.user_attrs
        confirmed, seed = attrs.get(CONFIRMS), int(attrs.get(SEED, -1))
        if confirmed is None:
            continue
        if seed not in seeds:
            seeds.append(seed)
        if confirmed not in configs:
            original = searched.get(confirmed)
            number = attrs.get(CONFIRMS_NUMBER)
            configs[confirmed] = ConfirmedConfig(
                trial=confirmed, number=int(number) if number not in (None, "") else None,
                params={k: v for k, v in t.params.items() if k != "train.seed"},
                original=dict(original.metrics) if original else {}, runs=[],
                run_id=original.run_id if original else None)
        best = (trial_best(cdir.trial(t.number), objectives, record.constraints)
                if t.state.name == "COMPLETE" else None)
        if best is not None:
            best.run_id = run_ids.get(best.trial, (None, None))[0]
        configs[confirmed].runs.append(ConfirmedRun(trial=cdir.trial(t.number).name, seed=seed,
                                                    state=t.state.name, best=best))
    counted = [r.best for c in configs.values() for r in c.runs if r.best is not None]
    metrics = [m for m, _ in objectives] + [m for m in ALSO_SHOWN if m not in dict(objectives)
                                            and counted
                                            and all(_finite(b.metrics.get(m)) for b in counted)]
    for c in configs.values():
        summarise(c, metrics)
    ranked = rank_configs(list(configs.values()), objectives)
    order = [c.trial for c in search.candidates if c.trial in configs]
    holds, notes = verdict(ranked, order, objectives)
    return Confirmation(search=record.name, objectives=objectives, metrics=metrics,
                        seeds=seeds, configs=ranked, search_order=order, holds=holds,
                        notes=notes, deploy=deploy_candidate(sdir, ranked, objectives))


def summarise(config: ConfirmedConfig, metrics: list[str]) -> None:
    """Mean and sample std of each metric over the configuration's finished runs."""
    bests = [r.best for r in config.runs if r.best is not None]
    config.n = len(bests)
    for m in metrics:
        values = np.array([b.metrics[m] for b in bests if _finite(b.metrics.get(m))], float)
        if len(values):
            config.mean[m] = float(values.mean())
            config.std[m] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def rank_configs(configs: list[ConfirmedConfig],
                 objectives: list[tuple[str, str]]) -> list[ConfirmedConfig]:
    """By confirmed mean, with the deploy rule's order (front, then first
    objective); configurations with no finished run come last, unranked."""
    done = [c for c in configs if all(m in c.mean for m, _ in objectives)]
    rest = [c for c in configs if c not in done]
    if not done:
        return rest
    values = np.array([[c.mean[m] for m, _ in objectives] for c in done], float)
    order = deploy_order(values, [mode for _, mode in objectives])
    ranked = [done[i] for i in order]
    for position, c in enumerate(ranked, 1):
        c.rank = position
    return ranked + rest


def verdict(ranked: list[ConfirmedConfig], search_order: list[str],
            objectives: list[tuple[str, str]]) -> tuple[bool | None, list[str]]:
    """Whether the search's order of the top-K survives the seed spread, and
    why, pair by pair (neighbours in the confirmed order, first objective)."""
    metric = objectives[0][0]
    done = [c for c in ranked if c.rank > 0 and metric in c.mean]
    notes: list[str] = []
    if len(done) < 2:
        return None, ["fewer than two configurations confirmed: nothing to compare"]
    if any(c.n < 2 for c in done):
        notes.append("a std needs two seeds per configuration: run `stain-search confirm` "
                     "with --seeds 2 or more")
        return None, notes
    holds = [c.trial for c in done] == [t for t in search_order if t in {c.trial for c in done}]
    if not holds:
        notes.append("the confirmed order (" + ", ".join(f"#{c.number}" for c in done)
                     + ") differs from the search's: the search's order was partly seed noise")
    for a, b in zip(done, done[1:]):
        gap = abs(a.mean[metric] - b.mean[metric])
        spread = max(a.std[metric], b.std[metric])
        if not gap > spread:
            holds = False
            notes.append(f"#{a.number} and #{b.number} are within one std of {metric} "
                         f"({gap:.3g} apart, seed std {spread:.3g}); confirm with more "
                         f"--seeds before trusting this order")
        else:
            notes.append(f"#{a.number} leads #{b.number} by {gap:.3g} {metric}, "
                         f"{gap / spread:.1f}× the larger seed std")
    failed = [c for c in done if c.failed]
    for c in failed:
        notes.append(f"#{c.number}: {c.failed} of {len(c.runs)} seed run(s) failed "
                     f"(diverged): it is less robust than its mean says")
    return holds, notes


def deploy_candidate(sdir: SearchDir, ranked: list[ConfirmedConfig],
                     objectives: list[tuple[str, str]]) -> Candidate | None:
    """The deploy rule over the best-confirmed configuration's kept checkpoints:
    its search run's and its confirmation runs'."""
    if not ranked or ranked[0].rank != 1:
        return None
    top = ranked[0]
    folders = [sdir.trials / top.trial] + [sdir.confirmation.trials / r.trial for r in top.runs
                                           if r.best is not None]
    candidates = [c for folder in folders for c in gather_trial(folder, list(top.params), {})
                  if None not in c.values(objectives)]
    best = rank(candidates, objectives)
    if not best:
        return None
    chosen = best[0]
    runs = {r.trial: r.best.run_id for r in top.runs if r.best is not None}
    chosen.run_id = runs.get(chosen.trial, top.run_id)
    chosen.number = top.number
    chosen.params = dict(top.params)
    chosen.state = "CONFIRMED"
    seed = {r.trial: r.seed for r in top.runs}.get(chosen.trial)
    if chosen.checkpoint.is_relative_to(sdir.confirmation.root):
        chosen.trial = f"{top.trial}.seed{seed}"  # the seed run of the trial it confirms
    return chosen


# --- showing it ---------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def _pm(c: ConfirmedConfig, m: str) -> str:
    if m not in c.mean:
        return "-"
    std = c.std.get(m, float("nan"))
    return f"{c.mean[m]:.4g} ± {std:.2g}" if math.isfinite(std) else f"{c.mean[m]:.4g}"


def format_confirmation(conf: Confirmation) -> str:
    goal = ", ".join(f"{m} {mode}" for m, mode in conf.objectives)
    out = [f"search {conf.search!r}: {len(conf.configs)} configuration(s) re-trained with "
           f"train.seed {', '.join(map(str, conf.seeds))}; ranked by the mean of {goal}",
           f"  ({conf.finished} of {conf.expected} runs finished; mean ± std over the new "
           f"seeds; 'search' is the search's own run, left out of the mean)"]
    params = sorted({k for c in conf.configs for k in c.params})
    first = conf.objectives[0][0]
    head = ["rank", "trial", "#", "n", *[f"{m} (mean ± std)" for m in conf.metrics],
            f"search {first}", *params]
    rows = [[str(c.rank or "-"), c.trial, _fmt(c.number), str(c.n),
             *[_pm(c, m) for m in conf.metrics], _fmt(c.original.get(first)),
             *[_fmt(c.params.get(k)) for k in params]] for c in conf.configs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out += ["", line(head), line(["-" * w for w in widths]), *map(line, rows), ""]
    if conf.holds is not None:
        out.append("the search's ranking " + ("holds over the seeds" if conf.holds
                                              else "does not survive the seed spread"))
    out += [f"note: {n}" for n in conf.notes]
    if conf.deploy is not None:
        out.append(f"deploy (confirmed): #{conf.deploy.number}, {conf.deploy.trial} at epoch "
                   f"{conf.deploy.epoch}: stain-search export {conf.search} --confirmed")
    return "\n".join(out)
