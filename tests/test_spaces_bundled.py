"""Every bundled search space loads, validates and names its training
settings correctly — they are what users run first (`stain-search spaces`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stain_search.spaces import bundled_spaces, load_space

NAMES = {"lambda", "lr", "identity", "r1", "attention", "optimizer", "full"}


def test_the_seven_spaces_are_bundled():
    assert {p.stem for p in bundled_spaces()} == NAMES


@pytest.mark.parametrize("name", sorted(NAMES))
def test_bundled_space_validates(name):
    spec = load_space(f"spaces/{name}.yaml")  # the README's spelling
    assert spec.name == name and spec.description and spec.params
    config = spec.base_config()
    assert config.data.crop % 2 ** config.model.depth == 0
    assert spec.resources.resolved_executor == "in_trial"  # 1 worker: no TorchTrainer per trial
    assert (len(spec.objectives) > 1) == (name == "full")


def test_cli_lists_every_space_with_its_description():
    out = subprocess.run([sys.executable, "-m", "stain_search.cli", "spaces"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in NAMES:
        assert name in out.stdout
    assert load_space("spaces/lambda.yaml").description.split()[0] in out.stdout
