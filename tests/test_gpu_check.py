"""bench/gpu_check.sh runs end to end in its CPU mode (``--cpu-smoke``), as a
user runs it, so the script is ready when a GPU machine is at hand. It checks
that every step ran and wrote its record, never a timing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_bench_loader import check_data_loader
from test_bench_smoke import check_meta, check_train_step

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """`bench/gpu_check.sh --cpu-smoke`, once: its steps include the bench
    scripts' own smoke modes (train_step, data_loader, translate), whose
    output the tests below check on this run."""
    out = tmp_path_factory.mktemp("gpu-check") / "results"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=out.parent, env=env,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def step_output(out: Path, name: str) -> tuple[str, dict]:
    record = json.loads((out / f"{name}.json").read_text())
    check_meta(record)
    return (out / f"{name}.log").read_text(), record


@pytest.mark.slow
@pytest.mark.timeout(1900)  # ~5 min on an idle 2-core box; 16 on a loaded one
def test_gpu_check_cpu_smoke(smoke_run):
    out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert summary["cpu_smoke"] is True
    for name in ("cuda", "train_step", "trial", "trial_figures", "translate"):
        assert steps[name] == "ok", steps
    assert steps["gpu_utilisation"].startswith("skipped")
    cuda = json.loads((out / "cuda.json").read_text())
    assert cuda["ok"] and cuda["device_used"] == "cpu" and cuda["bf16_dtype"] == "torch.bfloat16"
    trial = json.loads((out / "trial.json").read_text())
    assert [e["epoch"] for e in trial["epochs"]] == [1, 2]  # the tiny trial's two epochs
    assert all(e["time_train_s"] > 0 for e in trial["epochs"])
    for name in ("train_step", "translate"):
        assert json.loads((out / f"{name}.json").read_text())["rows"]
    if (SCRIPT.parent / "data_loader.py").exists():
        assert steps["data_loader"] == "ok", steps


@pytest.mark.slow
def test_train_step_smoke(smoke_run):
    check_train_step(*step_output(smoke_run, "train_step"))


@pytest.mark.slow
def test_data_loader_smoke(smoke_run):
    check_data_loader(*step_output(smoke_run, "data_loader"))
