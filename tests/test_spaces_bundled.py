"""Every bundled search space loads, validates under every profile it defines,
names its training settings correctly, and rewards a translation — they are
what users run first (`stain-search spaces`)."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from stain_search import config as cfg
from stain_search.pareto import pareto_mask
from stain_search.spaces import bundled_spaces, load_space, parse_space

NAMES = {"lambda", "lr", "identity", "r1", "attention", "optimizer", "full", "pbt"}
PARETO = {"full", "identity"}
PROFILED = [(path.stem, profile) for path in bundled_spaces()
            for profile in (cfg.read_yaml(path).get("profiles") or {})]


def test_the_eight_spaces_are_bundled():
    assert {p.stem for p in bundled_spaces()} == NAMES


@pytest.mark.parametrize("name", sorted(NAMES))
def test_bundled_space_validates(name):
    spec = load_space(f"spaces/{name}.yaml", gpus=0)  # the README's spelling, a CPU machine
    assert spec.name == name and spec.description and spec.params
    assert spec.profile == "demo" and set(spec.profiles) == {"demo", "gpu"}
    config = spec.base_config()
    assert config.data.crop % 2 ** config.model.depth == 0
    assert spec.resources.resolved_executor == "in_trial"  # 1 worker: no TorchTrainer per trial
    assert (len(spec.objectives) > 1) == (name in PARETO)


@pytest.mark.parametrize("name,profile", PROFILED)
def test_every_profile_validates(name, profile):
    """Every corner of the space makes a valid config under the profile (the
    parse checks them); the data is the profile's own, checked below."""
    spec = load_space(name, profile=profile, check_objective=False)
    assert spec.profile == profile
    config = spec.base_config()
    assert config.data.crop % 2 ** config.model.depth == 0
    if profile == "gpu":  # the reference scale (issue 13): U-Net-256 widths at 256 px
        assert (config.data.crop, config.model.ngf, config.model.ndf) == (256, 64, 64)
        assert config.model.depth == (8 if name not in ("attention", "full") else 7)
        assert 1 <= config.data.batch_size <= 4
        assert config.train.epochs >= 100 and config.train.decay_epochs > 0
        assert spec.resources.gpus_per_worker == 1


@pytest.mark.parametrize("name", sorted(NAMES))
def test_demo_profile_is_the_space_as_written(name):
    """`demo` changes nothing: the offline quickstart runs today's CPU sizes."""
    path = next(p for p in bundled_spaces() if p.stem == name)
    raw = {k: v for k, v in cfg.read_yaml(path).items() if k != "profiles"}
    plain = parse_space(raw, path=path, check_objective=False)
    demo = load_space(path, profile="demo", check_objective=False)
    assert demo.base == plain.base
    assert (demo.search, demo.resources, demo.objectives) == (plain.search, plain.resources,
                                                                plain.objectives)
    train = demo.base_config().train
    # small by training steps, not epochs: PBT needs several perturbation intervals
    assert train.epochs * train.steps_per_epoch <= 96 and demo.resources.gpus_per_worker == 0


def test_gpu_profile_data_fits_its_crop(monkeypatch, tmp_path):
    """The `gpu` profile's own dataset holds images large enough for its crops,
    and every space's objective is reported on it. Generated here with one field
    per split, at the profile's size (the whole set is 160 fields, ~1.5 min of
    CPU): what fits the crop is the fields' size, not their number."""
    from dataclasses import replace

    from stain_search.data import phantom
    from stain_search.data.datasets import verify_dataset

    monkeypatch.setenv("STAIN_SEARCH_CACHE", str(tmp_path))
    for key, spec in list(phantom.BUILTIN_DATASETS.items()):
        monkeypatch.setitem(phantom.BUILTIN_DATASETS, key, replace(spec, n_train=1, n_test=1))
    checked = set()
    for name in sorted(NAMES):
        spec = load_space(name, profile="gpu")  # the objective checked against the data
        d = spec.base_config().data
        if (d.path, d.crop) not in checked:
            verify_dataset(d.path, d.layout, d.crop, eval_crop=d.eval_crop,
                           load_size=d.load_size)
            checked.add((d.path, d.crop))
    assert checked and all(path.startswith("builtin:") for path, _ in checked)


