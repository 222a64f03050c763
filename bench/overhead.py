"""Orchestration cost: what a search adds on top of the training it runs.

The same small training runs three times:

1. **plain loop** — ``stain_search.train.run_training`` in this process with
   a reporter that throws results away (the loop still evaluates and writes
   its checkpoints, as it does inside a search);
2. **search** — ``stain_search.search.run_search`` of a space whose trials
   all train with those settings (``--trials``, default 2, one at a time):
   Ray start, Tune, an Optuna study, MLflow tracking, checkpoints persisted,
   once per executor (``--modes``):

   - ``ray_train``: a Ray Train ``TorchTrainer`` with one worker per trial
     (``resources.executor: ray_train``);
   - ``in_trial``: the training loop inside the Tune trial process
     (``resources.executor: in_trial``, what ``auto`` picks for one worker;
     Tune reuses the trial actor for the next trial);
   - ``in_trial_fresh``: the same with a fresh trial actor per trial
     (``reuse_actors=False`` patched in), to show what the reuse saves.

The extra wall time of each search over *trials ×* 1 is split using time stamps the
benchmark adds from outside, without changing the library: driver-side spans
around ``ray.init``/``ray.shutdown``, ``Tuner.fit``, every MLflow and Optuna
call, and, in the trial and worker processes (reached by wrapping the trial
function, which Ray ships by value), spans around the TorchTrainer, the
worker function, ``run_training``, ``ray.train.report`` or the in-trial
checkpoint copy (checkpoint persistence) and the per-epoch MLflow/pruning
calls. The training loop's own
per-epoch timings (``time_train_s``, ``time_eval_s``, ``time_checkpoint_s``)
give the in-loop differences.

A 5-minute trial is too long to run here often: the benchmark measures a
short trial and **extrapolates** the share of a 5-minute trial from the fixed
per-trial cost, the per-epoch cost and the epoch length (printed, labelled as
an extrapolation). Per-search costs (Ray start, the parent MLflow run) are
shown apart: a search pays them once, not per trial.

    python bench/overhead.py                 # ~4 minutes on 2 CPU cores (3 searches)
    python bench/overhead.py --smoke-test    # tiny model; one Ray start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import common  # noqa: E402

# The bundled spaces' CPU-sized trial (search_spaces/lambda.yaml's base).
LAMBDA_BASE = {"data.crop": 64, "data.batch_size": 4, "model.depth": 4, "model.ngf": 16,
               "model.ndf": 16, "train.steps_per_epoch": 24}
TINY_BASE = {"data.crop": 32, "data.batch_size": 2, "data.eval_crops": 4, "model.depth": 3,
             "model.ngf": 8, "model.ndf": 8, "model.d_blocks": 2, "train.steps_per_epoch": 2}
LAMBDA_CYCLE = 10.0  # the one "searched" value: a choice of one, so both runs train alike
TRIAL_SECONDS = 300.0  # the 5-minute trial the share is quoted for


# --- time stamps, from any process -------------------------------------------------------
# These helpers live in __main__ on purpose: Ray's cloudpickle then ships them
# (and the closures that use them) by value into the trial and worker processes.

def _stamp(path: str, event: str, **extra: Any) -> None:
    import json as _json
    import os as _os
    import time as _time

    line = _json.dumps({"t": _time.time(), "event": event, "pid": _os.getpid(), **extra},
                       default=str)
    with open(path, "a") as fh:
        fh.write(line + "\n")


def _timed(path: str, label: str, fn: Callable) -> Callable:
    """``fn`` with each call recorded as a span (label, start, seconds, depth).

    ``depth`` counts enclosing *categorised* spans in this process (an MLflow
    call made by another MLflow call is depth 2), so nothing is counted twice."""
    categorised = label.split(".")[0] in ("mlflow", "optuna", "ckpt", "ray")

    def wrapper(*args, **kwargs):
        import sys as _sys
        import time as _time
        import types as _types

        state = _sys.modules.get("_bench_overhead_state")
        if state is None:  # one counter per process, whichever copy of this code runs
            state = _sys.modules["_bench_overhead_state"] = _types.ModuleType("_bench_overhead_state")
            state.depth = 0
        if categorised:
            state.depth += 1
        depth = state.depth
        t0 = _time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            if categorised:
                state.depth -= 1
            _stamp(path, "span", label=label, start=t0, seconds=_time.time() - t0,
                   depth=depth if categorised else 0)
    return wrapper


def _patch(stack: ExitStack, obj: Any, name: str, path: str, label: str) -> None:
    stack.enter_context(mock.patch.object(obj, name, _timed(path, label, getattr(obj, name))))


TRACKING_CALLS = ("client", "get_or_create_experiment", "start_search_run", "log_params",
                  "end_search_run", "fail_orphans", "start_trial_run", "log_epoch", "log_image",
                  "end_trial_run", "trial_runs")


def _patch_tracking(stack: ExitStack, path: str, where: str) -> None:
    from stain_search import tracking

    for name in TRACKING_CALLS:
        _patch(stack, tracking, name, path, f"mlflow.{name}@{where}")
    # The best checkpoint's upload to MLflow is checkpoint traffic, counted as such.
    _patch(stack, tracking, "log_checkpoint", path, f"ckpt.mlflow_upload@{where}")


def _make_runner(path: str, executor: str) -> Callable:
    """What runs a trial's training loop — ``train_worker`` on each Ray Train
    worker (ray_train) or ``run_in_trial`` in the trial process (in_trial) —
    with spans around what it does per epoch.

    The real function is looked up in the process that runs it: a reference
    captured here would travel by value, with a private copy of its globals
    that the patches below cannot reach."""
    def bench_runner(worker_ctx):
        import ray.train
        import ray.tune

        import stain_search.trainables.cyclegan as ct
        from stain_search import study

        in_trial = executor == "in_trial"
        sink = ray.tune if in_trial else ray.train  # where the epoch's report goes
        label = "ray.tune_report@worker" if in_trial else "ckpt.ray_train_report@worker"
        _stamp(path, "worker_start")
        real_report = sink.report

        def report(metrics, *args, **kwargs):
            _stamp(path, "epoch", metrics={k: v for k, v in metrics.items()
                                           if isinstance(v, (int, float))})
            return _timed(path, label, real_report)(metrics, *args, **kwargs)

        with ExitStack() as stack:
            _patch_tracking(stack, path, "worker")
            stack.enter_context(mock.patch.object(sink, "report", report))
            # Both executors write each checkpoint once into the trial folder
            # and prune it there.
            _patch(stack, ct, "prune_checkpoints", path, "ckpt.prune@worker")
            _patch(stack, study.TrialPruning, "__init__", path, "optuna.load_study@worker")
            _patch(stack, study.TrialPruning, "should_prune", path, "optuna.should_prune@worker")
            _patch(stack, ct, "run_training", path, "run_training")
            try:
                return (ct._real_run_in_trial if in_trial else ct.train_worker)(worker_ctx)
            finally:
                _stamp(path, "worker_end")
    return bench_runner


def _make_trial(path: str) -> Callable:
    """The library's trial function (cyclegan_trial) with stamps around it."""
    def bench_trial(tune_config, *, ctx):
        from ray.train.torch import TorchTrainer

        import stain_search.trainables.cyclegan as ct

        _stamp(path, "trial_start")
        if not hasattr(ct, "_real_run_in_trial"):  # a reused actor keeps the module
            ct._real_run_in_trial = ct.run_in_trial
        with ExitStack() as stack:
            _patch_tracking(stack, path, "trial")
            _patch(stack, TorchTrainer, "fit", path, "trainer_fit")
            stack.enter_context(mock.patch.object(ct, "train_worker", _make_runner(path, "ray_train")))
            stack.enter_context(mock.patch.object(ct, "run_in_trial", _make_runner(path, "in_trial")))
            try:
                return ct.cyclegan_trial(tune_config, ctx=ctx)
            finally:
                _stamp(path, "trial_end")
    return bench_trial


