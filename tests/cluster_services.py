"""Real services for the cluster tests (`pytest -m cluster`), as pytest fixtures.

- ``s3_server``: moto's server mode (a real HTTP S3 implementation) on
  127.0.0.1 at a free port, with one bucket; ``env`` is what a client needs
  to reach it (pyarrow's ``S3FileSystem`` and boto3 both honour
  ``AWS_ENDPOINT_URL``).
- ``ray_cluster``: a Ray head and a second Ray node (``ray start --block``),
  one CPU each, on 127.0.0.1 with free ports, each in its own working
  directory with its own node-local scratch (``STAIN_SEARCH_SCRATCH``); the
  second node has the custom resource ``node2``, so a test can force work
  onto it, and ``ray_cluster.node_name(node_id)`` says which node ran it.

Every service is a process group of its own (``start_new_session``), stopped
by killing that group (SIGTERM, then SIGKILL after a grace period), also when
a test fails. Never ``ray stop``: it would stop every Ray on the machine,
other people's too.

tests/conftest.py registers them: a test module only names them as arguments
and carries ``pytestmark = pytest.mark.cluster``. However many modules use
(or import) them, a session starts one of each (:func:`shared`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STOP_GRACE_S = 5
START_TIMEOUT_S = 90
# Ray needs a port per worker process on a node; a trial, its Train
# controller and workers, and Tune's actors stay well under this.
WORKER_PORTS = 40


# --- ports ------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (each socket held until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(size: int, *, low: int = 12000, high: int = 32000) -> int:
    """The first port of ``size`` consecutive ports that are free now (Ray's
    ``--min-worker-port``/``--max-worker-port`` take a range, not a list);
    below Linux's ephemeral range (32768-60999), where outgoing connections
    would take ports from it."""
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        start = rng.randrange(low, high - size)
        socks = []
        try:
            for port in range(start, start + size):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports in {low}-{high}")


# --- processes --------------------------------------------------------------------------

@dataclass
class Service:
    """One started process (and its process group), with its log file."""

    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, then SIGKILL what is left of it after ``grace``."""
        try:
            pgid = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            # Children that outlived the leader (raylet, GCS, workers) too.
            _signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_service(name: str, argv: list[str], *, cwd: Path, env: dict[str, str]) -> Service:
    log = cwd / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Service(name=name, proc=proc, log=log)


def wait_for(what: str, ready, *, services: list[Service], timeout: float = START_TIMEOUT_S,
             every: float = 0.5):
    """Poll ``ready()`` until it returns something truthy; fail (with the logs)
    if a service dies first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited ({service.proc.returncode}) while "
                                   f"waiting for {what}:\n{service.tail()}")
        value = ready()
        if value:
            return value
        time.sleep(every)
    logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in services)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


# --- S3 (moto) --------------------------------------------------------------------------

@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]  # what a client needs: endpoint, test credentials, region
    service: Service

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


def _s3_answers(endpoint: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


@contextmanager
def start_s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 at a free port, with the bucket ``stain-search``."""
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    env = {**os.environ, **s3_env(endpoint)}
    service = start_service("moto", [sys.executable, "-m", "moto.server", "-H", HOST,
                                     "-p", str(port)], cwd=root, env=env)
    try:
        wait_for(f"moto S3 at {endpoint}", lambda: _s3_answers(endpoint), services=[service],
                 timeout=60)
        server = S3Server(endpoint=endpoint, bucket="stain-search", env=s3_env(endpoint),
                          service=service)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        service.stop()


# --- Ray: a head and a second node ------------------------------------------------------

@dataclass
class RayNode:
    name: str  # "head" or "node2"
    cwd: Path  # its own working directory
    scratch: Path  # its node-local scratch (STAIN_SEARCH_SCRATCH)
    service: Service


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:PORT, for --address / ray.init(address=...)
    head: RayNode
    node2: RayNode
    env: dict[str, str]  # what a driver process needs beside os.environ (no node's scratch)
    node_ids: dict[str, str] = field(default_factory=dict)  # Ray node id -> "head"/"node2"

    @property
    def head_dir(self) -> Path:
        return self.head.cwd

    @property
    def node2_dir(self) -> Path:
        return self.node2.cwd

    def node_name(self, node_id: str) -> str:
        """"head" or "node2" for a Ray node id (a trial's ``stain_search.node`` tag)."""
        try:
            return self.node_ids[node_id]
        except KeyError:
            raise KeyError(f"{node_id} is not a node of this cluster: {self.node_ids}") from None

    def driver_env(self, **extra: str) -> dict[str, str]:
        """os.environ plus what a `stain-search` driver needs to use this cluster."""
        return {**os.environ, **self.env, **extra}


