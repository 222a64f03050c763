"""What every benchmark script shares: where it ran, how loaded the machine
was, a plain-text table, and a JSON record of the figures.

The benchmarks are run by hand (never as timed tests) and print a table a
person can paste into ``bench/README.md``; the JSON beside it keeps the same
figures with the date, machine, command line and machine load, so a figure
in the README can always be traced to the run that produced it.

A figure taken on a busy machine is a different figure: every script records
``/proc/loadavg`` before and after, and the README says to prefer a 1-minute
load below ~1.5 on a 2-core machine.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 2 ** 20


# --- where and when ---------------------------------------------------------------------

def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (Linux), or None elsewhere."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The facts a figure depends on: CPU, cores, torch, GPU (if any), load."""
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg_start": loadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    load = info.get("loadavg_start")
    return (f"{info['date_utc']}  {where}  torch {info['torch']}  "
            f"threads {info['torch_threads']}  load {load[0] if load else '?'}")


def begin(name: str, threads: int | None) -> dict[str, Any]:
    """Pin the threads, print the header line (and a load warning): the facts."""
    set_threads(threads)
    info = machine_info()
    print(f"{name} benchmark — {machine_line(info)}")
    if warning := load_warning():
        print(warning)
    return info


# --- output -----------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *,
                 headers: Sequence[str] | None = None) -> str:
    """A Markdown pipe table: readable in a terminal and pasteable into the README."""
    headers = list(headers or columns)
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Iterable[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def default_json_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (a half-written record is worse than none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finish(name: str, json_path: str | Path | None, info: dict[str, Any],
           payload: dict[str, Any]) -> Path:
    """Stamp the end-of-run load, write the JSON record, say where it went."""
    info = {**info, "loadavg_end": loadavg()}
    path = write_json(json_path or default_json_path(name), {"meta": info, **payload})
    print(f"\nwrote {path}")
    return path


# --- measuring --------------------------------------------------------------------------

def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads. On a shared machine, more threads than
    free cores makes OpenMP spin against other processes: a 2-thread step on
    a loaded 2-core machine measured ~100x slower than a 1-thread one."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def synchronize(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["s"]`` holds the wall seconds."""
    box = {"s": 0.0}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's high-water RSS mark (Linux ≥ 4.0: clear_refs '5')."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else None


def geometric_mean(values: Iterable[float]) -> float | None:
    import math

    vals = [v for v in values if v is not None and v > 0]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def load_warning(threshold: float = 1.5) -> str | None:
    load = loadavg()
    if load and load[0] > threshold:
        return (f"note: 1-minute load is {load[0]:.2f} (> {threshold}): other processes share "
                f"the CPU, so figures are lower and noisier than on an idle machine")
    return None
