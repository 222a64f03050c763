"""Objective names a space may use for the evaluation metrics: aliases, stain metrics, why-nots."""

from __future__ import annotations

from pathlib import Path

import pytest

from stain_search import config as cfg
from stain_search.errors import ConfigError
from stain_search.metrics import frechet
from stain_search.spaces import parse_space

from conftest import TINY_BASE, tiny_space_yaml


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(frechet.WEIGHTS_ENV, raising=False)


def objectives(tmp_path: Path, objective: str, *, data: str = "builtin:phantom-trichrome",
               base: dict | None = None, pruner: str = "median"):
    path = tmp_path / "space.yaml"
    path.write_text(tiny_space_yaml(name="t", objective=objective, data=data, base=base,
                                    pruner=pruner))
    return [(o.metric, o.mode) for o in parse_space(cfg.read_yaml(path), path=path).objectives]


def test_kernel_names_the_kernel_distance_the_run_can_compute(tmp_path, monkeypatch):
    assert objectives(tmp_path, "{metric: kernel, mode: min}") == [("kd_random", "min")]
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")  # resolution only looks for the file
    monkeypatch.setenv(frechet.WEIGHTS_ENV, str(weights))
    assert objectives(tmp_path, "{metric: kernel, mode: min}") == [("kid", "min")]


def test_stain_metrics_are_objectives_with_directions(tmp_path):
    got = objectives(tmp_path, "[{metric: stain_area_error, mode: min}, "
                               "{metric: stain_od_r, mode: max}]", pruner="none")
    assert got == [("stain_area_error", "min"), ("stain_od_r", "max")]
    with pytest.raises(ConfigError, match="use mode: max"):
        objectives(tmp_path, "{metric: stain_od_r, mode: min}")


def test_unknown_stain_says_how_to_name_it(tmp_path):
    data = tmp_path / "data"
    for split in ("trainA", "trainB", "testA", "testB"):
        (data / split).mkdir(parents=True)
    import shutil

    from stain_search.data import builtin_dataset

    src = builtin_dataset("builtin:phantom-trichrome")
    for split in ("trainA", "trainB", "testA", "testB"):
        for p in sorted((src / split).iterdir())[:2]:
            shutil.copy(p, data / split / p.name)
    with pytest.raises(ConfigError, match="eval.stain"):
        objectives(tmp_path, "{metric: stain_area_error, mode: min}", data=str(data))
    ok = objectives(tmp_path, "{metric: stain_area_error, mode: min}", data=str(data),
                    base={**TINY_BASE, "eval.stain": "trichrome"})
    assert ok == [("stain_area_error", "min")]


def test_the_removed_eval_images_key_names_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_crops"):
        objectives(tmp_path, "{metric: frechet, mode: min}", base={"data.eval_images": 4})
