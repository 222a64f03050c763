"""Pruning reaches the study from another node (issue 16, test c).

The cluster (tests/cluster_services.py): a Ray head and ``node2``, one CPU
each, each with its own working directory; the search is kept in S3 and the
driver runs in a third directory. A trial never opens the study's journal:
its rank 0 reports every epoch to, and asks the pruner through, the gRPC proxy
the driver serves the study with (stain_search.study_proxy). Two trials run at
once, one per node: one good trial (6 steps an epoch, 2 epochs), then three
that barely train (lr 1e-7) and whose one epoch is 10 times longer, which the
median rule (grace 1, one finished trial) prunes at their first epoch.
Whichever node the good trial lands on, node2 runs a slow one that is judged
after the good trial has finished: if node2 starts with a slow one, the good
trial ends on the head within the slow one's first epoch (12 steps against
60); if node2 starts with the good one, it takes the next slow one while the
head is still in its first. The outcome does not hang on which node is
faster under load (with equal trials it once did: the head pruned them all
while node2 still trained its first).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from conftest import tiny_space_yaml
from stain_search import tracking
from stain_search.study import open_study

pytestmark = pytest.mark.cluster
TS = optuna.trial.TrialState
GOOD = "{optim.lr_g: 2.0e-4, train.steps_per_epoch: 6}"
BAD = "{optim.lr_g: 1.0e-7, train.steps_per_epoch: 60}"


@pytest.mark.timeout(900)
def test_a_trial_on_node2_is_pruned_through_the_served_study(ray_cluster, s3_server,
                                                             tmp_path):
    name, prefix = "pruned", "cluster-study"
    driver = tmp_path / "driver"
    driver.mkdir()
    env = ray_cluster.driver_env(STAIN_SEARCH_MIRROR=str(driver / "mirror"),
                                 STAIN_SEARCH_SCRATCH=str(driver / "scratch"),
                                 STAIN_SEARCH_NO_PROGRESS="1")
    space = driver / "space.yaml"
    space.write_text(tiny_space_yaml(
        name=name, num_samples=4, max_concurrent=2, epochs=2, min_trials=1,
        base={"train.steps_per_epoch": None},  # searched: each trial's own below
        space="  optim.lr_g: {distribution: loguniform, low: 1.0e-7, high: 1.0e-3}\n"
              "  train.steps_per_epoch: {distribution: choice, choices: [6, 60]}\n",
        search_extra=f", enqueue: [{GOOD}, {BAD}, {BAD}, {BAD}]"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run([sys.executable, "-m", "stain_search.cli", "run", str(space),
                          "--address", ray_cluster.address, "--storage",
                          f"s3://{s3_server.bucket}/{prefix}", "--tracking-uri", uri],
                         cwd=driver, env=env, capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stderr[-3000:]

    c = tracking.client(uri)
    runs = tracking.trial_runs(c, c.get_experiment_by_name(name).experiment_id, search=name)
    node = {int(r.data.tags[tracking.OPTUNA_TRIAL]): ray_cluster.node_name(r.data.tags[tracking.NODE])
            for r in runs}
    status = {int(r.data.tags[tracking.OPTUNA_TRIAL]): r.data.tags[tracking.STATUS] for r in runs}
    assert set(node.values()) == {"head", "node2"}, node
    # The study (the driver's journal, in its mirror of the S3 search) holds
    # what the trials on both nodes reported and what the pruner decided.
    journal = Path(driver / "mirror" / "s3" / s3_server.bucket / prefix / name / "study.journal")
    trials = {t.number: t for t in open_study(name, journal).get_trials(deepcopy=False)}
    assert sorted(trials) == list(range(4))
    on_node2 = [n for n, where in node.items() if where == "node2"]
    pruned_on_node2 = [n for n in on_node2 if trials[n].state == TS.PRUNED]
    assert pruned_on_node2, {n: (node[n], trials[n].state.name) for n in trials}
    for n in pruned_on_node2:
        assert status[n] == "pruned"  # MLflow says the same
        assert 1 in trials[n].intermediate_values  # reported from node2, through the proxy
    for n in on_node2:  # every epoch node2 ran reached the study
        epochs = [m.step for m in c.get_metric_history(
            next(r.info.run_id for r in runs
                 if int(r.data.tags[tracking.OPTUNA_TRIAL]) == n), "loss_G")]
        assert sorted(trials[n].intermediate_values) == epochs, n
