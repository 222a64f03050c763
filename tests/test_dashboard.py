"""`stain-search dashboard NAME` serves the search's Optuna study in
optuna-dashboard on 127.0.0.1: its API and a real browser find the study's
trials and its named objective; SIGINT (Ctrl-C) stops the server and every
process it started."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import urllib.request
import warnings

import pytest

from test_ui import (CHROMIUM, browse, free_port, kill_tree, needs_chromium, start, stop_and_check,
                     text_of, wait_for)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None,
                       reason="optuna-dashboard is not installed: pip install 'stain-search[dashboard]'"),
]
NAME = "dashtest"
METRIC = "fd_random"


@pytest.fixture()
def storage(tmp_path):
    """A search folder holding only its study journal, as `stain-search run`
    writes it: 4 finished trials, the objective named."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    folder = tmp_path / "runs" / NAME
    folder.mkdir(parents=True)
    study = optuna.create_study(
        study_name=NAME, direction="minimize",
        storage=JournalStorage(JournalFileBackend(str(folder / "study.journal"))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC])
    for lam in (2.0, 5.0, 10.0, 30.0):
        study.enqueue_trial({"loss.lambda_cycle": lam})
    study.optimize(lambda t: abs(t.suggest_float("loss.lambda_cycle", 1, 50, log=True) - 10),
                   n_trials=4)
    return tmp_path / "runs"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_few_trials_say_the_importance_is_unreliable(storage, monkeypatch, capsys):
    """4 complete trials: the dashboard still charts importance, the report does
    not (below 5): the command says so before it serves."""
    from stain_search import services
    from stain_search.cli import main

    monkeypatch.setattr(services, "serve", lambda *a, **k: 0)  # no server: the note only
    assert main(["dashboard", NAME, "--storage", str(storage), "--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "note: 4 complete trial(s): the dashboard's parameter importance is unreliable " \
           "below 5" in out, out


def test_unknown_search_is_one_clear_line(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "stain_search.cli", "dashboard", "nosuch",
                           "--storage", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no study of a search named 'nosuch'" in done.stderr


def serve(storage):
    port = free_port()
    proc = start("dashboard", NAME, "--storage", str(storage), "--port", str(port))
    try:
        wait_for(f"http://127.0.0.1:{port}/api/studies", proc, timeout=180)
    except BaseException:
        kill_tree(proc)
        raise
    return proc, port


def test_dashboard_serves_the_study_and_ctrl_c_stops_it(storage):
    proc, port = serve(storage)
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == [NAME]
        study = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert [t["state"] for t in study["trials"]] == ["Complete"] * 4
        assert study["objective_names"] == [METRIC]  # the axis label, not "Objective 0"
    except BaseException:
        kill_tree(proc)
        raise
    stop_and_check(proc, port, signal.SIGINT)


@needs_chromium
def test_dashboard_in_a_browser_shows_the_trials_and_the_objective(storage, tmp_path):
    assert CHROMIUM
    proc, port = serve(storage)
    try:
        base = f"http://127.0.0.1:{port}/dashboard/studies/0"
        trials = text_of(browse(f"{base}/trials", tmp_path / "chrome-trials"))
        history = text_of(browse(base, tmp_path / "chrome-history"))
    except BaseException:
        kill_tree(proc)
        raise
    stop_and_check(proc, port, signal.SIGTERM)
    assert "4 Trials" in trials
    for number in range(4):
        assert f"Trial {number}" in trials
    assert METRIC in history and "Objective 0" not in history
