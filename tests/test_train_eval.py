"""Evaluation inside training: crops from the data config, a content-keyed reference cache."""

from __future__ import annotations

import json

import pytest

from stain_search.config import load_config
from stain_search.evaluate import Evaluator
from stain_search.train import LocalReporter, build_data, run_training

from conftest import SHARED, TINY_BASE


def reference_key(config, tmp_path):
    data = build_data(config)
    ev = Evaluator(config.eval, dataset_key=data.dataset_key, has_pairs=data.has_pairs,
                   stain=data.stain, device="cpu", cache_dir=tmp_path / "cache")
    ev.prepare_reference(data.reference_batches)
    return ev.reference_key


def test_configs_differing_only_in_load_size_get_different_cache_keys(tmp_path):
    base = {**TINY_BASE, "eval.feature_extractor": "random"}
    native = reference_key(load_config(None, base), tmp_path)
    resized = reference_key(load_config(None, {**base, "data.load_size": 96}), tmp_path)
    assert native != resized
    assert native == reference_key(load_config(None, base), tmp_path)  # and the same config, the same


def test_eval_crops_sets_the_evaluated_count():
    data = build_data(load_config(None, {**TINY_BASE, "data.eval_crops": 10}))
    assert data.eval_crops == 10 == sum(b["A"].shape[0] for b in data.eval_batches)
    assert data.has_pairs and all(b["B"].shape == b["A"].shape for b in data.eval_batches)
    assert sum(b.shape[0] for b in data.reference_batches) == 10


def test_metrics_jsonl_has_the_new_metrics_and_counts(tmp_path):
    config = load_config(None, {**TINY_BASE, "train.epochs": 1, "train.steps_per_epoch": 1,
                                "data.eval_crops": 6, "eval.feature_extractor": "random"})
    run_training(config, reporter=LocalReporter(tmp_path / "out"), log=lambda m: None)
    line = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["eval_crops"] == line["fd_n"] == 6
    for key in ("fd_random", "kd_random", "kd_random_std", "stain_area_error", "stain_od_r",
                "stain_area_output", "stain_area_real"):
        assert key in line, key


BCI = SHARED / "data" / "real-samples" / "bci"


@pytest.mark.skipif(not BCI.is_dir(), reason="needs ../shared/data/real-samples/bci")
def test_bci_sample_evaluates_64_crops_with_dab_metrics():
    config = load_config(None, {"data.path": str(BCI), "data.crop": 64})
    data = build_data(config)
    assert data.stain == "ihc" and data.has_pairs
    assert data.eval_crops == 64  # the CPU default, all from its one 1024² test pair
