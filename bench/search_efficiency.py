"""Search efficiency: which search finds a good stain model for the least
compute — random search, TPE with early stopping, or population-based training?

On the phantom set (paired: the ground truth is known), for several seeds,
each strategy spends the same budget, N trials (or N members) of E epochs,
on the same space:

    random  Optuna's RandomSampler, every trial trained to the end
    tpe     stain_search.study's TPE sampler (Bergstra et al., 2011) + its
            median pruner (Golovin et al., 2017) deciding after every epoch
    pbt     Ray Tune's PBT as a search runs it (stain_search.pbt_scheduler:
            Jaderberg et al., 2017), N members, every ``--interval`` epochs
    pb2     the same with PB2's GP-bandit explore (Parker-Holder et al., 2020)

Compute is counted in **trial-epochs** (one epoch of one trial; every epoch
costs the same here). For each seed the target is "within 5% of the best
objective any strategy found"; the figure is the trial-epochs each
strategy spent until its first *completed* trial reached the target
(a pruned trial's partial score never counts). A strategy that never reaches
it is reported as not reaching it, with the compute it spent.

**What runs:** the algorithms, not the cluster. For random and TPE each trial is
``stain_search.train.run_training`` in this process, driven by a plain Optuna
ask/tell loop with the same samplers, pruner and suggestion code as a real
search (``stain_search.study.SAMPLERS``, ``make_pruner``,
``stain_search.study.suggest``); the pruner sees each epoch's objective as
``TrialPruning`` does. Ray adds a fixed cost per trial (bench/overhead.py:
~5 s for a fresh in_trial actor, ~22 s for a TorchTrainer, on 2 CPU cores),
which would dwarf these tiny trials without changing which algorithm needs
fewer epochs. The data set is read once and shared by
all trials (``build_data`` memoised) — the same saving for both strategies.
PBT and PB2 need Tune's scheduler: they run on a local Ray (``--cpus``
members at once, default one per CPU core), each member
``run_training`` epoch by epoch, exploiting through Tune checkpoints of our
format; their wall time includes Ray's restarts at every exploit. A member's
value is its last epoch's, like a completed trial's; the population's answer
exists only when its members finish, so its compute to target is counted at
the first member that finishes within the target.

    python bench/search_efficiency.py                 # ~9 min on 2 CPU cores (6 seeds, 4 strategies)
    python bench/search_efficiency.py --metric stain_area_error --mode min
    python bench/search_efficiency.py --smoke-test
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import stain_search.train as train_mod  # noqa: E402
from stain_search.errors import TrainingDiverged  # noqa: E402
from stain_search.spaces import SearchSpec, load_space  # noqa: E402
from stain_search.study import suggest  # noqa: E402
from stain_search.context import Pruning  # noqa: E402
from stain_search.study import SAMPLERS, make_pruner  # noqa: E402

TOLERANCE = 0.05  # "within 5% of the best objective found by either strategy"

SPACE = """\
name: bench-efficiency
description: bench/search_efficiency.py — learning rate, λ and identity weight on the phantom
data: builtin:phantom-trichrome
base:
{base}
space:
  optim.lr_g: {{distribution: loguniform, low: 1.0e-5, high: 3.0e-3}}
  loss.lambda_cycle: {{distribution: loguniform, low: 1, high: 50}}
  loss.lambda_identity: {{distribution: uniform, low: 0.0, high: 1.0}}
objective: {{metric: {metric}, mode: {mode}}}
search: {{algorithm: tpe, num_samples: {trials}, max_concurrent: 1, seed: 0,
         early_stopping: {{pruner: median, grace_period: {grace}}}}}
resources: {{workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}}
"""

# Small enough for ~1-2 s per trial-epoch on one CPU core, large enough to learn colour.
BASE = {"data.crop": 32, "data.batch_size": 4, "data.eval_crops": 8, "model.depth": 3,
        "model.ngf": 8, "model.ndf": 8, "model.d_blocks": 2, "train.epochs": 6,
        "train.steps_per_epoch": 12, "train.checkpoint_every": 1000}
SMOKE_BASE = {**BASE, "data.batch_size": 2, "data.eval_crops": 4, "train.epochs": 2,
              "train.steps_per_epoch": 2}


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str  # COMPLETE | PRUNED | FAIL
    epochs: int  # trial-epochs spent
    value: float | None  # final objective (COMPLETE only)
    history: list[float] = field(default_factory=list)  # objective per epoch
    spent_at: int | None = None  # a population's trial-epochs when this member finished


class PruningReporter:
    """What TrialPruning does in a real search: report each epoch's objective
    to the study's trial and stop when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, *, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.history: list[float] = []
        self.pruned = False

    def report(self, metrics, *, checkpoint, grid) -> None:
        value = float(metrics[self.metric])
        self.history.append(value)
        if self.prune:
            self.trial.report(value, step=int(metrics["epoch"]))
            self.pruned = self.trial.should_prune()

    def should_stop(self) -> bool:
        return self.pruned


