"""Issue 17, items 2 and 3: a space's `constraints:` (parsed, in the identity, told
to the sampler, honoured by `best`/`export`) and `run --warm-start OTHER` (the
new study starts with OTHER's best finished trials, enqueued best first)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import tiny_space_yaml
from stain_search.checkpoint import write_checkpoint
from stain_search.cli import main
from stain_search.deploy.select import pick, select, select_dir
from stain_search.errors import ConfigError
from stain_search.search_dir import SearchDir, identity_of
from stain_search.constraints import Constraint
from stain_search.spaces import load_space
from stain_search.study import create_study, is_feasible, make_sampler, open_study
from stain_search.study_searcher import StudySearcher

SSIM_MIN = "[{metric: ssim_structure, min: 0.6}, {metric: stain_area_error, max: 0.05}]"


def _space(tmp_path: Path, constraints: str | None, *, name: str = "con", **kw) -> Path:
    text = tiny_space_yaml(name=name, **kw)
    if constraints is not None:
        text += f"constraints: {constraints}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# --- parsing: one clear line per mistake --------------------------------------------------

def test_constraints_parse_into_the_spec_and_its_identity(tmp_path):
    spec = load_space(_space(tmp_path, SSIM_MIN))
    assert spec.constraints == (Constraint("ssim_structure", "min", 0.6),
                                Constraint("stain_area_error", "max", 0.05))
    assert identity_of(spec)["constraints"] == [
        {"metric": "ssim_structure", "bound": "min", "value": 0.6},
        {"metric": "stain_area_error", "bound": "max", "value": 0.05}]
    # Without constraints the identity has no such key: older searches stay comparable.
    assert "constraints" not in identity_of(load_space(_space(tmp_path, None, name="plain")))
    c = spec.constraints[0]
    assert c.violation({"ssim_structure": 0.7}) == pytest.approx(-0.1)
    assert c.violation({"ssim_structure": 0.5}) == pytest.approx(0.1)
    assert c.violation({}) == math.inf and not c.holds({"ssim_structure": float("nan")})


@pytest.mark.parametrize("constraints, expected", [
    ("[{metric: ssim_structur, min: 0.6}]", ("constraints[0].metric", "ssim_structur",
                                             "did you mean")),
    ("[{metric: ssim_structure}]", ("constraints[0]", "exactly one", "neither")),
    ("[{metric: ssim_structure, min: 0.5, max: 0.9}]", ("constraints[0]", "min and max")),
    ("[{metric: ssim_structure, min: high}]", ("constraints[0].min", "finite number")),
    ("[{metric: ssim_structure, min: .nan}]", ("constraints[0].min", "finite number")),
    ("[{metric: ssim_structure, above: 0.5}]", ("constraints[0].above", "unknown key")),
    ("{metric: ssim_structure, min: 0.6}", ("`constraints`", "expected a list")),
    ("[ssim_structure]", ("constraints[0]", "mapping")),
])
def test_bad_constraints_are_one_clear_line(tmp_path, constraints, expected):
    with pytest.raises(ConfigError) as err:
        load_space(_space(tmp_path, constraints))
    line = str(err.value)
    assert "\n" not in line and "con.yaml" in line
    for part in expected:
        assert part in line, line


def test_a_bad_constraint_ends_the_cli_with_exit_2_and_nothing_written(tmp_path, capsys):
    space = _space(tmp_path, "[{metric: ssim_structure, min: 0.5, max: 0.9}]")
    rc = main(["run", str(space), "--storage", str(tmp_path / "runs"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "constraints[0]" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_constraints_key_is_listed_among_the_top_keys(tmp_path):
    path = _space(tmp_path, None)
    path.write_text(path.read_text() + "constraint: []\n")
    with pytest.raises(ConfigError, match="did you mean `constraints`|constraints"):
        load_space(path)


# --- the sampler is told ------------------------------------------------------------------

PARETO = "[{metric: frechet, mode: min}, {metric: ssim_structure, mode: max}]"


@pytest.mark.parametrize("algorithm, objective, sampler_type", [
    ("tpe", "{metric: frechet, mode: min}", optuna.samplers.TPESampler),
    ("tpe", PARETO, optuna.samplers.TPESampler),  # multi-objective TPE
    ("nsga2", PARETO, optuna.samplers.NSGAIISampler),
])
def test_constrained_samplers_read_optunas_own_constraints(tmp_path, algorithm, objective,
                                                          sampler_type):
    text = tiny_space_yaml(name="con", objective=objective, pruner="none", num_samples=16)
    text = text.replace("algorithm: tpe", f"algorithm: {algorithm}").replace(
        "seed: 0,", "seed: 0, population_size: 2,")
    path = tmp_path / "con.yaml"
    path.write_text(text + f"constraints: {SSIM_MIN}\n")
    spec = load_space(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # constraints_func is deprecated
        sampler = make_sampler(spec, seed=0)
    # Optuna 5's samplers read trial.constraints themselves: no constraints_func.
    assert isinstance(sampler, sampler_type) and getattr(sampler, "_constraints_func", None) is None
    study = optuna.create_study(sampler=sampler, directions=["minimize"] * len(spec.objectives))
    for violations in ([0.1, -0.2], [-0.1, -0.2]):
        trial = study.ask()
        trial.suggest_float("loss.lambda_cycle", 1, 50, log=True)
        for constraint, value in zip(spec.constraints, violations):
            trial.set_constraint(str(constraint), value)
        study.tell(trial, [1.0] * len(spec.objectives))
    assert [list(t.constraints.values()) for t in study.trials] == [[0.1, -0.2], [-0.1, -0.2]]
    assert [is_feasible(t) for t in study.trials] == [False, True]
    # The next draw sees them: TPE ranks the infeasible trial below the feasible one.
    if sampler_type is optuna.samplers.TPESampler:
        from optuna.samplers._tpe.sampler import _get_infeasible_trial_score

        assert [_get_infeasible_trial_score(t) > 0 for t in study.trials] == [True, False]
    # A study stored before (one `constraints` list attribute) reads the same.
    old = study.ask()
    old.suggest_float("loss.lambda_cycle", 1, 50, log=True)
    study._storage.set_trial_system_attr(old._trial_id, "constraints", [0.3, -0.1])
    study.tell(old, [1.0] * len(spec.objectives))
    assert is_feasible(study.trials[-1]) is False


def test_the_searcher_stores_the_drivers_constraint_values_when_it_tells(tmp_path):
    spec = load_space(_space(tmp_path, SSIM_MIN))
    journal = tmp_path / "study.journal"
    create_study(spec, journal)
    asked: list[int] = []
    searcher = StudySearcher(spec, journal, told=lambda n: [3.0],
                             constrained=lambda n: asked.append(n) or [0.25, -0.01])
    searcher.suggest("tune_a")
    searcher.on_trial_complete("tune_a", {"done": True, "fd_random": 9.0, "frechet": 9.0})
    trial = open_study(spec.name, journal).trials[0]
    assert asked == [0] and trial.values == [3.0]  # the deploy-rule value, not the last
    assert trial.constraints == {str(c): v for c, v in zip(spec.constraints, [0.25, -0.01])}
    assert is_feasible(trial) is False
    # Told without values (no checkpoint): infeasible, never NaN.
    searcher = StudySearcher(spec, journal, told=lambda n: [2.0], constrained=lambda n: None)
    searcher.suggest("tune_b")
    searcher.on_trial_complete("tune_b", {"done": True, "fd_random": 9.0})
    assert list(open_study(spec.name, journal).trials[1].constraints.values()) == \
        [math.inf, math.inf]


def test_the_report_marks_infeasible_trials():
    from types import SimpleNamespace

    from stain_search.analysis.report import feasibility

    study = optuna.create_study()
    for violations in ([0.1], [-0.1], None):
        trial = study.ask()
        if violations is not None:
            trial.set_constraint("ssim_structure ≥ 0.6", violations[0])
        study.tell(trial, 1.0)
    assert feasibility(SimpleNamespace(study=study)) == {0: False, 1: True, 2: None}
    plain = optuna.create_study()
    plain.tell(plain.ask(), 1.0)
    assert feasibility(SimpleNamespace(study=plain)) == {}  # no column without constraints


# --- best and export pick among feasible checkpoints -----------------------------------------

def _made_search(root: Path, constraints: list[dict]) -> Path:
    """A hand-made finished search: two trials, two epochs each (no study, no MLflow)."""
    sdir = root / "runs" / "made"
    (sdir / "trials").mkdir(parents=True)
    identity = {"base": {}, "params": [{"key": "loss.lambda_cycle"}],
                "objectives": [{"metric": "fd_random", "mode": "min"}], "search": {},
                "constraints": constraints}
    (sdir / "search.json").write_text(json.dumps({
        "format": "stain-search-search/2", "name": "made", "search_id": "abc", "created": "",
        "profile": None, "budget": {"num_samples": 2, "max_concurrent": 1},
        "identity": identity}))
    points = {(0, 1): (10.0, 0.50), (0, 2): (8.0, 0.55), (1, 1): (12.0, 0.70),
              (1, 2): (11.0, 0.65)}
    for (trial, epoch), (fd, ssim) in points.items():
        write_checkpoint(sdir / "trials" / f"trial_{trial:03d}" / f"checkpoint_epoch_{epoch:04d}",
                         state={}, meta={"epoch": epoch,
                                         "metrics": {"fd_random": fd, "ssim_structure": ssim},
                                         "config": {"loss": {"lambda_cycle": 10.0 + trial}}})
    return sdir


def test_the_spaces_constraints_are_selects_default(tmp_path):
    _made_search(tmp_path, [{"metric": "ssim_structure", "bound": "min", "value": 0.6}])
    uri = f"sqlite:///{tmp_path / 'absent.db'}"
    selection = select("made", storage=tmp_path / "runs", tracking_uri=uri)
    assert [(c.trial, c.epoch) for c in selection.candidates] == [("trial_001", 2),
                                                                  ("trial_001", 1)]
    assert selection.best().trial == "trial_001"  # trial_000 is better but infeasible
    assert selection.dropped == {"fails ssim_structure ≥ 0.6": 2}
    unconstrained = select("made", storage=tmp_path / "runs", tracking_uri=uri,
                           space_constraints=False)
    assert unconstrained.best().trial == "trial_000"


def test_best_says_no_feasible_checkpoint_in_one_line(tmp_path, capsys):
    _made_search(tmp_path, [{"metric": "ssim_structure", "bound": "min", "value": 0.9}])
    args = ["best", "made", "--storage", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}"]
    assert main(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("no feasible checkpoint: none meets ssim_structure ≥ 0.9; "
                             "best infeasible shown (not deployable): #None trial_000 epoch 2 "
                             "(ssim_structure=0.55)")
    assert sum("✗" in line for line in out) == 4  # the infeasible ones, marked
    assert main(args + ["--no-constraints"]) == 0  # the space's constraints left out
    assert "no feasible" not in capsys.readouterr().out
    # --min/--max come on top of the space's own
    assert main(args + ["--no-constraints", "--min", "ssim_structure=0.68"]) == 0
    assert "trial_001" in capsys.readouterr().out
    # export refuses with the same line
    selection = select_dir(SearchDir(tmp_path / "runs" / "made"),
                           tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    with pytest.raises(ConfigError, match="no feasible checkpoint: none meets"):
        pick(selection)


def test_best_on_the_finished_search_with_a_constraint_nobody_meets(finished_search, tmp_path,
                                                                    capsys):
    import shutil

    # A copy: the shared fixture is read-only.
    copy = tmp_path / "runs" / finished_search.name
    shutil.copytree(finished_search.search_dir, copy)
    record = json.loads((copy / "search.json").read_text())
    record["identity"]["constraints"] = [{"metric": "ssim_structure", "bound": "min",
                                          "value": 2.0}]
    (copy / "search.json").write_text(json.dumps(record))
    rc = main(["best", finished_search.name, "--storage", str(tmp_path / "runs"),
               "--tracking-uri", finished_search.tracking_uri])
    first = capsys.readouterr().out.splitlines()[0]
    assert rc == 1 and first.startswith("no feasible checkpoint: none meets ssim_structure ≥ 2;")


# --- warm starts ----------------------------------------------------------------------------

def test_a_warm_start_from_a_missing_search_is_one_line_exit_2(tmp_path, capsys):
    space = _space(tmp_path, None, name="b", num_samples=2)
    rc = main(["run", str(space), "--storage", str(tmp_path / "runs"), "--warm-start", "nope",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no search named 'nope'" in err
    assert not (tmp_path / "runs" / "b").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_warm_started_search_starts_with_the_old_searchs_best(tmp_path, local_ray):
    from stain_search import tracking
    from stain_search.search import run_search
    from stain_search.warm_start import ATTR, plan_warm_start

    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    a = _space(tmp_path, None, name="a", num_samples=2, max_concurrent=1, pruner="none",
               epochs=2, search_extra=", enqueue: [{loss.lambda_cycle: 2}, {loss.lambda_cycle: 40}]")
    run_search(a, storage=storage, tracking_uri=uri, verbose=0)
    old = select_dir(SearchDir.of(storage, "a"), tracking_uri=uri, per_trial=True)
    best_first = [c.params["loss.lambda_cycle"] for c in old.candidates]
    assert sorted(best_first) == [2, 40]

    # B searches one more key, which A lacked: it takes B's default (0.5). B also
    # has a constraint every trial meets: the driver tells it and tags the runs.
    b = _space(tmp_path, "[{metric: ssim_structure, min: -1.0}]", name="b", num_samples=2,
               max_concurrent=1, pruner="none", epochs=1,
               extra_space="  loss.lambda_identity: {distribution: uniform, "
                           "low: 0.0, high: 1.0}\n")
    said: list[str] = []
    outcome = run_search(b, storage=storage, tracking_uri=uri, warm_start="a", verbose=0,
                         say=said.append)
    trials = open_study("b", storage / "b" / "study.journal").trials
    assert [t.params["loss.lambda_cycle"] for t in trials[:2]] == best_first
    assert [t.params["loss.lambda_identity"] for t in trials[:2]] == [0.5, 0.5]
    assert [t.user_attrs[ATTR] for t in trials[:2]] == [f"a #{c.number}" for c in old.candidates]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [is_feasible(t) for t in trials] == [True, True]
    client = tracking.client(uri)
    runs = tracking.trial_runs(client, client.get_experiment_by_name("b").experiment_id, search="b",
                               search_id=outcome.record.search_id)
    assert {r.data.tags.get(tracking.FEASIBLE) for r in runs} == {"true"}
    assert {r.data.tags.get(ATTR) for r in runs} == {f"a #{c.number}" for c in old.candidates}
    assert outcome.record.warm_start["search"] == "a"
    assert outcome.record.warm_start["enqueued"] == 2
    assert SearchDir.of(storage, "b").read_record().warm_start["enqueued"] == 2
    assert any(line.startswith("warm start from 'a': 2 of its 2") for line in said)
    assert any("loss.lambda_identity: not in 'a'" in line for line in said)

    # A narrower space drops the trial outside it, and says so.
    narrow = yaml.safe_load(b.read_text())
    narrow["name"] = "c"
    narrow["space"]["loss.lambda_cycle"]["high"] = 20
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(narrow))
    plan = plan_warm_start(load_space(tmp_path / "c.yaml"), SearchDir.of(storage, "a"),
                           limit=5, tracking_uri=uri)
    assert [p.params["loss.lambda_cycle"] for p in plan.points] == [2]
    assert len(plan.dropped) == 1 and "loss.lambda_cycle = 40" in plan.dropped[0]
    assert "outside this space (1..20)" in plan.dropped[0]


def test_the_study_is_told_the_best_checkpoint_that_meets_the_constraints(tmp_path):
    """Issue 25, item 2: the trial's best epoch on the objective (epoch 2) fails
    the space's constraints, epoch 1 meets them: the study is told epoch 1's
    value, as the deploy rule would deploy it; a trial no epoch of which meets
    them is told its best, with its violations (infeasible)."""
    from stain_search.checkpoint import write_checkpoint
    from stain_search.search import constraint_values, deploy_values

    spec = load_space(_space(tmp_path, SSIM_MIN))
    sdir = SearchDir.of(tmp_path / "runs", spec.name)
    sdir.create(spec)
    metrics = {0: {1: (5.0, 0.7, 0.01), 2: (3.0, 0.4, 0.01)},  # trial: epoch: fd, ssim, area
               1: {1: (6.0, 0.5, 0.01), 2: (4.0, 0.5, 0.20)}}
    for number, epochs in metrics.items():
        for epoch, (fd, ssim, area) in epochs.items():
            write_checkpoint(sdir.trial(number) / f"checkpoint_epoch_{epoch:04d}",
                             state={"w": epoch},
                             meta={"epoch": epoch, "metrics": {
                                 "fd_random": fd, "frechet": fd, "ssim_structure": ssim,
                                 "stain_area_error": area, "epoch": epoch}})
    assert deploy_values(sdir, spec, 0) == [5.0]  # not epoch 2's 3.0: it fails ssim ≥ 0.6
    assert constraint_values(sdir, spec, 0) == pytest.approx([-0.1, -0.04])
    assert deploy_values(sdir, spec, 1) == [4.0]  # none feasible: its best, told infeasible
    assert max(constraint_values(sdir, spec, 1)) > 0
