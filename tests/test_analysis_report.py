"""The report end to end on a small search written by hand: known trials in an
Optuna journal, MLflow runs logged through stain_search.tracking, tiny
checkpoints. Checks the trials frame, the Parquet file, every figure, the
flags, the links, the figures logged to the parent run, the CLI, and that
the page opens in headless Chromium without errors."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from conftest import TINY_BASE
from stain_search import tracking
from stain_search.analysis.load import load_search
from stain_search.analysis.report import analyse, write_report
from stain_search.checkpoint import checkpoint_name, write_checkpoint
from stain_search.cli import main
from stain_search.deploy.select import select
from stain_search.gan import CycleGAN
from stain_search.search_dir import SearchDir
from stain_search.spaces import load_space
from stain_search.study import suggest
from stain_search.study import create_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

NAME = "fake"
# (λ, identity, state, epochs): the fd falls with epochs and is lowest near λ = 7.
TRIALS = [(7.0, 0.1, "COMPLETE", 3), (2.0, 0.45, "COMPLETE", 3), (30.0, 0.2, "COMPLETE", 3),
          (4.0, 0.9, "COMPLETE", 3), (15.0, 0.5, "COMPLETE", 3), (1.2, 0.75, "COMPLETE", 3),
          (10.0, 0.65, "COMPLETE", 3), (3.0, 0.3, "COMPLETE", 3),
          (1.5, 0.3, "PRUNED", 1), (12.0, 0.6, "RUNNING", 0)]
HALLUCINATES = 1  # its ssim_structure collapses while its fd improves
COLLAPSED = 2  # its outputs barely vary
ONLY_IN_MLFLOW = 3  # its checkpoint lives only in MLflow's best/ artifact


def space_yaml(name: str, *, objective: str = "{metric: frechet, mode: min}") -> str:
    base = "\n".join(f"  {k}: {v}" for k, v in TINY_BASE.items())
    return (f"name: {name}\ndata: builtin:phantom-trichrome\nbase:\n{base}\nspace:\n"
            "  loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}\n"
            "  loss.lambda_identity: {distribution: uniform, low: 0.0, high: 1.0}\n"
            f"objective: {objective}\nsearch: {{algorithm: tpe, num_samples: 6, seed: 0}}\n")


def epoch_metrics(i: int, lam: float, epoch: int) -> dict[str, float]:
    fd = 30 + (np.log(lam) - np.log(7)) ** 2 - epoch
    ssim = 0.6 - (0.15 * (epoch - 1) if i == HALLUCINATES else 0.0)
    return {"loss_D_X": 0.5 / epoch, "loss_D_Y": 0.55 / epoch, "loss_G": 1 + 0.05 * epoch,
            "loss_cycle": 1 / epoch, "fd_random": fd, "ssim_structure": ssim,
            "output_diversity": 0.05 if i == COLLAPSED else 0.9, "time_train_s": 2.0}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake-search")
    space = root / "space.yaml"
    space.write_text(space_yaml(NAME))
    spec = load_space(space)
    sdir = SearchDir.of(root / "runs", NAME)
    search_id = sdir.create(spec).search_id
    search_dir = sdir.root
    study = create_study(spec, search_dir / "study.journal")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.get_or_create_experiment(c, NAME, uri=uri)
    parent = tracking.start_search_run(c, exp, search=NAME, search_id=search_id, objective=[], study=search_dir,
                                       search_dir=search_dir)
    torch.manual_seed(0)
    model = CycleGAN(spec.base_config(), device=torch.device("cpu"))
    for i, (lam, ident, state, n_epochs) in enumerate(TRIALS):
        study.enqueue_trial({"loss.lambda_cycle": lam, "loss.lambda_identity": ident})
        trial = study.ask()
        params = suggest(trial, spec.params)
        config = spec.trial_config(params)
        name = f"trial_{i:04d}"
        run = tracking.start_trial_run(c, exp, parent_run_id=parent, search=NAME,
                                       search_id=search_id, trial=name,
                                       optuna_trial=trial.number, params=config.flat(),
                                       searched=params, checkpoints=search_dir / "trials" / name)
        metrics = {}
        for epoch in range(1, n_epochs + 1):
            metrics = epoch_metrics(i, lam, epoch)
            tracking.log_epoch(c, run, metrics, epoch=epoch)
        if n_epochs:
            where = root / "elsewhere" if i == ONLY_IN_MLFLOW else search_dir / "trials" / name
            folder = write_checkpoint(where / checkpoint_name(n_epochs), state=model.state_dict_full(),
                                      meta={"epoch": n_epochs, "metrics": metrics,
                                            "config": config.to_dict()})
            if i == ONLY_IN_MLFLOW:
                tracking.log_checkpoint(c, run, folder)
        if state == "COMPLETE":
            study.tell(trial.number, metrics["fd_random"])
            tracking.end_trial_run(c, run, status="finished")
        elif state == "PRUNED":
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            tracking.end_trial_run(c, run, status="pruned")
    # A trial the study asked for but that never opened an MLflow run.
    study.ask()
    return {"root": root, "storage": root / "runs", "uri": uri, "search_dir": search_dir,
            "experiment_id": exp, "parent": parent}


@pytest.fixture(scope="module")
def report(fake):
    return write_report(NAME, storage=fake["storage"], tracking_uri=fake["uri"],
                        out=fake["root"] / "out" / "report.html",
                        parquet=fake["root"] / "out" / "trials.parquet")


def test_frame_one_row_per_trial_epoch(fake):
    search = load_search(NAME, storage=fake["storage"], tracking_uri=fake["uri"])
    frame = search.frame
    assert search.objectives[0].metric == "fd_random"
    assert search.param_keys == ["loss.lambda_cycle", "loss.lambda_identity"]
    assert search.is_log("loss.lambda_cycle") and not search.is_log("loss.lambda_identity")
    # 8 × 3 epochs + 1 pruned epoch + a running trial with no epoch + a study-only trial
    assert len(frame) == 8 * 3 + 1 + 1 + 1
    assert frame["loss.lambda_cycle"].dtype == float  # typed again, not MLflow's strings
    per_trial = frame.groupby("number")["state"].first().to_dict()
    assert per_trial == {**{n: "COMPLETE" for n in range(8)}, 8: "PRUNED", 9: "RUNNING",
                         10: "RUNNING"}
    assert frame.loc[frame["number"] == 10, "run_id"].isna().all()
    row = frame[(frame["number"] == 0) & (frame["epoch"] == 2)].iloc[0]
    assert row["fd_random"] == pytest.approx(epoch_metrics(0, 7.0, 2)["fd_random"])
    assert row["loss.lambda_cycle"] == pytest.approx(7.0)
    assert "epoch" not in frame.columns[7:]  # MLflow's "epoch" metric is the step already


def test_parquet_round_trip(report):
    back = pd.read_parquet(report.parquet)
    search_cols = ["trial", "number", "epoch", "loss.lambda_cycle", "fd_random", "ssim_structure"]
    assert len(back) == 27 and set(search_cols) <= set(back.columns)
    assert back.attrs["objectives"] == [["fd_random", "min"]]


def test_report_figures_flags_and_choice(report):
    assert set(report.figures) == {"importance", "param_effects", "best_so_far", "loss_curves",
                                   "top_trials_images"}
    for path in report.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    # Only λ moves the fd: both evaluators must rank it first.
    for evaluator, per_metric in report.analysis.importance.items():
        assert list(per_metric["fd_random"])[0] == "loss.lambda_cycle", evaluator
    assert set(report.analysis.importance) == {"fanova", "ped-anova"}
    assert report.analysis.importance_messages == []
    assert report.analysis.chosen == "trial_0000"  # λ = 7: the lowest fd
    kinds = {(f.trial, f.kind) for f in report.analysis.flags}
    assert ("trial_0001", "structure_loss") in kinds
    assert ("trial_0002", "mode_collapse") in kinds
    assert not any(t == "trial_0000" for t, _ in kinds)
    assert report.notes == []  # every top trial's checkpoint was found (one via MLflow)


def test_html_is_self_contained_with_run_links(report, fake):
    page = report.html.read_text()
    assert "<script" not in page and 'src="http' not in page
    assert page.count('src="data:image/png;base64,') == len(report.figures)
    runs = {r.data.tags[tracking.TRIAL]: r.info.run_id for r in tracking.trial_runs(
        tracking.client(fake["uri"]), fake["experiment_id"], search=NAME)}
    url = f"http://127.0.0.1:5000/#/experiments/{fake['experiment_id']}/runs/{runs['trial_0000']}"
    assert f'href="{url}"' in page
    assert "Parameter importance" in page and "Spearman" in page
    assert "mode collapse" in page and "structure loss" in page


def test_figures_logged_to_the_parent_run(report, fake):
    c = tracking.client(fake["uri"])
    logged = tracking.list_artifacts(c, fake["parent"], "report")
    names = {Path(p).name for p in logged}
    assert {f"{k}.png" for k in report.figures} | {"report.html"} <= names


def test_cli_report_unknown_search_is_one_line(fake, capsys):
    rc = main(["report", "nope", "--storage", str(fake["storage"]), "--tracking-uri", fake["uri"]])
    err = capsys.readouterr().err
    assert rc == 2 and "no search named 'nope'" in err and "--storage" in err
    assert "Traceback" not in err


def test_wrong_store_is_a_clear_error_and_creates_nothing(fake, tmp_path, capsys):
    wrong = tmp_path / "elsewhere.db"
    rc = main(["report", NAME, "--storage", str(fake["storage"]),
               "--tracking-uri", f"sqlite:///{wrong}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file" in err
    assert f"perhaps --tracking-uri {fake['uri']}" in err  # mlflow.db beside the storage
    assert not wrong.exists()


# --- a Pareto search ---------------------------------------------------------------

PARETO = [(1.0, 10.0, 0.50), (5.0, 20.0, 0.70), (20.0, 40.0, 0.90), (8.0, 25.0, 0.60),
          (40.0, 45.0, 0.40)]  # (λ, final fd ↓, final ssim_structure ↑): front = #0, #1, #2


def test_pareto_search_through_the_cli(fake, tmp_path, capsys):
    name = "fake-pareto"
    space = tmp_path / "pareto.yaml"
    space.write_text(space_yaml(name, objective=(
        "[{metric: frechet, mode: min}, {metric: ssim_structure, mode: max}]")))
    spec = load_space(space)
    sdir = SearchDir.of(fake["storage"], name)
    search_id = sdir.create(spec).search_id
    search_dir = sdir.root
    study = create_study(spec, search_dir / "study.journal")
    torch.manual_seed(0)
    model = CycleGAN(spec.base_config(), device=torch.device("cpu"))
    c = tracking.client(fake["uri"])
    exp = tracking.get_or_create_experiment(c, name, uri=fake["uri"])
    parent = tracking.start_search_run(c, exp, search=name, search_id=search_id, objective=[], study=search_dir,
                                       search_dir=search_dir)
    for i, (lam, fd, ssim) in enumerate(PARETO):
        study.enqueue_trial({"loss.lambda_cycle": lam, "loss.lambda_identity": 0.5})
        trial = study.ask()
        params = suggest(trial, spec.params)
        run = tracking.start_trial_run(c, exp, parent_run_id=parent, search=name,
                                       search_id=search_id, trial=f"trial_{i}", optuna_trial=trial.number,
                                       params=spec.trial_config(params).flat(), searched=params,
                                       checkpoints=search_dir / "trials" / f"trial_{i}")
        metrics = {"fd_random": fd, "ssim_structure": ssim, "loss_G": 1.0,
                   "output_diversity": 0.9}
        tracking.log_epoch(c, run, metrics, epoch=1)
        write_checkpoint(search_dir / "trials" / f"trial_{i}" / checkpoint_name(1),
                         state=model.state_dict_full(),
                         meta={"epoch": 1, "metrics": metrics,
                               "config": spec.trial_config(params).to_dict()})
        study.tell(trial.number, [fd, ssim])
        tracking.end_trial_run(c, run, status="finished")

    # Through the command line, as a user would (and without touching MLflow).
    out = tmp_path / "pareto.html"
    rc = main(["report", name, "--storage", str(fake["storage"]), "--tracking-uri", fake["uri"],
               "--out", str(out), "--parquet", str(tmp_path / "t.parquet"), "--no-log",
               "--ui-url", "http://mlflow.example:8080/"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and printed[-1] == str(out)
    assert f"trials × epochs: {tmp_path / 't.parquet'}" in printed
    page = out.read_text()
    assert "Pareto front" in page and 'href="http://mlflow.example:8080/#/experiments/' in page
    assert (tmp_path / "pareto_figures" / "pareto.png").stat().st_size > 5_000
    assert not tracking.list_artifacts(c, parent)  # --no-log

    analysis = analyse(load_search(name, storage=fake["storage"], tracking_uri=fake["uri"]))
    table = analysis.table
    assert set(table.loc[analysis.front, "number"]) == {t.number for t in study.best_trials}
    assert set(table.loc[analysis.front, "number"]) == {0, 1, 2}
    # The deploy rule: on the front, the best first objective (fd 10), as `best` says.
    assert (analysis.chosen, analysis.chosen_epoch) == ("trial_0", 1)
    best = select(name, storage=fake["storage"], tracking_uri=fake["uri"]).best()
    assert (best.trial, best.epoch) == (analysis.chosen, analysis.chosen_epoch)
    assert list(table["number"]) == [0, 1, 2, 3, 4]  # the front by fd, then the rest


# --- the page in a real browser ------------------------------------------------

HARNESS = """<!DOCTYPE html><html><body>
<iframe id="r" src="{src}" style="width:1200px;height:900px"></iframe><pre id="out">pending</pre>
<script>
document.getElementById("r").addEventListener("load", () => {{
  const d = document.getElementById("r").contentDocument;
  const imgs = Array.from(d.images);
  document.getElementById("out").textContent = JSON.stringify({{
    title: d.title, images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    rows: d.querySelectorAll("tbody tr").length,
    links: Array.from(d.links).map(a => a.getAttribute("href"))}});
}});
</script></body></html>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian `chromium` not installed "
                    "(apt-get install -y chromium); CI installs it")
def test_report_opens_in_headless_chromium(report, tmp_path):
    page = tmp_path / "report.html"
    shutil.copy(report.html, page)
    (tmp_path / "harness.html").write_text(HARNESS.format(src=page.name))
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "harness.html").as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "rror" in line], console
    found = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["title"] == f"stain-search report: {NAME}"
    assert seen["images"] == len(report.figures) and seen["decoded"] == seen["images"]
    assert seen["rows"] == 10  # the top-10 table of 11 trials
    assert any("/#/experiments/" in link for link in seen["links"])
