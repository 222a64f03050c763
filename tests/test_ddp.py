"""Data parallelism: 2 Ray Train workers over gloo keep identical weights.

Each rank trains on its own shard (so gradients differ before the
all-reduce); after the steps every rank must hold bit-identical networks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def worker(ctx: dict) -> None:
    import ray.train
    import torch

    from stain_search.config import from_dict
    from stain_search.gan import world
    from stain_search.train import run_training

    class Record:
        def __init__(self):
            self.losses = []

        def report(self, metrics, *, checkpoint, grid):
            ray.train.report({"loss_G": metrics["loss_G"]})

    rank, size = world()
    seen = []
    config = from_dict(ctx["config"])
    from stain_search import train as train_module

    real_epoch = train_module.train_epoch

    def spy(model, loader):  # remember this rank's first batch: shards must differ
        batch = next(iter(loader))
        seen.append(float(batch["A"].sum()))
        return real_epoch(model, loader)

    train_module.train_epoch = spy
    try:
        model_holder = {}
        real_cls = train_module.CycleGAN

        class Spy(real_cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                model_holder["m"] = self

        train_module.CycleGAN = Spy
        run_training(config, reporter=Record(), device=torch.device("cpu"), log=lambda m: None)
    finally:
        train_module.train_epoch = real_epoch
        train_module.CycleGAN = real_cls
    model = model_holder["m"]
    digest = hashlib.sha256()
    for name in ("G", "F", "D_X", "D_Y"):
        for key, tensor in sorted(getattr(model, name).state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    out = Path(ctx["out"]) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "size": size, "digest": digest.hexdigest(),
                               "first_batch": seen[0]}))


def test_two_gloo_workers_hold_identical_weights(tmp_path):
    import ray
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from conftest import TINY_BASE
    from stain_search.config import load_config

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = load_config(None, {**TINY_BASE, "train.epochs": 1, "train.steps_per_epoch": 3,
                                "loss.r1_gamma": 1.0})
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            worker, train_loop_config={"config": config.to_dict(), "out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "ray")))
        trainer.fit()
    finally:
        ray.shutdown()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # different shards
    assert ranks[0]["digest"] == ranks[1]["digest"]  # yet identical weights