def run_trial(study: optuna.Study, spec: SearchSpec, *, prune: bool, seed: int) -> TrialRecord:
    trial = study.ask()
    values = suggest(trial, spec.params)
    config = spec.trial_config({**values, "train.seed": seed})
    metric = spec.objectives[0].metric
    reporter = PruningReporter(trial, metric, prune=prune)
    try:
        train_mod.run_training(config, reporter=reporter, device=torch.device("cpu"),
                               log=lambda m: None, should_stop=reporter.should_stop)
    except TrainingDiverged:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return TrialRecord(trial.number, values, "FAIL", len(reporter.history) + 1, None,
                           reporter.history)
    if reporter.pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return TrialRecord(trial.number, values, "PRUNED", len(reporter.history), None,
                           reporter.history)
    final = reporter.history[-1]
    study.tell(trial, final)
    return TrialRecord(trial.number, values, "COMPLETE", len(reporter.history), final,
                       reporter.history)


OPTUNA_STRATEGIES = {
    # name → (sampler name in stain_search.study.SAMPLERS, prune?)
    "random": ("random", False),
    "tpe": ("tpe", True),
}
POPULATION = ("pbt", "pb2")
STRATEGIES = (*OPTUNA_STRATEGIES, *POPULATION)


def run_population(algorithm: str, spec: SearchSpec, *, seed: int, members: int,
                   interval: int, cpus: int) -> list[TrialRecord]:
    """One PBT/PB2 run on a local Ray: ``members`` members, the search's scheduler."""
    import ray
    from ray import tune

    from stain_search.pbt import check_pbt
    from stain_search.pbt_scheduler import build_scheduler, population

    spec = dataclasses.replace(spec, search=dataclasses.replace(
        spec.search, algorithm=algorithm, num_samples=members,
        early_stopping=dataclasses.replace(spec.search.early_stopping, pruner="none"),
        pbt=dataclasses.replace(spec.search.pbt, perturbation_interval=interval)))
    t = spec.base_config().train
    spec.mutate = check_pbt(spec.search.pbt, spec.params, algorithm=algorithm,
                            num_samples=members, pruner="none", objectives=1, epochs=t.epochs,
                            eval_every=t.eval_every, checkpoint_every=1, path=spec.path)
    direction = "minimize" if spec.objectives[0].mode == "min" else "maximize"
    study = optuna.create_study(direction=direction,
                                sampler=SAMPLERS[algorithm](seed, members))
    configs = population(study, spec, resumed=[], new=members, current=lambda n: None)
    metric, mode = spec.objectives[0].metric, spec.objectives[0].mode
    from stain_search.pbt_scheduler import seed_schedulers, template

    seed_schedulers(seed)
    with tempfile.TemporaryDirectory(prefix="bench-pbt-") as tmp:
        epochs_log = Path(tmp) / "epochs.jsonl"  # every epoch any member trained, as it ended
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_member, spec=spec, seed=seed,
                                                     epochs_log=str(epochs_log)), {"cpu": 1}),
            param_space=template(configs),
            tune_config=tune.TuneConfig(
                search_alg=tune.search.BasicVariantGenerator(points_to_evaluate=configs,
                                                             max_concurrent=cpus),
                scheduler=build_scheduler(spec), num_samples=members, metric=metric,
                mode=mode, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0))
        tuner.fit()
        import json

        rows = [(e["t"], e["epoch"], e["number"], e["value"])
                for e in map(json.loads, epochs_log.read_text().splitlines())]
    ray.shutdown()
    rows.sort()  # in time: the population's compute as it was spent
    out = []
    for number in sorted({n for _, _, n, _ in rows}):
        history = [v for _, _, n, v in rows if n == number]
        ok = math.isfinite(history[-1])  # NaN: the member diverged
        out.append(TrialRecord(number, study.trials[number].params,
                               "COMPLETE" if ok else "FAIL", len(history),
                               history[-1] if ok else None, history))
    # Order members by the moment they finished: compute_to_target then walks them.
    finished = {n: max(i for i, (_, _, m, _) in enumerate(rows) if m == n) for n in
                {n for _, _, n, _ in rows}}
    for record in out:
        record.spent_at = finished[record.number] + 1
    return sorted(out, key=lambda r: r.spent_at)


