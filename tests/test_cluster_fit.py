"""Whether a space's trials fit a cluster's nodes (plan.check_cluster), and what
a trial asks Ray for (cluster.trial_resources) — no Ray needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from stain_search.cluster import probe, trial_resources, worker_group_retries
from stain_search.errors import ConfigError
from stain_search.plan import check_cluster, describe_nodes, trials_that_fit
from stain_search.spaces import Resources

TWO_ONE_CPU = [{"CPU": 1.0, "memory": 8e9}, {"CPU": 1.0, "node2": 1.0, "memory": 8e9}]


class Spec:  # the parts of a SearchSpec check_cluster reads
    def __init__(self, resources: Resources):
        self.resources, self.path = resources, Path("ddp.yaml")


def test_a_ray_train_trial_driver_holds_no_cpu_or_gpu():
    asked = trial_resources(Resources(workers_per_trial=2, cpus_per_worker=1, gpus_per_worker=1))
    assert asked.get("CPU", 0) == 0 and "GPU" not in asked and asked["memory"] > 0
    # in_trial: the trial process is the worker
    assert trial_resources(Resources(cpus_per_worker=2, gpus_per_worker=1)) == {"CPU": 2, "GPU": 1}


@pytest.mark.parametrize("resources, nodes, fits", [
    (Resources(workers_per_trial=2), TWO_ONE_CPU, 1),  # one worker per node
    (Resources(workers_per_trial=3), TWO_ONE_CPU, 0),
    (Resources(workers_per_trial=1, cpus_per_worker=0.3), [{"CPU": 0.9}], 3),  # 0.3 × 3 = 0.9
    (Resources(workers_per_trial=2, cpus_per_worker=4, gpus_per_worker=1),
     [{"CPU": 16, "GPU": 1}, {"CPU": 16, "GPU": 1}, {"CPU": 16}], 1),  # GPUs limit
    (Resources(workers_per_trial=2, cpus_per_worker=8, gpus_per_worker=1),
     [{"CPU": 4, "GPU": 8}], 0),  # each worker wants more CPUs than a node has
])
def test_trials_that_fit(resources, nodes, fits):
    assert trials_that_fit(resources, nodes) == fits


def test_a_space_that_never_fits_is_one_line_naming_both_sides():
    with pytest.raises(ConfigError) as err:
        check_cluster(Spec(Resources(workers_per_trial=3)), TWO_ONE_CPU, where="the Ray cluster")
    assert str(err.value) == (
        "resources: a trial needs 3 workers × 1 CPU; the Ray cluster has 2 nodes with 1 CPU "
        "each — lower workers_per_trial or add nodes (ddp.yaml)")
    with pytest.raises(ConfigError, match="lower cpus_per_worker/gpus_per_worker"):
        check_cluster(Spec(Resources(cpus_per_worker=2)), TWO_ONE_CPU)
    assert check_cluster(Spec(Resources(workers_per_trial=2)), TWO_ONE_CPU) == 1


def test_describe_nodes_groups_alike_nodes():
    assert describe_nodes([{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 4}]) == (
        "2 nodes with 8 CPU, 1 GPU each and 1 node with 4 CPU")


def test_the_worker_group_wait_is_bounded(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    monkeypatch.setenv("STAIN_SEARCH_WORKER_GROUP_WAIT_S", "600")
    assert worker_group_retries() == 9  # 10 tries of 60 s
    monkeypatch.setenv("STAIN_SEARCH_WORKER_GROUP_WAIT_S", "10")
    assert worker_group_retries() == 0  # one try


def test_probe_refuses_a_port_nothing_listens_on_and_a_bad_address():
    from cluster_services import free_port

    port = free_port()
    with pytest.raises(ConfigError, match=f"--address 127.0.0.1:{port}: no Ray cluster"):
        probe(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        probe("127.0.0.1:head")
    probe("auto")  # left to Ray
