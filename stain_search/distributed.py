"""Data parallelism by hand: rank, gradient averaging, weight broadcast.

A trial with several Ray Train workers runs one process per worker in the
process group Ray Train sets up (gloo on CPU, NCCL on GPU). The CycleGAN
step does not fit DistributedDataParallel's one-forward-one-backward
reducer: G and D update in turn, R1 differentiates twice, extragradient
takes two gradients per update. So the training code calls these helpers
explicitly instead:

- :func:`world`: (rank, world size), (0, 1) outside a distributed job;
- :func:`broadcast_parameters`: start every worker from rank 0's weights,
  as DDP does at construction;
- :func:`sync_gradients`: average gradients over workers, one flattened
  all-reduce per network group, after each backward;
- :func:`mean_over_workers`: average logged scalars (the epoch's losses).

Averaged, not summed: with equal shards per worker the mean of the workers'
mean-reduced gradients is the gradient of the whole global batch, so a
learning rate means the same at any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a distributed job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sync_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients across workers with one flattened all-reduce.

    Every worker must pass the same parameters with the same set of
    gradients present (the same networks after the same backward).
    """
    _, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)  # a sum over workers
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: nn.Module) -> None:
    """Start every worker from rank 0's weights (as DDP does at construction)."""
    if world()[1] == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each scalar averaged over workers, in float64 (all workers call this)."""
    _, size = world()
    if size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / size for k, v in zip(keys, t.tolist())}
