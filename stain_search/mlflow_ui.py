"""The MLflow UI: links into it (the runs table, the compare view and the report
of a search, what `stain-search ui --search NAME` and the report print, and one
run's page), read from the store through :mod:`stain_search.tracking`; and the
environment its server runs in (:func:`ui_environment`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stain_search.tracking import (CONFIRMS_SEARCH, OBJECTIVE, ROLE, SEARCH_DIR, SEARCH_ID,
                                   TrackingError, client, trial_runs)


TOP_COMPARED = 10  # runs in the compare link: more make its plots unreadable


def ui_links(uri: str, search: str, *, base: str, top: int = TOP_COMPARED) -> dict[str, str]:
    """The links `stain-search ui --search NAME` prints: ``runs`` (the
    experiment's runs table, trial runs only, best first), ``compare`` (the
    compare view of the ``top`` best trials, best first) and ``report`` (the
    report page logged to the parent run, or the file ``stain-search report``
    writes). With several searches of one name, the newest.

    Trials are ranked by the first objective's best epoch value, as the
    report does; trials that logged none come last.
    """
    from urllib.parse import quote, urlencode

    c = client(uri)
    exp = c.get_experiment_by_name(search)
    if exp is None or exp.lifecycle_stage != "active":
        raise TrackingError(f"no search named {search!r} in {uri}: check --search and "
                            f"--tracking-uri (the store `stain-search run` wrote to)")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE}` = 'search'",
                            order_by=["attributes.start_time DESC"], max_results=100)
    # The newest search itself, not a confirmation nested under one.
    parent = next((r for r in parents if CONFIRMS_SEARCH not in r.data.tags), None)
    search_id = parent.data.tags.get(SEARCH_ID) if parent else None
    objectives = json.loads(parent.data.tags.get(OBJECTIVE, "[]")) if parent else []
    metric, mode = ((objectives[0]["metric"], objectives[0]["mode"]) if objectives else (None, "min"))
    runs = trial_runs(c, exp.experiment_id, search=search, search_id=search_id)
    ui = base.rstrip("/")

    def best(run: Any) -> float:
        values = [m.value for m in c.get_metric_history(run.info.run_id, metric)] if metric else []
        values = [v for v in values if np.isfinite(v)]
        if not values:
            return float("inf")
        return min(values) if mode == "min" else -max(values)

    ranked = sorted(runs, key=best)
    flt = f"tags.`{ROLE}` = 'trial'" + (f" and tags.`{SEARCH_ID}` = '{search_id}'" if search_id else "")
    # MLflow 3.17's UI takes its GenAI / model-training mode from this URL
    # parameter (else from the browser's last choice, GenAI at first), before
    # the experiment's kind tag: without it even /runs shows the GenAI sidebar.
    state = {"workflowType": "machine_learning", "searchFilter": flt}
    if metric:
        state.update(orderByKey=f"metrics.`{metric}`", orderByAsc="true" if mode == "min" else "false")
    links = {
        "runs": f"{ui}/#/experiments/{exp.experiment_id}/runs?{urlencode(state, quote_via=quote)}",
        "compare": (f"{ui}/#/compare-runs?runs="
                    f"{quote(json.dumps([r.info.run_id for r in ranked[:top]]))}"
                    f"&experiments={quote(json.dumps([exp.experiment_id]))}"
                    f"&workflowType=machine_learning"),
    }
    logged = parent is not None and "report/report.html" in {
        a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    if logged:
        links["report"] = f"{run_url(ui, exp.experiment_id, parent.info.run_id)}/artifacts/report/report.html"
    else:
        folder = parent.data.tags.get(SEARCH_DIR) if parent else None
        page = Path(folder) / "report.html" if folder else None
        links["report"] = (page.as_uri() if page is not None and page.is_file() else
                           f"not written yet: `stain-search report {search}` writes it")
    return links


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run (the UI's own hash route)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_environment() -> dict[str, str]:
    """The UI server's environment: MLflow's job runner off unless the user set
    it. Its huey consumers run GenAI jobs (LLM scorers, prompt optimisation)
    that a training search never submits; with them, one viewer was 11
    processes, ~2.7 GiB and ~50 s of CPU in its first 35 s on 2 cores,
    beside the training it shows (without: 2 processes, ~0.5 GiB, ~13 s)."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
