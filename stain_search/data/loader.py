"""The training DataLoader: built once per run, its workers kept across epochs.

- :class:`EpochSampler` yields this rank's ``(index, number)`` keys of one
  epoch: a permutation seeded by (seed, epoch), wrapped when the epoch asks
  for more items than there are, and one random number per position that
  seeds the item's crop and flips. It runs in the main process, so a
  persistent worker sees a new epoch through it, and a crop depends on
  (seed, epoch, position) only: the same with 0, 1 or 8 workers.
- :func:`resolve_num_workers` turns ``data.num_workers: auto`` into this
  worker's CPUs minus one (one stays for the training step).
- :func:`cache_budget` sizes each process's decoded-image cache
  (``data.cache_mb``): every loader process keeps its own copy.
- :func:`build_train_loader` puts them together, with pinned memory on CUDA
  (so ``.to(device, non_blocking=True)`` really overlaps the copy) and a few
  batches prefetched per worker.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from stain_search.config import DataConfig
from stain_search.data.datasets import UnpairedDataset

MIB = 2 ** 20
# auto: the decoded cache may take this share of the memory available when
# the run starts, over all loader processes of this trainer: the rest is the
# model's, the other trials' and the page cache's.
CACHE_RAM_FRACTION = 0.25
# Batches each worker keeps ready (torch's default is 2): a cache miss in
# the first epoch decodes a whole image, and a deeper queue absorbs it.
PREFETCH_BATCHES = 4


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of (run seed, epoch, rank): every epoch and rank its own stream."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % 2**31


class EpochSampler(Sampler[tuple[int, int]]):
    """``samples`` keys per epoch over all ranks; this rank gets every ``world``-th.

    Call :meth:`set_epoch` before iterating. The permutation is the one
    ``torch.randperm`` draws from ``epoch_seed(seed, epoch, 0)``, and the
    numbers follow from the same generator, so all ranks agree on both.
    """

    def __init__(self, size: int, *, samples: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        if size < 1 or samples < world:
            raise ValueError(f"EpochSampler needs items and at least one sample per rank "
                             f"(size={size}, samples={samples}, world={world})")
        self.size, self.samples, self.seed = size, samples, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keys(self) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 0))
        order = torch.randperm(self.size, generator=g).tolist()
        order = (order * math.ceil(self.samples / self.size))[: self.samples]
        numbers = torch.randint(0, 2**62, (self.samples,), generator=g).tolist()
        return list(zip(order, numbers))[self.rank::self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(range(self.rank, self.samples, self.world))


def available_cpus() -> int:
    """CPUs this process may use: a Ray worker's share, else its affinity mask."""
    if "ray" in sys.modules:  # never import Ray just to ask
        import ray

        if ray.is_initialized():
            try:
                cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            except Exception:  # noqa: BLE001 - the driver itself has no assignment
                cpus = None
            if cpus:
                return max(1, int(cpus))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str) -> int:
    """``data.num_workers``: a count, or auto = this worker's CPUs minus one, at least 0."""
    return max(0, available_cpus() - 1) if value == "auto" else int(value)


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable, else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_budget(value: int | str, *, dataset_bytes: int, processes: int) -> int:
    """Bytes of decoded-image cache for each of ``processes`` loader processes.

    A number is MB per process; auto caches the whole dataset when all
    processes' copies fit in :data:`CACHE_RAM_FRACTION` of the available
    memory, else each process gets its share of that fraction (LRU then
    keeps the most recently used images).
    """
    if value != "auto":
        return int(value) * MIB
    share = int(CACHE_RAM_FRACTION * available_memory()) // max(1, processes)
    return min(dataset_bytes, share)


def build_train_loader(dataset: UnpairedDataset, data: DataConfig, *, samples: int, seed: int,
                       rank: int = 0, world: int = 1,
                       device: torch.device | None = None) -> DataLoader:
    """The run's one training DataLoader; call ``loader.sampler.set_epoch(e)`` per epoch.

    Sizes ``dataset``'s cache for the worker count (each worker fills its
    own copy, so a DDP rank on the same machine is one more set of them).
    """
    workers = resolve_num_workers(data.num_workers)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dataset.set_cache(cache_budget(data.cache_mb, dataset_bytes=dataset.decoded_bytes(),
                                   processes=max(1, workers) * local_ranks))
    sampler = EpochSampler(len(dataset), samples=samples, seed=seed, rank=rank, world=world)
    cuda = device is not None and device.type == "cuda"
    extra = dict(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES) if workers else {}
    return DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, pin_memory=cuda,
                      generator=torch.Generator().manual_seed(epoch_seed(seed, 0, rank)),
                      **extra)