def _member(config: dict, *, spec: SearchSpec, seed: int, epochs_log: str) -> None:
    """One PBT member: epochs of run_training, each epoch's checkpoint to Tune."""
    from ray import tune

    torch.set_num_threads(1)
    metric = spec.objectives[0].metric
    train_config = spec.trial_config({**config["params"], "train.seed": seed,
                                      "train.checkpoint_every": 1})
    given = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="bench-member-") as tmp:
        resume = Path(given.to_directory(tmp)) if given is not None else None

        class Report:
            def report(self, metrics, *, checkpoint, grid):
                import json

                with open(epochs_log, "a") as fh:  # one line per trained epoch (O_APPEND)
                    fh.write(json.dumps({"t": time.time(), "epoch": int(metrics["epoch"]),
                                         "number": int(config["optuna_number"]),
                                         "value": float(metrics[metric])}) + "\n")
                tune.report({metric: float(metrics[metric]), "epoch": int(metrics["epoch"])},
                            checkpoint=tune.Checkpoint.from_directory(checkpoint))

        try:
            train_mod.run_training(train_config, reporter=Report(), resume=resume,
                                   device=torch.device("cpu"), log=lambda m: None)
        except TrainingDiverged:
            tune.report({metric: float("nan"), "epoch": -1})


def run_strategy(name: str, spec: SearchSpec, *, seed: int, trials: int) -> list[TrialRecord]:
    sampler_name, prune = OPTUNA_STRATEGIES[name]
    sampler = SAMPLERS[sampler_name](seed, spec.search.population_size)
    pruning = Pruning.of(spec.search.early_stopping, spec.objectives)
    pruner = make_pruner(pruning) if prune else optuna.pruners.NopPruner()
    direction = "minimize" if spec.objectives[0].mode == "min" else "maximize"
    study = optuna.create_study(direction=direction, sampler=sampler, pruner=pruner)
    return [run_trial(study, spec, prune=prune, seed=seed) for _ in range(trials)]


def within(value: float, target_best: float, mode: str) -> bool:
    slack = TOLERANCE * abs(target_best)
    return value <= target_best + slack if mode == "min" else value >= target_best - slack


def compute_to_target(records: list[TrialRecord], best: float, mode: str) -> int | None:
    """Trial-epochs spent until the first completed trial within 5% of ``best``
    (a population: until the first member that finished within it)."""
    spent = 0
    for r in records:
        spent = r.spent_at if r.spent_at is not None else spent + r.epochs
        if r.state == "COMPLETE" and r.value is not None and within(r.value, best, mode):
            return spent
    return None


def best_of(records: list[TrialRecord], mode: str) -> float | None:
    values = [r.value for r in records if r.state == "COMPLETE" and r.value is not None]
    if not values:
        return None
    return min(values) if mode == "min" else max(values)


