"""A full disk stops the search at once, with one line, and loses nothing (issue 10, defect 9).

The search's storage is a real 3 MiB tmpfs: the first trial's first two
checkpoints fit, the third does not (ENOSPC inside the checkpoint write).
The driver stops the whole search on that first storage error instead of
failing and retrying every trial, prints one line naming the path and the
free space, and exits 2. The interrupted trial stays RUNNING in the study;
once the filesystem is made larger, `resume` continues it from its newest
checkpoint and the search finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from conftest import ensure_local_ray, tiny_space_yaml
from stain_search import tracking
from stain_search.cli import main
from stain_search.search_dir import SearchDir
from stain_search.study import open_study

pytestmark = pytest.mark.slow
NAME = "full"


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine refuses a tmpfs mount: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_stops_the_search_with_one_line_and_resume_finishes_it(tmp_path, small_disk,
                                                                           monkeypatch):
    space = tmp_path / "full.yaml"
    space.write_text(tiny_space_yaml(name=NAME, num_samples=2, max_concurrent=1, pruner="none",
                                     epochs=4))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage", str(small_disk), "--tracking-uri", uri]
    cli = [sys.executable, "-m", "stain_search.cli"]
    first = subprocess.run(cli + ["run", str(space), *common], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 2, first.stderr[-3000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("stain-search: error: search 'full' stopped: No space left on "
                           "device: "), last
    assert str(small_disk) in last and "MiB free" in last and "stain-search resume full" in last
    sdir = SearchDir.of(small_disk, NAME)
    study = open_study(NAME, sdir.study_journal)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]  # not FAIL
    kept = sorted(p.name for p in sdir.trial(0).iterdir() if not p.name.startswith(".tmp"))
    assert kept and all(not p.name.startswith(".tmp") for p in sdir.trial(0).iterdir())

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    ensure_local_ray()  # the resume, in this process on the session's Ray
    monkeypatch.chdir(tmp_path)
    assert main(["resume", NAME, *common]) == 0
    study = open_study(NAME, sdir.study_journal)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(NAME)
    runs = {int(r.data.tags[tracking.OPTUNA_TRIAL]): r for r in tracking.trial_runs(
        c, exp.experiment_id, search=NAME, search_id=sdir.read_record().search_id)}
    first_run = runs[0]
    assert first_run.data.tags[tracking.RESUMED_FROM] == kept[-1].rsplit("_", 1)[1].lstrip("0")
    steps = [m.step for m in c.get_metric_history(first_run.info.run_id, "loss_G")]
    assert steps == [1, 2, 3, 4]  # each epoch once
