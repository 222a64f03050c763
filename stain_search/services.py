"""Local servers the CLI runs in the foreground: the MLflow UI (`stain-search
ui`) and optuna-dashboard (`stain-search dashboard`).

A server is started in its own session (so its own process group): the
terminal's Ctrl-C then reaches only stain-search, which stops the server and
everything it started. MLflow's UI is a tree — the `mlflow` command, uvicorn
and huey job workers — and stopping only its first process leaves the rest
running and the port served. SIGTERM, as `kill` or a scheduler sends it, is
handled the same way. A SIGKILL of stain-search cannot be caught: the kernel
then sends the server SIGTERM (its parent-death signal), and it stops its own
children as it does on Ctrl-C.

A server's address is printed only once the server answers there; one that
fails to start is one line from its own log, exit status 2.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import psutil

from stain_search.errors import StainSearchError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STARTUP_TIMEOUT_S = 600.0  # MLflow's UI takes minutes to come up on a busy 2-core machine
PR_SET_PDEATHSIG = 1  # prctl(2)
GRACE_S = 10.0  # for a clean shutdown (uvicorn drains, huey stops) before SIGKILL


class _Stopped(Exception):
    """A stop signal arrived while the server ran."""


class ServerFailed(StainSearchError):
    """The server did not come up: its own log says why."""


def serve(cmd: Sequence[str], *, env: dict[str, str] | None = None,
          log: Path | None = None, ready_url: str | None = None, what: str = "the server",
          announce: Callable[[], None] = lambda: None,
          startup_timeout: float = STARTUP_TIMEOUT_S) -> int:
    """Run the server ``cmd`` until it exits or stain-search receives SIGINT or
    SIGTERM, then stop its whole process tree. Returns the server's exit
    status, or 0 when it was stopped on request. With ``log``, the server's own
    output (start-up notices, access lines) goes to that file instead of the
    terminal; if the server exits by itself, the file's last lines are shown.

    With ``ready_url``, nothing is announced until that address answers:
    ``announce`` runs then. A server that exits first, or does not answer in
    ``startup_timeout`` seconds, is :class:`ServerFailed`, with the last line of
    its log. The server gets SIGTERM if stain-search itself dies, even by
    SIGKILL (the kernel's parent-death signal), so no orphan keeps the port."""
    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    proc: subprocess.Popen | None = None
    out = open(log, "w", encoding="utf-8") if log is not None else None
    try:
        proc = subprocess.Popen(list(cmd), env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT if out else None,
                                preexec_fn=_terminate_with_parent)
        if ready_url is not None:
            _wait_answering(proc, ready_url, what=what, log=log, timeout=startup_timeout)
        announce()
        status = proc.wait()
        if out is not None and status != 0:
            out.flush()
            tail = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
        return status
    except _Stopped:
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            if proc is not None:
                stop_tree(proc)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if out is not None:
                out.close()


def check_port_free(host: str, port: int, *, flag: str = "--port") -> None:
    """Refuse a port another program already serves: its answer would be
    mistaken for our server's."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServerFailed(f"{host}:{port} is already in use ({err.strerror}); pass "
                               f"another {flag}") from None


def _terminate_with_parent() -> None:
    """In the server's process, before it runs: SIGTERM when stain-search dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: stop_tree still runs on a normal exit
        pass


def _wait_answering(proc: subprocess.Popen, url: str, *, what: str, log: Path | None,
                    timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"{what} exited (status {proc.returncode}) before it answered: "
                               f"{_last_line(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered, with an error page: it is up
        except (OSError, ValueError):
            time.sleep(0.25)
    raise ServerFailed(f"{what} did not answer on {url} within {timeout:.0f} s: "
                       f"{_last_line(log)}")


def _last_line(log: Path | None) -> str:
    """The server log's last line that says something (an error, usually)."""
    if log is None or not Path(log).is_file():
        return "no log"
    lines = [l.strip() for l in Path(log).read_text(encoding="utf-8", errors="replace")
             .splitlines() if l.strip()]
    raised = [l for l in lines if re.match(r"[\w.]+(Error|Exception)\b", l)]  # a traceback's last line
    errors = [l for l in lines if "error" in l.lower() and not l.startswith("(Background")]
    last = (raised or errors or lines or ["the log is empty"])[-1]
    return f"{last[:300]} (log: {log})"


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The server's processes: its group, and its descendants (a child may
    start a session of its own, as MLflow's job runner does)."""
    members: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(proc.pid)
        members[leader.pid] = leader
        members.update((p.pid, p) for p in leader.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == proc.pid:
                members.setdefault(p.pid, p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(members.values())


def stop_tree(proc: subprocess.Popen, *, grace: float = GRACE_S) -> None:
    """SIGTERM the server's group and descendants; SIGKILL what is left after
    ``grace`` seconds; reap the server."""
    members = tree(proc)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for p in members:
        _signal(p, signal.SIGTERM)
    left = _wait_gone(proc, members, timeout=grace)
    for p in left:
        _signal(p, signal.SIGKILL)
    _wait_gone(proc, left, timeout=grace)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def alive(p: psutil.Process) -> bool:
    """Running, and not a zombie waiting for a parent that may never reap it."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(proc: subprocess.Popen, members: list[psutil.Process], *,
               timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the server itself once it exits
        left = [p for p in members if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def server_log(name: str, port: int) -> Path:
    """Where a foreground server's own output goes: a file per server and port."""
    return Path(tempfile.gettempdir()) / f"stain-search-{name}-{port}.log"
