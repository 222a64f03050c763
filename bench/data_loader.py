"""Training loader throughput: decoded-image cache on/off × DataLoader workers,
beside what the training step consumes at the same crop.

Two generated sets, written once into a temporary folder (cyclegan layout):

- ``jpeg1024``: 1024² JPEG (quality 90), like BCI's fields;
- ``png1400``: 1400² PNG, like 1393² microscope fields (MIST, the issue's
  measurement).

The images are H&E-like renderings (Beer–Lambert, ``stain_search.data.stain``)
of smooth density fields with nuclei-sized blobs and pixel noise, so that
they compress, and decode, roughly like tissue rather than like flat colour.
For each (set, crop, cache, workers) a forked child of the bench process
(torch already imported: every row starts from the same resident baseline,
and no row pays an import) builds the library's loader (``stain_search.data.loader.build_train_loader``, as ``run_training``
does) and iterates ``--epochs`` epochs through its persistent workers:

- ``cold``: items/s of the first epoch (each worker decodes every image once);
- ``warm``: items/s of the later epochs (with the cache: no decoding);
- ``peak RSS``: the largest sum of resident memory of the process and its
  workers seen during the run, sampled every 20 ms (forked workers share
  pages, which this counts in each: an upper bound).

``cache off, 0 workers`` is the behaviour before the cache (each item
decodes its A and its B image): the ``× before`` column divides by it.
``demand`` is the library step's img/s at the same crop and batch from
``bench/results/train_step.json`` (``bench/train_step.py``), one item = one
A + B pair = one image of the step; ``× demand`` = warm items/s ÷ demand.

    python bench/data_loader.py
    python bench/data_loader.py --smoke-test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

SETS = {"jpeg1024": (1024, ".jpg"), "png1400": (1400, ".png")}
TRAIN_STEP_JSON = common.RESULTS_DIR / "train_step.json"


# --- the generated images ---------------------------------------------------------------

def smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian-filtered noise, unit std (FFT: fast at 1400²)."""
    f = np.fft.rfft2(rng.standard_normal((size, size)))
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    field = np.fft.irfft2(f * np.exp(-2 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2)), s=(size, size))
    return field / max(field.std(), 1e-9)


def tissue_like(rng: np.random.Generator, size: int) -> np.ndarray:
    from stain_search.data.stain import render

    nuclei = np.clip(smooth(rng, size, 2.5) - 1.2, 0, None) * 0.9  # blobs ~10 px
    haem = 0.25 + 0.08 * smooth(rng, size, size / 12) + nuclei
    eosin = 0.35 + 0.15 * smooth(rng, size, size / 20) + 0.05 * smooth(rng, size, 1.5)
    image = render(np.clip(np.stack([haem, eosin], -1), 0, None), ["haematoxylin", "eosin"])
    noise = rng.normal(0, 4, image.shape)  # sensor noise: what makes real fields incompressible
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def generate(root: Path, name: str, *, images: int, size: int | None = None) -> Path:
    """A cyclegan-layout set of ``images`` per training domain (one test image each);
    ``size`` replaces the set's side (the smoke test's small images)."""
    from stain_search.data.io import write_image

    side, suffix = SETS[name]
    size = size or side
    folder = root / name
    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng(0)
    for split, count in (("trainA", images), ("trainB", images), ("testA", 1), ("testB", 1)):
        for i in range(count):
            write_image(folder / split / f"img{i:03d}{suffix}", tissue_like(rng, size),
                        fsync=False)
    (folder / "done").write_text("")
    return folder


# --- one measurement, in a fresh process ------------------------------------------------

