"""Data parallelism: 2 Ray Train workers over gloo keep identical weights,
and the helpers in stain_search.distributed average (never sum) over workers.

Each rank trains on its own shard (so gradients differ before the
all-reduce); after the steps every rank must hold bit-identical networks.
``worker`` below is that training run; the test that runs it is
``tests/test_cluster_ray.py``'s, with its two workers on two Ray nodes (one
node would prove less, and the suite pays for the Train run once).
Identical weights alone would also follow from summed gradients, so the test
here runs the helpers in two plain gloo processes and compares each result
with the average computed by hand from every rank's own values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def worker(ctx: dict) -> None:
    import ray.train
    import torch

    from stain_search.config import from_dict
    from stain_search.distributed import world
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


# --- the helpers on their own: averaged, not summed ---------------------------

def _helpers_worker(rank: int, size: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from stain_search.distributed import (broadcast_parameters, mean_over_workers,
                                          sync_gradients, world)

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        torch.manual_seed(100 + rank)  # different weights on each rank before the broadcast
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        broadcast_parameters(net)
        weights = torch.cat([t.detach().reshape(-1) for t in net.state_dict().values()
                             if t.is_floating_point()])
        # Different data on each rank, so the local gradients differ.
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(rank)) * (rank + 1)
        net(x).pow(2).mean().backward()
        params = list(net.parameters())
        local = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        sync_gradients(params)
        synced = torch.cat([p.grad.reshape(-1) for p in params])
        every_local = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(every_local, local)
        every_weights = [torch.empty_like(weights) for _ in range(size)]
        dist.all_gather(every_weights, weights)
        scalars = mean_over_workers({"loss_G": float(rank + 1), "loss_D": 10.0 * rank},
                                    torch.device("cpu"))
        torch.save({"world": world(), "local": every_local, "synced": synced,
                    "weights": every_weights, "scalars": scalars}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_helpers_average_gradients_and_scalars_over_workers(tmp_path):
    import torch.multiprocessing as mp

    size = 2
    mp.spawn(_helpers_worker, args=(size, str(tmp_path / "store"), str(tmp_path)),
             nprocs=size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(size)]
    assert [r["world"] for r in ranks] == [(0, size), (1, size)]
    local = ranks[0]["local"]
    assert not torch.allclose(local[0], local[1])  # the shards' gradients differ
    by_hand = (local[0] + local[1]) / size
    for r in ranks:
        torch.testing.assert_close(r["synced"], by_hand, rtol=1e-6, atol=1e-7)
        # A sum would be twice the mean: make sure the check can tell them apart.
        assert not torch.allclose(r["synced"], local[0] + local[1])
        torch.testing.assert_close(r["weights"][1], r["weights"][0], rtol=0, atol=0)
        assert r["scalars"] == {"loss_G": 1.5, "loss_D": 5.0}
