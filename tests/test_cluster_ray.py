"""Two real Ray nodes on this machine (tests/cluster_services.py), one CPU each:
data-parallel trials across them, and what happens when a trial cannot fit.

- A 2-worker gloo run, one worker per node, ends with bit-identical networks.
- `stain-search run --address` with a DDP space (2 workers × 1 CPU): the
  trial driver holds no CPU, so both workers are placed (one per node) and
  the search finishes; before the fix its 0.01-CPU driver left one node
  unable to hold a worker and Ray Train retried the worker group forever.
- A space that can never fit (3 workers × 1 CPU on 2 × 1 CPU) exits 2 in
  seconds, naming what it asks for and what the cluster has, writing nothing.
- A trial whose workers fit the cluster but not its free resources now (a
  CPU held by someone else) fails in bounded time, naming both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_BASE, tiny_space_yaml
from test_ddp import worker as ddp_worker
from stain_search import tracking

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DDP = "{workers_per_trial: 2, cpus_per_worker: 1, executor: ray_train, max_failures: 0}"


def stain_search(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float
                 ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "stain_search.cli", *args],
                          cwd=cwd, env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                          text=True, timeout=timeout)


def ddp_space(tmp_path: Path, name: str, resources: str = DDP, *, epochs: int = 1) -> Path:
    space = tmp_path / f"{name}.yaml"
    space.write_text(tiny_space_yaml(name=name, num_samples=1, max_concurrent=1, epochs=epochs,
                                     pruner="none", resources=resources))
    return space


# --- the services themselves ------------------------------------------------------

@pytest.mark.timeout(120)
def test_the_services_answer(ray_cluster, s3_server, monkeypatch):
    """pyarrow (as Ray Tune/Train and the storage code use it) and boto3 reach the
    S3 store through its env alone; the cluster has its two nodes."""
    from pyarrow import fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    store, path = fs.FileSystem.from_uri(f"s3://{s3_server.bucket}/services/probe.txt")
    assert type(store).__name__ == "S3FileSystem"
    with store.open_output_stream(path) as out:
        out.write(b"hello")
    assert "services/probe.txt" in s3_server.keys("services/")
    with store.open_input_stream(path) as stream:
        assert stream.read() == b"hello"
    assert sorted(ray_cluster.node_ids.values()) == ["head", "node2"]
    assert ray_cluster.head_dir != ray_cluster.node2_dir


# --- DDP across the two nodes ------------------------------------------------------

def ranked_worker(ctx: dict) -> None:
    """test_ddp's worker (trains, writes rank{r}.json with its weights' digest),
    plus the node it ran on."""
    import ray

    from stain_search.distributed import world

    ddp_worker(ctx)
    rank, _ = world()
    (Path(ctx["out"]) / f"node{rank}.txt").write_text(ray.get_runtime_context().get_node_id())


@pytest.mark.timeout(240)
def test_two_gloo_workers_on_two_nodes_hold_identical_weights(ray_cluster, tmp_path, own_ray):
    import ray
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    import test_ddp
    from stain_search.config import load_config

    for module in (sys.modules[__name__], test_ddp):
        ray.cloudpickle.register_pickle_by_value(module)
    config = load_config(None, {**TINY_BASE, "train.epochs": 1, "train.steps_per_epoch": 3,
                                "loss.r1_gamma": 1.0})
    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        TorchTrainer(
            ranked_worker, train_loop_config={"config": config.to_dict(), "out": str(tmp_path)},
            # One CPU per node: the two workers can only be placed one per node.
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="ddp2", storage_path=str(tmp_path / "ray")),
        ).fit()
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    nodes = {ray_cluster.node_name((tmp_path / f"node{r}.txt").read_text()) for r in (0, 1)}
    assert nodes == {"head", "node2"}  # really across the two nodes
    assert [r["size"] for r in ranks] == [2, 2]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # different shards
    assert ranks[0]["digest"] == ranks[1]["digest"]  # yet identical weights


@pytest.mark.timeout(300)
def test_ddp_search_on_two_one_cpu_nodes_finishes(ray_cluster, s3_server, tmp_path):
    """In S3 (no disk shared): rank 0's checkpoints reach the bucket from its node."""
    space = ddp_space(tmp_path, "ddp2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.monotonic()
    done = stain_search(["run", str(space), "--address", ray_cluster.address, "--storage",
                         f"s3://{s3_server.bucket}/ddp", "--tracking-uri", uri],
                        cwd=tmp_path, env=ray_cluster.driver_env(
                            STAIN_SEARCH_MIRROR=str(tmp_path / "mirror")), timeout=280)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    c = tracking.client(uri)
    [run] = tracking.trial_runs(c, c.get_experiment_by_name("ddp2").experiment_id,
                                search="ddp2")
    assert run.data.tags[tracking.STATUS] == "finished", run.data.tags
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss_G")] == [1]
    # Rank 0 ran on one of the two nodes and said which.
    assert ray_cluster.node_name(run.data.tags[tracking.NODE]) in ("head", "node2")
    kept = [k for k in s3_server.keys("ddp/ddp2/trials/trial_000/") if k.endswith("/state.pt")]
    assert kept, "rank 0's checkpoint did not reach the bucket"
    assert not list((tmp_path / "mirror").rglob("state.pt"))  # the driver never needed it
    print(f"ddp search: {elapsed:.0f} s")


# --- trials that do not fit ---------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_space_that_can_never_fit_exits_2_at_once(ray_cluster, tmp_path):
    space = ddp_space(tmp_path, "ddp3", resources="{workers_per_trial: 3, cpus_per_worker: 1}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Within a minute, or subprocess.TimeoutExpired fails the test (the bound, not a speed).
    done = stain_search(["run", str(space), "--address", ray_cluster.address, "--storage",
                         str(tmp_path / "runs"), "--shared-fs", "--tracking-uri", uri],
                        cwd=tmp_path, env=ray_cluster.driver_env(), timeout=60)
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    errors = [l for l in done.stderr.splitlines() if l.startswith("stain-search: error: ")]
    assert errors == done.stderr.strip().splitlines()[-1:], done.stderr
    assert "3 workers × 1 CPU" in errors[0] and "2 nodes with 1 CPU each" in errors[0]
    assert "workers_per_trial" in errors[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(240)
def test_a_worker_group_that_cannot_be_placed_fails_in_bounded_time(ray_cluster, tmp_path, own_ray):
    """node2's CPU held by another job: the cluster holds the trial, its free
    resources do not; the trial fails after the worker-group wait."""
    import ray

    space = ddp_space(tmp_path, "blocked")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False,
             namespace="blocker")
    try:
        @ray.remote(num_cpus=1, resources={"node2": 1})
        class Holder:
            def ready(self) -> bool:
                return True

        holder = Holder.remote()
        ray.get(holder.ready.remote(), timeout=60)
        # A hang would run into the timeout (subprocess.TimeoutExpired fails the test).
        done = stain_search(["run", str(space), "--address", ray_cluster.address, "--storage",
                             str(tmp_path / "runs"), "--shared-fs", "--tracking-uri", uri],
                            cwd=tmp_path, timeout=150, env=ray_cluster.driver_env(
                                RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="3",
                                STAIN_SEARCH_WORKER_GROUP_WAIT_S="6"))
    finally:
        ray.shutdown()  # the holder goes with its job
    assert done.returncode != 0, done.stdout[-3000:]
    c = tracking.client(uri)
    [run] = tracking.trial_runs(c, c.get_experiment_by_name("blocked").experiment_id,
                                search="blocked")
    assert run.data.tags[tracking.STATUS] == "failed"
    error = run.data.tags[tracking.ERROR]
    assert "2 workers × 1 CPU" in error and "could not be placed in 6 s" in error, error
    assert "2 nodes with 1 CPU each" in error, error
