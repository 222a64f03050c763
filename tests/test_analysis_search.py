"""The analysis on a real (tiny) finished search: the schema search.py and the
trainable actually write. Read-only on the shared ``finished_search``."""

from __future__ import annotations

import pytest

from stain_search import tracking
from stain_search.analysis.load import load_search
from stain_search.analysis.report import write_report

pytestmark = pytest.mark.slow  # makes the shared search if no other test has


def snapshot(fs) -> tuple:
    """What must not change: files of the search folder, artifacts of every run."""
    files = sorted((str(p.relative_to(fs.search_dir)), p.stat().st_size)
                   for p in fs.search_dir.rglob("*") if p.is_file())
    c = tracking.client(fs.tracking_uri)
    exp = tracking.find_experiment(c, fs.name)
    runs = c.search_runs([exp])
    return files, sorted((r.info.run_id, tuple(tracking.list_artifacts(c, r.info.run_id)))
                         for r in runs)


def test_real_search_frame_and_report(finished_search, tmp_path):
    fs = finished_search
    before = snapshot(fs)
    search = load_search(fs.name, storage=fs.search_dir.parent, tracking_uri=fs.tracking_uri)
    frame = search.frame
    assert frame["trial"].nunique() == 3
    assert set(frame["state"]) <= {"COMPLETE", "PRUNED", "FAIL"}
    assert "loss.lambda_cycle" in search.param_keys and search.is_log("loss.lambda_cycle")
    assert frame["loss.lambda_cycle"].dtype == float
    objective = search.objectives[0].metric
    assert objective in frame.columns and {"loss_D_X", "loss_D_Y", "loss_G"} <= set(frame.columns)
    # One row per trial × epoch: epochs are 1..n for each trial, none repeated.
    for _, rows in frame.groupby("trial"):
        assert list(rows["epoch"]) == list(range(1, len(rows) + 1))
    # The study's values are the deploy rule's: each trial's best epoch (the
    # kept checkpoints always include it), what the user will deploy by.
    for t in search.study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE":
            epochs = frame[frame["number"] == t.number].dropna(subset=[objective])
            assert epochs[objective].min() == pytest.approx(t.values[0])

    report = write_report(fs.name, storage=fs.search_dir.parent, tracking_uri=fs.tracking_uri,
                          out=tmp_path / "report.html", parquet=tmp_path / "t.parquet",
                          log_to_mlflow=False)
    assert report.html.is_file() and report.logged_to is None
    assert {"param_effects", "best_so_far", "loss_curves", "top_trials_images"} <= set(report.figures)
    assert all(p.stat().st_size > 5_000 for p in report.figures.values())
    assert "complete trial(s)" in report.analysis.importance_messages[0]  # 3 trials: too few
    assert snapshot(fs) == before  # nothing written into the shared search or its store