def test_cli_lists_every_space_with_its_description_and_profiles():
    out = subprocess.run([sys.executable, "-m", "stain_search.cli", "spaces"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    for name in NAMES:
        assert name in out.stdout
    assert load_space("spaces/lambda.yaml").description.split()[0] in out.stdout
    assert out.stdout.count("--profile gpu") == len(NAMES)
    assert out.stdout.count("--profile demo") == len(NAMES)
    assert "256 px, U-Net depth 8 ngf 64" in out.stdout


# --- every bundled space rewards a translation (issue 12) ------------------------------------

class Lookup(nn.Module):
    """A "generator" that returns, for each evaluation batch, a fixed image batch:
    the phantom's true rendering in the other stain (an oracle for the metrics)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.table = {x.numpy().tobytes(): y for x, y in pairs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.cpu().numpy().tobytes()].to(x.device)


def evaluation_settings(spec) -> tuple:
    """The space's keys that decide its evaluation set and metrics (hashable, for the cache)."""
    return tuple(sorted((k, v) for k, v in spec.base.items() if k.startswith(("data.", "eval."))))


@functools.cache
def phantom_scores(settings: tuple) -> tuple[dict, dict]:
    """(identity's metrics, true target's metrics) on the evaluation set of
    ``settings``, computed by the project's evaluator as a trial's evaluation is."""
    from stain_search.evaluate import Evaluator
    from stain_search.train import build_data

    config = cfg.load_config(None, dict(settings))
    bundle = build_data(config, device=torch.device("cpu"))
    assert bundle.has_pairs, "the phantom's test images are paired"
    evaluator = Evaluator(config.eval, dataset_key=bundle.dataset_key,
                          has_pairs=bundle.has_pairs, stain=bundle.stain, device="cpu")
    evaluator.prepare_reference(bundle.reference_batches)
    forward = Lookup([(b["A"], b["B"]) for b in bundle.eval_batches])  # H&E → its true stain
    backward = Lookup([(b["B"], b["A"]) for b in bundle.eval_batches])
    target = evaluator.evaluate(forward, backward, bundle.eval_batches)
    identity = evaluator.evaluate(nn.Identity(), nn.Identity(), bundle.eval_batches)
    return identity, target


@pytest.mark.parametrize("data", ["builtin:phantom-trichrome", "builtin:phantom-ki67"])
@pytest.mark.parametrize("name", sorted(NAMES))
def test_identity_does_not_beat_the_true_stain(name, data):
    """Copying the H&E (output = input) must not beat the phantom's true target
    rendering on the space's objective; for a Pareto space it must not dominate it."""
    spec = load_space(name, data=data, profile="demo")
    identity, target = phantom_scores(evaluation_settings(spec))
    metrics = [o.metric for o in spec.objectives]
    values = np.array([[target[m] for m in metrics], [identity[m] for m in metrics]])
    front = pareto_mask(values, [o.mode for o in spec.objectives])
    assert front[0], (f"{name} on {data}: the identity map ({dict(zip(metrics, values[1]))}) "
                      f"beats the true stain ({dict(zip(metrics, values[0]))})")


def test_ssim_structure_alone_would_reward_the_identity():
    """Why identity.yaml is a Pareto: the contract above fails for ssim_structure alone,
    and the Fréchet distance is what makes a copy pay."""
    identity, target = phantom_scores(evaluation_settings(load_space("identity", profile="demo")))
    assert identity["ssim_structure"] > target["ssim_structure"]
    fd = next(k for k in identity if k in ("fid", "fd_random"))
    assert identity[fd] > target[fd]
