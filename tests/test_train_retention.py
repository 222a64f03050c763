"""Checkpoint retention for `stain-search train`: the k best plus the newest,
never the checkpoint a resume needs, and a pruned run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stain_search.checkpoint import list_checkpoints, prune_checkpoints, write_checkpoint
from stain_search.config import load_config
from stain_search.errors import ConfigError
from stain_search.train import LocalReporter, Retention, retention_for, run_training

from conftest import TINY_BASE


def fake_checkpoint(root, epoch, score):
    metrics = {"epoch": epoch} if score is None else {"epoch": epoch, "fd_random": score}
    return write_checkpoint(root / f"checkpoint_epoch_{epoch:04d}", state={"w": torch.zeros(1)},
                            meta={"epoch": epoch, "metrics": metrics})


@pytest.mark.parametrize("scores", [
    [5, 4, 3, 2, 1, 9],           # the newest is the worst
    [1, 2, 3, 4, 5, None],        # the newest was not evaluated
    [None, None, None, None, None, None],  # nothing evaluated at all
    [3, 3, 3, 3, 3, 3],           # ties
])
@pytest.mark.parametrize("keep", [1, 2])
def test_pruning_keeps_the_best_and_always_the_newest(tmp_path, scores, keep):
    reporter = LocalReporter(tmp_path, retention=Retention(keep=keep, metric="fd_random",
                                                           mode="min"))
    staging = tmp_path / "staging"
    for epoch, score in enumerate(scores, start=1):
        folder = fake_checkpoint(staging, epoch, score)
        reporter.report({"epoch": epoch}, checkpoint=folder, grid=None)
        kept = list_checkpoints(tmp_path / "checkpoints")
        assert reporter.latest().name == f"checkpoint_epoch_{epoch:04d}"  # resume point
        assert len(kept) <= keep + 1
    scored = sorted((s, e) for e, s in enumerate(scores, start=1) if s is not None)
    best = {e for _, e in scored[:keep]}
    names = {int(p.name.rsplit("_", 1)[1]) for p in list_checkpoints(tmp_path / "checkpoints")}
    # Below the limit nothing is pruned, so unscored runs may keep a second one.
    assert best | {len(scores)} <= names and len(names) <= keep + 1


def test_prune_keeps_everything_below_the_limit(tmp_path):
    for epoch in (1, 2):
        fake_checkpoint(tmp_path, epoch, float(epoch))
    assert prune_checkpoints(tmp_path, keep=2, metric="fd_random", mode="min") == []
    assert len(list_checkpoints(tmp_path)) == 2


def states(reporter):
    return torch.load(reporter.latest() / "state.pt", weights_only=True)


def test_six_epochs_keep_two_leaves_three_and_resume_exactly(tmp_path):
    config = load_config(None, {**TINY_BASE, "train.epochs": 6, "train.steps_per_epoch": 2,
                                "train.keep_checkpoints": 2})
    retention = retention_for(config)
    assert retention == Retention(keep=2, metric="fd_random", mode="min")

    straight = LocalReporter(tmp_path / "straight", retention=retention, generator_snapshots=True)
    run_training(config, reporter=straight, log=lambda m: None)
    kept = list_checkpoints(tmp_path / "straight" / "checkpoints")
    assert len(kept) <= 3 and kept[-1].name == "checkpoint_epoch_0006"

    halves = LocalReporter(tmp_path / "halves", retention=retention)
    epochs_done = []
    run_training(config, reporter=halves, log=lambda m: None,
                 should_stop=lambda: epochs_done.append(1) or len(epochs_done) == 3)
    assert halves.latest().name == "checkpoint_epoch_0003"
    assert len(list_checkpoints(tmp_path / "halves" / "checkpoints")) <= 3
    run_training(config, reporter=halves, resume=halves.latest(), log=lambda m: None)
    assert len(list_checkpoints(tmp_path / "halves" / "checkpoints")) <= 3

    a, b = states(straight), states(halves)
    for net in ("G", "F", "D_X", "D_Y"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key}"
    lines = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "halves")}
    assert [m["loss_G"] for m in lines["straight"]] == [m["loss_G"] for m in lines["halves"]]
    # What retention kept is what it promised: the 2 best by fd_random, plus the newest.
    by_score = sorted(lines["straight"], key=lambda m: m["fd_random"])
    expected = {m["epoch"] for m in by_score[:2]} | {6}
    assert {int(p.name.rsplit("_", 1)[1]) for p in kept} == expected

    # Generator snapshots: one per evaluated epoch, G's weights alone.
    snapshots = sorted((tmp_path / "straight" / "generators").glob("G_epoch_*.safetensors"))
    assert [p.name for p in snapshots] == [f"G_epoch_{e:04d}.safetensors" for e in range(1, 7)]
    g = load_file(snapshots[-1])
    assert g.keys() == a["G"].keys()
    assert all(torch.equal(g[k], a["G"][k]) for k in g)


def test_keep_metric_must_be_reported():
    with pytest.raises(ConfigError, match="keep_metric.*'ssim'.*known: frechet"):
        retention_for(load_config(None, {"train.keep_metric": "ssim"}))
    with pytest.raises(ConfigError, match="keep_metric.*no epoch reports 'ki67_f1'"):
        retention_for(load_config(None, {"train.keep_metric": "ki67_f1"}))  # trichrome
    assert retention_for(load_config(None, {"train.keep_checkpoints": None})) == Retention()
    with pytest.raises(ConfigError, match="keep_checkpoints.*at least 1"):
        load_config(None, {"train.keep_checkpoints": 0})


def test_cli_train_prunes_and_names_a_bad_metric_in_one_line(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    raw: dict = {}
    for key, value in {**TINY_BASE, "train.epochs": 3, "train.steps_per_epoch": 1,
                       "train.keep_checkpoints": 1}.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    cfg.write_text(yaml.safe_dump(raw))
    run = [sys.executable, "-m", "stain_search.cli", "train", str(cfg)]
    done = subprocess.run([*run, "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "keeping the 1 best checkpoints by fd_random" in done.stdout
    assert len(list_checkpoints(tmp_path / "o" / "checkpoints")) <= 2
    bad = subprocess.run([*run, "--out", str(tmp_path / "bad"), "--set",
                          "train.keep_metric=ssim_gtt"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "train.keep_metric" in bad.stderr and not (tmp_path / "bad").exists()
