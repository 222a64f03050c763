"""One training run: it learns, resumes exactly, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stain_search.cli import main
from stain_search.config import load_config
from stain_search.errors import TrainingDiverged
from stain_search.evaluate import Evaluator
from stain_search.gan import CycleGAN
from stain_search.optim import OPTIMIZERS
from stain_search.train import LocalReporter, build_data, run_training

from conftest import TINY_BASE


class Keep:
    """A reporter that remembers every epoch."""

    def __init__(self):
        self.epochs: list[dict] = []

    def report(self, metrics, *, checkpoint, grid):
        self.epochs.append(dict(metrics))


def untrained_metrics(config) -> dict:
    data = build_data(config)
    model = CycleGAN(config, device=torch.device("cpu"), seed=config.train.seed)
    ev = Evaluator(config.eval, dataset_key=data.dataset_key, has_pairs=data.has_pairs,
                   stain=data.stain, device="cpu")
    ev.prepare_reference(data.reference_batches)
    return ev.evaluate(model.G, model.F, data.eval_batches)


@pytest.mark.slow
def test_short_run_on_the_phantom_visibly_learns():
    # 64 px phantom, 16 evaluation pairs: ~20 s on 2 CPU cores.
    config = load_config(None, {
        "data.crop": 64, "data.batch_size": 4, "data.eval_crops": 16, "model.depth": 4,
        "model.ngf": 16, "model.ndf": 16, "train.epochs": 5, "train.steps_per_epoch": 25})
    before = untrained_metrics(config)
    kept = Keep()
    after = run_training(config, reporter=kept, log=lambda m: None)
    # Measured here: ssim_gt 0.12 → ~0.33, fd_random ~18 → ~3 (seed 0). The
    # margins are far outside what an untrained or collapsed model reaches.
    assert after["ssim_gt"] > before["ssim_gt"] + 0.1
    assert after["fd_random"] < 0.5 * before["fd_random"]
    assert after["ssim_structure"] > before["ssim_structure"] + 0.1
    assert kept.epochs[-1]["loss_cycle"] < kept.epochs[0]["loss_cycle"]


def test_resume_continues_exactly(tmp_path):
    config = load_config(None, {**TINY_BASE, "train.epochs": 2, "train.steps_per_epoch": 3,
                                "data.flip": True, "loss.r1_gamma": 1.0})
    straight = LocalReporter(tmp_path / "straight")
    run_training(config, reporter=straight, log=lambda m: None)
    first = LocalReporter(tmp_path / "halves")
    run_training(load_config(None, {**TINY_BASE, "train.epochs": 2, "train.steps_per_epoch": 3,
                                    "loss.r1_gamma": 1.0}),
                 reporter=first, log=lambda m: None,
                 should_stop=lambda: True)  # stop after epoch 1
    assert first.latest().name == "checkpoint_epoch_0001"
    run_training(config, reporter=first, resume=first.latest(), log=lambda m: None)
    a = torch.load(straight.latest() / "state.pt", weights_only=True)
    b = torch.load(first.latest() / "state.pt", weights_only=True)
    for net in ("G", "F", "D_X", "D_Y"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key}"
    lines_a = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "halves/metrics.jsonl").read_text().splitlines()]
    assert [x["loss_G"] for x in lines_a] == [x["loss_G"] for x in lines_b]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_with_every_loss_term(optimizer):
    config = load_config(None, {**TINY_BASE, "train.epochs": 1, "train.steps_per_epoch": 2,
                                "optim.name": optimizer, "loss.r1_gamma": 0.5,
                                "loss.r1_interval": 2, "model.attention": "both",
                                "model.depth": 2})
    kept = Keep()
    metrics = run_training(config, reporter=kept, log=lambda m: None)
    for name in ("loss_G", "loss_F", "loss_D_X", "loss_D_Y", "loss_cycle", "loss_identity"):
        assert metrics[name] > 0
    assert metrics["loss_R1"] > 0


def test_absurd_learning_rate_diverges_with_a_clear_error():
    config = load_config(None, {**TINY_BASE, "train.epochs": 3, "train.steps_per_epoch": 6,
                                "optim.lr_g": 1e6, "optim.lr_d": 1e6})
    with pytest.raises(TrainingDiverged, match="diverged.*learning rate"):
        run_training(config, reporter=Keep(), log=lambda m: None)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stain_search.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_writes_results_and_refuses_to_overwrite(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("data: {crop: 32, batch_size: 2, eval_crops: 4}\n"
                   "model: {depth: 3, ngf: 8, ndf: 8, d_blocks: 2}\n"
                   "train: {epochs: 1, steps_per_epoch: 2}\n")
    out = tmp_path / "out"
    done = run_cli("train", str(cfg), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "checkpoints" / "checkpoint_epoch_0001" / "state.pt").is_file()
    assert (out / "samples" / "epoch_0001.png").is_file()
    assert json.loads((out / "metrics.jsonl").read_text())["epoch"] == 1
    # The refusal and the resume: the same `main`, in this process.
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cli_bad_key_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("loss: {lamda_cycle: 5}\n")
    done = run_cli("train", str(cfg), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "did you mean `loss.lambda_cycle`" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