def memoised_build_data():
    """build_data once per data config: every trial here reads the same files."""
    real = train_mod.build_data
    cache: dict[str, Any] = {}

    def build(config, **kwargs):
        key = repr(config.data) + repr(config.eval) + repr(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = real(config, **kwargs)
        return cache[key]
    return build


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--trials", type=int, default=8,
                   help="trials per strategy and seed (PBT/PB2: the population)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {BASE['train.epochs']}")
    p.add_argument("--metric", default="ssim_gt",
                   help="objective (default ssim_gt: SSIM against the phantom's ground truth)")
    p.add_argument("--mode", default="max", choices=["min", "max"])
    p.add_argument("--grace", type=int, default=1, help="epochs before pruning may stop a trial")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated, of {', '.join(STRATEGIES)}")
    p.add_argument("--interval", type=int, default=2, help="PBT/PB2 perturbation interval (epochs)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="PBT/PB2 members training at once (one CPU core each)")
    p.add_argument("--json", default=None, help="default: bench/results/search_efficiency.json")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.seeds, args.trials, args.interval = [0], 3, 1
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: {', '.join(unknown)} not among {', '.join(STRATEGIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info = common.begin("search_efficiency", args.threads)
    base = dict(SMOKE_BASE if args.smoke_test else BASE)
    if args.epochs:
        base["train.epochs"] = args.epochs
    with tempfile.TemporaryDirectory(prefix="bench-efficiency-") as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(SPACE.format(
            base=textwrap.indent("\n".join(f"{k}: {v}" for k, v in base.items()), "  "),
            metric=args.metric, mode=args.mode, trials=args.trials, grace=args.grace))
        spec = load_space(space)
    mode = spec.objectives[0].mode
    print(f"objective {spec.objectives[0].metric} ({mode}); {args.trials} trials × "
          f"{base['train.epochs']} epochs max; seeds {args.seeds}")
    names = args.strategies
    runs: dict[str, dict[int, list[TrialRecord]]] = {name: {} for name in names}
    walls: dict[str, dict[int, float]] = {name: {} for name in names}
    t0 = time.perf_counter()
    if any(n in POPULATION for n in names):
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    with mock.patch.object(train_mod, "build_data", memoised_build_data()):
        for seed in args.seeds:
            for name in names:
                t1 = time.perf_counter()
                if name in POPULATION:
                    ray.init(num_cpus=args.cpus, include_dashboard=False,
                             log_to_driver=False, logging_level="ERROR")
                    runs[name][seed] = run_population(name, spec, seed=seed, members=args.trials,
                                                      interval=args.interval, cpus=args.cpus)
                else:
                    runs[name][seed] = run_strategy(name, spec, seed=seed, trials=args.trials)
                walls[name][seed] = time.perf_counter() - t1
                recs = runs[name][seed]
                print(f"  seed {seed} {name:6s}: best {best_of(recs, mode)}, "
                      f"{sum(r.epochs for r in recs)} trial-epochs, "
                      f"{sum(r.state == 'PRUNED' for r in recs)} pruned, "
                      f"{sum(r.state == 'FAIL' for r in recs)} failed, "
                      f"{walls[name][seed]:.0f} s", flush=True)
    per_seed = []
    for seed in args.seeds:
        bests = [b for b in (best_of(runs[n][seed], mode) for n in names) if b is not None]
        best = (min(bests) if mode == "min" else max(bests)) if bests else None
        row: dict[str, Any] = {"seed": seed, "best": best}
        for name in names:
            recs = runs[name][seed]
            row[f"{name}_best"] = best_of(recs, mode)
            row[f"{name}_to_target"] = compute_to_target(recs, best, mode) if best is not None else None
            row[f"{name}_total"] = sum(r.epochs for r in recs)
        per_seed.append(row)
    summary = []
    for name in names:
        reached = [r[f"{name}_to_target"] for r in per_seed if r[f"{name}_to_target"] is not None]
        best_values = [b for b in (r[f"{name}_best"] for r in per_seed) if b is not None]
        summary.append({
            "strategy": name, "seeds": len(per_seed), "reached": len(reached),
            "median_to_target": statistics.median(reached) if reached else None,
            "mean_to_target": statistics.fmean(reached) if reached else None,
            "mean_total": statistics.fmean(r[f"{name}_total"] for r in per_seed),
            "mean_best": statistics.fmean(best_values) if best_values else None,
            "std_best": statistics.stdev(best_values) if len(best_values) > 1 else None,
            "wins": sum(1 for r in per_seed if r["best"] is not None
                        and r[f"{name}_best"] == r["best"]),
            "mean_wall_s": statistics.fmean(walls[name].values()),
        })
    print(f"\ntrial-epochs to reach within {TOLERANCE:.0%} of the best {spec.objectives[0].metric} "
          f"any strategy found (per seed):")
    print(common.format_table(per_seed, ["seed", "best", *[f"{n}_best" for n in names],
                                         *[f"{n}_to_target" for n in names]],
                              headers=["seed", "best", *[f"{n} best" for n in names],
                                       *[f"{n} epochs→target" for n in names]]))
    print("\nsummary:")
    print(common.format_table(summary, ["strategy", "seeds", "reached", "median_to_target",
                                        "mean_total", "mean_best", "std_best", "wins",
                                        "mean_wall_s"],
                              headers=["strategy", "seeds", "reached target", "median epochs→target",
                                       "mean epochs spent", "mean best", "std best",
                                       "best of seed", "mean wall s"]))
    ratios = [r["random_to_target"] / r["tpe_to_target"] for r in per_seed
              if r.get("random_to_target") and r.get("tpe_to_target")]
    geo = common.geometric_mean(ratios)
    if "tpe" in names and "random" in names:
        print(f"\nrandom/TPE compute ratio (geometric mean over {len(ratios)} seeds where both "
              f"reached the target): {geo:.2f}" if geo else
              "\nno seed where both random and TPE reached the target")
    print(f"wall time {time.perf_counter() - t0:.0f} s (random/TPE in-process; PBT/PB2 on a "
          f"local Ray, {args.cpus} members at once)")
    common.finish("search_efficiency", args.json, info, {
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "base": base,
        "tolerance": TOLERANCE, "per_seed": per_seed, "summary": summary,
        "ratio_geomean": geo, "wall_s": {n: {str(k): v for k, v in w.items()}
                                         for n, w in walls.items()},
        "trials": {name: {str(seed): [asdict(r) for r in recs] for seed, recs in by_seed.items()}
                   for name, by_seed in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
