"""``--storage s3://…``: a search kept in an object store, read back from elsewhere.

Against a real S3 implementation (moto's server, tests/cluster_services.py) on
127.0.0.1. The driver runs with a mirror folder and the trials with a scratch
folder of their own; both are deleted afterwards, and `best`, `export`,
`status` and `report` run from a fresh working directory with a fresh mirror:
whatever they need must come from the bucket.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cluster_services import _s3_answers, free_port, s3_env, start_service, wait_for
from conftest import tiny_space_yaml

pytestmark = pytest.mark.cluster
NAME = "s3search"


def _cli(args, *, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "stain_search.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _env(s3, tmp_path, who: str) -> dict[str, str]:
    return {**os.environ, **s3.env, "STAIN_SEARCH_MIRROR": str(tmp_path / who / "mirror"),
            "STAIN_SEARCH_SCRATCH": str(tmp_path / who / "scratch"),
            "STAIN_SEARCH_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def s3_search(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3search")
    (tmp / "driver").mkdir()
    space = tmp / "driver" / "space.yaml"
    space.write_text(tiny_space_yaml(name=NAME, num_samples=2, max_concurrent=1, epochs=2,
                                     pruner="none"))
    storage = f"s3://{s3_server.bucket}/runs"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run = _cli(["run", str(space), "--storage", storage, "--tracking-uri", uri],
               cwd=tmp / "driver", env=_env(s3_server, tmp, "driver"))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp, storage, uri, run


def test_everything_the_search_keeps_is_in_the_bucket(s3_search, s3_server):
    tmp, storage, uri, run = s3_search
    keys = s3_server.keys(f"runs/{NAME}/")
    rel = {k[len(f"runs/{NAME}/"):] for k in keys}
    for name in ("search.json", "space.yaml", "study.journal", "summary.json"):
        assert name in rel, sorted(rel)
    for trial in ("trial_000", "trial_001"):
        kept = {r.split("/")[2] for r in rel if r.startswith(f"trials/{trial}/checkpoint_epoch_")}
        assert kept, sorted(rel)
        for ckpt in kept:
            assert {f"trials/{trial}/{ckpt}/state.pt", f"trials/{trial}/{ckpt}/meta.json"} <= rel
    assert any(r.startswith("tune/run-1/") for r in rel), sorted(rel)  # Tune's own state
    # The console names the store, never this machine's mirror of it.
    assert f"  {storage}/{NAME}: 2 trial(s)" in run.stdout, run.stdout
    assert f"Tune's in {storage}/{NAME}/tune" in run.stdout, run.stdout
    assert f"checkpoint: {storage}/{NAME}/trials/trial_00" in run.stdout, run.stdout
    # The driver's mirror holds pointers, never a checkpoint's weights.
    mirror = tmp / "driver" / "mirror"
    assert list(mirror.rglob("meta.json")) and not list(mirror.rglob("state.pt"))
    assert not (tmp / "driver" / "stain-search-runs").exists()


def _in_process(args, *, cwd, env, monkeypatch, capsys) -> SimpleNamespace:
    """A reader verb (no Ray) as `_cli` runs it, in this process: the same words,
    folder and environment, without ~7 s of imports per command."""
    from stain_search.cli import main

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd)
        for key in set(os.environ) - set(env):
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        code = main(args)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_best_export_status_report_from_a_fresh_machine(s3_search, s3_server, tmp_path,
                                                        monkeypatch, capsys):
    """A fresh working folder and mirror: whatever the readers need comes from
    the bucket. They run in this process, which holds nothing of the search."""
    _cli = functools.partial(_in_process, monkeypatch=monkeypatch, capsys=capsys)  # noqa: N806
    tmp, storage, uri, _ = s3_search
    summary = json.loads(s3_server.client().get_object(
        Bucket=s3_server.bucket, Key=f"runs/{NAME}/summary.json")["Body"].read())
    # Nothing left on the "machines" that ran it: only the bucket (and MLflow).
    shutil.rmtree(tmp / "driver" / "mirror", ignore_errors=True)
    shutil.rmtree(tmp / "driver" / "scratch", ignore_errors=True)
    env = _env(s3_server, tmp_path, "laptop")
    (tmp_path / "laptop").mkdir()
    common = ["--storage", storage, "--tracking-uri", uri]
    best = _cli(["best", NAME, "--json", *common], cwd=tmp_path / "laptop", env=env)
    assert best.returncode == 0, best.stderr[-2000:]
    chosen = json.loads(best.stdout)["candidates"][0]
    assert (chosen["trial"], chosen["epoch"]) == (summary["deploy"]["trial"],
                                                  summary["deploy"]["epoch"]), (chosen, summary)
    # Both name the checkpoint where it is kept: in the bucket, not in a mirror.
    where = (f"{storage}/{NAME}/trials/{chosen['trial']}/"
             f"checkpoint_epoch_{chosen['epoch']:04d}")
    assert chosen["checkpoint"] == summary["deploy"]["checkpoint"] == where
    out = tmp_path / "laptop" / "model"
    export = _cli(["export", NAME, "--out", str(out), *common], cwd=tmp_path / "laptop", env=env)
    assert export.returncode == 0, export.stderr[-2000:]
    assert (out / "model.json").is_file() and (out / "generator.safetensors").is_file()
    # Only the exported checkpoint's weights were fetched.
    fetched = list((tmp_path / "laptop" / "mirror").rglob("state.pt"))
    assert len(fetched) == 1 and fetched[0].parent.name == f"checkpoint_epoch_{chosen['epoch']:04d}"
    status = _cli(["status", NAME, "--json", *common], cwd=tmp_path / "laptop", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "finished", status
    listing = _cli(["status", "--json", "--storage", storage], cwd=tmp_path / "laptop", env=env)
    assert [r["name"] for r in json.loads(listing.stdout)] == [NAME], listing.stdout
    # What a user opens here is written here (not into the hidden mirror).
    report = _cli(["report", NAME, *common], cwd=tmp_path / "laptop", env=env)
    page = tmp_path / "laptop" / "stain-search-runs" / NAME / "report.html"
    assert report.returncode == 0 and page.is_file(), report.stderr[-2000:]


def test_a_missing_bucket_is_one_line_and_writes_nothing(s3_server, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(tiny_space_yaml(name="nobucket", num_samples=1, epochs=1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(s3_server, tmp_path, "x")
    run = _cli(["run", str(space), "--storage", "s3://no-such-bucket/runs", "--tracking-uri", uri],
               cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("stain-search: error")]
    assert len(lines) == 1 and "no-such-bucket" in lines[0] and "does not exist" in lines[0], lines
    assert run.stderr.strip().splitlines()[-1] == lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "x").exists()


def test_refused_credentials_are_one_line_and_write_nothing(tmp_path):
    """A store that checks keys (moto with IAM auth on) and a key it does not know."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    service = start_service("moto-auth", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                          "-p", str(port)], cwd=tmp_path,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        wait_for("moto", lambda: _s3_answers(endpoint), services=[service], timeout=60)
        space = tmp_path / "space.yaml"
        space.write_text(tiny_space_yaml(name="refused", num_samples=1, epochs=1))
        env = {**os.environ, **s3_env(endpoint), "AWS_ACCESS_KEY_ID": "AKIANOBODY",
               "STAIN_SEARCH_MIRROR": str(tmp_path / "mirror")}
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run = _cli(["run", str(space), "--storage", "s3://any-bucket/runs", "--tracking-uri", uri],
                   cwd=tmp_path, env=env, timeout=120)
    finally:
        service.stop()
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("stain-search: error")]
    assert len(lines) == 1 and "s3://any-bucket/runs" in lines[0], run.stderr
    assert run.stderr.strip().splitlines()[-1] == lines[0]
    assert "credentials" in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mirror").exists()
