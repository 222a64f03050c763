"""Progress bars: drawn at a terminal, silent off one (CI, `> out.log`, Ray trials)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_BASE, run_on_terminal
from stain_search.progress import NO_PROGRESS_ENV, is_terminal, progress, progress_enabled

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def as_terminal(monkeypatch) -> FakeTerminal:
    """stderr as a terminal, wide enough that rich truncates nothing. Called in the test
    itself: pytest's capture puts its own sys.stderr back after a fixture's setup."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv(NO_PROGRESS_ENV, raising=False)
    stream = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def shown(stream: io.StringIO) -> str:
    return ANSI.sub("", stream.getvalue())


def test_off_a_terminal_nothing_is_written(capsys):
    stream = io.StringIO()
    with progress("tiling", total=3, unit="tiles", stream=stream) as advance:
        for _ in range(3):
            advance()
    with progress("export: ranking checkpoints") as advance:  # stderr: pytest's capture
        advance(0, description="export: writing generator.onnx")
    assert stream.getvalue() == ""
    assert capsys.readouterr().err == ""
    assert not is_terminal(stream) and not is_terminal(None)


def test_at_a_terminal_the_bar_shows_description_percentage_and_count(monkeypatch):
    terminal = as_terminal(monkeypatch)
    with progress("tiling", total=4, unit="tiles") as advance:
        advance(0, description="tiling slide_03 (1/2)")
        for _ in range(4):
            advance()
    text = shown(terminal)
    assert re.search(r"tiling slide_03 \(1/2\) .*100% +4/4 tiles", text), text


def test_unknown_length_shows_the_step_running(monkeypatch):
    terminal = as_terminal(monkeypatch)
    with progress("export: ranking checkpoints") as advance:
        advance(0, description="export: writing generator.onnx")
    assert "export: writing generator.onnx" in shown(terminal)


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_the_environment_silences_a_terminal(monkeypatch, value):
    terminal = as_terminal(monkeypatch)
    monkeypatch.setenv(NO_PROGRESS_ENV, value)
    assert not progress_enabled()
    with progress("tiling", total=2) as advance:
        advance(2)
    assert terminal.getvalue() == ""
    monkeypatch.setenv(NO_PROGRESS_ENV, "0")
    assert progress_enabled()


def test_a_ray_worker_is_silent_even_on_a_terminal(monkeypatch):
    as_terminal(monkeypatch)
    fake = SimpleNamespace(global_worker=SimpleNamespace(mode=1), WORKER_MODE=1)
    monkeypatch.setitem(sys.modules, "ray._private.worker", fake)
    assert not progress_enabled()
    fake.global_worker.mode = 0  # the driver (SCRIPT_MODE)
    assert progress_enabled()


def test_reference_features_show_a_bar_once_then_the_cache_is_silent(tmp_path, monkeypatch):
    from stain_search.metrics.frechet import FrechetDistance, random_spec

    terminal = as_terminal(monkeypatch)

    g = torch.Generator().manual_seed(0)
    real = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)]
    FrechetDistance(random_spec(), cache_dir=tmp_path).reference_stats(real)
    assert re.search(r"fd_random reference features .*100% +8/8 crops", shown(terminal))
    terminal.seek(0)
    terminal.truncate()
    FrechetDistance(random_spec(), cache_dir=tmp_path).reference_stats(real)  # a cache hit
    assert terminal.getvalue() == ""


def _tiny_checkpoint(folder):
    from stain_search.checkpoint import write_checkpoint
    from stain_search.config import load_config
    from stain_search.gan import CycleGAN

    config = load_config(None, TINY_BASE)
    gan = CycleGAN(config, device=torch.device("cpu"))
    write_checkpoint(folder, state=gan.state_dict_full(),
                     meta={"epoch": 1, "metrics": {}, "config": config.to_dict()})
    return folder


def test_export_names_each_step_and_its_spinner_shows_the_portable_copy(tmp_path, monkeypatch):
    from stain_search.deploy import select as select_module
    from stain_search.deploy.export import export_checkpoint, export_search

    terminal = as_terminal(monkeypatch)

    checkpoint = _tiny_checkpoint(tmp_path / "checkpoint_epoch_0001")
    steps: list[str] = []
    export_checkpoint(checkpoint, tmp_path / "direct", portable="torchscript", on_step=steps.append)
    assert steps == ["reading the checkpoint", "stain statistics of the training data",
                     "writing generator.safetensors", "writing generator.pt",
                     "checking generator.pt against G"]
    assert terminal.getvalue() == ""  # export_checkpoint alone draws nothing

    chosen = SimpleNamespace(trial="trial_000", epoch=1, checkpoint=checkpoint, number=0,
                             state="COMPLETE", run_id=None, params={}, rank=1)
    selection = SimpleNamespace(search_dir=tmp_path / "search", objectives=[("fd_random", "min")])
    monkeypatch.setattr(select_module, "select", lambda *a, **k: selection)
    monkeypatch.setattr(select_module, "pick", lambda *a, **k: chosen)
    result = export_search("s", out=tmp_path / "via-search", register=False,
                           portable="torchscript")
    assert (result.folder / "generator.pt").is_file()
    assert "export: checking generator.pt against G" in shown(terminal)


def _run(argv: list[str], *, tty: bool, cwd) -> tuple[int, str]:
    """Run a command with stdout+stderr on a pseudo-terminal, or stderr on a pipe."""
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    env.pop(NO_PROGRESS_ENV, None)
    if not tty:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr
    return run_on_terminal(argv, cwd=cwd, env=env, timeout=300)


def test_data_prepare_draws_a_bar_on_a_terminal_and_nothing_in_a_log(tmp_path):
    from test_data_prepare import pair_source

    src = pair_source(tmp_path / "src")
    cmd = [sys.executable, "-m", "stain_search.cli", "data", "prepare", str(src)]
    rc, text = _run(cmd + [str(tmp_path / "tty"), "--tile", "64"], tty=True, cwd=tmp_path)
    assert rc == 0, text[-2000:]
    assert re.search(r"tiling slide \(1/1\) .*100% +64/64 tiles", text), text[-2000:]
    assert "dataset written to" in text
    rc, err = _run(cmd + [str(tmp_path / "log"), "--tile", "64"], tty=False, cwd=tmp_path)
    assert rc == 0 and err == "", err
