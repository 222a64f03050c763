"""The search's closing summary: ``summary.json`` and the lines the run ends with.

Both name the checkpoint the deploy rule picks (``stain_search.deploy.select``),
with its metrics, parameters, folder and MLflow run; a Pareto search also
lists its front.
"""

from __future__ import annotations

from typing import Any


def summary_record(selection, elapsed_s: float) -> dict[str, Any]:
    best = selection.best()
    return {"search": selection.search, "search_id": selection.search_id,
            "objectives": [{"metric": m, "mode": mode} for m, mode in selection.objectives],
            "rule": selection.rule,
            "deploy": None if best is None else {
                "trial": best.trial, "number": best.number, "epoch": best.epoch,
                "state": best.state, "metrics": best.metrics, "params": best.params,
                "checkpoint": selection.where(best), "run_id": best.run_id},
            "front": [{"trial": c.trial, "number": c.number, "epoch": c.epoch}
                      for c in selection.front] if selection.multi_objective else None,
            "elapsed_s": elapsed_s}


def format_summary(selection, *, tracking_uri: str) -> str:
    """The run's closing lines for ``selection`` (``deploy.select.Selection``)."""
    best = selection.best()
    if best is None and selection.no_feasible_line():
        return (f"search {selection.search!r}: {selection.no_feasible_line()}; "
                f"`stain-search best {selection.search}` lists them")
    if best is None:
        why = "; ".join(f"{n} {r}" for r, n in selection.dropped.items()) or "no checkpoints"
        return (f"search {selection.search!r}: no checkpoint to deploy ({why}); "
                f"`stain-search status {selection.search}` shows the trials")
    goal = ", ".join(f"{m} {mode}" for m, mode in selection.objectives)
    vals = ", ".join(f"{m}={best.metrics[m]:.4g}" for m, _ in selection.objectives)
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in best.params.items())
    lines = [f"search {selection.search!r} ({goal}), deploy rule: {selection.rule}",
             f"  deploy: #{best.number} {best.trial} at epoch {best.epoch}: {vals}  [{params}]",
             f"      checkpoint: {selection.where(best)}",
             f"      mlflow run: {best.run_id}"]
    if selection.multi_objective:
        lines.append(f"  Pareto front: {len(selection.front)} checkpoint(s) "
                     f"(`stain-search best {selection.search}` lists them)")
    lines.append(f"MLflow store: {tracking_uri}  (stain-search ui)")
    return "\n".join(lines)
