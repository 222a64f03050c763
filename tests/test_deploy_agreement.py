"""One answer to "which model do I deploy?" (issue 12): the run's closing
summary, summary.json, `best` (its first row), `report` (its "chosen" mark)
and `export`'s default all name the same trial × epoch — the deploy rule of
stain_search.deploy.select."""

from __future__ import annotations

import json

import pytest

from stain_search.analysis.load import load_search
from stain_search.analysis.report import analyse
from stain_search.cli import main
from stain_search.deploy.export import export_search
from stain_search.deploy.select import select
from stain_search.summary import format_summary

pytestmark = pytest.mark.slow


def test_every_verb_names_the_same_checkpoint(finished_search, tmp_path, capsys):
    fs = finished_search
    storage = fs.root / "runs"
    rule = select(fs.name, storage=storage, tracking_uri=fs.tracking_uri).best()
    named = {"rule": (rule.trial, rule.epoch)}

    best = fs.outcome.selection.best()
    named["run's closing summary"] = (best.trial, best.epoch)
    assert f"{best.trial} at epoch {best.epoch}" in format_summary(
        fs.outcome.selection, tracking_uri=fs.outcome.tracking_uri)
    deploy = json.loads((fs.search_dir / "summary.json").read_text())["deploy"]
    named["summary.json"] = (deploy["trial"], deploy["epoch"])

    assert main(["best", fs.name, "--storage", str(storage), "--tracking-uri",
                 fs.tracking_uri, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["candidates"][0]
    named["best (first row)"] = (first["trial"], first["epoch"])

    analysis = analyse(load_search(fs.name, storage=storage, tracking_uri=fs.tracking_uri))
    named["report (chosen)"] = (analysis.chosen, analysis.chosen_epoch)

    exported = export_search(fs.name, storage=storage, tracking_uri=fs.tracking_uri,
                             out=tmp_path / "export", register=False, portable="none")
    named["export (default)"] = (exported.candidate.trial, exported.candidate.epoch)
    assert len(set(named.values())) == 1, named
    # The rule is the best epoch among kept checkpoints, not the trial's last epoch.
    values = [c.metrics[fs.outcome.selection.objectives[0][0]]
              for c in fs.outcome.selection.candidates]
    assert rule.metrics[fs.outcome.selection.objectives[0][0]] == min(values)