# --- the runs ---------------------------------------------------------------------------

class DiscardReporter:
    """The plain loop's reporter: results go nowhere (the checkpoint folder is
    still written by the loop and deleted after the call, as in a search)."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def report(self, metrics, *, checkpoint, grid) -> None:
        self.epochs.append(dict(metrics))


def space_yaml(name: str, base: dict[str, Any], *, cpus: int, trials: int, executor: str) -> str:
    lines = "\n".join(f"  {k}: {v}" for k, v in base.items())
    return textwrap.dedent(f"""\
        name: {name}
        description: sequential search for bench/overhead.py
        data: builtin:phantom-trichrome
        base:
        """) + lines + "\n" + textwrap.dedent(f"""\
        space:
          loss.lambda_cycle: {{distribution: choice, choices: [{LAMBDA_CYCLE}]}}
        objective: {{metric: frechet, mode: min}}
        search: {{algorithm: tpe, num_samples: {trials}, max_concurrent: 1, seed: 0,
                 early_stopping: {{pruner: median, grace_period: 1}}}}
        resources: {{workers_per_trial: 1, cpus_per_worker: {cpus}, gpus_per_worker: 0,
                    executor: {executor}}}
        """)


def run_plain(config, *, threads: int) -> dict[str, Any]:
    import torch

    from stain_search.train import run_training

    torch.set_num_threads(threads)  # as many as a trial's worker gets (cpus_per_worker)
    reporter = DiscardReporter()
    t0 = time.perf_counter()
    run_training(config, reporter=reporter, device=torch.device("cpu"), log=lambda m: None)
    return {"wall_s": time.perf_counter() - t0, "epochs": reporter.epochs}


# The searches measured: the library's two executors, and in_trial without
# the actor reuse the library turns on for it (patched, to show its share).
MODES = {
    "ray_train": dict(executor="ray_train", reuse_actors=None,
                      what="resources.executor: ray_train — a TorchTrainer per trial"),
    "in_trial": dict(executor="in_trial", reuse_actors=None,
                     what="resources.executor: in_trial — the loop in the Tune trial "
                          "process, trial actors reused"),
    "in_trial_fresh": dict(executor="in_trial", reuse_actors=False,
                           what="in_trial with a fresh trial actor per trial (reuse_actors off)"),
}


def run_one_search(space: Path, root: Path, *, reuse_actors: bool | None,
                   stamps: Path) -> dict[str, Any]:
    import ray
    from ray import tune

    import stain_search.search as search_mod
    import stain_search.study as study_mod
    import stain_search.study_searcher as searcher_mod
    import stain_search.trainables.cyclegan as ct

    path = str(stamps)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(ct, "cyclegan_trial", _make_trial(path)))
        if reuse_actors is not None:  # override the library's choice
            real_config = tune.TuneConfig
            stack.enter_context(mock.patch.object(
                tune, "TuneConfig", lambda **kw: real_config(**{**kw, "reuse_actors": reuse_actors})))
        _patch(stack, search_mod, "init_ray", path, "ray.init@driver")
        _patch(stack, ray, "shutdown", path, "ray.shutdown@driver")
        _patch(stack, tune.Tuner, "fit", path, "tuner_fit")
        _patch(stack, search_mod, "deploy_selection", path, "driver.summarize")
        for module in (study_mod, searcher_mod):  # the driver's and the searcher's
            _patch(stack, module, "create_study", path, "optuna.create_study@driver")
        _patch(stack, searcher_mod.StudySearcher, "suggest", path, "optuna.suggest@driver")
        _patch(stack, searcher_mod.StudySearcher, "on_trial_complete", path, "optuna.tell@driver")
        _patch_tracking(stack, path, "driver")
        _stamp(path, "search_start")
        t0 = time.perf_counter()
        summary = search_mod.run_search(space, storage=root / "runs",
                                        tracking_uri=f"sqlite:///{root / 'mlflow.db'}", verbose=0)
        wall = time.perf_counter() - t0
        _stamp(path, "search_end")
    if summary.selection.best() is None:
        raise RuntimeError(f"the search in {root} finished no trial")
    return {"wall_s": wall, "records": [json.loads(line) for line in stamps.read_text().splitlines()]}


# --- splitting the extra time -----------------------------------------------------------------

CATEGORY_OF = {  # span label prefix → category
    "mlflow.": "MLflow logging",
    "optuna.": "Optuna (ask/tell/prune)",
    "ckpt.": "checkpoint persistence",
    "ray.tune_report": "Tune report",
    "ray.init": "Ray start/stop",
    "ray.shutdown": "Ray start/stop",
}
DELTA = " (Δ vs plain loop)"  # rows that compare equal work: noise, not orchestration


def category(label: str) -> str | None:
    for prefix, name in CATEGORY_OF.items():
        if label.startswith(prefix):
            return name
    return None


def _end(span: dict[str, Any]) -> float:
    return span["start"] + span["seconds"]


def timeline(records: list[dict[str, Any]]) -> tuple[list[tuple], list[dict], list[list[dict]]]:
    """(phases, categorised spans, epochs per trial) of a sequential search.

    The phases partition the search's wall time: (name, start, end, scope,
    trial index or None); scope is "search", "trial" or "loop"."""
    spans = [r for r in records if r["event"] == "span"]

    def one(label):
        found = [s for s in spans if s["label"] == label]
        if not found:
            raise RuntimeError(f"no {label!r} time stamp: the search did not run as expected")
        return found[0]

    def many(label):
        return sorted((s for s in spans if s["label"] == label), key=lambda s: s["start"])

    def times(event):
        return sorted(r["t"] for r in records if r["event"] == event)

    init, fit = one("ray.init@driver"), one("tuner_fit")
    runs, trainers = many("run_training"), many("trainer_fit")
    ts, te, ws, we = times("trial_start"), times("trial_end"), times("worker_start"), times("worker_end")
    if not (len(ts) == len(te) == len(ws) == len(we) == len(runs)) or not ts:
        raise RuntimeError(f"unmatched trial time stamps: {len(ts)} trial starts, {len(te)} ends, "
                           f"{len(runs)} training runs")
    (start,), (stop,) = times("search_start"), times("search_end")
    phases: list[tuple] = [("driver setup (space, study, MLflow parent run)", start, init["start"],
                            "search", None),
                           ("Ray start/stop", init["start"], _end(init), "search", None)]
    for k in range(len(ts)):
        tr = trainers[k] if trainers else None
        prev = _end(init) if k == 0 else te[k - 1]
        phases += [
            ("Tune: trial scheduled, actor ready", prev, ts[k], "trial", k),
            ("trial setup", ts[k], tr["start"] if tr else ws[k], "trial", k),
            *([("Train worker start", tr["start"], ws[k], "trial", k)] if tr else []),
            ("worker setup before the loop", ws[k], runs[k]["start"], "trial", k),
            ("loop", runs[k]["start"], _end(runs[k]), "loop", k),
            ("worker after the loop", _end(runs[k]), we[k], "trial", k),
            *([("Train worker stop", we[k], _end(tr), "trial", k)] if tr else []),
            ("trial finish", _end(tr) if tr else we[k], te[k], "trial", k),
        ]
    phases += [("Tune: after the last trial", te[-1], _end(fit), "search", None),
               ("driver finish (Ray stop, summary)", _end(fit), stop, "search", None)]
    counted = [s for s in spans if category(s["label"]) and s.get("depth", 1) == 1
               and s["label"] != "ray.init@driver"]
    epochs = [[r["metrics"] for r in records if r["event"] == "epoch" and ts[k] <= r["t"] <= te[k]]
              for k in range(len(ts))]
    return phases, counted, epochs


def breakdown(search: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """Split (search wall − trials × plain wall) into named costs.

    Every categorised span (an MLflow, Optuna, checkpoint or Ray call) is
    taken out of the phase it happened in and counted under its category; a
    phase keeps the rest. Inside each trial's training loop, the difference
    from the plain loop is split into those calls and the loop's own
    per-epoch timings (training, evaluation, checkpoint write)."""
    phases, spans, epochs = timeline(search["records"])
    n = len(epochs)
    costs: dict[tuple[str, str, int | None], float] = {}

    def add(name: str, scope: str, k: int | None, seconds: float) -> None:
        costs[(name, scope, k)] = costs.get((name, scope, k), 0.0) + seconds

    def total(rows, key):
        return sum(r.get(key, 0.0) for r in rows)

    for name, a, b, scope, k in phases:
        inside = [s for s in spans if a <= s["start"] < b]
        for s in inside:
            add(category(s["label"]), "search" if scope == "search" else
                ("epoch" if scope == "loop" else "trial"), k, s["seconds"])
        if scope != "loop":
            add(name, scope, k, max(0.0, b - a - sum(s["seconds"] for s in inside)))
            continue
        deltas = {key: total(epochs[k], key) - total(plain["epochs"], key)
                  for key in ("time_train_s", "time_eval_s", "time_checkpoint_s")}
        add("training" + DELTA, "epoch", k, deltas["time_train_s"])
        add("evaluation" + DELTA, "epoch", k, deltas["time_eval_s"])
        add("checkpoint write" + DELTA, "epoch", k, deltas["time_checkpoint_s"])
        add("loop, other" + DELTA, "epoch", k, (b - a) - plain["wall_s"]
            - sum(s["seconds"] for s in inside) - sum(deltas.values()))
    extra = search["wall_s"] - n * plain["wall_s"]
    add("unattributed", "search", None, extra - sum(costs.values()))
    rows = [{"cost": name, "scope": scope, "trial": k, "seconds": sec}
            for (name, scope, k), sec in costs.items()]
    return {"extra_s": extra, "trials": n, "rows": rows,
            "epochs_per_trial": [len(e) for e in epochs],
            "run_training_s": [b - a for name, a, b, scope, k in phases if scope == "loop"]}


def by_cost(b: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per cost: per search, then each trial (fixed + its epochs); largest first."""
    table: dict[str, dict[str, Any]] = {}
    cols = ["search"] + [f"trial {k + 1}" for k in range(b["trials"])]
    for r in b["rows"]:
        line = table.setdefault(r["cost"], {"cost": r["cost"], "total": 0.0})
        col = "search" if r["trial"] is None else f"trial {r['trial'] + 1}"
        line[col] = line.get(col, 0.0) + r["seconds"]
        line["total"] += r["seconds"]
    out = sorted(table.values(), key=lambda r: (r["cost"].endswith(DELTA), -r["total"]))
    out.append({"cost": "TOTAL extra", "total": sum(r["total"] for r in out),
                **{c: sum(r.get(c, 0.0) for r in out) for c in cols}})
    return out


