"""The Ray cluster a search runs on, checked before anything is written.

- **What a trial holds.** :func:`trial_resources`: under ``ray_train`` the
  Tune trial is a thin driver that takes nothing a worker needs.
- **Reaching it.** ``--address`` (or ``RAY_ADDRESS``) must answer: ``ray.init``
  retries an address where nothing listens for minutes, so the GCS port is
  probed first (:func:`probe`), with a bounded timeout.
- **What it holds.** Each alive node's total resources (:func:`nodes`); the
  local Ray a search starts without ``--address`` is this machine
  (:func:`local_nodes`). ``plan.check_cluster`` then refuses a space none of
  whose trials fit, and says how many fit at once.
- **How long a trial waits for its workers.** Ray Train retries a worker
  group it cannot place (each try ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
  60 s) forever by default; :func:`worker_group_retries` bounds the wait at
  ``STAIN_SEARCH_WORKER_GROUP_WAIT_S`` (10 min: an autoscaler's new node has
  time to come up), after which the trial fails naming what it asked for.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

from stain_search.errors import ConfigError
from stain_search.plan import describe_nodes

PROBE_TIMEOUT_S = 5
TRIAL_DRIVER_MEMORY = 256 * 2**20  # a ray_train trial's driver: bytes, its only request
WORKER_GROUP_WAIT_ENV, WORKER_GROUP_WAIT_S = "STAIN_SEARCH_WORKER_GROUP_WAIT_S", 600.0
START_TIMEOUT_ENV, START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0
# The driver's settings that trials on other nodes must see too (a job-level
# runtime_env carries them): the worker-group wait above, and the test hooks.
FORWARDED_ENV = (WORKER_GROUP_WAIT_ENV, START_TIMEOUT_ENV, "STAIN_SEARCH_TEST_KILL_AT_EPOCH",
                 "STAIN_SEARCH_TEST_KILL_MARKER")


def trial_resources(resources: Any) -> dict[str, float]:
    """What one Tune trial holds: the worker itself (in_trial), or, for the thin
    driver that only waits on its TorchTrainer (ray_train), a little memory and
    no CPU or GPU: Tune refuses an empty request, and even a CPU sliver leaves a
    node of N CPUs unable to hold N CPUs of workers (two 1-CPU nodes would never
    place a 2-worker trial)."""
    if resources.resolved_executor == "ray_train":
        return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    return {"CPU": resources.cpus_per_worker,
            **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker > 0 else {})}


def ray_log_dir() -> str | None:
    import ray

    try:
        return str(Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs")
    except AttributeError:  # a client connection (ray://) has no local session
        return None


def address_of(address: str | None) -> str | None:
    return address or os.environ.get("RAY_ADDRESS") or None


def probe(address: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse, in ``timeout`` seconds, a ``host:port`` where no Ray cluster listens.
    ``auto`` and ``local`` are left to Ray. A ``ray://`` (Ray Client) address is
    refused: Ray Client runs Tune on the head node, away from the driver's
    study and its folder's mirror."""
    if address.startswith("ray://"):
        raise ConfigError(
            f"--address {address}: Ray Client addresses are not supported (Tune would run "
            f"on the head node, away from this driver's study); run stain-search on the "
            f"head node with --address auto, or submit it there: `ray job submit "
            f"--address http://HEAD:8265 -- stain-search run …`")
    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except ValueError:
        raise ConfigError(f"--address {address}: not HOST:PORT (e.g. 10.0.0.5:6379, the "
                          f"address `ray start --head` prints)") from None
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there ({why}); start one with "
            f"`ray start --head --port {port}`, or pass the address `ray start` printed "
            f"(--address or RAY_ADDRESS)") from None


def nodes() -> list[dict[str, float]]:
    """Each alive node's total resources, as the connected Ray reports them."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def local_nodes(*, gpus: int) -> list[dict[str, float]]:
    """The local Ray a search starts: this machine's CPUs (as Ray counts them) and GPUs."""
    from ray._private.utils import get_num_cpus

    return [{"CPU": float(get_num_cpus()), **({"GPU": float(gpus)} if gpus else {})}]


def capacity(spec: Any, *, say=None) -> int:
    """How many of the space's trials run at once on the connected cluster, or
    on the local Ray a search would start (this machine; Ray not started).
    A space none of whose trials fit is refused (ConfigError), unless an
    autoscaler may add nodes: then a warning through ``say``."""
    import ray

    from stain_search.plan import check_cluster
    from stain_search.profiles import local_gpus

    say = say or (lambda line: None)
    if not ray.is_initialized():
        have, where = local_nodes(gpus=local_gpus()), "this machine (a local Ray)"
    else:
        have, where = nodes(), "the Ray cluster"
    try:
        fits = check_cluster(spec, have, where=where)
    except ConfigError as err:
        if not (ray.is_initialized() and can_grow()):
            raise
        say(f"warning: {err}; the cluster's autoscaler may add nodes for it")
        return 1
    wanted = spec.search.max_concurrent
    if fits < wanted:
        say(f"resources: {fits} trial{'s' if fits > 1 else ''} at a time fit {where} "
            f"({describe_nodes(have)}), not max_concurrent {wanted}")
    return fits


def can_grow() -> bool:
    """Whether an autoscaler may add nodes (``ray up``, KubeRay): then a trial that
    does not fit now may fit later, and the search is only warned."""
    try:
        from ray._private.state import state

        return bool(state.get_max_resources_from_cluster_config())
    except Exception:  # noqa: BLE001 - a private API: no answer means a fixed cluster
        return False


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def worker_group_retries() -> int:
    """Ray Train's ``controller_failure_limit``: worker-group start tries (of
    START_TIMEOUT_S each) past the first that fit in the wait."""
    wait = float(os.environ.get(WORKER_GROUP_WAIT_ENV, WORKER_GROUP_WAIT_S))
    start = float(os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_S))
    return max(0, math.ceil(wait / start) - 1)


def unplaced_message(resources: Any) -> str:
    """One line for a trial whose worker group was never placed: what it asked
    for, and what the cluster holds now."""
    # What Ray Train really waited: whole tries of its start timeout.
    wait = (worker_group_retries() + 1) * float(os.environ.get(START_TIMEOUT_ENV, START_TIMEOUT_S))
    gpus = f" + {resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker > 0 else ""
    try:
        import ray

        free = [{k: v for k, v in n.items() if k in ("CPU", "GPU")} for n in _available()]
        have = (f"the cluster has {describe_nodes(nodes())}, free now: "
                f"{describe_nodes(free) if free else 'nothing'}") if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - the message matters more than the detail
        have = ""
    return (f"its worker group ({resources.workers_per_trial} workers × "
            f"{resources.cpus_per_worker:g} CPU{gpus}) could not be placed in {wait:g} s"
            + (f"; {have}" if have else "")
            + " — lower workers_per_trial, free the cluster or add nodes")


def _available() -> list[dict[str, float]]:
    from ray._private.state import available_resources_per_node

    return list(available_resources_per_node().values())
