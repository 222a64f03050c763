"""The search's console (issue 14): what it shows, on a terminal and off one."""

from __future__ import annotations

import io
import os
import re
import sys
from types import SimpleNamespace

import pytest

from conftest import run_on_terminal, tiny_space_yaml
from stain_search.console import SearchConsole
from stain_search.spaces import Objective

OBJ = [Objective("fd_random", "min"), Objective("ssim_structure", "max")]


def _trial(tid: str, last: dict | None = None):
    return SimpleNamespace(trial_id=tid, last_result=last or {})


def _result(number: int, epoch: int, fd: float, ssim: float = 0.5) -> dict:
    return {"config": {"optuna_number": number}, "epoch": epoch, "fd_random": fd,
            "ssim_structure": ssim, "images_per_s": 2.5}


def test_the_view_shows_running_trials_counts_best_and_eta():
    out = io.StringIO()
    console = SearchConsole(name="lam", objectives=OBJ, num_samples=6, max_concurrent=2,
                            epochs=4, done_before={"complete": 1, "pruned": 0, "failed": 0},
                            live=False, stream=out)
    console.on_trial_result(0, [], _trial("a"), _result(1, 1, 9.0))
    console.on_trial_result(0, [], _trial("b"), _result(2, 1, 7.5))
    console.on_trial_result(0, [], _trial("a"), _result(1, 2, 6.0))
    lines = console.lines()
    assert lines[0].startswith("search lam — 1/6 done (1 complete, 0 pruned, 0 failed, "
                               "2 running, 3 pending) · ")
    assert "ETA" in lines[0]
    assert lines[1] == "  #1  epoch 2/4  fd_random 6  ssim_structure 0.5  2.5 img/s"
    assert lines[2] == "  #2  epoch 1/4  fd_random 7.5  ssim_structure 0.5  2.5 img/s"
    assert lines[3] == "  best so far: #1 at epoch 2, fd_random 6"
    # Off a terminal: one line per trial that ends, and nothing else.
    console.on_trial_complete(0, [], _trial("a", {"pruned": 1}))
    console.on_trial_error(0, [], _trial("b"))
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("trial #1 pruned at epoch 2  fd_random 6  ssim_structure 0.5")
    assert printed[0].endswith("— 2/6 done, best so far: #1 at epoch 2, fd_random 6")
    assert printed[1].startswith("trial #2 failed at epoch 1")
    assert len(printed) == 2
    assert console.counts == {"complete": 1, "pruned": 1, "failed": 1}


def test_a_trial_s_time_counts_from_its_start_not_its_first_result(monkeypatch):
    import stain_search.console as console_module

    now = [100.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    console = SearchConsole(name="t", objectives=OBJ[:1], num_samples=1, max_concurrent=1,
                            epochs=2, done_before={}, live=False, stream=out)
    console.on_trial_start(0, [], _trial("a"))                      # t = 100
    now[0] = 130.0
    console.on_trial_result(0, [], _trial("a"), _result(0, 1, 9.0))  # its first result
    now[0] = 131.0
    console.on_trial_complete(0, [], _trial("a"))
    assert "(31s)" in out.getvalue(), out.getvalue()


def test_a_storage_stop_is_left_to_the_driver():
    out = io.StringIO()
    console = SearchConsole(name="x", objectives=OBJ[:1], num_samples=2, max_concurrent=1,
                            epochs=2, done_before={}, live=False, stream=out)
    console.on_trial_result(0, [], _trial("a"), _result(0, 1, 3.0))
    console.on_trial_complete(0, [], _trial("a", {"storage_error": "No space left"}))
    assert out.getvalue() == "" and console.done == 0


@pytest.mark.slow
def test_a_search_under_a_terminal_shows_the_live_view(tmp_path):
    space = tmp_path / "live.yaml"
    space.write_text(tiny_space_yaml(name="live", num_samples=2, max_concurrent=1,
                                     pruner="none", epochs=2))
    rc, text = run_on_terminal([sys.executable, "-m", "stain_search.cli", "run", str(space),
                                "--storage", str(tmp_path / "runs"), "--tracking-uri",
                                f"sqlite:///{tmp_path / 'mlflow.db'}"],
                               cwd=tmp_path, env={**os.environ, "COLUMNS": "160", "TERM": "xterm"})
    assert rc == 0, text[-3000:]
    assert re.search(r"search live — \d/2 done \(", text), text[-3000:]
    assert re.search(r"best so far: #\d at epoch \d, fd_random \d", text), text[-3000:]
    assert "Trial status" not in text and "Configuration for experiment" not in text
