"""A real MLflow tracking server for the tests, as a pytest fixture.

``mlflow_server`` runs ``mlflow server`` with a SQLite backend store and
``--artifacts-destination`` in a temp folder (so artifacts travel through the
server's proxy, as on a team's server), on 127.0.0.1 at a free port, and waits
until it answers. At teardown its whole process tree is stopped (the
``mlflow`` command, uvicorn and its job workers: ``stain_search.services.stop_tree``),
also when a test fails.

Use it from a test module with ``from mlflow_server import mlflow_server  # noqa: F401``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from stain_search.services import stop_tree

HOST = "127.0.0.1"
START_TIMEOUT_S = 120  # a cold start on 2 busy CPU cores (imports, DB migrations)


@dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT: what --tracking-uri takes
    port: int
    db: Path  # the SQLite backend store
    artifacts: Path  # --artifacts-destination: where logged artifacts land
    log: Path  # the server's own output


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def answers(uri: str, *, timeout: float = 2) -> bool:
    """The server's health endpoint says OK."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = MlflowServer(uri=f"http://{HOST}:{port}", port=port, db=root / "mlflow.db",
                          artifacts=root / "artifacts", log=root / "server.log")
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{server.db}",
           "--artifacts-destination", str(server.artifacts),
           "--host", HOST, "--port", str(port), "--workers", "1"]
    with open(server.log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                # no GenAI job runners (8 processes, ~40 s of CPU):
                                # not what these tests are about (mlflow_ui.ui_environment)
                                env={**os.environ, "MLFLOW_TRACKING_URI": "",
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(server.uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = server.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not answer on {server.uri} "
                            f"(exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield server
    finally:
        stop_tree(proc)
