"""`stain-search best`: trial × epoch checkpoints ranked, constrained, Pareto."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from stain_search import tracking
from stain_search.checkpoint import list_checkpoints, read_meta, write_checkpoint
from stain_search.cli import main
from stain_search.deploy.export import load_model
from stain_search.deploy.select import Constraint, parse_constraint, pick, select
from stain_search.errors import ConfigError
from stain_search.study import storage


def test_constraints_parse_and_hold():
    c = parse_constraint("ssim_structure=0.7", bound="min")
    assert c == Constraint("ssim_structure", "min", 0.7)
    assert c.holds({"ssim_structure": 0.7}) and not c.holds({"ssim_structure": 0.69})
    assert not c.holds({})  # a checkpoint without the metric fails it
    assert parse_constraint("fid = 80", bound="max").holds({"fid": 79.0})
    for bad in ("ssim_structure", "=3", "fid=abc", "fid=nan"):
        with pytest.raises(ConfigError, match="METRIC=NUMBER"):
            parse_constraint(bad, bound="max")


# --- on a real finished search (read-only) ------------------------------------------------------

@pytest.fixture(scope="module")
def searched(finished_search):
    fs = finished_search
    return fs, select(fs.name, storage=fs.root / "runs", tracking_uri=fs.tracking_uri)


def test_every_kept_checkpoint_is_ranked_by_the_objective(searched):
    fs, selection = searched
    (metric, mode), = selection.objectives
    study = optuna.load_study(study_name=fs.name, storage=storage(fs.search_dir / "study.journal"))
    states = {t.number: t.state.name for t in study.get_trials()}
    on_disk = {(folder.name, read_meta(ck)["epoch"])
               for folder in (fs.search_dir / "trials").iterdir() if folder.is_dir()
               for ck in list_checkpoints(folder)}
    ranked = selection.candidates
    failed = sum(1 for c in ranked if c.state == "FAIL")
    assert failed == 0
    assert {(c.trial, c.epoch) for c in ranked} <= on_disk
    assert len(ranked) + sum(selection.dropped.values()) == len(on_disk)
    values = [c.metrics[metric] for c in ranked]
    assert values == sorted(values, reverse=mode == "max")
    assert [c.rank for c in ranked] == list(range(1, len(ranked) + 1))
    # trial × epoch, not only each trial's last epoch
    assert len({c.trial for c in ranked}) < len(ranked)
    # joined with the study and MLflow
    c = tracking.client(fs.tracking_uri)
    exp = c.get_experiment_by_name(fs.name)
    runs = {r.data.tags[tracking.TRIAL]: r for r in tracking.trial_runs(c, exp.experiment_id,
                                                                        search=fs.name)}
    for cand in ranked:
        run = runs[cand.trial]
        assert cand.run_id == run.info.run_id
        assert cand.number == int(run.data.tags[tracking.OPTUNA_TRIAL])
        assert cand.state == states[cand.number]
        assert set(cand.params) == {"optim.lr_g", "loss.lambda_cycle"}
    assert "PRUNED" in {cand.state for cand in ranked}  # the fixture's third trial


def test_constraints_drop_checkpoints(searched):
    fs, selection = searched
    scores = sorted(c.metrics["ssim_structure"] for c in selection.candidates)
    cut = scores[len(scores) // 2]
    kept = select(fs.name, storage=fs.root / "runs", tracking_uri=fs.tracking_uri,
                  constraints=[parse_constraint(f"ssim_structure={cut}", bound="min")])
    assert kept.candidates and all(c.metrics["ssim_structure"] >= cut for c in kept.candidates)
    assert len(kept.candidates) == sum(s >= cut for s in scores)
    assert sum(kept.dropped.values()) == len(selection.candidates) - len(kept.candidates) + \
        sum(selection.dropped.values())
    with pytest.raises(ConfigError, match="no checkpoint reports 'sharpness'"):
        select(fs.name, storage=fs.root / "runs", tracking_uri=fs.tracking_uri,
               constraints=[parse_constraint("sharpness=1", bound="min")])


def test_per_trial_keeps_each_trials_best(searched):
    fs, selection = searched
    per_trial = select(fs.name, storage=fs.root / "runs", tracking_uri=fs.tracking_uri,
                       per_trial=True)
    assert [c.trial for c in per_trial.candidates] == \
        list(dict.fromkeys(c.trial for c in selection.candidates))
    assert [c.rank for c in per_trial.candidates] == list(range(1, len(per_trial.candidates) + 1))


def test_pick_a_trial_by_name_or_number(searched):
    _, selection = searched
    last = selection.candidates[-1]
    assert pick(selection).rank == 1
    assert pick(selection, trial=last.trial).trial == last.trial
    by_number = pick(selection, trial=str(last.number))
    assert by_number.trial == last.trial and by_number.rank == min(
        c.rank for c in selection.candidates if c.trial == last.trial)
    assert pick(selection, trial=last.trial, epoch=last.epoch).epoch == last.epoch
    with pytest.raises(ConfigError, match="no ranked checkpoint"):
        pick(selection, trial="trial_nope")
    with pytest.raises(ConfigError, match="kept:"):
        pick(selection, trial=last.trial, epoch=999)


def test_cli_best_table_and_json(searched, capsys):
    fs, selection = searched
    args = ["best", fs.name, "--storage", str(fs.root / "runs"), "--tracking-uri", fs.tracking_uri]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "ssim_structure" in table and selection.candidates[0].trial in table
    assert main(args + ["--json", "--top", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(c["trial"], c["epoch"]) for c in out["candidates"]] == \
        [(c.trial, c.epoch) for c in selection.candidates]
    assert main(["best", "no-such-search", "--storage", str(fs.root / "runs")]) == 2
    assert "no search named 'no-such-search'" in capsys.readouterr().err


def test_cli_export_best_without_registry(searched, tmp_path, capsys):
    fs, selection = searched
    best = selection.candidates[0]
    out = tmp_path / "exported"
    assert main(["export", fs.name, "--storage", str(fs.root / "runs"), "--tracking-uri",
                 fs.tracking_uri, "--out", str(out), "--no-register", "--portable", "none"]) == 0
    assert str(out) in capsys.readouterr().out
    prov = load_model(out).info["provenance"]
    assert (prov["trial"], prov["epoch"], prov["mlflow_run_id"]) == \
        (best.trial, best.epoch, best.run_id)
    assert prov["metrics"] == best.metrics


# --- several objectives: the Pareto front --------------------------------------------------------

def test_multi_objective_search_lists_the_pareto_front(tmp_path):
    """A hand-made two-objective search folder (no study, no MLflow)."""
    search_dir = tmp_path / "runs" / "pareto"
    (search_dir / "trials").mkdir(parents=True)
    (search_dir / "search.json").write_text(json.dumps({
        "name": "pareto", "params": [{"key": "loss.lambda_cycle"}],
        "objectives": [{"metric": "fd_random", "mode": "min"},
                       {"metric": "ssim_structure", "mode": "max"}]}))
    points = {("a", 1): (10.0, 0.5), ("a", 2): (8.0, 0.6),   # a@2 dominates a@1
              ("b", 1): (12.0, 0.9), ("c", 1): (5.0, 0.2), ("c", 2): (9.0, 0.55)}
    for (trial, epoch), (fd, ssim) in points.items():
        write_checkpoint(search_dir / "trials" / f"trial_{trial}" / f"checkpoint_epoch_{epoch:04d}",
                         state={}, meta={"epoch": epoch,
                                         "metrics": {"fd_random": fd, "ssim_structure": ssim},
                                         "config": {"loss": {"lambda_cycle": 10.0}}})
    selection = select("pareto", storage=tmp_path / "runs",
                       tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    front = {(c.trial, c.epoch) for c in selection.front}
    assert front == {("trial_a", 2), ("trial_b", 1), ("trial_c", 1)}
    ranks = {(c.trial, c.epoch): c.rank for c in selection.candidates}
    assert (ranks[("trial_c", 2)], ranks[("trial_a", 1)]) == (2, 3)  # a@2 > c@2 > a@1
    assert [c.rank for c in selection.candidates] == sorted(c.rank for c in selection.candidates)
    assert selection.candidates[0].trial == "trial_c"  # within the front: by fd_random
    assert selection.candidates[0].params == {"loss.lambda_cycle": 10.0}
    assert any("no MLflow store" in n for n in selection.notes)
    assert not (tmp_path / "absent.db").exists()  # reading never creates a store
    flags = {(c["trial"], c["epoch"]): c["pareto"] for c in selection.to_dict()["candidates"]}
    assert sum(flags.values()) == 3


def _candidate(trial: str, number: int, epoch: int, kd: float, std: float):
    from stain_search.deploy.select import Candidate

    return Candidate(trial=trial, epoch=epoch, metrics={"kd_random": kd, "kd_random_std": std},
                     params={}, checkpoint=Path(trial), number=number)


def test_best_says_when_the_winner_is_within_noise():
    from stain_search.deploy.select import certainty_notes, rank

    objectives = [("kd_random", "min")]
    close = rank([_candidate("trial_003", 3, 4, 0.110, 0.02),
                  _candidate("trial_005", 5, 4, 0.118, 0.03),
                  _candidate("trial_003", 3, 2, 0.140, 0.02)], objectives)
    [note] = certainty_notes(close, objectives, {}, search="bci")
    assert note.startswith("#3 and #5 are within one std of kd_random (0.008 apart, std 0.03")
    assert note.endswith("confirm with `stain-search confirm bci --top 2 --seeds 3` before "
                         "trusting this order")
    clear = rank([_candidate("trial_003", 3, 4, 0.05, 0.01),
                  _candidate("trial_005", 5, 4, 0.15, 0.01)], objectives)
    [note] = certainty_notes(clear, objectives, {})
    assert note == "#3 leads #5 by 0.1 kd_random, 10.0× its std over evaluation subsets"


def test_best_says_when_the_study_was_told_another_epoch():
    from types import SimpleNamespace

    from stain_search.deploy.select import certainty_notes, rank

    objectives = [("kd_random", "min")]
    ranked = rank([_candidate("trial_001", 1, 2, 0.05, float("nan"))], objectives)
    [note] = certainty_notes(ranked, objectives, {1: SimpleNamespace(values=[0.09])})
    assert "holds another value of #1, kd_random = 0.09" in note
    assert "the deploy rule picks its epoch 2" in note
