"""The seams without Ray: the Pareto pruner, the search record and identity,
the driver lock, and which modules may import which."""

from __future__ import annotations

import ast
import json
import multiprocessing
import time
from pathlib import Path

import pytest

from conftest import tiny_space_yaml
from stain_search.context import Pruning
from stain_search.errors import ConfigError
from stain_search.lock import DriverLock, SearchRunning, is_locked, read_driver
from stain_search.preflight import check_search_dir, resolve_budget
from stain_search.search_dir import SearchDir, SearchRecord, identity_of
from stain_search.spaces import Objective, load_space
from stain_search.study import TrialPruning, create_study, median_prunes, serve_study

ROOT = Path(__file__).resolve().parents[1]
PARETO = [Objective("fd_random", "min"), Objective("ssim_structure", "max")]


def _pareto_space(tmp_path, *, name="pareto", pruner="median", extra=""):
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_space_yaml(
        name=name, pruner=pruner, search_extra=extra,
        objective="[{metric: frechet, mode: min}, {metric: ssim_structure, mode: max}]")
        .replace("grace_period: 1, min_trials: 2", "grace_period: 1, min_trials: 2, "
                 "metric: ssim_structure"))
    return path


# --- defect 6: a Pareto search's pruner really prunes -----------------------------------

def test_pareto_median_rule_prunes_the_worse_half_and_the_study_says_pruned(tmp_path):
    spec = load_space(_pareto_space(tmp_path))
    pruning = Pruning.of(spec.search.early_stopping, spec.objectives)
    assert pruning.metric == "ssim_structure" and pruning.mode == "max"
    assert pruning.multi_objective
    journal = tmp_path / "study.journal"
    study = create_study(spec, journal)
    for value in (0.8, 0.7, 0.6):  # three finished trials with good structure
        t = study.ask()
        for epoch in (1, 2, 3):
            study._storage.set_trial_intermediate_value(t._trial_id, epoch, value)
        study.tell(t, [1.0, value])
    good, bad = study.ask(), study.ask()
    # The trials reach the study as on a cluster: through the driver's proxy.
    with serve_study(journal, name=spec.name, host="127.0.0.1") as access:
        p_good = TrialPruning(access, good._trial_id, pruning)
        p_bad = TrialPruning(access, bad._trial_id, pruning)
        assert not p_bad.should_prune({"ssim_structure": 0.1}, epoch=1)  # grace period
        assert p_bad.should_prune({"ssim_structure": 0.2}, epoch=2)  # below the median 0.7
        assert not p_good.should_prune({"ssim_structure": 0.75}, epoch=2)
    assert study._storage.get_trial(bad._trial_id).intermediate_values == {1: 0.1, 2: 0.2}


def test_median_rule_waits_for_min_trials(tmp_path):
    spec = load_space(_pareto_space(tmp_path))
    pruning = Pruning.of(spec.search.early_stopping, spec.objectives)
    study = create_study(spec, tmp_path / "study.journal")
    t = study.ask()
    study._storage.set_trial_intermediate_value(t._trial_id, 2, 0.9)
    study.tell(t, [1.0, 0.9])  # one complete trial; min_trials is 2
    bad = study.ask()
    study._storage.set_trial_intermediate_value(bad._trial_id, 2, 0.0)
    assert not median_prunes(study, bad._trial_id, pruning=pruning, step=2)


def test_pareto_with_successive_halving_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="successive halving.*Pareto"):
        load_space(_pareto_space(tmp_path, pruner="successive_halving"))


def test_nsga2_that_would_only_draw_its_random_generation_is_refused(tmp_path):
    path = tmp_path / "nsga.yaml"
    path.write_text(tiny_space_yaml(name="nsga", num_samples=8).replace(
        "algorithm: tpe", "algorithm: nsga2"))
    with pytest.raises(ConfigError, match="only draws its random first generation"):
        load_space(path)
    path.write_text(tiny_space_yaml(name="nsga", num_samples=8, search_extra=", population_size: 4")
                    .replace("algorithm: tpe", "algorithm: nsga2"))
    assert load_space(path).search.population_size == 4


def test_the_study_names_its_objectives(tmp_path):
    spec = load_space(_pareto_space(tmp_path))
    study = create_study(spec, tmp_path / "study.journal")
    assert study.metric_names == ["fd_random", "ssim_structure"]


