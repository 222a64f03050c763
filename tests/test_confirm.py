"""`stain-search confirm` (issue 12): the top trials re-trained with new seeds.

End to end on the phantom (K=2, N=2: 4 child runs, mean ± std in `best
--confirmed --json`, the report's error bars, `export --confirmed`), a
confirmation stopped mid-run and continued, and the verdict on constructed
cases: a ranking that holds, one within noise, one that flips.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ensure_local_ray, tiny_space_yaml
from stain_search import mlflow_ui, tracking
from stain_search.cli import main
from stain_search.deploy.confirmed import ConfirmedConfig, ConfirmedRun, verdict
from stain_search.deploy.select import Candidate
from stain_search.search_dir import SearchDir

NAME = "conf"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished 2-trial search on the tiny phantom (no pruning)."""
    from stain_search.search import run_search

    ensure_local_ray()
    root = tmp_path_factory.mktemp("confirm")
    space = root / "tiny.yaml"
    space.write_text(tiny_space_yaml(name=NAME, num_samples=2, max_concurrent=1, epochs=2,
                                     pruner="none"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_search(space, storage=root / "runs", tracking_uri=uri, verbose=0)
    return root, uri


def _cli(root: Path, uri: str, *args: str) -> list[str]:
    return [*args, "--storage", str(root / "runs"), "--tracking-uri", uri]


@pytest.mark.slow
def test_best_confirmed_before_any_confirmation_says_how(searched, tmp_path, capsys):
    """On a copy of the search without its confirmation, whatever ran before."""
    root, uri = searched
    shutil.copytree(root / "runs" / NAME, tmp_path / "runs" / NAME,
                    ignore=shutil.ignore_patterns("confirm"))
    assert not SearchDir.of(tmp_path / "runs", NAME).confirmation.exists()
    assert main(_cli(tmp_path, uri, "best", NAME, "--confirmed")) == 2
    assert f"`stain-search confirm {NAME} --top 3 --seeds 3`" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_confirm_top2_over_2_seeds_then_best_report_and_export_follow_it(searched, capsys,
                                                                       local_ray):
    root, uri = searched
    sdir = SearchDir.of(root / "runs", NAME)
    assert main(_cli(root, uri, "confirm", NAME, "--top", "2", "--seeds", "2")) == 0
    out = capsys.readouterr().out
    assert "2 configuration(s) re-trained with train.seed 1, 2" in out

    # Four child runs, each tagged with the trial it confirms and its seed,
    # under a parent run nested in the search's own.
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(NAME)
    confirm_record = sdir.confirmation.read_record()
    runs = tracking.trial_runs(c, exp.experiment_id, search=NAME,
                               search_id=confirm_record.search_id)
    assert len(runs) == 4
    pairs = sorted((r.data.tags[tracking.CONFIRMS], int(r.data.tags[tracking.SEED])) for r in runs)
    assert pairs == [("trial_000", 1), ("trial_000", 2), ("trial_001", 1), ("trial_001", 2)]
    assert all(r.data.params["train.seed"] == r.data.tags[tracking.SEED] for r in runs)
    search_parent = tracking.search_run(c, exp.experiment_id, search=NAME,
                                        search_id=sdir.read_record().search_id)
    confirm_parent = tracking.search_run(c, exp.experiment_id, search=NAME,
                                         search_id=confirm_record.search_id)
    assert confirm_parent.data.tags[tracking.PARENT] == search_parent.info.run_id
    assert {r.data.tags[tracking.PARENT] for r in runs} == {confirm_parent.info.run_id}
    # `ui --search` still opens the search's own trials, not the newer confirmation's.
    links = mlflow_ui.ui_links(uri, NAME, base="http://127.0.0.1:1")
    assert sdir.read_record().search_id in links["runs"]
    assert confirm_record.search_id not in links["runs"]
    # The search itself is untouched: its own ranking still lists its 2 trials only.
    assert main(_cli(root, uri, "best", NAME, "--json")) == 0
    assert {c["trial"] for c in json.loads(capsys.readouterr().out)["candidates"]} == \
        {"trial_000", "trial_001"}

    # best --confirmed --json: mean ± std per configuration, from the runs' own values.
    assert main(_cli(root, uri, "best", NAME, "--confirmed", "--json")) == 0
    conf = json.loads(capsys.readouterr().out)
    assert conf["runs_finished"] == conf["runs_expected"] == 4 and conf["seeds"] == [1, 2]
    metric = conf["objectives"][0]["metric"]
    assert [c["rank"] for c in conf["configurations"]] == [1, 2]
    for config in conf["configurations"]:
        values = [r["best"]["metrics"][metric] for r in config["runs"]]
        assert config["n"] == 2
        assert config["mean"][metric] == pytest.approx(np.mean(values))
        assert config["std"][metric] == pytest.approx(np.std(values, ddof=1))
    means = [c["mean"][metric] for c in conf["configurations"]]
    assert means == sorted(means)  # fd_random: lower first
    assert conf["holds"] in (True, False) and conf["notes"]
    top = conf["configurations"][0]
    assert conf["deploy"]["trial"].startswith(top["trial"])

    # The report shows the confirmation (error bars); export --confirmed follows it.
    assert main(_cli(root, uri, "report", NAME, "--no-log")) == 0
    page = sdir.report_file.read_text()
    assert "Confirmed over seeds" in page and "Top configurations over seeds" in page
    capsys.readouterr()
    assert main(_cli(root, uri, "export", NAME, "--confirmed", "--no-register",
                     "--portable", "none")) == 0
    exported = capsys.readouterr().out
    assert f"at epoch {conf['deploy']['epoch']}" in exported
    assert conf["deploy"]["trial"] in exported

    # Plain `best` points at the confirmation.
    assert main(_cli(root, uri, "best", NAME)) == 0
    assert f"`stain-search best {NAME} --confirmed`" in capsys.readouterr().out

    # Run again: it continues (here: nothing left), trains nothing new.
    assert main(_cli(root, uri, "confirm", NAME, "--top", "2", "--seeds", "2")) == 0
    assert len(tracking.trial_runs(c, exp.experiment_id, search=NAME,
                                   search_id=confirm_record.search_id)) == 4
    # Other seeds on an existing confirmation: refused in one line, nothing changed.
    before = sorted(p.name for p in sdir.confirmation.trials.iterdir())
    assert main(_cli(root, uri, "confirm", NAME, "--top", "2", "--seeds", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already has a confirmation" in err
    assert "--top 2 --seeds 2" in err
    assert sorted(p.name for p in sdir.confirmation.trials.iterdir()) == before


def test_confirm_without_a_search_or_confirmation_is_one_line(tmp_path, capsys):
    storage = str(tmp_path / "runs")
    assert main(["confirm", "nope", "--storage", storage]) == 2
    assert "no search named 'nope'" in capsys.readouterr().err
    assert main(["confirm", "nope", "--storage", storage, "--top", "0"]) == 2
    assert "--top and --seeds must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_stopped_confirmation_continues_and_repeats_nothing(tmp_path, capsys):
    """Ctrl-C mid-run, then the same command again: every seed run finishes,
    each epoch is logged once, no run is duplicated. The Ctrl-C hits a process,
    as typed; the command again runs in this process, on the session's Ray."""
    space = tmp_path / "tiny.yaml"
    space.write_text(tiny_space_yaml(name="stop", num_samples=1, max_concurrent=1, epochs=3,
                                     pruner="none", base={"train.steps_per_epoch": 12}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    cli = [sys.executable, "-m", "stain_search.cli"]
    from stain_search.search import run_search

    ensure_local_ray()  # the search confirmed is set-up, made in this process
    run_search(space, storage=tmp_path / "runs", tracking_uri=uri, verbose=0)
    cdir = SearchDir.of(tmp_path / "runs", "stop").confirmation
    proc = subprocess.Popen([*cli, "confirm", "stop", "--top", "1", "--seeds", "2", *common],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(cdir.trials.glob("*/checkpoint_epoch_*")):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "`stain-search confirm stop --top 1 --seeds 2` continues it" in err

    capsys.readouterr()
    code = main(["confirm", "stop", "--top", "1", "--seeds", "2", "--json", *common])
    out = capsys.readouterr()
    assert code == 0, out.err
    conf = json.loads(out.out)
    assert conf["runs_finished"] == 2
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("stop")
    runs = tracking.trial_runs(c, exp.experiment_id, search="stop",
                               search_id=cdir.read_record().search_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "epoch")]
        assert steps == [1, 2, 3], steps


# --- the verdict, on constructed cases ------------------------------------------------------

def _config(trial: str, number: int, values: list[float]) -> ConfirmedConfig:
    runs = [ConfirmedRun(trial=f"trial_{i:03d}", seed=i + 1, state="COMPLETE",
                         best=Candidate(trial=f"trial_{i:03d}", epoch=2,
                                        metrics={"kd_random": v}, params={},
                                        checkpoint=Path("."))) for i, v in enumerate(values)]
    return ConfirmedConfig(trial=trial, number=number, params={}, original={}, runs=runs,
                           mean={"kd_random": float(np.mean(values))},
                           std={"kd_random": float(np.std(values, ddof=1))}, n=len(values),
                           rank=0)


def _ranked(*configs: ConfirmedConfig) -> list[ConfirmedConfig]:
    ordered = sorted(configs, key=lambda c: c.mean["kd_random"])
    for i, c in enumerate(ordered, 1):
        c.rank = i
    return ordered


OBJ = [("kd_random", "min")]


def test_a_clear_lead_holds():
    ranked = _ranked(_config("trial_003", 3, [0.10, 0.11, 0.12]),
                     _config("trial_005", 5, [0.30, 0.31, 0.29]))
    holds, notes = verdict(ranked, ["trial_003", "trial_005"], OBJ)
    assert holds is True
    assert notes == ["#3 leads #5 by 0.19 kd_random, 19.0× the larger seed std"]


def test_within_one_std_says_so_and_how_to_settle_it():
    ranked = _ranked(_config("trial_003", 3, [0.10, 0.20, 0.15]),
                     _config("trial_005", 5, [0.12, 0.22, 0.17]))
    holds, notes = verdict(ranked, ["trial_003", "trial_005"], OBJ)
    assert holds is False
    [note] = notes
    assert note.startswith("#3 and #5 are within one std of kd_random (0.02 apart, seed std 0.05)")
    assert "confirm with more --seeds" in note


def test_a_flipped_order_is_named():
    ranked = _ranked(_config("trial_003", 3, [0.10, 0.11, 0.12]),
                     _config("trial_005", 5, [0.30, 0.31, 0.29]))
    holds, notes = verdict(ranked, ["trial_005", "trial_003"], OBJ)  # the search had #5 first
    assert holds is False
    assert "differs from the search's" in notes[0]


def test_one_seed_cannot_give_a_std():
    ranked = _ranked(_config("trial_003", 3, [0.10]), _config("trial_005", 5, [0.30]))
    ranked[0].std["kd_random"] = ranked[1].std["kd_random"] = math.nan
    holds, notes = verdict(ranked, ["trial_003", "trial_005"], OBJ)
    assert holds is None and "--seeds 2 or more" in notes[0]
