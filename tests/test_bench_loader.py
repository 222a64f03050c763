"""bench/data_loader.py and bench/checkerboard.py in their tiny mode: they run,
print their table and write the JSON the README quotes (no timing checked)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from test_bench_smoke import BENCH, run_bench, table_rows


def load(script: str):
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_data_loader(stdout: str, record: dict) -> None:
    """What `bench/data_loader.py --smoke-test` prints and records. It runs as a
    step of `bench/gpu_check.sh --cpu-smoke`, and is checked on that run
    (tests/test_gpu_check.py), not run a second time."""
    assert table_rows(stdout, "| set")
    rows = record["rows"]
    assert {(r["cache"], r["workers"]) for r in rows} == {(False, 0), (False, 1), (True, 0),
                                                          (True, 1)}
    for r in rows:
        assert r["warm_items_s"] > 0 and r["cold_items_s"] > 0 and r["peak_rss_mib"] > 0
        before = next(b for b in rows if not b["cache"] and b["workers"] == 0)
        assert math.isclose(r["x_before"], r["warm_items_s"] / before["warm_items_s"])
        assert (r["cache_mib_per_process"] > 0) == r["cache"]
        if r["demand_img_s"] is not None:
            assert math.isclose(r["x_demand"], r["warm_items_s"] / r["demand_img_s"])


def test_checkerboard_smoke(tmp_path):
    stdout, record = run_bench("checkerboard", tmp_path, timeout=900)
    assert table_rows(stdout, "| upsample")
    assert {(r["upsample"], r["epoch"]) for r in record["rows"]} == {
        ("resize", 0), ("resize", 1), ("transpose", 0), ("transpose", 1)}
    assert record["better"] in ("resize", "transpose")
    assert all(r["nyquist_ratio"] > 0 for r in record["rows"])


def test_nyquist_share_sees_a_checkerboard():
    checkerboard = load("checkerboard")
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.uniform(100, 140, (16, 16, 3)), 4, 0), 4, 1)  # (64, 64, 3)
    board = (np.indices((64, 64)).sum(0) % 2 * 40.0)[..., None]
    assert checkerboard.line_share(smooth, 2) < 0.01
    assert checkerboard.line_share(smooth + board, 2) > 0.5
    assert checkerboard.line_share(board.repeat(3, -1), 2) == pytest.approx(1.0)
