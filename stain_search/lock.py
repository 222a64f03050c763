"""The live driver of a search: one at a time, and visible to `status`.

A driver holds an exclusive ``flock`` on ``driver.lock`` for as long as it
runs; the kernel drops it when the process ends, however it ends (SIGKILL
included), so a crashed driver never leaves a stale lock. Beside it,
``driver.json`` says who holds it (pid, host, start) and a heartbeat the
driver refreshes every few seconds: `stain-search status` reads it without
Ray, also from a machine that cannot take the lock to test it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from stain_search.atomic import atomic_write_text
from stain_search.errors import StainSearchError

HEARTBEAT_S = 5.0
# A heartbeat older than this means the driver is gone (it refreshes every 5 s).
STALE_AFTER_S = 30.0


class SearchRunning(StainSearchError):
    """Another driver is running this search."""


@dataclass(frozen=True)
class DriverInfo:
    pid: int
    host: str
    started: str  # ISO 8601, UTC
    heartbeat: float  # time.time() of the last refresh

    @property
    def heartbeat_age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat)


def read_driver(path: Path) -> DriverInfo | None:
    try:
        raw = json.loads(Path(path).read_text())
        return DriverInfo(int(raw["pid"]), str(raw["host"]), str(raw["started"]),
                          float(raw["heartbeat"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_locked(lock_path: Path) -> bool:
    """Whether a live process holds the lock (tested without taking it for long)."""
    if not Path(lock_path).exists():
        return False
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


class DriverLock:
    """``with DriverLock(lock_path, driver_path, name=...):`` the search's one driver."""

    def __init__(self, lock_path: Path, driver_path: Path, *, name: str):
        self.lock_path, self.driver_path, self.name = Path(lock_path), Path(driver_path), name
        self._fh = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: DriverInfo | None = None

    def __enter__(self) -> "DriverLock":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            other = read_driver(self.driver_path)
            who = (f"pid {other.pid} on {other.host}, since {other.started}" if other
                   else "another process")
            raise SearchRunning(f"search {self.name!r} is running ({who}); wait for it, or "
                                f"stop it (Ctrl-C / kill {other.pid if other else 'PID'}) "
                                f"before resuming") from None
        self._fh = fh
        self.info = DriverInfo(os.getpid(), socket.gethostname(),
                               datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               time.time())
        self._write()
        self._thread = threading.Thread(target=self._beat, name="stain-search-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        try:
            atomic_write_text(self.driver_path, json.dumps(asdict(self.info)))
        except OSError:  # a full disk must not kill the driver over a heartbeat
            pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.info = DriverInfo(self.info.pid, self.info.host, self.info.started, time.time())
            self._write()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        self.driver_path.unlink(missing_ok=True)
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
