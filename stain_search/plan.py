"""What a search will run, said before it runs: the first line of `stain-search run`,
the hardware check, and `--dry-run`'s resolved search.

Beside :mod:`stain_search.profiles` (which parses a space's scales) because
these read a whole parsed :class:`~stain_search.spaces.SearchSpec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stain_search import config as cfg
from stain_search.errors import ConfigError
from stain_search.profiles import CPU_PROFILE
from stain_search.spaces import SearchSpec

def scale(config: cfg.Config, resources: Any) -> str:
    """One line of what a profile sets: crop, widths, batch, epochs, resources."""
    d, m, t = config.data, config.model, config.train
    decay = f" ({t.decay_epochs} decaying)" if t.decay_epochs else ""
    steps = f" × {t.steps_per_epoch} steps" if t.steps_per_epoch else ""
    gpus = resources.gpus_per_worker
    per_worker = (f"{gpus:g} GPU + " if gpus else "") + f"{resources.cpus_per_worker:g} CPU"
    return (f"{d.crop} px, U-Net depth {m.depth} ngf {m.ngf}, D ndf {m.ndf}, batch "
            f"{d.batch_size}, {t.epochs} epochs{steps}{decay}, {per_worker} per worker")


def describe(spec: SearchSpec) -> str:
    """The first line of a run: which profile, why, and what it sets."""
    head = f"profile {spec.profile}" if spec.profile else "no profile"
    others = [n for n in spec.profiles if n != spec.profile]
    tail = f"; others: {', '.join(others)} (--profile NAME)" if others else ""
    return (f"{spec.name}: {head} ({spec.profile_reason}) — "
            f"{scale(spec.base_config(), spec.resources)}{tail}")


def check_hardware(spec: SearchSpec, *, gpus: int) -> None:
    """Refuse, before Ray starts, a space whose trials ask for GPUs this machine lacks.

    Ray would otherwise keep every trial pending, waiting for a GPU that never comes.
    """
    want = spec.resources.gpus_per_worker
    if want > 0 and gpus == 0:
        which = f"profile `{spec.profile}`" if spec.profile else f"{spec.path.name}"
        cpu = (f"--profile {CPU_PROFILE}, or " if CPU_PROFILE in spec.profiles
               and spec.profile != CPU_PROFILE else "")
        raise ConfigError(
            f"{which} asks for {want:g} GPU per trial worker, but no GPU is visible here "
            f"(torch.cuda.is_available() is False): run with {cpu}--address of a Ray "
            f"cluster that has GPUs (or set RAY_ADDRESS); --dry-run shows the settings "
            f"without a GPU")


def worker_bundle(resources: Any) -> dict[str, float]:
    """What one trial worker holds (in_trial: the trial process itself)."""
    return {"CPU": float(resources.cpus_per_worker),
            **({"GPU": float(resources.gpus_per_worker)} if resources.gpus_per_worker > 0 else {})}


def workers_on(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many ``bundle``-sized workers one node's resources hold."""
    # 1e-9: Ray counts resources in 1e-4 units; 0.3 × 3 must fit in 0.9.
    return int(min((node.get(k, 0.0) + 1e-9) // v for k, v in bundle.items() if v > 0))


def trials_that_fit(resources: Any, nodes: list[Mapping[str, float]]) -> int:
    """How many trials the nodes hold at once. A trial's workers are identical
    bundles, so placing them node by node is exact (no packing puzzle)."""
    bundle = worker_bundle(resources)
    workers = 1 if resources.resolved_executor == "in_trial" else resources.workers_per_trial
    return sum(workers_on(n, bundle) for n in nodes) // workers


def describe_nodes(nodes: list[Mapping[str, float]]) -> str:
    """"2 nodes with 1 CPU each", "1 node with 8 CPU, 1 GPU and 1 node with 4 CPU"."""
    def one(n: Mapping[str, float]) -> str:
        return ", ".join(f"{n.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k == "CPU" or n.get(k))

    groups: dict[str, int] = {}
    for n in nodes:
        groups[one(n)] = groups.get(one(n), 0) + 1
    if not groups:
        return "no alive node"
    return " and ".join(f"{count} node{'s' if count > 1 else ''} with {what}"
                        f"{' each' if count > 1 else ''}" for what, count in groups.items())


def check_cluster(spec: SearchSpec, nodes: list[Mapping[str, float]], *,
                  where: str = "the cluster") -> int:
    """Refuse a space none of whose trials the cluster's nodes can ever hold (Ray
    would keep it pending, or Ray Train retry its worker group, forever); else
    how many trials fit at once. ``nodes``: each alive node's total resources."""
    r = spec.resources
    fits = trials_that_fit(r, nodes)
    if fits > 0:
        return fits
    workers = 1 if r.resolved_executor == "in_trial" else r.workers_per_trial
    gpus = f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker > 0 else ""
    one_fits = any(workers_on(n, worker_bundle(r)) for n in nodes)
    fix = ("lower workers_per_trial or add nodes" if one_fits else
           "lower cpus_per_worker/gpus_per_worker or add larger nodes")
    raise ConfigError(
        f"resources: a trial needs {workers} worker{'s' if workers > 1 else ''} × "
        f"{r.cpus_per_worker:g} CPU{gpus}; {where} has {describe_nodes(nodes)} — {fix} "
        f"({spec.path.name})")


def dry_run(spec: SearchSpec, *, gpus: int) -> str:
    """What ``--dry-run`` prints: the search exactly as it would start, as YAML.

    Nothing is started, written or read: no Ray, no search folder, no MLflow
    run, no image (a built-in dataset is not generated), so the objective is
    resolved (``frechet`` → its honest name) but checked against the data
    only when the search starts.
    """
    import yaml

    resources = {**dataclasses.asdict(spec.resources),
                 "executor": f"{spec.resources.resolved_executor} ({spec.resources.executor})"}
    record = {
        "profile": {"name": spec.profile, "why": spec.profile_reason,
                    "defined": list(spec.profiles)},
        "space_file": str(spec.path),
        "base_config": spec.base_config().to_dict(),
        "space": {p.key: {k: v for k, v in dataclasses.asdict(p).items()
                          if k != "key" and v not in (None, (), [])} for p in spec.params},
        "objective": [dataclasses.asdict(o) for o in spec.objectives],
        "search": dataclasses.asdict(spec.search),
        "resources": resources,
    }
    text = yaml.safe_dump(json_safe(record), sort_keys=False, allow_unicode=True, width=100)
    lines = [describe(spec), text.rstrip()]
    try:
        check_hardware(spec, gpus=gpus)
    except ConfigError as err:
        lines.append(f"note: a run here would stop before Ray starts: {err}")
    lines.append("dry run: nothing started or written (no Ray, no search folder, no MLflow "
                 "run, no data read; the objective is checked against the data when the "
                 "search starts)")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Tuples → lists, paths → strings: plain YAML, no Python tags."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
