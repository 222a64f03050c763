"""The training loader: crops fixed by the seed whatever the worker count,
one decode per image per worker, workers kept across epochs, the cache and
worker-count settings, and datasets read through a `data prepare` manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stain_search.config import DataConfig, load_config
from stain_search.data import datasets, loader
from stain_search.data.datasets import DecodedImages, UnpairedDataset
from stain_search.data.folders import resolve_dataset
from stain_search.data.io import read_image, write_image
from stain_search.data.loader import (EpochSampler, build_train_loader, cache_budget,
                                      resolve_num_workers)
from stain_search.data.prepare import prepare_dataset
from stain_search.errors import DataError
from stain_search.train import build_data, run_training

from conftest import TINY_BASE


def make(folder: Path, n: int, *, size: int = 48, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [write_image(folder / f"im{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for i in range(n)]


def epoch_batches(ds: UnpairedDataset, *, workers: int, cache_mb: int | str = "auto",
                  epochs: int = 2) -> list[list[dict]]:
    data = DataConfig(batch_size=3, num_workers=workers, cache_mb=cache_mb)
    dl = build_train_loader(ds, data, samples=12, seed=7)
    out = []
    for epoch in range(epochs):
        dl.sampler.set_epoch(epoch)
        torch.manual_seed(1000 + workers)  # the global RNG must not matter
        out.append(list(dl))
    return out


@pytest.fixture
def dataset(tmp_path) -> UnpairedDataset:
    return UnpairedDataset(make(tmp_path / "A", 4), make(tmp_path / "B", 5, seed=1), crop=16)


def test_crops_are_the_same_with_0_and_2_workers_and_with_the_cache_off(dataset):
    base = epoch_batches(dataset, workers=0)
    for workers, cache in [(2, "auto"), (0, 0), (2, 0)]:
        other = epoch_batches(dataset, workers=workers, cache_mb=cache)
        for epoch_a, epoch_b in zip(base, other):
            assert len(epoch_a) == len(epoch_b) == 4
            for a, b in zip(epoch_a, epoch_b):
                assert torch.equal(a["A"], b["A"]) and torch.equal(a["B"], b["B"])
                assert a["B_path"] == b["B_path"]
    # ...and the seed does decide: epochs differ from each other.
    assert not torch.equal(base[0][0]["A"], base[1][0]["A"])


def test_training_is_identical_with_0_and_2_workers():
    runs = {}
    for workers in (0, 2):
        config = load_config(None, {**TINY_BASE, "train.epochs": 2, "train.steps_per_epoch": 2,
                                    "data.num_workers": workers})
        kept = []
        run_training(config, reporter=type("R", (), {"report": lambda self, m, **_: kept.append(m)})(),
                     log=lambda m: None)
        runs[workers] = [(m["loss_G"], m["loss_D_Y"], m["fd_random"]) for m in kept]
    assert runs[0] == runs[2]


def test_each_image_is_decoded_once_per_worker_and_workers_persist(tmp_path, monkeypatch):
    log = tmp_path / "decodes.log"

    def logged_read(path, *args, **kwargs):  # forked workers inherit the patch
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {path}\n")
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_image", logged_read)
    files_a, files_b = make(tmp_path / "A", 3), make(tmp_path / "B", 3, seed=1)
    ds = UnpairedDataset(files_a, files_b, crop=16)
    data = DataConfig(batch_size=2, num_workers=2)
    dl = build_train_loader(ds, data, samples=12, seed=0)
    pids_by_epoch = []
    for epoch in range(3):
        dl.sampler.set_epoch(epoch)
        before = log.read_text().splitlines() if log.exists() else []
        assert len(list(dl)) == 6
        lines = log.read_text().splitlines()
        pids_by_epoch.append({line.split()[0] for line in lines[len(before):]})
    decodes = [tuple(line.split()) for line in log.read_text().splitlines()]
    assert len(decodes) == len(set(decodes))  # never the same image twice in one process
    pids = {pid for pid, _ in decodes}
    assert len(pids) <= 2 and str(os.getpid()) not in pids
    # 12 items x 2 images an epoch, 6 distinct files: later epochs hit the
    # caches of the same two worker processes, so they decode (almost) nothing.
    assert len(decodes) <= 2 * 6
    assert all(p <= pids for p in pids_by_epoch)

    off = tmp_path / "off.log"
    log.rename(off)
    dl = build_train_loader(ds, DataConfig(batch_size=2, num_workers=0, cache_mb=0),
                            samples=12, seed=0)
    list(dl)
    assert len(log.read_text().splitlines()) == 24  # cache off: two decodes per item


def test_decoded_images_is_lru_by_bytes(tmp_path):
    files = make(tmp_path, 3, size=32)  # 32*32*3 = 3072 bytes each
    cache = DecodedImages(max_bytes=2 * 3072)
    for p in (files[0], files[1], files[0], files[2]):  # files[1] is least recent at the end
        cache.load(p, 16, None)
    assert cache.misses == 3 and cache.hits == 1 and len(cache) == 2 and cache.bytes == 6144
    cache.load(files[0], 16, None)
    assert cache.hits == 2
    cache.load(files[1], 16, None)
    assert cache.misses == 4
    image = cache.load(files[1], 16, None)
    np.testing.assert_array_equal(image, read_image(files[1]))
    with pytest.raises(ValueError):
        image[0, 0, 0] = 1  # cached arrays are shared: read-only
    off = DecodedImages(0)
    off.load(files[0], 16, None)
    off.load(files[0], 16, None)
    assert len(off) == 0 and off.bytes == 0
    too_big = DecodedImages(100)
    too_big.load(files[0], 16, None)
    assert len(too_big) == 0


def test_cache_budget(monkeypatch):
    monkeypatch.setattr(loader, "available_memory", lambda: 8 * 2**30)
    assert cache_budget(64, dataset_bytes=10**12, processes=3) == 64 * 2**20  # MB per process
    assert cache_budget(0, dataset_bytes=10, processes=1) == 0
    assert cache_budget("auto", dataset_bytes=2**30, processes=1) == 2**30  # it fits: all
    # 4 workers share a quarter of 8 GiB: 512 MiB each, less than the 1 GiB dataset.
    assert cache_budget("auto", dataset_bytes=2**30, processes=4) == 2**29


def test_num_workers_auto_is_cpus_minus_one(monkeypatch):
    for cpus, expected in [(1, 0), (2, 1), (8, 7)]:
        monkeypatch.setattr(loader, "available_cpus", lambda cpus=cpus: cpus)
        assert resolve_num_workers("auto") == expected
    assert resolve_num_workers(3) == 3
    assert load_config(None, {"data.num_workers": "auto"}).data.num_workers == "auto"


def test_sampler_shards_one_permutation_across_ranks():
    whole = EpochSampler(10, samples=16, seed=3).keys()
    shards = [EpochSampler(10, samples=16, seed=3, rank=r, world=2).keys() for r in (0, 1)]
    assert shards[0] == whole[0::2] and shards[1] == whole[1::2]
    assert sorted({i for i, _ in whole}) == list(range(10))  # every item, wrapped to 16
    assert len(EpochSampler(10, samples=16, seed=3, rank=1, world=2)) == 8


# --- a dataset read through the manifest of `data prepare` ---------------------------------

def prepared(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for domain, seed in (("A", 0), ("B", 1)):
        for split in ("train", "test"):
            rng = np.random.default_rng(seed)
            img = np.clip(np.array((200, 120, 190)) + rng.normal(0, 12, (128, 256, 3)), 0, 255)
            write_image(src / f"{split}{domain}" / "s1.png", img.astype(np.uint8))
    return prepare_dataset(src, tmp_path / "prepared", tile=64, min_tissue=0.0)


def test_manifest_is_a_dataset_with_its_own_splits(tmp_path):
    out = prepared(tmp_path)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    for path in (out, out / "manifest.parquet"):
        files = resolve_dataset(path)
        assert files.layout == "manifest"
        for split, domain, got in [("train", "A", files.train_a), ("test", "B", files.test_b)]:
            assert sorted(got) == sorted(out / r["path"] for r in rows
                                         if r["split"] == split and r["domain"] == domain)
        assert len(files.pairs) == len(files.test_a) == 8  # same tile names in A and B
    # The manifest decides, not the listing: a stray file in trainA is not trained on.
    write_image(out / "trainA" / "stray.png", np.zeros((64, 64, 3), np.uint8))
    assert all(p.name != "stray.png" for p in resolve_dataset(out).train_a)
    config = load_config(None, {**TINY_BASE, "data.path": str(out / "manifest.parquet")})
    assert len(build_data(config).train) == 8


def test_manifest_tolerates_extra_columns_and_names_what_is_wrong(tmp_path):
    out = prepared(tmp_path)
    table = pq.read_table(out / "manifest.parquet")
    extra = table.append_column("slide_id", pa.array(["s1"] * table.num_rows))
    pq.write_table(extra, out / "manifest.parquet")
    assert len(resolve_dataset(out).train_b) == 8
    pq.write_table(table.drop(["split"]), out / "manifest.parquet")
    with pytest.raises(DataError, match="no column 'split'"):
        resolve_dataset(out)
    pq.write_table(table, out / "manifest.parquet")
    missing = out / table.column("path")[0].as_py()
    missing.unlink()
    with pytest.raises(DataError, match="listed in .*missing"):
        resolve_dataset(out)
    (out / "manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet manifest"):
        resolve_dataset(out / "manifest.parquet")