def steady_state(b: dict[str, Any]) -> dict[str, float]:
    """Per search / per trial / per epoch costs of orchestration (Δ rows left out).

    With two or more trials, trials 2.. are the steady state (Tune reuses the
    trial's actor; caches are warm) and what trial 1 paid beyond them is a
    per-search cost."""
    n = b["trials"]
    steady = list(range(1, n)) if n >= 2 else [0]
    fixed = [0.0] * n
    loop = [0.0] * n
    search = 0.0
    for r in b["rows"]:
        if r["cost"].endswith(DELTA):
            continue
        if r["trial"] is None:
            search += r["seconds"]
        elif r["scope"] == "epoch":
            loop[r["trial"]] += r["seconds"]
        else:
            fixed[r["trial"]] += r["seconds"]
    per_trial = sum(fixed[k] for k in steady) / len(steady)
    per_epoch = sum(loop[k] / max(b["epochs_per_trial"][k], 1) for k in steady) / len(steady)
    first_excess = (fixed[0] + loop[0]) - (per_trial + per_epoch * b["epochs_per_trial"][0]) \
        if n >= 2 else 0.0
    return {"per_search_s": search + first_excess, "per_trial_s": per_trial,
            "per_epoch_s": per_epoch, "first_trial_excess_s": first_excess}


