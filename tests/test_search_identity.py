"""A search has an identity beyond its name (defects 1, 7 and 8 of issue 10).

Two searches of the same name run in two folders against one MLflow store, as
a team's server is: each gets its own parent run, its trials are tagged with
its own search id, and each names its own checkpoints. The second has a
different budget (which used to crash with MLflow's "Changing param values is
not allowed") and a space file without `name:` given `--name` (which used to
fail every trial, whose pruner re-read the file and opened the wrong study).
Then the first is resumed with a bigger budget: `--num-samples` extends it.
"""

from __future__ import annotations

import pytest

from conftest import tiny_space_yaml
from stain_search import tracking
from stain_search.deploy.select import select
from stain_search.search import run_search
from stain_search.study import open_study

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
NAME = "same"


def test_same_name_searches_in_one_store_never_share_runs(tmp_path):
    space = tmp_path / "same.yaml"
    space.write_text(tiny_space_yaml(name=NAME, num_samples=1, max_concurrent=1, pruner="none",
                                     epochs=1))  # four searches: identity, not training
    nameless = tmp_path / "no-name-here.yaml"  # file stem ≠ search name, no `name:` key
    nameless.write_text("\n".join(line for line in space.read_text().splitlines()
                                  if not line.startswith("name:")) + "\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a_runs, b_runs = tmp_path / "a" / "runs", tmp_path / "b" / "runs"
    a = run_search(space, storage=a_runs, tracking_uri=uri, verbose=0)
    b = run_search(nameless, name=NAME, storage=b_runs, tracking_uri=uri, num_samples=2,
                   verbose=0)
    assert a.record.search_id != b.record.search_id
    assert b.spec.name == NAME and b.selection.best() is not None

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(NAME)
    runs = c.search_runs([exp.experiment_id])
    parents = {r.data.tags[tracking.SEARCH_ID]: r for r in runs
               if r.data.tags.get(tracking.ROLE) == "search"}
    assert set(parents) == {a.record.search_id, b.record.search_id}  # one parent each
    for outcome, n_trials, folder in ((a, 1, a_runs), (b, 2, b_runs)):
        sid = outcome.record.search_id
        children = tracking.trial_runs(c, exp.experiment_id, search=NAME, search_id=sid)
        assert len(children) == n_trials
        assert {r.data.tags[tracking.PARENT] for r in children} == {parents[sid].info.run_id}
        best = outcome.selection.best()
        assert best.checkpoint.is_relative_to(folder)  # its own checkpoints, never the other's
        assert best.run_id in {r.info.run_id for r in children}
        chosen = select(NAME, storage=folder, tracking_uri=uri).best()
        assert (chosen.trial, chosen.epoch, chosen.run_id) == (best.trial, best.epoch, best.run_id)

    # Defect 8: the budget is not the identity; `--num-samples` extends a search.
    more = run_search(space, storage=a_runs, tracking_uri=uri, resume=True, num_samples=2,
                      verbose=0)
    assert more.record.search_id == a.record.search_id
    study = open_study(NAME, a_runs / NAME / "study.journal")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    children = tracking.trial_runs(c, exp.experiment_id, search=NAME, search_id=a.record.search_id)
    assert sorted(int(r.data.tags[tracking.OPTUNA_TRIAL]) for r in children) == [0, 1]
    assert more.record.budget.num_samples == 2
    again = run_search(space, storage=a_runs, tracking_uri=uri, resume=True, verbose=0)
    assert len(open_study(NAME, a_runs / NAME / "study.journal").trials) == 2  # nothing new
    assert again.record.budget.num_samples == 2  # the recorded budget
