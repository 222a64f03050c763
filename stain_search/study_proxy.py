"""The study, served to trials on any node: Optuna's gRPC storage proxy.

A trial's rank 0 reports every epoch to the search's study and asks its
pruner whether to stop (``stain_search.study.TrialPruning``). The study lives
in one journal file on the driver's disk, which a trial on another Ray node
cannot see (a cluster need not share a filesystem). So the driver serves the
study with Optuna's own proxy (the server that
``optuna.storages.run_grpc_proxy_server`` builds, held by the driver so that
it can stop it), and a trial talks to it with
``optuna.storages.GrpcStorageProxy``. What a trial needs to find it,
:class:`~stain_search.context.StudyAccess` (the study's name, the driver's
address and the port), is decided once by the driver and travels in the
:class:`~stain_search.context.TrialContext`.

- Bound to the driver's Ray node address (``127.0.0.1`` for the private local
  cluster a search starts itself), never to every interface (the wildcard
  address): the study takes writes from whoever reaches the port, so it
  listens only where the cluster's nodes already talk to each other.
- The port is the OS's free pick, or ``STAIN_SEARCH_STUDY_PORT`` for a
  firewalled cluster where only chosen ports are open between nodes.
- It serves exactly while Tune runs (``with StudyServer(...)``): stopped at the
  end, on Ctrl-C and on errors.
- Every call a trial makes has a deadline (:data:`CALL_TIMEOUT_S`), with a few
  quick retries while the address refuses (gRPC's own retry policy): a trial
  whose driver is gone fails with :class:`StudyUnreachable` instead of waiting
  forever.

Optuna documents the proxy as unsupported over a ``JournalStorage``
(optuna#6084): a trial *popped* from the queue by one process and evaluated
by another confused the journal's ownership of ``enqueue_trial`` points. Here
only the driver's searcher asks for and enqueues trials, on its own storage;
trials only read the study, set intermediate values and ask the pruner, so
that case does not arise (and Optuna 5's ``JournalStorage`` guards against
it besides).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, GrpcStorageProxy

from stain_search.context import StudyAccess
from stain_search.errors import ConfigError

PORT_ENV = "STAIN_SEARCH_STUDY_PORT"
# Every trial call is short (a few trials' records at most); a driver that has
# not answered in this long is gone or stuck.
CALL_TIMEOUT_S = 60
READY_TIMEOUT_S = 60  # a trial's first connection
SERVER_THREADS = 16  # concurrent calls: each trial makes one at a time
STOP_GRACE_S = 2

# gRPC's service config: a default deadline on every method ("name": [{}]) and
# retries while the address refuses (UNAVAILABLE: nothing reached the server).
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{}],
    "timeout": f"{CALL_TIMEOUT_S}s",
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.5s", "maxBackoff": "4s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


class StudyUnreachable(RuntimeError):
    """A trial cannot reach the study its driver serves."""

    def __init__(self, access: StudyAccess, why: str):
        super().__init__(
            f"the study {access.name!r} at {access.address} (served by the search's driver) "
            f"does not answer: {why}. Is the driver still running, and can this node reach "
            f"{access.address}? (On a firewalled cluster open a port between the nodes and "
            f"set {PORT_ENV} for the driver.)")


def requested_port() -> int:
    """The port the driver serves the study on: ``STAIN_SEARCH_STUDY_PORT``, or
    0 (the OS picks a free one)."""
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return 0
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{PORT_ENV}={raw!r}: not a TCP port; give a number 1-65535 "
                          f"(or unset it for a free port)")
    return port


def driver_host(*, private: bool) -> str:
    """The address the driver serves the study on: its Ray node's (the one the
    cluster's other nodes already reach it by), or 127.0.0.1 when the search
    started a private local cluster (``private``) and every trial runs here."""
    if private:
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


class StudyServer:
    """The driver's study, served over gRPC while the ``with`` block runs.

    Constructing it binds the port (so :attr:`access` is known before the
    trials are built); entering starts serving, leaving stops it."""

    def __init__(self, storage: BaseStorage, *, name: str, host: str, port: int | None = None):
        import grpc
        # What optuna.storages.run_grpc_proxy_server builds (its make_server),
        # with the port it bound kept, and SO_REUSEPORT off: gRPC turns it on by
        # default on Linux, where a busy port would then be shared, not refused.
        from optuna.storages._grpc.auto_generated.api_pb2_grpc import (
            add_StorageServiceServicer_to_server)
        from optuna.storages._grpc.servicer import OptunaStorageProxyService

        port = requested_port() if port is None else port
        self._pool = ThreadPoolExecutor(max_workers=SERVER_THREADS,
                                        thread_name_prefix="study-proxy")
        self._server = grpc.server(self._pool, options=[("grpc.so_reuseport", 0)])
        add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), self._server)
        try:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            self._pool.shutdown(wait=False)
            setting = f"{PORT_ENV}={port}: " if port else ""
            fix = "choose another port or unset it" if port else "is it this machine's address?"
            raise ConfigError(f"{setting}cannot serve the search's study on {host}:{port or 0} "
                              f"(taken, or not an address of this machine); {fix}") from None
        self.access = StudyAccess(name=name, host=host, port=bound)

    def __enter__(self) -> StudyAccess:
        self._server.start()
        return self.access

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving (calls in flight get ``STOP_GRACE_S`` to finish)."""
        self._server.stop(STOP_GRACE_S).wait(STOP_GRACE_S + 3)
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Proxy(GrpcStorageProxy):
    """Optuna's client, on a channel whose every call has a deadline and
    retries while the address refuses (:data:`SERVICE_CONFIG`). Optuna builds
    its channel without options; ``_setup`` is where it does."""

    def _setup(self) -> None:
        import grpc
        from optuna.storages._grpc.auto_generated.api_pb2_grpc import StorageServiceStub
        from optuna.storages._grpc.client import GrpcClientCache

        self._channel = grpc.insecure_channel(
            f"{self._host}:{self._port}",
            options=[("grpc.max_receive_message_length", -1), ("grpc.enable_retries", 1),
                     ("grpc.service_config", SERVICE_CONFIG)])
        self._stub = StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)


def connect(access: StudyAccess, *, ready_timeout_s: float = READY_TIMEOUT_S) -> BaseStorage:
    """The study's storage as a trial sees it, once the driver answers."""
    with warnings.catch_warnings():  # "experimental" since Optuna 4.2
        warnings.simplefilter("ignore", ExperimentalWarning)
        proxy = _Proxy(host=access.host, port=access.port)
    try:
        proxy.wait_server_ready(timeout=ready_timeout_s)
    except ConnectionError:
        proxy.close()
        raise StudyUnreachable(access, f"no answer within {ready_timeout_s:.0f} s") from None
    return proxy


@contextlib.contextmanager
def reaching(access: StudyAccess):
    """Calls to the served study: a driver that is gone or cut off (the call
    refused or past its deadline) becomes :class:`StudyUnreachable`."""
    import grpc

    try:
        yield
    except grpc.RpcError as err:
        if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
        raise StudyUnreachable(access, f"{err.code().name} ({err.details()})") from None
