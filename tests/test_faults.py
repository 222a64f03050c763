"""What really happens to a search that runs for days on shared machines.

- One real search (3 concurrent trials on one SQLite store) in which one
  trial diverges (absurd learning rates) and one Ray Train worker is
  SIGKILLed mid-trial: the diverged trial is FAIL with its reason, the others
  complete, the killed worker's trial continues from its last checkpoint and
  ends with every epoch logged exactly once, and no metric is lost.
- Checkpoints are atomic: a crash mid-write never leaves a folder a reader
  (training resume, `stain-search best/export`) would pick.
- Security: no unpickling of untrusted files, YAML only via safe_load, the UI
  binds to 127.0.0.1 by default.

The driver-kill + resume case is tests/test_resume.py.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

from conftest import stop_local_ray, tiny_space_yaml
from stain_search import tracking
from stain_search.deploy.select import gather
from stain_search.search_dir import SearchDir
from stain_search.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                     read_checkpoint, write_checkpoint)
from stain_search.gan import LOSS_NAMES

PACKAGE_DIRS = [Path(__file__).resolve().parents[1] / d for d in ("stain_search", "trainables")]
EPOCHS = 3
KILL_AT = 2
# Enqueued so the outcome is deterministic; trial #1 diverges at its second step.
POINTS = [(2.0e-4, 2.0e-4), (1.0e6, 1.0e6), (3.0e-4, 1.0e-4)]
DIVERGED = 1


# --- one real search with two faults ----------------------------------------

@dataclass
class FaultSearch:
    search_dir: Path
    uri: str
    marker: Path
    outcome: object  # stain_search.search.SearchOutcome


@pytest.fixture(scope="module")
def fault_search(tmp_path_factory) -> FaultSearch:
    from stain_search.search import run_search
    from stain_search.trainables.cyclegan import KILL_AT_EPOCH_ENV, KILL_MARKER_ENV

    stop_local_ray()  # the trials must inherit the fault variables set below
    root = tmp_path_factory.mktemp("faults")
    enqueue = ", ".join(f"{{optim.lr_g: {g:.1e}, optim.lr_d: {d:.1e}}}" for g, d in POINTS)
    text = tiny_space_yaml(
        name="faults", num_samples=len(POINTS), max_concurrent=len(POINTS), pruner="none",
        epochs=EPOCHS,
        space="  optim.lr_g: {distribution: loguniform, low: 1.0e-5, high: 1.0e+6}\n"
              "  optim.lr_d: {distribution: loguniform, low: 1.0e-5, high: 1.0e+6}\n",
        search_extra=f", enqueue: [{enqueue}]",
        # Ray Train's executor: its worker is what gets killed. 3 trials ×
        # 0.45-CPU workers (their trial drivers hold no CPU) fit the 2 CI cores at once:
        # the killed one and an undisturbed one write to SQLite at the same time.
        resources="{workers_per_trial: 1, cpus_per_worker: 0.45, executor: ray_train}")
    space = root / "faults.yaml"
    space.write_text(text)
    marker = root / "killed-worker"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in (KILL_AT_EPOCH_ENV, KILL_MARKER_ENV)}
    # Ray workers inherit the environment of the Ray this process starts.
    os.environ[KILL_AT_EPOCH_ENV], os.environ[KILL_MARKER_ENV] = str(KILL_AT), str(marker)
    try:
        result = run_search(space, storage=root / "runs", tracking_uri=uri, verbose=0)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return FaultSearch(search_dir=root / "runs" / "faults", uri=uri, marker=marker,
                       outcome=result)


@pytest.fixture(scope="module")
def outcome(fault_search):
    from stain_search.spaces import load_space
    from stain_search.study import load_study

    spec = load_space(fault_search.search_dir / "space.yaml")
    study = load_study(spec, fault_search.search_dir / "study.journal")
    c = tracking.client(fault_search.uri)
    exp = c.get_experiment_by_name("faults")
    runs = {int(r.data.tags[tracking.OPTUNA_TRIAL]): r
            for r in tracking.trial_runs(c, exp.experiment_id, search="faults")}
    return study, c, exp.experiment_id, runs


@pytest.mark.slow
def test_diverged_trial_is_failed_with_reason_and_the_search_goes_on(fault_search, outcome):
    study, c, exp_id, runs = outcome
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(POINTS))) == sorted(runs)
    bad = trials[DIVERGED]
    assert bad.params["optim.lr_g"] == pytest.approx(1e6)
    assert bad.state == optuna.trial.TrialState.FAIL
    run = runs[DIVERGED]
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.STATUS] == "failed"
    assert "diverged" in run.data.tags[tracking.ERROR]
    # It stopped at once: no epoch finished, so none was logged.
    assert c.get_metric_history(run.info.run_id, "loss_G") == []
    # The others were not disturbed.
    for t in trials:
        if t.number != DIVERGED:
            assert t.state == optuna.trial.TrialState.COMPLETE, t
            assert runs[t.number].data.tags[tracking.STATUS] == "finished"
    best = fault_search.outcome.selection.best()
    assert best is not None and best.number != DIVERGED
    [parent] = [r for r in c.search_runs([exp_id]) if r.data.tags.get(tracking.ROLE) == "search"]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_concurrent_trials_on_sqlite_lose_no_metric(fault_search, outcome):
    study, c, _, runs = outcome
    done = {n: r for n, r in runs.items() if n != DIVERGED}
    # They really ran at the same time (else this proves nothing about SQLite).
    assert max(r.info.start_time for r in done.values()) < min(r.info.end_time for r in done.values())
    for number, run in done.items():
        for name in (*LOSS_NAMES, "fd_random", "ssim_structure", "epoch"):
            steps = [m.step for m in c.get_metric_history(run.info.run_id, name)]
            assert steps == list(range(1, EPOCHS + 1)), (number, name, steps)
        assert sorted(study.trials[number].intermediate_values) == list(range(1, EPOCHS + 1))
        # Every number each kept checkpoint recorded is in MLflow, at its epoch.
        kept = list_checkpoints(run.data.tags[tracking.CHECKPOINTS])
        assert kept, number
        for folder in kept:
            meta = json.loads((folder / "meta.json").read_text())
            for name, value in meta["metrics"].items():
                # Timings differ when the killed trial re-runs an epoch whose
                # first attempt MLflow already holds; everything else is exact.
                if not isinstance(value, (int, float)) or name.startswith("time_") \
                        or name == "images_per_s":
                    continue
                logged = {m.step: m.value for m in c.get_metric_history(run.info.run_id, name)}
                assert logged.get(meta["epoch"]) == pytest.approx(value, rel=1e-6), (number, name)


@pytest.mark.slow
def test_killed_worker_continues_from_its_checkpoint(fault_search, outcome):
    study, c, _, runs = outcome
    assert fault_search.marker.exists(), "the fault was never injected"
    run_id = fault_search.marker.read_text()
    [(number, run)] = [(n, r) for n, r in runs.items() if r.info.run_id == run_id]
    # Ray Train restarted the worker from the last checkpoint it had (the
    # epoch before the kill), not from scratch, within FailureConfig.
    # The epoch's checkpoint is written where it is kept before the epoch is
    # reported: the restart continues from the killed epoch's own checkpoint.
    assert run.data.tags[tracking.RESUMED_FROM] == str(KILL_AT)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS] == "finished"
    assert study.trials[number].state == optuna.trial.TrialState.COMPLETE
    steps = [m.step for m in c.get_metric_history(run_id, "loss_G")]
    assert steps == list(range(1, EPOCHS + 1))  # each epoch once, none repeated or lost
    kept = [p.name for p in list_checkpoints(run.data.tags[tracking.CHECKPOINTS])]
    assert f"checkpoint_epoch_{EPOCHS:04d}" in kept


@pytest.mark.slow
def test_killed_in_trial_process_continues_from_its_checkpoint(tmp_path, monkeypatch, own_ray):
    """The in_trial executor (auto's choice for one worker): the killed
    process is the Tune trial itself; Tune restarts it (max_failures) and it
    continues from the newest checkpoint in its folder."""
    from stain_search.search import run_search
    from stain_search.spaces import load_space
    from stain_search.study import load_study
    from stain_search.trainables.cyclegan import KILL_AT_EPOCH_ENV, KILL_MARKER_ENV

    space = tmp_path / "killed.yaml"
    space.write_text(tiny_space_yaml(name="killed", num_samples=1, max_concurrent=1,
                                     pruner="none", epochs=EPOCHS))
    marker = tmp_path / "killed-trial"
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, str(KILL_AT))  # Ray's workers inherit it
    monkeypatch.setenv(KILL_MARKER_ENV, str(marker))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(space, storage=tmp_path / "runs", tracking_uri=uri, verbose=0)
    assert marker.exists(), "the fault was never injected"
    spec = load_space(tmp_path / "runs" / "killed" / "space.yaml")
    assert spec.resources.resolved_executor == "in_trial"
    [trial] = load_study(spec, tmp_path / "runs" / "killed" / "study.journal").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and result.selection.best().number == 0
    c = tracking.client(uri)
    [run] = tracking.trial_runs(c, c.get_experiment_by_name("killed").experiment_id,
                                search="killed")
    assert run.info.run_id == marker.read_text()
    # The epoch's checkpoint is written where it is kept before the epoch is
    # reported: the restart continues from the killed epoch's own checkpoint.
    assert run.data.tags[tracking.RESUMED_FROM] == str(KILL_AT)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.STATUS] == "finished"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss_G")]
    assert steps == list(range(1, EPOCHS + 1))
    kept = [p.name for p in list_checkpoints(run.data.tags[tracking.CHECKPOINTS])]
    assert f"checkpoint_epoch_{EPOCHS:04d}" in kept and len(kept) <= 3  # 2 best + newest


# --- atomic checkpoints (cheap) ---------------------------------------------

def _state() -> dict:
    torch.manual_seed(0)
    return {"G": {"w": torch.randn(2, 2)}, "steps": 3}


def _meta(epoch: int, fd: float) -> dict:
    return {"epoch": epoch, "metrics": {"fd_random": fd}, "config": {}}


def test_crash_mid_write_leaves_no_checkpoint_under_a_real_name(tmp_path, monkeypatch):
    root = tmp_path / "ckpts"
    write_checkpoint(root / "checkpoint_epoch_0001", state=_state(), meta=_meta(1, 5.0))
    write_checkpoint(root / "checkpoint_epoch_0002", state=_state(), meta=_meta(2, 4.0))

    real_write = Path.write_bytes

    def half_write(self, data):  # the state file's write stops half-way: a full disk
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with pytest.raises(OSError):
        write_checkpoint(root / "checkpoint_epoch_0003", state=_state(), meta=_meta(3, 1.0))
    with pytest.raises(OSError):  # re-writing an existing epoch keeps the old one whole
        write_checkpoint(root / "checkpoint_epoch_0002", state=_state(), meta=_meta(2, 0.5))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_epoch_0001",
                                                      "checkpoint_epoch_0002"]
    assert latest_checkpoint(root).name == "checkpoint_epoch_0002"
    state, meta = read_checkpoint(root / "checkpoint_epoch_0002")
    assert meta["metrics"]["fd_random"] == 4.0 and torch.equal(state["G"]["w"], _state()["G"]["w"])


def _half_written_search(tmp_path: Path) -> Path:
    """A trial folder as a SIGKILL mid-write leaves it."""
    trial = tmp_path / "trials" / "trial_x"
    write_checkpoint(trial / "checkpoint_epoch_0001", state=_state(), meta=_meta(1, 9.0))
    # Killed before the rename: a complete-looking temp folder with the best score.
    tmp = trial / ".tmp-checkpoint_epoch_0002-abc123"
    write_checkpoint(tmp, state=_state(), meta=_meta(2, 0.1))
    # Killed by something else half way: meta.json without state.pt, and a
    # state.pt without meta.json.
    (trial / "checkpoint_epoch_0003").mkdir()
    (trial / "checkpoint_epoch_0003" / "meta.json").write_text(json.dumps(
        {"format": "stain-search-checkpoint/1", **_meta(3, 0.01)}))
    (trial / "checkpoint_epoch_0004").mkdir()
    (trial / "checkpoint_epoch_0004" / "state.pt").write_bytes(b"PK\x03\x04")
    return trial


def test_half_written_checkpoint_is_never_picked(tmp_path):
    trial = _half_written_search(tmp_path)
    assert [p.name for p in list_checkpoints(trial)] == ["checkpoint_epoch_0001"]
    assert latest_checkpoint(trial).name == "checkpoint_epoch_0001"
    with pytest.raises(CheckpointError):
        read_checkpoint(trial / "checkpoint_epoch_0003")


def test_deploy_selection_never_picks_a_half_written_checkpoint(tmp_path):
    _half_written_search(tmp_path)
    found = gather(SearchDir(tmp_path), [], {})
    assert [(c.trial, c.epoch) for c in found] == [("trial_x", 1)]


# --- security (cheap) -------------------------------------------------------

def _package_sources() -> list[tuple[Path, ast.AST]]:
    files = sorted(p for d in PACKAGE_DIRS for p in d.rglob("*.py"))
    assert len(files) > 20
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in files]


def _calls(tree: ast.AST, module: str, names: set[str]):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in names and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module):
            yield node


def test_every_torch_load_is_weights_only_and_yaml_is_safe():
    torch_loads = 0
    for path, tree in _package_sources():
        for call in _calls(tree, "torch", {"load"}):
            torch_loads += 1
            flags = {k.arg: k.value for k in call.keywords}
            assert isinstance(flags.get("weights_only"), ast.Constant) \
                and flags["weights_only"].value is True, f"{path}:{call.lineno}"
        for call in _calls(tree, "yaml", {"load", "load_all", "unsafe_load", "full_load",
                                          "unsafe_load_all", "full_load_all"}):
            pytest.fail(f"{path}:{call.lineno}: yaml.{call.func.attr}; use yaml.safe_load")
        for call in _calls(tree, "pickle", {"load", "loads"}):
            pytest.fail(f"{path}:{call.lineno}: pickle.{call.func.attr} runs code from files")
    assert torch_loads >= 1  # the scan saw the checkpoint reader


class _Exploit:
    """Unpickling this runs code: it creates the file named by ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_malicious_checkpoint_is_rejected_without_running_code(tmp_path):
    folder = tmp_path / "checkpoint_epoch_0001"
    write_checkpoint(folder, state=_state(), meta=_meta(1, 1.0))
    pwned = tmp_path / "pwned"
    torch.save({"G": _Exploit(pwned)}, folder / "state.pt")
    assert not pwned.exists()
    # Its size no longer matches meta.json's record: refused before it is opened.
    with pytest.raises(CheckpointError, match="were written .*cannot be used"):
        read_checkpoint(folder)
    # Without that record (a checkpoint from before it), the loader refuses it.
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(folder)
    assert not pwned.exists()
    # The same payload runs code through a plain unpickler: the test is real.
    pickle.loads(pickle.dumps({"G": _Exploit(pwned)}))  # noqa: S301 - proving the exploit
    assert pwned.exists()


def test_ui_binds_to_localhost_by_default():
    from stain_search.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    for path, _ in _package_sources():
        assert "0.0.0.0" not in path.read_text(), path  # never a default bind address
