"""The search end to end: Ray Tune + Optuna + Ray Train trials + MLflow.

Uses the session's `finished_search` (a real 3-trial search; see conftest):
the MLflow runs, the Optuna study and the checkpoints must tell one story.
"""

from __future__ import annotations

import json

import optuna
import pytest

from stain_search import tracking
from stain_search.checkpoint import list_checkpoints, read_checkpoint
from stain_search.gan import LOSS_NAMES
from stain_search.spaces import load_space
from stain_search.study import load_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(finished_search):
    c = tracking.client(finished_search.tracking_uri)
    exp = c.get_experiment_by_name(finished_search.name)
    assert exp is not None
    return c, exp.experiment_id


@pytest.fixture(scope="module")
def study(finished_search):
    spec = load_space(finished_search.search_dir / "space.yaml")
    return load_study(spec, finished_search.search_dir / "study.journal")


def test_one_parent_and_one_child_run_per_trial(finished_search, store):
    c, exp_id = store
    runs = c.search_runs([exp_id])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE) == "search"]
    children = [r for r in runs if r.data.tags.get(tracking.ROLE) == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert {r.data.tags[tracking.PARENT] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)  # none left RUNNING
    # The parent holds what made the search.
    names = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"space.yaml", "search.json", "summary.json"} <= names


def test_every_trial_logged_params_epochs_and_images(finished_search, store):
    c, exp_id = store
    for run in tracking.trial_runs(c, exp_id, search=finished_search.name):
        params = run.data.params
        assert "loss.lambda_cycle" in params and "optim.lr_g" in params and "model.ngf" in params
        epochs = len(c.get_metric_history(run.info.run_id, "loss_G"))
        assert epochs >= 1
        for name in (*LOSS_NAMES, "fd_random", "ssim_structure", "ssim_gt", "psnr_gt"):
            history = c.get_metric_history(run.info.run_id, name)
            assert [m.step for m in history] == list(range(1, epochs + 1)), name
        # No number called `fid` without the Inception weights.
        assert "fid" not in run.data.metrics
        samples = {a.path for a in c.list_artifacts(run.info.run_id, "samples")}
        assert f"samples/epoch_{epochs:04d}.png" in samples


def test_study_agrees_with_mlflow_and_pruning_was_honest(finished_search, store, study):
    c, exp_id = store
    runs = {int(r.data.tags[tracking.OPTUNA_TRIAL]): r
            for r in tracking.trial_runs(c, exp_id, search=finished_search.name)}
    trials = study.get_trials(deepcopy=False)
    assert sorted(runs) == [t.number for t in trials] == [0, 1, 2]
    state_to_status = {optuna.trial.TrialState.COMPLETE: "finished",
                       optuna.trial.TrialState.PRUNED: "pruned"}
    for t in trials:
        assert runs[t.number].data.tags[tracking.STATUS] == state_to_status[t.state]
    # The enqueued lr=1e-7 trial barely trains and is pruned at epoch 1; a
    # pruned trial is never told to the sampler as a complete result.
    pruned = study.trials[2]
    assert pruned.params["optim.lr_g"] == pytest.approx(1e-7)
    assert pruned.state == optuna.trial.TrialState.PRUNED
    # Optuna keeps a pruned trial's last intermediate value for reference, but
    # the trial is PRUNED: TPE ranks it below every complete trial and it can
    # never be the best.
    assert pruned.values == [pruned.intermediate_values[max(pruned.intermediate_values)]]
    assert study.best_trial.number != 2
    assert len(c.get_metric_history(runs[2].info.run_id, "fd_random")) < 3
    for t in trials[:2]:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert sorted(t.intermediate_values) == [1, 2, 3]


def test_best_trial_has_its_best_checkpoint(finished_search, store, study):
    c, _ = store
    deploy = finished_search.outcome.selection.best()
    assert deploy.state == "COMPLETE"
    summary = json.loads((finished_search.search_dir / "summary.json").read_text())
    assert (summary["deploy"]["number"], summary["deploy"]["epoch"]) == (deploy.number, deploy.epoch)
    kept = list_checkpoints(deploy.checkpoint.parent)
    assert 1 <= len(kept) <= 2  # CheckpointConfig keeps the best k=2
    values = [json.loads((k / "meta.json").read_text())["metrics"]["fd_random"] for k in kept]
    state, meta = read_checkpoint(kept[values.index(min(values))])
    assert set(state) >= {"G", "F", "D_X", "D_Y", "opt_g", "opt_d"}
    assert meta["metrics"]["fd_random"] == pytest.approx(min(values))
    # The same best checkpoint is an artifact of the trial's MLflow run.
    assert deploy.checkpoint == kept[values.index(min(values))]
    best_dir = [a.path for a in c.list_artifacts(deploy.run_id, "best")]
    assert best_dir == [f"best/{kept[values.index(min(values))].name}"]


def test_status_of_a_finished_search_and_the_listing(finished_search, capsys):
    from stain_search.cli import main

    storage = str(finished_search.root / "runs")
    assert main(["status", finished_search.name, "--storage", storage, "--tracking-uri",
                 finished_search.tracking_uri, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["driver"] is None
    assert status["counts"]["COMPLETE"] == 2 and status["counts"]["PRUNED"] == 1
    best = finished_search.outcome.selection.best()
    assert (status["best"]["trial"], status["best"]["epoch"]) == (best.trial, best.epoch)
    assert status["resume"] is None and status["running"] == []
    assert main(["status", "--storage", storage]) == 0
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.split()[:3] == [finished_search.name, "finished", "3/3"]


def test_the_readers_load_neither_ray_nor_torch(finished_search):
    """`status` and `best` read the search folder, the study and MLflow: no Ray
    (docs/ARCHITECTURE.md: the readers need none) and no torch (checkpoint
    metadata is JSON), so they answer in the time MLflow takes to open."""
    import subprocess
    import sys

    common = ["--storage", str(finished_search.search_dir.parent),
              "--tracking-uri", finished_search.tracking_uri]
    code = ("import sys\nfrom stain_search.cli import main\n"
            f"for argv in ({['status', 'tiny', *common]!r}, {['best', 'tiny', *common]!r}):\n"
            "    assert main(argv) == 0, argv\n"
            "print(sorted({'ray', 'torch'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