def ray_env(base: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **base, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_DEDUP_LOGS": "0"}


def node_ports() -> list[str]:
    """Free ports for every listening socket a Ray node opens, so two clusters
    on one machine (two people's tests) cannot collide."""
    manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    low = free_port_range(WORKER_PORTS)
    return ["--node-manager-port", str(manager), "--object-manager-port", str(objects),
            "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
            "--min-worker-port", str(low), "--max-worker-port", str(low + WORKER_PORTS - 1)]


NODES_SCRIPT = """
import json, logging, ray
ray.init(address={address!r}, logging_level=logging.ERROR, log_to_driver=False)
try:
    print(json.dumps([{{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]}}
                      for n in ray.nodes()]))
finally:
    ray.shutdown()
"""


def cluster_nodes(address: str, env: dict[str, str], *, timeout: float = 30) -> list[dict]:
    """The cluster's nodes, as a short-lived driver sees them ([] if it cannot yet)."""
    try:
        out = subprocess.run([sys.executable, "-c", NODES_SCRIPT.format(address=address)],
                             capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return []
    if out.returncode != 0:
        return []
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return []


@contextmanager
def start_ray(tmp_path_factory, s3_server: S3Server):
    """A two-node Ray cluster on this machine: a head and ``node2``, 1 CPU each."""
    root = tmp_path_factory.mktemp("ray")
    port, client_port = free_ports(2)
    address = f"{HOST}:{port}"
    nodes: dict[str, RayNode] = {}
    try:
        for name in ("head", "node2"):
            cwd = root / name
            scratch = cwd / "scratch"
            scratch.mkdir(parents=True)
            env = ray_env({**s3_server.env, "STAIN_SEARCH_SCRATCH": str(scratch)})
            # Short, per-node temp dirs: Ray's unix sockets must stay under ~107 bytes.
            temp = Path(f"/tmp/rc{port}{name[0]}")
            common = ["--num-cpus", "1", "--node-ip-address", HOST, "--temp-dir", str(temp),
                      "--block", "--disable-usage-stats", *node_ports()]
            if name == "head":
                argv = ["ray", "start", "--head", "--port", str(port),
                        "--ray-client-server-port", str(client_port),
                        "--include-dashboard=false", *common]
            else:
                argv = ["ray", "start", "--address", address, "--resources",
                        json.dumps({"node2": 1}), *common]
            ray_bin = str(Path(sys.executable).parent / "ray")
            nodes[name] = RayNode(name=name, cwd=cwd, scratch=scratch,
                                  service=start_service(name, [ray_bin, *argv[1:]], cwd=cwd,
                                                        env=env))
            if name == "head":  # the second node needs the GCS up
                wait_for(f"the Ray head at {address}",
                         lambda: len(cluster_nodes(address, ray_env(s3_server.env))) >= 1,
                         services=[nodes["head"].service], every=1)
        services = [n.service for n in nodes.values()]
        alive = wait_for("2 alive Ray nodes", lambda: (lambda ns: ns if len(ns) == 2 else None)(
            [n for n in cluster_nodes(address, ray_env(s3_server.env)) if n["alive"]]),
            services=services, every=1)
        ids = {n["id"]: "node2" if "node2" in n["resources"] else "head" for n in alive}
        assert sorted(ids.values()) == ["head", "node2"], ids
        yield RayCluster(address=address, head=nodes["head"], node2=nodes["node2"],
                         env={**s3_server.env, "RAY_USAGE_STATS_ENABLED": "0",
                              "RAY_AUTH_MODE": "disabled"},
                         node_ids=ids)
    finally:
        for node in reversed(list(nodes.values())):
            node.service.stop()
        import shutil

        for name in ("h", "n"):
            shutil.rmtree(f"/tmp/rc{port}{name}", ignore_errors=True)


# --- the fixtures: one of each per session -------------------------------------------

_SHARED: dict[str, list] = {}  # name -> [service, users, its ExitStack]


@contextmanager
def shared(name: str, start):
    """One ``start()`` per session however many fixture definitions ask for it (a
    module that imports the fixtures gets definitions of its own); stopped when
    the last user is done."""
    entry = _SHARED.get(name)
    if entry is None:
        stack = ExitStack()
        entry = _SHARED[name] = [stack.enter_context(start()), 0, stack]
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _SHARED[name]
            entry[2].close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 at a free port, with the bucket ``stain-search``."""
    with shared("s3", lambda: start_s3(tmp_path_factory)) as server:
        yield server


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """A two-node Ray cluster on this machine: a head and ``node2``, 1 CPU each."""
    with shared("ray", lambda: start_ray(tmp_path_factory, s3_server)) as cluster:
        yield cluster