def tree_rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def measure(spec: dict[str, Any], queue: mp.Queue) -> None:
    import os

    import torch

    from stain_search.config import DataConfig
    from stain_search.data import resolve_dataset
    from stain_search.data.datasets import UnpairedDataset
    from stain_search.data.loader import build_train_loader

    torch.set_num_threads(1)
    peak = {"kib": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["kib"] = max(peak["kib"], tree_rss_kib(os.getpid()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    files = resolve_dataset(spec["path"])
    dataset = UnpairedDataset(files.train_a, files.train_b, crop=spec["crop"], seed=0)
    data = DataConfig(batch_size=spec["batch"], num_workers=spec["workers"],
                      cache_mb="auto" if spec["cache"] else 0)
    loader = build_train_loader(dataset, data, samples=spec["items"], seed=0)
    seconds = []
    for epoch in range(spec["epochs"]):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(batch["A"].shape[0] for batch in loader)
        seconds.append(time.perf_counter() - t0)
        assert n == spec["items"], (n, spec["items"])
    del loader  # stop the persistent workers before the last RSS sample
    stop.set()
    sampler.join()
    queue.put({"seconds": seconds, "peak_rss_mib": peak["kib"] / 1024,
               "cache_mib_per_process": dataset.images.max_bytes / common.MIB})


def run_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("fork")  # one child per row: its workers and peak are its own
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(spec, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join()
    return result


# --- the step's demand ------------------------------------------------------------------

def step_demand(path: Path, *, crop: int, batch: int) -> dict[str, Any] | None:
    """The library step's img/s at (crop, batch), attention none, no R1, fp32."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    for row in record.get("rows", []):
        if (row.get("phase") == "grid" and row.get("variant") == "fp32" and row["size"] == crop
                and row["batch"] == batch and row["attention"] == "none" and not row["r1"]):
            return {"img_s": row["img_s"], "date": record["meta"]["date_utc"],
                    "machine": f"{record['meta']['cpu']} ({record['meta']['cpu_count']} cores)"}
    return None


def main(argv: list[str] | None = None) -> int:
    import torch  # noqa: F401 - imported once here, inherited by every forked row

    import stain_search.data.loader  # noqa: F401 - likewise

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--crops", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=8, help="training images per domain")
    parser.add_argument("--items", type=int, default=64, help="items per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs with the cache on")
    parser.add_argument("--epochs-off", type=int, default=2, help="epochs with the cache off")
    parser.add_argument("--data-dir", default=None, help="keep the generated sets here")
    parser.add_argument("--size", type=int, default=None, help="override the sets' image side")
    parser.add_argument("--train-step-json", default=str(TRAIN_STEP_JSON))
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.sets, args.crops, args.workers = ["jpeg1024"], [64], [0, 1]
        args.images, args.items, args.epochs, args.epochs_off = 2, 8, 2, 1
        args.size = args.size or 256

    info = common.begin("data_loader", 1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(args.data_dir or tmp)
        t0 = time.perf_counter()
        paths = {name: generate(root, name, images=args.images, size=args.size)
                 for name in args.sets}
        print(f"generated {', '.join(args.sets)} ({args.images} images per domain"
              f"{f', {args.size} px' if args.size else ''}) in "
              f"{time.perf_counter() - t0:.1f} s under {root}")
        rows = []
        for name in args.sets:
            for crop in args.crops:
                demand = step_demand(Path(args.train_step_json), crop=crop, batch=args.batch)
                for cache in (False, True):
                    for workers in args.workers:
                        spec = {"path": str(paths[name]), "crop": crop, "batch": args.batch,
                                "workers": workers, "cache": cache, "items": args.items,
                                "epochs": args.epochs if cache else args.epochs_off}
                        result = run_in_fresh_process(spec)
                        sec = result["seconds"]
                        warm = sec[1:] or sec
                        row = {"set": name, "crop": crop, "cache": cache, "workers": workers,
                               "cold_items_s": args.items / sec[0],
                               "warm_items_s": args.items * len(warm) / sum(warm),
                               "peak_rss_mib": result["peak_rss_mib"],
                               "cache_mib_per_process": result["cache_mib_per_process"],
                               "demand_img_s": demand["img_s"] if demand else None,
                               "epoch_seconds": sec}
                        rows.append(row)
                        print(f"  {name} {crop}px cache {'on ' if cache else 'off'} "
                              f"workers {workers}: {row['warm_items_s']:.1f} items/s warm")
        for row in rows:
            before = next(r for r in rows if r["set"] == row["set"] and r["crop"] == row["crop"]
                          and not r["cache"] and r["workers"] == min(args.workers))
            row["x_before"] = row["warm_items_s"] / before["warm_items_s"]
            row["x_demand"] = (row["warm_items_s"] / row["demand_img_s"]
                               if row["demand_img_s"] else None)
    demand_source = step_demand(Path(args.train_step_json), crop=args.crops[0], batch=args.batch)
    print()
    print(common.format_table(rows, [
        "set", "crop", "cache", "workers", "cold_items_s", "warm_items_s", "x_before",
        "peak_rss_mib", "demand_img_s", "x_demand"], headers=[
        "set", "crop", "cache", "workers", "cold items/s", "warm items/s", "× before",
        "peak RSS MiB", "step img/s", "× demand"]))
    if demand_source:
        print(f"\nstep demand: library step, attention none, no R1, batch {args.batch}, from "
              f"{args.train_step_json} ({demand_source['date']}, {demand_source['machine']})")
    common.finish("data_loader", args.json, info, {
        "settings": vars(args), "rows": rows, "demand_source": demand_source})
    return 0


if __name__ == "__main__":
    sys.exit(main())
