"""Kill a running search (SIGKILL, mid-trial) and resume it: no finished
trial is lost or run again, MLflow has one run per trial with each epoch
logged once, and the Optuna study agrees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import ensure_local_ray, tiny_space_yaml, wait_until_gone
from stain_search import tracking
from stain_search.cli import main
from stain_search.spaces import load_space
from stain_search.study import load_study

pytestmark = pytest.mark.slow


def test_killed_search_resumes_without_losing_or_repeating(tmp_path, monkeypatch):
    space = tmp_path / "resume.yaml"
    space.write_text(tiny_space_yaml(name="resume", max_concurrent=1, pruner="none",
                                     base={"train.steps_per_epoch": 6}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "stain_search.cli", "run", str(space), "--storage",
           str(tmp_path / "runs"), "--tracking-uri", uri]
    journal = tmp_path / "runs" / "resume" / "study.journal"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    spec = None
    deadline = time.monotonic() + 480
    try:
        while time.monotonic() < deadline:  # until trial 0 is done and trial 1 has begun
            time.sleep(2)
            assert proc.poll() is None, "the search ended before it could be killed"
            if not journal.exists():
                continue
            spec = spec or load_space(tmp_path / "runs" / "resume" / "space.yaml")
            trials = load_study(spec, journal).get_trials(deepcopy=False)
            if (len(trials) >= 2 and trials[0].state == optuna.trial.TrialState.COMPLETE
                    and trials[1].intermediate_values):
                break
        else:
            pytest.fail("the search did not reach its second trial in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=60)
    first = load_study(spec, journal).trials[0]
    wait_until_gone(proc.pid)  # the killed driver's Ray is gone too

    # The resume, in this process on the session's Ray (a driver given --address):
    # what it finds is what the killed process left on disk.
    ensure_local_ray()
    monkeypatch.chdir(tmp_path)
    assert main(cmd[3:] + ["--resume"]) == 0

    trials = load_study(spec, journal).get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[0].datetime_complete == first.datetime_complete  # not run again
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("resume")
    runs = tracking.trial_runs(c, exp.experiment_id, search="resume")
    assert sorted(int(r.data.tags[tracking.OPTUNA_TRIAL]) for r in runs) == [0, 1, 2]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS] == "finished"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss_G")]
        assert steps == [1, 2, 3], (run.info.run_name, steps)  # each epoch once
    parents = [r for r in c.search_runs([exp.experiment_id])
               if r.data.tags.get(tracking.ROLE) == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
