"""The benchmark scripts in bench/ run in their tiny mode (``--smoke-test``),
print a table and write a JSON record that holds what the README quotes.

Scripts run as a user runs them (a subprocess, by path), so an import that
only works from the repository root, or a flag that was renamed, fails here.
Nothing here checks a timing: the figures come from the scripts, by hand.
"""

from __future__ import annotations

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
    meta = record["meta"]
    assert meta["command"] and meta["date_utc"] and meta["cpu_count"] >= 1
    assert "loadavg_start" in meta and "loadavg_end" in meta
    return proc.stdout, record


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


def test_train_step_smoke(tmp_path):
    stdout, record = run_bench("train_step", tmp_path)
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
        # The split is complete: its parts add up to the measured extra wall time.
        assert sum(r["seconds"] for r in search["rows"]) == pytest.approx(search["extra_s"])
        for r in search["rows"]:
            if "Δ" not in r["cost"] and r["cost"] != "unattributed":
                assert r["seconds"] >= 0, (mode, r)
        assert search["wall_s"] > record["plain"]["wall_s"]
        (measured, sixty) = search["extrapolated"]
        assert sixty["epoch_s"] == 60 and 0 < sixty["share_trial"] < measured["share_trial"]
    assert "Train worker start" not in {r["cost"] for r in record["in_trial"]["rows"]}
