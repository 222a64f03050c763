"""Ctrl-C and SIGTERM, then resume: nothing lost, nothing run twice, the stores agree.

One search is stopped three times, at the three moments that matter — while
its first trial starts, mid-epoch, and between trials — alternating SIGINT
(a terminal's Ctrl-C, sent to the whole process group) and SIGTERM (what a
cluster scheduler sends the driver), and resumed after each. Each stop must exit 130
with the resume command, leave no trial FAIL in the study, and the final
study and MLflow must agree trial by trial (state, value, every epoch
logged once) with ``num_samples`` useful trials.

While the first driver runs, a second one is refused (the driver lock) and
``stain-search status`` reads the live search without Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import tiny_space_yaml
from stain_search import tracking
from stain_search.cli import main
from stain_search.lock import read_driver
from stain_search.search_dir import SearchDir
from stain_search.study import open_study

pytestmark = pytest.mark.slow
TS = optuna.trial.TrialState
NAME, SAMPLES, TOTAL, EPOCHS = "stops", 3, 5, 3


def _trials(sdir: SearchDir):
    if not sdir.study_journal.exists():
        return []
    try:
        return open_study(NAME, sdir.study_journal).get_trials(deepcopy=False)
    except KeyError:
        return []


def _driver_pid(sdir: SearchDir) -> int | None:
    info = read_driver(sdir.driver_file)
    return info.pid if info else None


def _wait(proc, until, *, what: str, timeout: float = 420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        assert proc.poll() is None, f"the search ended before {what}"
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


MOMENTS = {
    # name: (signal, condition on the study's trials)
    "while its trial starts": (signal.SIGINT, lambda ts: any(
        t.state == TS.RUNNING and not t.intermediate_values for t in ts)),
    "mid-epoch": (signal.SIGTERM, lambda ts: any(
        t.state == TS.RUNNING and t.intermediate_values for t in ts)),
    "between trials": (signal.SIGINT, lambda ts: sum(t.state == TS.COMPLETE for t in ts) >= 2),
}


@pytest.mark.timeout(1800)  # five driver runs (each starts Ray); ~3 min on an idle 2-core machine
def test_stopped_three_times_then_resumed_loses_and_repeats_nothing(tmp_path, capsys):
    space = tmp_path / "stops.yaml"
    space.write_text(tiny_space_yaml(name=NAME, num_samples=SAMPLES, max_concurrent=1,
                                     pruner="none", epochs=EPOCHS,
                                     base={"train.steps_per_epoch": 6}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    sdir = SearchDir.of(storage, NAME)
    common = ["--storage", str(storage), "--tracking-uri", uri]
    cli = [sys.executable, "-m", "stain_search.cli"]
    first_cmd = cli + ["run", str(space), *common]
    resume_cmd = cli + ["resume", NAME, *common]

    def status() -> dict:  # read in this process: no Ray, nothing the signals reach
        capsys.readouterr()
        assert main(["status", NAME, "--json", *common]) == 0
        return json.loads(capsys.readouterr().out)

    for i, (moment, (sig, condition)) in enumerate(MOMENTS.items()):
        proc = subprocess.Popen(first_cmd if i == 0 else resume_cmd, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _wait(proc, lambda: condition(_trials(sdir)), what=moment)
            # Ctrl-C reaches a terminal's whole process group; a scheduler's
            # SIGTERM reaches the driver (Kubernetes: the container's main
            # process). A SIGTERM to the group would also end the local Ray
            # cluster's own processes, which do not block it as they do SIGINT.
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        assert proc.returncode == 130, (moment, err[-3000:])
        assert f"interrupted ({signal.Signals(sig).name}) — `stain-search resume {NAME}` " \
               f"continues it" in err, err[-2000:]
        assert "Tuner.restore" not in out + err
        states = [t.state for t in _trials(sdir)]
        assert TS.FAIL not in states, (moment, states)
        assert status()["state"] == "interrupted"

    # The last resume extends the budget (--num-samples) and runs to the end.
    # While it runs, a second driver is refused and `status` reads it live.
    proc = subprocess.Popen(resume_cmd + ["--num-samples", str(TOTAL)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # The journal still holds the interrupted trial as RUNNING: wait for this
        # driver to hold the lock (driver.json names it) before a second one races it.
        _wait(proc, lambda: _driver_pid(sdir) == proc.pid, what="the driver lock")
        again = subprocess.run(resume_cmd, cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        live = status()
        if proc.poll() is None:  # the driver lived through both: they saw it running
            assert again.returncode == 2, again.stderr
            assert f"search {NAME!r} is running (pid {proc.pid} on" in again.stderr
            assert live["state"] == "running" and live["driver"]["alive"]
            assert live["driver"]["pid"] == proc.pid
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-3000:]

    trials = _trials(sdir)
    assert [t.number for t in trials] == list(range(TOTAL))  # num_samples useful trials
    assert all(t.state == TS.COMPLETE for t in trials), [t.state for t in trials]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(NAME)
    record = sdir.read_record()
    runs = {int(r.data.tags[tracking.OPTUNA_TRIAL]): r for r in tracking.trial_runs(
        c, exp.experiment_id, search=NAME, search_id=record.search_id)}
    assert sorted(runs) == [t.number for t in trials]
    for t in trials:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS] == "finished"
        assert tracking.ERROR not in run.data.tags, run.data.tags.get(tracking.ERROR)
        history = c.get_metric_history(run.info.run_id, "fd_random")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))  # each epoch once
        # The study was told the deploy rule's value (the trial's best epoch), from what MLflow has.
        assert t.value == pytest.approx(min(m.value for m in history))
        assert sorted(t.intermediate_values) == list(range(1, EPOCHS + 1))
    parents = [r for r in c.search_runs([exp.experiment_id])
               if r.data.tags.get(tracking.ROLE) == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
