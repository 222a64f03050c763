"""`stain-search ui` serves the search's MLflow store; a real browser sees
the trial runs and their metric columns."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from stain_search import tracking

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, *, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("ui exited early")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_ui_shows_the_trials_and_their_metrics(finished_search, tmp_path):
    c = tracking.client(finished_search.tracking_uri)
    exp = c.get_experiment_by_name(finished_search.name)
    runs = tracking.trial_runs(c, exp.experiment_id, search=finished_search.name)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stain_search.cli", "ui", "--tracking-uri",
         finished_search.tracking_uri, "--port", str(port), "--search", finished_search.name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        # The link the command printed for this search's trials.
        url = next(line for line in iter(proc.stdout.readline, "")
                   if line.startswith("trials of search")).split(": ", 1)[1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/compare-runs")
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=30000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=180).stdout
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    for run in runs:
        assert run.info.run_name in dom
    assert "fd_random" in dom and "ssim_structure" in dom
