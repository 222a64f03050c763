"""Benchmark `stain-search translate`: tiles/s, Mpx/s and peak memory on generated slides.

H&E-like slides (``--sizes``, e.g. 4096 16384 32768x8192) are generated from
the built-in tissue phantom — a tissue section (an ellipse of phantom fields)
on glass, ``--tissue`` of the slide (default 0.6) — and written as
JPEG-tiled TIFFs strip by strip, never whole in memory. A real U-Net with
untrained (seeded) weights then translates each into a pyramidal TIFF as
`stain-search translate` does, in a fresh child process per row of the
table, so the peak resident memory (VmHWM) is that translation's own: it
should not grow with the slide (column strips, tests/test_translate_memory.py).
``--background-test`` adds a slide that is 70 % glass, translated with
``--min-tissue`` (glass tiles skipped) and with ``--min-tissue 0``.

    python bench/translate.py --sizes 4096 16384 --depth 3 --ngf 8 --norm-stats tile
    python bench/translate.py --norm-stats global tile  # compare statistics modes
    python bench/translate.py --device cuda --batch-size 16   # batched, on a GPU
    python bench/translate.py --smoke-test              # what CI runs: 512 px

Prints a Markdown table and writes the figures, with the machine and its
load, to bench/results/translate.json (``--json``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402

FIELD = 1024  # side of one generated phantom field (at most)
GLASS = 242  # brightness of empty glass


def he_fields(size: int, n: int = 4) -> list[np.ndarray]:
    from stain_search.data.phantom import phantom_pair

    return [phantom_pair("trichrome", i, size=size, seed=7)[1] for i in range(n)]


def slide_strips(height: int, width: int, *, tissue: float = 0.6, rows: int = 256):
    """Rows of the slide, ``rows`` at a time: phantom fields (rotated by
    position) inside an elliptical section covering ``tissue`` of it, glass outside."""
    side = min(FIELD, height, width)
    fields = he_fields(side)
    rng = np.random.default_rng(0)
    semi = np.sqrt(4 * tissue / np.pi)  # ellipse semi-axes ·H/2, ·W/2: area = tissue·H·W
    size = width
    for y0 in range(0, height, rows):
        ys = np.arange(y0, min(y0 + rows, height))
        strip = np.empty((len(ys), size, 3), np.uint8)
        for fx in range(0, size, side):
            for fy in sorted({int(y) // side for y in ys}):
                k = (fy * 7 + fx // side * 3) % len(fields)
                field = np.rot90(fields[k], k=(fy + fx // side) % 4)
                sel = ys // side == fy
                block = field[ys[sel] % side][:, :min(side, size - fx)]
                strip[sel, fx:fx + block.shape[1]] = block
        yy = (ys[:, None] - height / 2) / (semi * height / 2)
        xx = (np.arange(size)[None, :] - size / 2) / (semi * size / 2)
        outside = yy ** 2 + xx ** 2 > 1
        glass = np.clip(rng.normal(GLASS, 2.0, (len(ys), size, 3)), 0, 255).astype(np.uint8)
        strip[outside] = glass[outside]
        yield strip


def write_slide(path: Path, height: int, width: int, *, tissue: float = 0.6) -> None:
    import tifffile

    size = width

    def tiles():
        for strip in slide_strips(height, width, tissue=tissue):
            for x in range(0, size, 256):
                block = np.zeros((256, 256, 3), np.uint8)
                part = strip[:, x:x + 256]
                block[:part.shape[0], :part.shape[1]] = part
                yield block

    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2 ** 31) as tif:
        tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(256, 256),
                  photometric="rgb", compression="jpeg", resolution=(1e4 / 0.5,) * 2,
                  resolutionunit="CENTIMETER")


def translate_job(job: dict, src: str, dst: str, queue) -> None:
    """In a fresh child: build G, translate the slide, report the figures."""
    try:
        queue.put(_translate(job, src, dst))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        queue.put({"error": f"{type(err).__name__}: {err}"})
        raise


def _translate(job: dict, src: str, dst: str) -> dict:
    import torch

    from stain_search.config import load_config
    from stain_search.deploy.translate import Translator, pick_device, translate_path
    from stain_search.models import build_generator, init_weights

    common.set_threads(job["threads"])
    torch.manual_seed(0)
    cfg = load_config(None, {"model.depth": job["depth"], "model.ngf": job["ngf"],
                             "data.crop": 2 ** job["depth"] * 2})
    device = pick_device(job["device"])
    g = init_weights(build_generator(cfg.model)).to(device).eval()
    tr = Translator(g, depth=job["depth"], device=device, tile=job["tile"],
                    overlap=job["overlap"], norm_stats=job["norm_stats"],
                    batch_size=job["batch_size"], progress=job["progress"],
                    min_tissue=job["min_tissue"], model_mpp=0.5)
    startup = common.rss_mib()
    common.reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with common.stopwatch() as t:
        translate_path(tr, src, dst)
    run = tr.last_run
    h, w = job["shape"]
    return {
        "size": f"{h}x{w}", "tissue": job["tissue"], "min_tissue": job["min_tissue"],
        "device": str(device), "threads": torch.get_num_threads(),
        "depth": job["depth"], "ngf": job["ngf"], "norm_layers": len(tr.norms),
        "norm_stats": tr.norm_stats, "tile": tr.tile, "overlap": tr.overlap,
        "batch_size": tr.batch_size, "tiles": run.tiles, "tissue_tiles": run.tissue_tiles,
        "passes": run.passes, "forwards": run.forwards, "seconds": t["s"],
        "tiles_per_s": run.tiles / t["s"], "forwards_per_s": run.forwards / t["s"],
        "mpix_per_s": h * w / 1e6 / t["s"],
        "startup_rss_mib": startup, "peak_rss_mib": common.peak_rss_mib(),
        "gpu_peak_mib": (torch.cuda.max_memory_allocated(device) / common.MIB
                         if device.type == "cuda" else None),
        "output_mib": Path(dst).stat().st_size / common.MIB,
        "loadavg_1m": (common.loadavg() or [None])[0],
    }


def run_child(job: dict, src: Path, dst: Path) -> dict:
    ctx = mp.get_context("spawn")  # fresh: its peak RSS is this translation's alone
    queue = ctx.Queue()
    proc = ctx.Process(target=translate_job, args=(job, str(src), str(dst), queue))
    proc.start()
    result = None
    while result is None and (proc.is_alive() or not queue.empty()):
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: still working
            pass
    proc.join()
    if result is None or "error" in result:
        raise RuntimeError(f"translation failed: {(result or {}).get('error', proc.exitcode)}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["4096", "16384"],
                   help="slides: N (N x N) or HxW, one table row each (default 4096 16384)")
    p.add_argument("--tissue", type=float, default=0.6, help="tissue share of each slide")
    p.add_argument("--min-tissue", type=float, default=0.01, help="as translate's")
    p.add_argument("--background-test", action="store_true",
                   help="also a 70 %%-glass slide of the first size, --min-tissue vs 0")
    p.add_argument("--depth", type=int, default=4, help="U-Net depth (quickstart: 4)")
    p.add_argument("--ngf", type=int, default=16, help="U-Net width (quickstart: 16)")
    p.add_argument("--tile", type=int, help="tile size (default: from depth)")
    p.add_argument("--overlap", type=int, help="overlap (default: covers the receptive field)")
    p.add_argument("--norm-stats", nargs="+", default=["global"],
                   choices=["global", "kernel", "tile"], help="one table row each")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="record path (default: bench/results/translate.json)")
    p.add_argument("--progress", action="store_true", help="show the progress bars")
    p.add_argument("--smoke-test", action="store_true", help="512 px, for CI")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.sizes = ["512"]
    args.shapes = [tuple(int(v) for v in (s.split("x") if "x" in s else (s, s)))
                   for s in args.sizes]
    return args


COLUMNS = ["size", "tissue", "min_tissue", "device", "norm_stats", "tile", "overlap", "tiles",
           "tissue_tiles", "passes", "forwards", "seconds", "tiles_per_s", "forwards_per_s",
           "mpix_per_s",
           "startup_rss_mib", "peak_rss_mib", "gpu_peak_mib"]
HEADERS = ["size", "tissue", "min tissue", "device", "norm stats", "tile", "overlap", "tiles",
           "tissue tiles", "stat passes", "tile forwards", "s", "tiles/s", "forwards/s", "MP/s",
           "start-up RSS MiB",
           "peak RSS MiB", "GPU peak MiB"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = common.machine_info()
    print(f"translate benchmark — {common.machine_line(info)}")
    if warning := common.load_warning():
        print(warning)
    rows, slides = [], []
    jobs = [(shape, args.tissue, args.min_tissue) for shape in args.shapes]
    if args.background_test:
        jobs += [(args.shapes[0], 0.3, args.min_tissue), (args.shapes[0], 0.3, 0.0)]
    with tempfile.TemporaryDirectory(prefix="stain-search-bench-") as tmp:
        for shape, tissue, min_tissue in jobs:
            src = Path(tmp) / f"slide-{shape[0]}x{shape[1]}-{tissue}.tif"
            if not src.exists():
                t0 = time.perf_counter()
                write_slide(src, *shape, tissue=tissue)
                slides.append({"shape": shape, "tissue": tissue,
                               "generate_s": time.perf_counter() - t0,
                               "mib": src.stat().st_size / common.MIB})
                print(f"generated a {shape[0]} x {shape[1]} px slide ({tissue:.0%} tissue) in "
                      f"{slides[-1]['generate_s']:.0f} s ({slides[-1]['mib']:.0f} MiB JPEG "
                      f"TIFF); U-Net depth {args.depth}, ngf {args.ngf}, untrained", flush=True)
            for mode in args.norm_stats:
                job = {**vars(args), "norm_stats": mode, "shape": shape, "tissue": tissue,
                       "min_tissue": min_tissue}
                dst = Path(tmp) / "stained.tif"
                rows.append(run_child(job, src, dst))
                dst.unlink()
                print(f"  {rows[-1]['size']} {mode} min-tissue {min_tissue}: "
                      f"{rows[-1]['seconds']:.1f} s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
                      flush=True)
            if not any(j[0] == shape and j[1] == tissue for j in jobs[jobs.index(
                    (shape, tissue, min_tissue)) + 1:]):
                src.unlink()  # disk: one slide at a time
    print()
    print(common.format_table(rows, COLUMNS, headers=HEADERS))
    saving = None
    if args.background_test:
        skip, full = rows[-2 * len(args.norm_stats)], rows[-len(args.norm_stats)]
        saving = {"min_tissue_s": skip["seconds"], "all_tiles_s": full["seconds"],
                  "saved_fraction": 1 - skip["seconds"] / full["seconds"]}
        print(f"\n70 % glass: --min-tissue {skip['min_tissue']} took {skip['seconds']:.1f} s, "
              f"--min-tissue 0 {full['seconds']:.1f} s: {saving['saved_fraction']:.0%} saved")
    print("\ntiles/s counts every tile of the grid (background ones pass through), "
          "forwards/s every tile forward of every pass")
    common.finish("translate", args.json, info, {"slides": slides, "rows": rows,
                                                 "background_test": saving})
    return 0


if __name__ == "__main__":
    sys.exit(main())
