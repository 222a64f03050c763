"""`stain-search ui` serves the search's MLflow store: a real browser sees the
trial runs (the runs table, not MLflow 3's GenAI overview) and the compare
view of the best trials; stopped with SIGTERM, it leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from stain_search import mlflow_ui, registry, tracking
from stain_search.services import alive

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
# MLflow's CLI, then uvicorn: slow on 2 busy cores.
STARTUP_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, *, timeout: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited early (status {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """`stain-search ARGS` as a user starts it: in the test's process group."""
    return subprocess.Popen([sys.executable, "-m", "stain_search.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_and_check(proc: subprocess.Popen, port: int, sig: int = signal.SIGTERM) -> None:
    """Signal stain-search alone (as `kill PID` does) and check that it took
    its server down: every descendant gone, nothing listening on the port."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert tree, "the server should run as stain-search's child"
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0
    finally:  # never leak a server into the rest of the suite
        for p in tree:
            if alive(p):
                p.kill()
    left = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in tree if alive(p)]
    assert not left, f"left running after {signal.Signals(sig).name}: {left}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def printed_line(proc: subprocess.Popen, prefix: str) -> str:
    for line in iter(proc.stdout.readline, ""):
        if line.startswith(prefix):
            return line.split(": ", 1)[1].strip()
    raise AssertionError(f"no line starting {prefix!r}")


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` after 30 s of virtual time in headless Chromium (and a screenshot)."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=30000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=240).stdout
    if screenshot is not None:
        subprocess.run([*flags, "--window-size=1400,900", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=240)
    return dom


def text_of(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def kill_tree(proc: subprocess.Popen) -> None:
    """After a failed start: SIGKILL stain-search and all it started."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        if alive(p):
            p.kill()
    proc.wait(timeout=30)


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) if alive(p) else ""
    except psutil.Error:
        return ""


def server_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """stain-search's process tree once the UI answers: MLflow's CLI and its
    uvicorn server, and none of MLflow's job consumers (huey), which the UI
    turns off (mlflow_ui.ui_environment): they would start after the first answer."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    mlflow = [p for p in tree if "-m mlflow ui" in _cmdline(p)]
    assert mlflow, [_cmdline(p) for p in tree]
    assert mlflow[0].environ().get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"
    assert not any("huey_consumer" in _cmdline(p) for p in tree)
    return tree


def test_sigterm_stops_the_whole_server(tmp_path):
    port = free_port()
    proc = start("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--port", str(port))
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        server_tree(proc)
    except BaseException:
        kill_tree(proc)
        raise
    stop_and_check(proc, port, signal.SIGTERM)


def test_a_killed_cli_leaves_no_server_behind(tmp_path):
    """SIGKILL cannot be caught: the server's parent-death signal stops it,
    and MLflow takes its uvicorn and job consumers down with it."""
    port = free_port()
    proc = start("ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--port", str(port))
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        tree = server_tree(proc)
    except BaseException:
        kill_tree(proc)
        raise
    proc.kill()
    proc.wait(timeout=30)
    _, left = psutil.wait_procs(tree, timeout=120)
    left = [p for p in left if alive(p)]
    for p in left:
        p.kill()
    assert not left, [p.pid for p in left]


def test_a_server_is_announced_only_once_it_answers(tmp_path):
    """A port already served by someone else, and a server that exits at start:
    one line each, exit 2, and no "MLflow UI on http://..." line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "stain_search.cli", "ui", "--port", str(port),
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "MLflow UI on" not in done.stdout, done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("stain-search: error: 127.0.0.1:")
    assert "already in use" in done.stderr and "--port" in done.stderr
    (tmp_path / "mlflow.db").write_text("not a database")  # MLflow exits at start
    done = subprocess.run([sys.executable, "-m", "stain_search.cli", "ui", "--port",
                           str(free_port()), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          capture_output=True, text=True, timeout=STARTUP_S)
    assert done.returncode == 2 and "MLflow UI on" not in done.stdout, done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("stain-search: error: the MLflow UI exited"), done.stderr
    assert "log:" in lines[-1]


# ---------------------------------------------------------------- what a browser sees

SEARCH = "uitest"
OBJECTIVE = "fd_random"
# (λ, λ_identity, fd_random per epoch): trial 1 is the best, trial 0 the worst.
TRIALS = [(2.0, 0.1, [9.0, 8.0]), (10.6, 0.54, [5.0, 3.0]), (30.0, 0.9, [7.0, 6.5])]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A search's MLflow record, written through stain_search.tracking as the
    driver and trials write it (no Ray: the UI only reads the store)."""
    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(c, SEARCH, uri=uri)
    parent = tracking.start_search_run(c, exp, search=SEARCH, search_id="0123456789ab",
                                       objective=[{"metric": OBJECTIVE, "mode": "min"}],
                                       study=root / "study.journal", search_dir=root)
    names = []
    for number, (lam, ident, values) in enumerate(TRIALS):
        params = {"loss.lambda_cycle": lam, "loss.lambda_identity": ident}
        name = tracking.trial_run_name(number, params)
        run = tracking.start_trial_run(
            c, exp, parent_run_id=parent, search=SEARCH, search_id="0123456789ab",
            trial=f"trial_{number:04d}", optuna_trial=number, params=params, searched=params,
            checkpoints=root / "trials", run_name=name, tune_trial_id=f"tune{number}")
        for epoch, value in enumerate(values, 1):
            tracking.log_epoch(c, run, {OBJECTIVE: value, "ssim_structure": 0.5, "epoch": epoch},
                               epoch=epoch)
            tracking.log_best_so_far(c, parent, OBJECTIVE, value, step=number)
        tracking.end_trial_run(c, run, status="finished")
        names.append(name)
    return {"uri": uri, "root": root, "experiment": exp, "names": names}


def test_store_records_what_the_ui_shows(store):
    c = tracking.client(store["uri"])
    exp = c.get_experiment(store["experiment"])
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    assert store["names"][1] == "t01 λ=10.6 id=0.54"
    runs = tracking.trial_runs(c, store["experiment"], search=SEARCH)
    assert {r.data.tags[tracking.TUNE_TRIAL] for r in runs} == {"tune0", "tune1", "tune2"}
    links = mlflow_ui.ui_links(store["uri"], SEARCH, base="http://127.0.0.1:1")
    ids = {r.info.run_name: r.info.run_id for r in runs}
    best_first = [ids[store["names"][i]] for i in (1, 2, 0)]
    assert "runs=" + urllib.parse.quote(json.dumps(best_first)) in links["compare"]
    assert links["report"].startswith("not written yet")


@needs_chromium
def test_ui_links_open_the_runs_table_and_the_compare_view(store, tmp_path):
    port = free_port()
    proc = start("ui", "--tracking-uri", store["uri"], "--port", str(port), "--search", SEARCH)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        runs_url = printed_line(proc, "runs of search")
        compare_url = printed_line(proc, "compare its top trials")
        report = printed_line(proc, "report")
        assert runs_url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert compare_url.startswith(f"http://127.0.0.1:{port}/#/compare-runs")
        assert "stain-search report" in report
        # The experiment's own page, in model-training mode: its kind tag makes it the runs table.
        bare = runs_url.split("/runs?")[0] + "?workflowType=machine_learning"
        # STAIN_SEARCH_SCREENSHOTS=DIR also saves what the browser saw, to look at.
        shots = os.environ.get("STAIN_SEARCH_SCREENSHOTS")
        pages = {name: text_of(browse(url, tmp_path / f"chrome-{name}",
                                      screenshot=Path(shots) / f"ui-{name}.png" if shots else None))
                 for name, url in [("runs", runs_url), ("experiment", bare),
                                   ("compare", compare_url)]}
    except BaseException:
        kill_tree(proc)
        raise
    stop_and_check(proc, port, signal.SIGTERM)
    for name in ("runs", "experiment"):  # the runs table, not the GenAI overview
        assert "matching runs" in pages[name], name
        assert "Token Usage" not in pages[name] and "Latency" not in pages[name], name
    # The printed link: the trial runs themselves (not folded under the parent run), best first.
    runs = pages["runs"]
    assert f"Sort: {OBJECTIVE}" in runs and "3 matching runs" in runs
    assert all(run_name in runs for run_name in store["names"])
    assert sorted(store["names"], key=runs.find) == [store["names"][i] for i in (1, 2, 0)]
    compare = pages["compare"]
    assert OBJECTIVE in compare
    for run_name in store["names"]:
        assert run_name in compare


def test_model_version_description_names_its_origin():
    text = registry.describe_model_version({
        "search": "lambda", "trial": "trial_0003", "optuna_trial": 3, "epoch": 4,
        "data": "builtin:phantom-trichrome", "objectives": [{"metric": OBJECTIVE, "mode": "min"}],
        "metrics": {"ssim_structure": 0.71, OBJECTIVE: 12.345, "note": "not a number"}})
    assert "search **lambda**, trial **trial_0003** (#3), epoch **4**" in text
    assert "`builtin:phantom-trichrome`" in text and "note" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "metric" not in line]
    assert rows == [f"| {OBJECTIVE} (objective, min) | 12.35 |", "| ssim_structure | 0.71 |"]


def test_a_server_s_own_output_goes_to_its_log_and_its_last_lines_show_if_it_dies(
        tmp_path, capfd):
    """`ui`/`dashboard` keep MLflow's and uvicorn's start-up notices off the
    terminal (issue 14), but a server that fails (a port in use) still says why."""
    from stain_search.services import serve

    log = tmp_path / "server.log"
    noisy = [sys.executable, "-c", "print('INFO: Waiting for application startup.')"]
    assert serve(noisy, log=log) == 0
    assert capfd.readouterr() == ("", "")
    assert "Waiting for application startup" in log.read_text()
    dying = [sys.executable, "-c", "import sys; print('ERROR: [Errno 98] address already "
             "in use'); sys.exit(3)"]
    assert serve(dying, log=log) == 3
    assert "address already in use" in capfd.readouterr().err
