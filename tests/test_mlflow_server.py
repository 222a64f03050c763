"""An MLflow tracking server as the search's store: a real ``mlflow server``
(SQLite backend, artifacts through its proxy; tests/mlflow_server.py).

- a 2-trial search logs through it (each trial's best checkpoint and sample
  images land in the server's artifacts folder), and ``best`` and ``export``
  read the same store back;
- 4 concurrent trials log to it and nothing is lost: every epoch of every
  trial in MLflow is the epoch its checkpoint's meta.json holds;
- a server that is down is one line naming the URI and the fix, exit 2,
  within seconds, with nothing written (``run`` and ``best``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import ensure_local_ray, tiny_space_yaml
from mlflow_server import free_port, mlflow_server  # noqa: F401 - the fixture
from stain_search import cli, tracking
from stain_search.checkpoint import list_checkpoints, read_meta

pytestmark = pytest.mark.slow


def stain_search(*argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it."""
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "stain_search.cli", *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def run_search(tmp: Path, uri: str, *, name: str, **space) -> Path:
    space_file = tmp / f"{name}.yaml"
    space_file.write_text(tiny_space_yaml(name=name, **space))
    code = cli.main(["run", str(space_file), "--storage", str(tmp / "runs"),
                     "--tracking-uri", uri])
    assert code == 0
    return tmp / "runs" / name


def trial_runs(uri: str, name: str) -> list:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(name)
    return c, tracking.trial_runs(c, exp.experiment_id, search=name)


@pytest.fixture(scope="module", autouse=True)
def _local_ray():
    """The session's local Ray (conftest.ensure_local_ray) for the module's
    searches: each would otherwise start and stop its own (~15 s each on 2 busy
    cores). The driver then serves its study on this node's address, as on a
    cluster it joined."""
    ensure_local_ray()


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):  # noqa: F811
    """A finished 2-trial search whose store is the server."""
    tmp = tmp_path_factory.mktemp("served")
    cwd = Path.cwd()
    os.chdir(tmp)  # nothing may fall back to a ./mlflow.db
    try:
        sdir = run_search(tmp, mlflow_server.uri, name="served", num_samples=2, epochs=2,
                          pruner="none")
    finally:
        os.chdir(cwd)
    return tmp, sdir


