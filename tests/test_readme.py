"""The README's commands run as written (issue 10: a README contract test).

Every ``stain-search …`` command in the README's code blocks is run, in the
README's order, in one fresh folder, as a user would type it there. Only the
file names a reader replaces with their own are substituted: ``spaces/lambda.yaml``
becomes a tiny copy of the bundled space in ``./spaces/`` (a file path wins
over a bundled name), ``my-space.yaml``/``my.yaml`` tiny files, ``/data/BCI``
a BCI-layout folder made from the phantom, ``slide.tif`` a small TIFF. Budgets
shrink as the spaces do (``SMALLER``: ``--num-samples 12`` runs 3 trials,
``--top 3 --seeds 3`` 2 × 2 re-trainings; ``SHORTER``: the quickstart
``stain-search train`` runs 4 of its 8 epochs): the same code paths, a
fraction of the work. Each must exit 0, or be listed in ``NOT_RUN`` with the
reason it cannot run here. The first command, the quickstart, runs as a process,
as typed: its private Ray, its driver lock, its exit status and its printed
lines. Every other command calls the same ``main`` with the same words in the
same folder, sparing a process start (~5 s of imports on 2 busy cores) each;
the ones that start a search (``SEARCHES``: run, resume, confirm) use the
session's one local Ray, as a driver given ``--address`` does, sparing Ray's
start and stop (~6 s) too.
This is the test that would have caught ``--name`` failing every trial.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ensure_local_ray, tiny_space_yaml

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"

# Commands that cannot run in CI, by their first words, each with its reason.
NOT_RUN = {
    "stain-search ui": "a server that runs until stopped; tests/test_ui.py starts it, "
                       "loads its pages in Chromium and stops it",
    "stain-search dashboard": "a server that runs until stopped; tests/test_dashboard.py "
                              "starts it and loads it in Chromium",
    "stain-search weights fetch": "downloads from the internet, which CI cannot reach; "
                                  "tests/test_weights.py fetches from a local server",
}


def readme_commands() -> list[str]:
    """`stain-search …` commands of the README's fenced code blocks, in order
    (comments dropped, `a && b` split, continuation lines joined)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("stain-search"):
                    commands.append(part)
    return commands


def _not_run(command: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """A fresh folder holding the files the README's commands name."""
    from stain_search.data.phantom import builtin_dataset
    from stain_search.data.io import read_image

    cwd = tmp_path_factory.mktemp("readme-user")
    (cwd / "spaces").mkdir()
    (cwd / "spaces" / "lambda.yaml").write_text(tiny_space_yaml(
        name="lambda", num_samples=2, max_concurrent=1, epochs=2, pruner="none")
        + "profiles:\n  demo: {}\n  gpu:\n    base: {train.epochs: 200, train.decay_epochs: 100}\n"
          "    resources: {gpus_per_worker: 1}\n")
    (cwd / "my-space.yaml").write_text(tiny_space_yaml(
        name="mine", num_samples=1, max_concurrent=1, epochs=1, pruner="none"))
    base = {k.split(".")[0]: {} for k in ("data", "model", "train")}
    for key, value in {"data.crop": 32, "data.batch_size": 2, "model.depth": 3,
                       "model.ngf": 8, "model.ndf": 8, "model.d_blocks": 2,
                       "train.epochs": 2, "train.steps_per_epoch": 3}.items():
        section, name = key.split(".")
        base[section][name] = value
    (cwd / "my.yaml").write_text(yaml.safe_dump(base))
    phantom = Path(builtin_dataset("phantom-trichrome"))
    bci = cwd / "data" / "BCI"
    for src, dst in (("trainA", "HE/train"), ("trainB", "IHC/train"),
                     ("testA", "HE/test"), ("testB", "IHC/test")):
        shutil.copytree(phantom / src, bci / dst)
    import tifffile

    tile = read_image(sorted((phantom / "testA").iterdir())[0])
    tifffile.imwrite(cwd / "slide.tif", np.tile(tile, (2, 2, 1)))
    # An Aperio-like .svs (what a scanner writes; OpenSlide reads it as "aperio").
    big = np.tile(tile, (4, 4, 1))
    with tifffile.TiffWriter(cwd / "slide.svs") as tif:
        for i, level in enumerate((big, big[::2, ::2])):
            tif.write(level, tile=(128, 128), photometric="rgb", compression="jpeg",
                      subfiletype=1 if i else 0, metadata=None,
                      description=(f"Aperio Image Library v12.0.15\r\n{big.shape[1]}x"
                                   f"{big.shape[0]} [0,0 {big.shape[1]}x{big.shape[0]}] "
                                   f"(128x128) RGB|AppMag = 20|MPP = 0.5000") if i == 0 else None)
    return cwd


# A budget flag's value in the README → the value run here (tiny spaces, 2 CPUs).
SMALLER = {"--num-samples": "3", "--top": "2", "--seeds": "2"}
# A command whose budget is a bundled config, not a flag: the same command with a
# budget flag added (the quickstart's 8 epochs become 4, its decay epochs: the same code path).
SHORTER = {"stain-search train": ["--epochs", "4"]}


# Verbs that start a search, and so a Ray: in this process, on the session's Ray.
SEARCHES = {"run", "resume", "confirm"}


def run_in_process(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    from stain_search.cli import main

    if argv[0] in SEARCHES and "--dry-run" not in argv:
        ensure_local_ray()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd)
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own exits
            code = stop.code if isinstance(stop.code, int) else 2
    out = capsys.readouterr()
    return code, out.err or out.out


def substitute(command: str, cwd: Path) -> list[str]:
    words = shlex.split(command)
    swap = {"/data/BCI": str(cwd / "data" / "BCI")}
    out = [swap.get(w, w) for w in words[1:]]
    for i, word in enumerate(out[:-1]):
        if word in SMALLER:
            out[i + 1] = SMALLER[word]
    out += SHORTER.get(command.strip(), [])
    return [sys.executable, "-m", "stain_search.cli", *out]


def test_every_readme_command_runs(user_folder, monkeypatch, capsys):
    commands = readme_commands()
    assert commands and commands[0] == "stain-search run spaces/lambda.yaml", commands[:3]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    failures, ran = [], []
    for command in dict.fromkeys(commands):  # a command the README repeats runs once
        if _not_run(command):
            continue
        argv = substitute(command, user_folder)[3:]
        if command != commands[0]:
            code, said = run_in_process(argv, user_folder, monkeypatch, capsys)
            ran.append(command)
            if code != 0:
                failures.append(f"{command}  →  exit {code} (in process)\n{said[-1500:]}")
            continue
        done = subprocess.run(substitute(command, user_folder), cwd=user_folder, env=env,
                              capture_output=True, text=True, timeout=900)
        ran.append(command)
        printed = (done.stdout + done.stderr).strip().splitlines()  # off a terminal
        assert len(printed) <= 40, "\n".join(printed)  # issue 14: the quickstart's ≤ ~40 lines
        if done.returncode != 0:
            failures.append(f"{command}  →  exit {done.returncode}\n"
                            f"{(done.stderr or done.stdout)[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert any(c.startswith("stain-search export") for c in ran)

