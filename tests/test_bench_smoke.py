"""The benchmark scripts in bench/ run in their tiny mode (``--smoke-test``),
print a table and write a JSON record that holds what the README quotes.

Scripts run as a user runs them (a subprocess, by path), so an import that
only works from the repository root, or a flag that was renamed, fails here.
Nothing here checks a timing: the figures come from the scripts, by hand.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, tmp_path: Path, *extra: str, timeout: int = 300) -> tuple[str, dict]:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--smoke-test",
                           "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    record = json.loads(out.read_text())
    check_meta(record)
    return proc.stdout, record


def check_meta(record: dict) -> None:
    meta = record["meta"]
    assert meta["command"] and meta["date_utc"] and meta["cpu_count"] >= 1
    assert "loadavg_start" in meta and "loadavg_end" in meta


def table_rows(stdout: str, header_start: str) -> list[list[str]]:
    """The data rows of the first Markdown table whose header begins with ``header_start``."""
    lines = stdout.splitlines()
    squeeze = lambda text: " ".join(text.split())  # noqa: E731 - cells are padded
    start = next(i for i, line in enumerate(lines) if squeeze(line).startswith(squeeze(header_start)))
    assert set(lines[start + 1].replace("|", "")) == {"-"}, "no separator line under the header"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def check_train_step(stdout: str, record: dict) -> None:
    """What `bench/train_step.py --smoke-test` prints and records. It runs as a
    step of `bench/gpu_check.sh --cpu-smoke`, and is checked on that run
    (tests/test_gpu_check.py), not run a second time."""
    assert table_rows(stdout, "| phase | variant")  # the speed-up summary
    rows = record["rows"]
    variants = {(r["phase"], r["variant"]) for r in rows}
    assert {("grid", "plain"), ("grid", "fp32"), ("switches", "fused"),
            ("switches", "channels_last"), ("switches", "bf16")} <= variants
    for r in rows:
        assert not r["note"].startswith("error"), r
        assert r["img_s"] > 0 and r["steps"] >= 2 and r["gflop_img"] > 0
        assert r["peak_mib"] is not None and r["peak_mib"] > 0  # CPU: forked child's peak RSS
        assert r["r1"] is True and r["size"] == 32
    for r in rows:  # each ratio is against the plain step of the same configuration
        plain = next(p for p in rows if p["variant"] == "plain" and p["phase"] == r["phase"]
                     and p["attention"] == r["attention"])
        assert math.isclose(r["speedup"], r["img_s"] / plain["img_s"], rel_tol=1e-9)
    # FLOPs are the model's, counted once per configuration: equal for every variant of it.
    assert len({round(r["gflop_img"], 9) for r in rows if r["attention"] == "none"}) == 1


def test_eval_cost_smoke(tmp_path):
    stdout, record = run_bench("eval_cost", tmp_path)
    assert table_rows(stdout, "| features")
    canon = record["canonical"]
    assert canon["time_eval_s"] > 0 and 0 < canon["eval_share"] < 1
    (row,) = record["rows"]
    assert row["extractor"] == "random" and row["eval_images"] == 4 and row["eval_batch"] == 2
    assert row["eval_s"] > 0 and 0 < row["share"] < 1
    assert row["ref_cold_s"] > 0 and row["ref_cached_s"] > 0


def test_search_efficiency_smoke(tmp_path):
    stdout, record = run_bench("search_efficiency", tmp_path)
    assert table_rows(stdout, "| seed")
    assert table_rows(stdout, "| strategy")
    (seed,) = record["per_seed"]
    for name in ("tpe", "random"):
        trials = record["trials"][name]["0"]
        assert len(trials) == 3
        assert seed[f"{name}_total"] == sum(t["epochs"] for t in trials)
        assert all(t["state"] in ("COMPLETE", "PRUNED", "FAIL") for t in trials)
        # Random search never prunes: every trial trains every epoch.
        if name == "random":
            assert all(t["state"] != "PRUNED" and t["epochs"] == 2 for t in trials
                       if t["state"] != "FAIL")
        best = max(t["value"] for t in trials if t["state"] == "COMPLETE")
        assert seed[f"{name}_best"] == pytest.approx(best)
        if seed[f"{name}_to_target"] is not None:
            assert seed[f"{name}_to_target"] <= seed[f"{name}_total"]
    assert seed["best"] == pytest.approx(max(seed["tpe_best"], seed["random_best"]))


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    stdout, record = run_bench("overhead", tmp_path, timeout=600)
    assert table_rows(stdout, "| extra cost")
    expected = {"ray_train": {"Ray start/stop", "Train worker start", "MLflow logging",
                              "checkpoint persistence"},
                "in_trial": {"Ray start/stop", "MLflow logging", "checkpoint persistence",
                             "Tune report"}}
    for mode, must in expected.items():
        search = record[mode]
        costs = {r["cost"] for r in search["rows"]}
        assert must <= costs, (mode, costs)
        assert search["trials"] == 1 and search["epochs_per_trial"] == [2]
        assert all(math.isfinite(r["seconds"]) for r in search["rows"]), mode
        (measured, sixty) = search["extrapolated"]
        assert sixty["epoch_s"] == 60 and sixty["epochs_in_5min"] == 5
    assert "Train worker start" not in {r["cost"] for r in record["in_trial"]["rows"]}


def load_overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_split_of_a_known_timeline():
    """The split itself, on made-up time stamps (no clock involved): every
    second of the search's extra wall time lands in exactly one named cost."""
    overhead = load_overhead()

    def span(label, start, seconds):
        return {"event": "span", "label": label, "start": start, "seconds": seconds, "depth": 1}

    epoch = {"time_train_s": 3.0, "time_eval_s": 0.5, "time_checkpoint_s": 0.1}
    records = [
        {"event": "search_start", "t": 0.0},
        span("mlflow.start_search_run@driver", 0.2, 0.5),
        span("ray.init@driver", 1.0, 4.0),
        span("tuner_fit", 5.5, 20.0),
        {"event": "trial_start", "t": 6.0},
        span("trainer_fit", 6.5, 17.0),
        {"event": "worker_start", "t": 10.0},
        span("run_training", 11.0, 8.0),
        span("mlflow.log_epoch@worker", 13.5, 0.3),
        {"event": "epoch", "t": 14.0, "metrics": epoch},
        span("ckpt.ray_train_report@worker", 14.0, 0.2),
        span("mlflow.log_epoch@worker", 17.5, 0.3),
        {"event": "epoch", "t": 18.0, "metrics": epoch},
        span("ckpt.ray_train_report@worker", 18.0, 0.2),
        {"event": "worker_end", "t": 19.5},
        {"event": "trial_end", "t": 24.0},
        {"event": "search_end", "t": 27.0},
    ]
    plain = {"wall_s": 6.0, "epochs": [{"time_train_s": 2.5, "time_eval_s": 0.4,
                                        "time_checkpoint_s": 0.1}] * 2}
    b = overhead.breakdown({"wall_s": 27.0, "records": records}, plain)
    assert b["extra_s"] == pytest.approx(21.0) and b["epochs_per_trial"] == [2]
    costs = {}
    for r in b["rows"]:
        costs[r["cost"]] = costs.get(r["cost"], 0.0) + r["seconds"]
    delta = overhead.DELTA
    assert costs == pytest.approx({
        "driver setup (space, study, MLflow parent run)": 0.5, "MLflow logging": 0.5 + 0.6,
        "Ray start/stop": 4.0, "Tune: trial scheduled, actor ready": 1.0, "trial setup": 0.5,
        "Train worker start": 3.5, "worker setup before the loop": 1.0,
        "checkpoint persistence": 0.4, "training" + delta: 1.0, "evaluation" + delta: 0.2,
        "checkpoint write" + delta: 0.0, "loop, other" + delta: -0.2,
        "worker after the loop": 0.5, "Train worker stop": 4.0, "trial finish": 0.5,
        "Tune: after the last trial": 1.5, "driver finish (Ray stop, summary)": 1.5,
        "unattributed": 0.0})
    steady = overhead.steady_state(b)
    assert steady["per_trial_s"] == pytest.approx(11.0)  # the trial's own phases
    assert steady["per_epoch_s"] == pytest.approx(0.5)  # MLflow + checkpoint per epoch
    assert steady["per_search_s"] == pytest.approx(8.0)
    five_min = overhead.extrapolate(b, epoch_s=60.0, trials_per_search=6)
    assert five_min["share_trial"] == pytest.approx((11.0 + 0.5 * 5) / 300)
    assert five_min["share_with_search_fixed"] == pytest.approx((11.0 + 0.5 * 5 + 8.0 / 6) / 300)


def test_eval_stability_smoke(tmp_path):
    stdout, record = run_bench("eval_stability", tmp_path, timeout=600)
    assert table_rows(stdout, "| dataset")
    (row,) = record["stability"]
    assert row["dataset"] == "phantom" and row["crops_per_half"] == 4 and row["checkpoints"] >= 2
    for metric in ("fd_random", "kd_random", "ssim_structure", "stain_area_error", "stain_od_r"):
        assert math.isnan(row[metric]) or -1 <= row[metric] <= 1
    (share,) = record["eval_share"]
    assert share["eval_crops"] == 4 and 0 < share["share"] < 1