def extrapolate(b: dict[str, Any], *, epoch_s: float, trials_per_search: int) -> dict[str, Any]:
    """Share of a 5-minute trial's wall time that orchestration adds (an extrapolation)."""
    s = steady_state(b)
    epochs_5min = TRIAL_SECONDS / epoch_s
    trial_extra = s["per_trial_s"] + s["per_epoch_s"] * epochs_5min
    return {**s, "epoch_s": epoch_s, "epochs_in_5min": epochs_5min,
            "share_trial": trial_extra / TRIAL_SECONDS,
            "share_with_search_fixed": (trial_extra + s["per_search_s"] / trials_per_search)
            / TRIAL_SECONDS,
            "trials_per_search": trials_per_search}


# --- the run ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["lambda", "tiny"], default="lambda",
                   help="lambda: search_spaces/lambda.yaml's trial; tiny: the tests' model")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trials", type=int, default=2,
                   help="sequential trials per search (≥ 2 separates per-search from per-trial costs)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: 24 (lambda.yaml)")
    p.add_argument("--cpus", type=int, default=1, help="cpus_per_worker (and the plain loop's threads)")
    p.add_argument("--trials-per-search", type=int, default=6,
                   help="to amortise per-search costs in the extrapolation (lambda.yaml: 6)")
    p.add_argument("--epoch-seconds", type=float, action="append", default=None,
                   help="epoch lengths to extrapolate for (default: the measured one and 60)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"searches to measure (default all: {', '.join(MODES)})")
    p.add_argument("--keep", default=None, help="keep the searches' folders here")
    p.add_argument("--json", default=None, help="default: bench/results/overhead.json")
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.model, args.epochs, args.trials, args.modes = "tiny", 2, 1, "ray_train,in_trial"
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from stain_search.config import load_config

    base = dict(TINY_BASE if args.model == "tiny" else LAMBDA_BASE)
    if args.steps_per_epoch:
        base["train.steps_per_epoch"] = args.steps_per_epoch
    base["train.epochs"] = args.epochs
    info = common.begin("overhead", None)  # threads: the plain loop pins its own
    config = load_config(None, {**base, "loss.lambda_cycle": LAMBDA_CYCLE})
    # Warm-up: generates the phantom and the cached reference statistics once,
    # so neither run pays for them.
    run_plain(load_config(None, {**base, "train.epochs": 1, "train.steps_per_epoch": 1,
                                 "loss.lambda_cycle": LAMBDA_CYCLE}), threads=args.cpus)
    plain = run_plain(config, threads=args.cpus)
    epoch_s = sum(e["time_train_s"] + e.get("time_eval_s", 0) + e.get("time_checkpoint_s", 0)
                  for e in plain["epochs"]) / len(plain["epochs"])
    print(f"plain loop: {plain['wall_s']:.1f} s for {args.epochs} epochs "
          f"({epoch_s:.2f} s per epoch incl. evaluation and checkpoint)")
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    results: dict[str, Any] = {"plain": {"wall_s": plain["wall_s"], "epoch_s": epoch_s,
                                         "epochs": plain["epochs"]}}
    for mode in args.modes:
        root = tmp / mode
        root.mkdir(parents=True, exist_ok=True)
        space = root / "space.yaml"
        space.write_text(space_yaml(f"overhead-{mode.replace('_', '-')}", base, cpus=args.cpus,
                                    trials=args.trials, executor=MODES[mode]["executor"]))
        run = run_one_search(space, root, reuse_actors=MODES[mode]["reuse_actors"],
                             stamps=root / "stamps.jsonl")
        b = breakdown(run, plain)
        lengths = args.epoch_seconds or [round(epoch_s, 2), 60.0]
        ext = [extrapolate(b, epoch_s=e, trials_per_search=args.trials_per_search) for e in lengths]
        results[mode] = {"wall_s": run["wall_s"], "what": MODES[mode]["what"], **b,
                         "extrapolated": ext}
        print(f"\n{mode} ({MODES[mode]['what']}): {run['wall_s']:.1f} s wall for {b['trials']} trial(s), "
              f"{b['extra_s']:.1f} s more than {b['trials']} plain loop(s) "
              f"({b['extra_s'] / (b['trials'] * plain['wall_s']):.0%} of their time)")
        cols = ["search"] + [f"trial {k + 1}" for k in range(b["trials"])]
        print(common.format_table(by_cost(b), ["cost", *cols, "total"],
                                  headers=["extra cost (s)", "per search", *cols[1:], "total"]))
        print(f"\nEXTRAPOLATED (not measured) to a {TRIAL_SECONDS / 60:.0f}-minute trial "
              f"(steady state: {'trials 2..' if b['trials'] > 1 else 'trial 1'}):")
        print(common.format_table(ext, ["epoch_s", "epochs_in_5min", "per_trial_s", "per_epoch_s",
                                        "share_trial", "per_search_s", "share_with_search_fixed"],
                                  headers=["epoch s", "epochs", "per trial s", "per epoch s",
                                           "share of trial", "per search s",
                                           f"share incl. search/{args.trials_per_search}"]))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    common.finish("overhead", args.json, info, {
        "settings": {k: v for k, v in vars(args).items() if k != "json"}, "base": base,
        "trial_seconds": TRIAL_SECONDS, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