# --- the record: identity vs budget (defect 8) ------------------------------------------

def test_budget_is_not_identity_and_resume_extends_it(tmp_path):
    space = tmp_path / "b.yaml"
    space.write_text(tiny_space_yaml(name="b", num_samples=2))
    spec = load_space(space)
    sdir = SearchDir(tmp_path / "runs" / "b")
    record = sdir.create(spec)
    assert record.search_id and len(record.search_id) == 32
    assert "num_samples" not in json.dumps(record.identity)
    more = load_space(space)
    more.search.num_samples = 5  # as --num-samples 5 does
    saved = check_search_dir(more, sdir, resume=True)  # not refused: budget only
    assert saved.search_id == record.search_id
    assert resolve_budget(more, saved, num_samples=None, max_concurrent=None).num_samples == 2
    assert resolve_budget(more, saved, num_samples=4, max_concurrent=None).num_samples == 4
    changed = load_space(space)
    changed.base["loss.lambda_identity"] = 0.1
    with pytest.raises(ConfigError, match="different base"):
        check_search_dir(changed, sdir, resume=True)
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        check_search_dir(spec, sdir, resume=False)


def test_record_round_trips_and_a_broken_one_is_one_line(tmp_path):
    space = tmp_path / "r.yaml"
    space.write_text(tiny_space_yaml(name="r"))
    spec = load_space(space)
    sdir = SearchDir(tmp_path / "r")
    record = sdir.create(spec)
    again = sdir.read_record()
    assert again == record and again.identity == identity_of(spec)
    assert [p.key for p in again.params] == [p.key for p in spec.params]
    assert again.objectives == spec.objectives
    sdir.record_file.write_text('{"name": "r"}')
    with pytest.raises(ConfigError, match="not a stain-search search record"):
        sdir.read_record()
    with pytest.raises(ConfigError, match="no search named 'nope'"):
        SearchDir(tmp_path / "nope").read_record()
    assert SearchRecord.new(spec).search_id != record.search_id


# --- the driver lock --------------------------------------------------------------------

def _hold(lock, driver, ready, done):
    with DriverLock(lock, driver, name="held"):
        ready.set()
        done.wait(30)


def test_a_second_driver_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):
    lock, driver = tmp_path / "driver.lock", tmp_path / "driver.json"
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(lock, driver, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        assert is_locked(lock)
        info = read_driver(driver)
        assert info.pid == proc.pid
        with pytest.raises(SearchRunning, match=rf"search 'held' is running \(pid {proc.pid} on"):
            with DriverLock(lock, driver, name="held"):
                pass
    finally:
        proc.kill()  # as SIGKILL: no clean exit
        proc.join(10)
    assert not is_locked(lock)  # the kernel dropped it
    with DriverLock(lock, driver, name="held") as held:
        assert read_driver(driver).pid == held.info.pid
    assert not driver.exists()


# --- what may import what ---------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("folder", ["analysis", "stain_search/deploy"])
def test_readers_do_not_import_the_ray_driver(folder):
    for path in sorted((ROOT / folder).glob("*.py")):
        assert "stain_search.search" not in _imports(path), path


def test_no_trial_re_reads_a_space_file():
    for path in sorted((ROOT / "trainables").glob("*.py")):
        text = path.read_text()
        assert "load_space" not in text and "read_yaml" not in text, path


def test_lock_heartbeat_is_fresh(tmp_path):
    with DriverLock(tmp_path / "l", tmp_path / "d.json", name="x"):
        time.sleep(0.1)
        assert read_driver(tmp_path / "d.json").heartbeat_age_s < 5


@pytest.mark.parametrize("module", ["errors", "yaml_file", "atomic", "config", "distributed",
                                    "pareto", "progress", "pbt"])
def test_the_foundation_imports_nothing_of_ours_but_errors(module):
    """(config reads its file through yaml_file, itself foundation.)"""
    ours = {m for m in _imports(ROOT / "stain_search" / f"{module}.py")
            if m.startswith("stain_search")}
    assert ours <= {"stain_search.errors", *(["stain_search.yaml_file"] if module == "config"
                                            else [])}, ours


def test_only_the_driver_starts_ray():
    for path in sorted((ROOT / "stain_search").rglob("*.py")) + sorted(ROOT.glob("analysis/*.py")):
        if path.name != "search.py":
            assert "ray.init(" not in path.read_text(), path