def test_a_search_logs_through_the_server_and_best_and_export_read_it_back(
        mlflow_server, served, capsys):  # noqa: F811
    tmp_path, sdir = served
    c, runs = trial_runs(mlflow_server.uri, "served")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        # Artifacts went through the server's proxy into --artifacts-destination.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        files = {p.relative_to(mlflow_server.artifacts).as_posix()
                 for p in mlflow_server.artifacts.rglob("*") if p.is_file()
                 and run.info.run_id in p.parts}
        assert any("/best/" in f and f.endswith("meta.json") for f in files), files
        assert any(f.endswith("samples/epoch_0002.png") for f in files), files
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    capsys.readouterr()

    storage = str(tmp_path / "runs")
    assert cli.main(["best", "served", "--storage", storage, "--tracking-uri",
                     mlflow_server.uri, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["candidates"] and not any("MLflow" in n for n in best.get("notes", []))
    by_trial = {r.data.tags[tracking.TRIAL]: r.info.run_id for r in runs}
    top = best["candidates"][0]
    assert top["run_id"] == by_trial[top["trial"]]  # joined with the server's runs

    out = tmp_path / "exported"
    assert cli.main(["export", "served", "--storage", storage, "--tracking-uri",
                     mlflow_server.uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"(store: {mlflow_server.uri})" in printed, printed
    # Registered in the server, by a run nested under the trial's, whose model
    # files went through the proxy too.
    version = next(v for v in c.search_model_versions()
                   if v.tags.get(tracking.TRIAL) == top["trial"])
    assert c.get_run(version.run_id).data.tags[tracking.PARENT] == top["run_id"]
    assert any(p.is_file() and version.run_id in p.parts
               for p in mlflow_server.artifacts.rglob("*"))
    assert any(out.iterdir())

    # `ui` against a server starts nothing: the server is the UI; its links point there.
    assert cli.main(["ui", "--tracking-uri", mlflow_server.uri, "--search", "served"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"MLflow UI: {mlflow_server.uri.rstrip('/')}"), printed
    assert any(line.startswith(f"runs: {mlflow_server.uri.rstrip('/')}/#/experiments/")
               for line in printed), printed


def test_four_concurrent_trials_lose_nothing(mlflow_server, tmp_path):  # noqa: F811
    epochs = 2  # both epochs' checkpoints are kept (the best 2 + the newest)
    sdir = run_search(tmp_path, mlflow_server.uri, name="concurrent", num_samples=4,
                      max_concurrent=4, epochs=epochs, pruner="none",
                      resources="{workers_per_trial: 1, cpus_per_worker: 0.5}")
    c, runs = trial_runs(mlflow_server.uri, "concurrent")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    # They logged at the same time: on 2 busy cores a trial (~6 s) can end
    # before the last worker process is up, so not always all four at once.
    assert most_at_once(runs) >= 2
    for run in runs:
        trial = run.data.tags[tracking.TRIAL]
        checkpoints = list_checkpoints(sdir / "trials" / trial)
        metas = {int(m["epoch"]): m["metrics"] for m in map(read_meta, checkpoints)}
        assert sorted(metas) == list(range(1, epochs + 1)), trial
        names = {k for m in metas.values() for k, v in m.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        assert {"loss_G", "epoch"} <= names
        for key in names:
            history = c.get_metric_history(run.info.run_id, key)
            logged = {m.step: m.value for m in history}
            # Every epoch once, each the value its checkpoint holds.
            assert len(history) == len(logged) == epochs, (trial, key, history)
            for epoch, metrics in metas.items():
                assert logged[epoch] == pytest.approx(float(metrics[key]), rel=1e-9), \
                    (trial, key, epoch)
        images = tracking.list_artifacts(c, run.info.run_id, "samples")
        assert sorted(Path(p).name for p in images) == [f"epoch_{e:04d}.png"
                                                         for e in range(1, epochs + 1)]


def test_a_server_that_is_down_is_one_line_exit_2_and_nothing_written(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    space = tmp_path / "down.yaml"
    space.write_text(tiny_space_yaml(name="down"))
    # No minutes of MLflow's retries: a run that takes them hits the timeout.
    done = stain_search("run", str(space), "--storage", str(tmp_path / "runs"),
                        "--tracking-uri", down, cwd=tmp_path, timeout=60)
    _one_line(done, down)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    # The probe itself: one quick try, not MLflow's backoff (what it asks MLflow for).
    from mlflow.tracking import MlflowClient

    asked, probe = [], MlflowClient.search_experiments

    def spy(self, *args, **kwargs):
        asked.append((os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                      os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))
        return probe(self, *args, **kwargs)

    with mock.patch.object(MlflowClient, "search_experiments", spy), \
            pytest.raises(tracking.TrackingError, match="connection refused"):
        tracking.client(down)
    assert asked == [("0", "5")]


def test_best_against_a_server_that_is_down_is_one_line(served, tmp_path):
    """Bounded by the subprocess timeout: a CLI that retried a dead server for
    minutes would time out and fail here."""
    down = f"http://127.0.0.1:{free_port()}"
    done = stain_search("best", "served", "--storage", str(served[1].parent),
                        "--tracking-uri", down, cwd=tmp_path, timeout=120)
    _one_line(done, down)


def most_at_once(runs) -> int:
    """The most runs open at one moment (from their start and end times)."""
    edges = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs],
                   key=lambda e: (e[0], e[1]))
    open_, most = 0, 0
    for _, step in edges:
        open_ += step
        most = max(most, open_)
    return most


def _one_line(done: subprocess.CompletedProcess, uri: str) -> None:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in lines if line.startswith("stain-search: error: ")]
    assert errors == lines[-1:], done.stderr  # one line, and the last
    assert f"MLflow tracking server {uri} does not answer" in errors[0], errors[0]
    assert "mlflow server" in errors[0] and "--tracking-uri" in errors[0], errors[0]
