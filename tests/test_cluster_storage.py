"""A search on two Ray nodes that share no disk, kept in S3 (issue 16, tests a and e).

The cluster (tests/cluster_services.py): a head and ``node2``, one CPU each,
each with its own working directory and node-local scratch; an S3 server
(moto) holds the search. The driver runs in a third directory with its own
mirror. Nothing here may work by one node reading another's files: after
the search every node's scratch and the driver's mirror are deleted, and
`best` and `export` run from a fourth, fresh directory against the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import tiny_space_yaml
from stain_search import tracking
from stain_search.study import open_study

pytestmark = pytest.mark.cluster
TS = optuna.trial.TrialState


def _cli(args, *, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "stain_search.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _machine(cluster, root: Path, who: str) -> tuple[Path, dict[str, str]]:
    """A working directory and environment of its own: a machine without the others' disks."""
    cwd = root / who
    cwd.mkdir(parents=True, exist_ok=True)
    return cwd, cluster.driver_env(STAIN_SEARCH_MIRROR=str(cwd / "mirror"),
                                   STAIN_SEARCH_SCRATCH=str(cwd / "scratch"),
                                   STAIN_SEARCH_NO_PROGRESS="1")


def _checkpoints(folder: Path) -> dict[str, set[str]]:
    """{trial: {checkpoint folders}} with weights in a scratch folder."""
    found: dict[str, set[str]] = {}
    for state in folder.rglob("state.pt"):
        found.setdefault(state.parent.parent.name, set()).add(state.parent.name)
    return found


def _epochs(c, run_id: str) -> list[int]:
    return [m.step for m in c.get_metric_history(run_id, "loss_G")]


@pytest.mark.timeout(900)
def test_two_nodes_no_shared_disk_search_in_s3(ray_cluster, s3_server, tmp_path):
    name, storage = "nodes", f"s3://{s3_server.bucket}/two-nodes"
    driver, env = _machine(ray_cluster, tmp_path, "driver")
    space = driver / "space.yaml"
    # Two trials at once on two 1-CPU nodes: one of them runs on node2.
    space.write_text(tiny_space_yaml(name=name, num_samples=2, max_concurrent=2, epochs=2,
                                     pruner="none"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage", storage, "--tracking-uri", uri]
    for node in (ray_cluster.head, ray_cluster.node2):
        shutil.rmtree(node.scratch, ignore_errors=True)
        node.scratch.mkdir()
    run = _cli(["run", str(space), "--address", ray_cluster.address, *common], cwd=driver, env=env)
    assert run.returncode == 0, run.stderr[-3000:]

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(name)
    runs = tracking.trial_runs(c, exp.experiment_id, search=name)
    where = {r.data.tags[tracking.TRIAL]: ray_cluster.node_name(r.data.tags[tracking.NODE])
             for r in runs}
    assert sorted(where.values()) == ["head", "node2"], where
    # Each node's scratch has its own trial's checkpoints only, and every one
    # of them is in the bucket: nothing lives only on a node's disk.
    keys = set(s3_server.keys(f"two-nodes/{name}/trials/"))
    for node in (ray_cluster.head, ray_cluster.node2):
        local = _checkpoints(node.scratch)
        assert set(local) == {t for t, n in where.items() if n == node.name}, (node.name, local)
        for trial, folders in local.items():
            for folder in folders:
                assert f"two-nodes/{name}/trials/{trial}/{folder}/state.pt" in keys, keys
    assert not list((driver / "mirror").rglob("state.pt"))  # the driver read no weights
    for r in runs:  # MLflow has every epoch of both
        assert _epochs(c, r.info.run_id) == [1, 2], r.data.tags[tracking.TRIAL]

    # A fresh machine, with nothing but the bucket and MLflow: best and export.
    for node in (ray_cluster.head, ray_cluster.node2):
        shutil.rmtree(node.scratch, ignore_errors=True)
        node.scratch.mkdir()
    shutil.rmtree(driver / "mirror")
    laptop, env2 = _machine(ray_cluster, tmp_path, "laptop")
    best = _cli(["best", name, "--json", *common], cwd=laptop, env=env2)
    assert best.returncode == 0, best.stderr[-2000:]
    chosen = json.loads(best.stdout)["candidates"][0]
    export = _cli(["export", name, "--out", str(laptop / "model"), *common], cwd=laptop, env=env2)
    assert export.returncode == 0, export.stderr[-2000:]
    assert (laptop / "model" / "generator.safetensors").is_file()
    assert json.loads((laptop / "model" / "model.json").read_text())["provenance"]["trial"] \
        == chosen["trial"]


def _study_of(journal: Path, name: str):
    if not journal.is_file():
        return []
    try:
        return open_study(name, journal).get_trials(deepcopy=False)
    except (KeyError, ValueError):
        return []


@pytest.mark.timeout(900)
def test_driver_killed_then_resumed_from_s3_elsewhere(ray_cluster, s3_server, tmp_path):
    name, storage = "killed", f"s3://{s3_server.bucket}/killed"
    driver, env = _machine(ray_cluster, tmp_path, "driver")
    space = driver / "space.yaml"
    # One trial at a time (as tests/test_resume.py): the second trial's epochs
    # give a wide window to kill the driver in with the first one finished.
    space.write_text(tiny_space_yaml(name=name, num_samples=3, max_concurrent=1, epochs=3,
                                     pruner="none", base={"train.steps_per_epoch": 6}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--address", ray_cluster.address, "--storage", storage, "--tracking-uri", uri]
    journal = driver / "mirror" / "s3" / s3_server.bucket / "killed" / name / "study.journal"
    proc = subprocess.Popen([sys.executable, "-m", "stain_search.cli", "run", str(space), *common],
                            cwd=driver, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 480
    try:
        while time.monotonic() < deadline:  # a trial done, another one mid-way
            time.sleep(0.5)
            assert proc.poll() is None, "the search ended before it could be killed"
            trials = _study_of(journal, name)
            if any(t.state == TS.COMPLETE for t in trials) and any(
                    t.state == TS.RUNNING and t.intermediate_values for t in trials):
                break
        else:
            pytest.fail("the search did not reach a finished and a running trial in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver; the cluster stays up
        proc.wait(timeout=60)
    finished = {t.number: t.value for t in _study_of(journal, name) if t.state == TS.COMPLETE}

    # Resumed on another machine: the driver's mirror is gone with its machine.
    other, env2 = _machine(ray_cluster, tmp_path, "other")
    done = _cli(["resume", name, *common], cwd=other, env=env2, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    trials = _study_of(other / "mirror" / "s3" / s3_server.bucket / "killed" / name /
                       "study.journal", name)
    assert [t.number for t in trials] == [0, 1, 2], [t.number for t in trials]
    assert all(t.state == TS.COMPLETE for t in trials), [t.state for t in trials]
    for number, value in finished.items():  # what was finished is kept as it was
        assert trials[number].value == pytest.approx(value)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(name)
    runs = tracking.trial_runs(c, exp.experiment_id, search=name)
    assert sorted(int(r.data.tags[tracking.OPTUNA_TRIAL]) for r in runs) == [0, 1, 2]
    for r in runs:  # each epoch once, and the study agrees with MLflow
        assert _epochs(c, r.info.run_id) == [1, 2, 3], r.data.tags[tracking.TRIAL]
        assert r.data.tags[tracking.STATUS] == "finished"
    summary = json.loads(s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"killed/{name}/summary.json")["Body"].read())
    assert summary["deploy"]["trial"] in {f"trial_{n:03d}" for n in range(3)}


def test_a_local_storage_on_two_nodes_needs_shared_fs(ray_cluster, tmp_path):
    """The other node could not see it: refused before anything is written."""
    driver, env = _machine(ray_cluster, tmp_path, "driver")
    space = driver / "space.yaml"
    space.write_text(tiny_space_yaml(name="local", num_samples=1, epochs=1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _cli(["run", str(space), "--address", ray_cluster.address, "--storage",
                str(driver / "runs"), "--tracking-uri", uri], cwd=driver, env=env, timeout=180)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("stain-search: error: --storage ") and "--shared-fs" in last, last
    assert "s3://" in last and "2 nodes" in last, last
    assert not (driver / "runs").exists() and not (tmp_path / "mlflow.db").exists()
