"""`stain-search report NAME`: what a search taught us, on one HTML page.

The page answers the seed's question — how λ and the other weights trade
fidelity to the target stain against keeping the tissue's structure — from
any finished or running search:

1. what mattered: parameter importance per objective (``analysis.importance``)
   and the direction of each effect (Spearman's ρ);
2. each parameter against each objective and ``ssim_structure``;
3. the Pareto front (multi-objective searches) with the chosen trial;
4. search progress (best objective against compute) and training losses;
5. the top trials side by side on the same validation tiles;
6. flags: structure lost while realism improved, mode collapse;
7. a table of the top trials, each linked to its MLflow run (and, where the
   space has `constraints:`, whether each met them).

The page is self-contained (PNG figures embedded as base64, no script, no
network), so it can be mailed or archived. The PNGs are also kept beside it
(``<page>_figures/``) and logged to the search's parent MLflow run under
``report/``.
"""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stain_search import mlflow_ui, tracking
from stain_search.atomic import check_replaceable
from stain_search.errors import StainSearchError

from stain_search.analysis import flags as flagging
from stain_search.analysis import plots
from stain_search.analysis.page_text import CAPTIONS, CSS
from stain_search.analysis.importance import EVALUATORS, NotEnoughTrials, importances, trends
from stain_search.analysis.load import Search, load_search, save_parquet, trial_table
from stain_search.pareto import deploy_order, pareto_mask

log = logging.getLogger(__name__)

DEFAULT_UI = "http://127.0.0.1:5000"  # where `stain-search ui` serves a local store
TOP_TRIALS = 10  # rows of the table
GRID_TRIALS = 4  # columns of the image grid
GRID_TILES = 4
CLEAR_TREND = 0.3  # |Spearman ρ| below this is reported as no clear trend


@dataclass
class Analysis:
    """The numbers behind the page (also what a notebook would want)."""

    table: pd.DataFrame  # one row per trial, ranked best first
    front: np.ndarray  # bool per table row: on the Pareto front (multi-objective)
    chosen: str | None  # the trial to deploy
    importance: dict[str, dict[str, dict[str, float]]]  # evaluator → metric → param → share
    importance_messages: list[str]
    trends: list[dict]
    flags: list[flagging.Flag]
    chosen_epoch: int | None = None  # its epoch (the deploy rule picks a trial × epoch)


@dataclass
class Report:
    html: Path
    figures: dict[str, Path]
    parquet: Path | None
    analysis: Analysis
    logged_to: str | None = None  # the parent run the figures went to
    notes: list[str] = field(default_factory=list)


# --- the numbers -----------------------------------------------------------------

def rank_trials(table: pd.DataFrame, objectives) -> tuple[pd.DataFrame, np.ndarray]:
    """Complete trials first, by the deploy rule's order (multi: Pareto front, then the
    first objective; stain_search.pareto);
    then the others (pruned, running, failed) by their last first-objective value."""
    metrics = [o.metric for o in objectives]
    modes = [o.mode for o in objectives]
    have = all(m in table.columns for m in metrics)
    values = table[metrics].to_numpy(dtype=float) if have else np.full((len(table), 1), np.nan)
    scored = np.isfinite(values).all(axis=1)
    complete = (table["state"] == "COMPLETE").to_numpy() & scored
    idx_c = np.flatnonzero(complete)
    order = list(idx_c[deploy_order(values[idx_c], modes)]) if idx_c.size else []
    rest = np.flatnonzero(~complete)
    if have:
        first = values[rest, 0] * (1.0 if modes[0] == "min" else -1.0)
        rest = rest[np.argsort(np.where(np.isfinite(first), first, np.inf), kind="stable")]
    order += list(rest)
    front = np.zeros(len(table), dtype=bool)
    if idx_c.size:
        front[idx_c[pareto_mask(values[idx_c], modes)]] = True
    ranked = table.iloc[order].reset_index(drop=True)
    return ranked, front[order]


def effect_metrics(search: Search) -> list[str]:
    """What each parameter is plotted against: the objectives, plus the structure
    check (ssim_structure) and the Fréchet metric when they are not objectives."""
    metrics = [o.metric for o in search.objectives]
    fd = flagging.frechet_metric(search.frame.columns)
    for extra in (fd, "ssim_structure"):
        if extra and extra not in metrics and extra in search.frame.columns:
            metrics.append(extra)
    return metrics


def analyse(search: Search) -> Analysis:
    table = trial_table(search.frame, params=search.param_keys, objectives=search.objectives)
    if table.empty:
        return Analysis(table, np.zeros(0, dtype=bool), None, {}, [], [], [])
    table, front = rank_trials(table, search.objectives)
    chosen, chosen_epoch = deploy_choice(search)
    scores, messages = {}, []
    for name in EVALUATORS:
        try:
            scores[name] = importances(search.study, search.objectives, evaluator=name)
        except NotEnoughTrials as err:
            if str(err) not in messages:
                messages.append(str(err))
    found = trends(table, params=search.param_keys, metrics=effect_metrics(search))
    flags = flagging.all_flags(search.frame, table)
    return Analysis(table, front, chosen, scores, messages, found, flags,
                    chosen_epoch=chosen_epoch)


def deploy_choice(search: Search) -> tuple[str | None, int | None]:
    """The checkpoint `best` and `export` name (stain_search.deploy.select's rule):
    the report marks the same trial × epoch."""
    from stain_search.deploy.select import select_dir

    best = select_dir(search.sdir, tracking_uri=search.tracking_uri).best()
    return (best.trial, best.epoch) if best is not None else (None, None)


# --- the figures ---------------------------------------------------------------------

def colour_param(search: Search, analysis: Analysis) -> str | None:
    """The numeric parameter that mattered most (for colouring loss curves)."""
    numeric = [k for k in search.param_keys if not search.is_categorical(k)]
    for per_metric in analysis.importance.values():
        first = next(iter(per_metric.values()), {})
        for key in first:
            if key in numeric:
                return key
    return numeric[0] if numeric else None


def make_figures(search: Search, analysis: Analysis, folder: Path, *,
                 images: bool = True, grid_trials: int = GRID_TRIALS,
                 grid_tiles: int = GRID_TILES) -> tuple[dict[str, Path], list[str]]:
    """Write every figure as a PNG into ``folder``: name → path, and notes on
    what could not be drawn."""
    table, figures, notes = analysis.table, {}, []
    logs = [k for k in search.param_keys if search.is_log(k)]
    cats = [k for k in search.param_keys if search.is_categorical(k)]

    def keep(name: str, fig) -> None:
        figures[name] = plots.save(fig, folder / f"{name}.png")

    if analysis.importance:
        keep("importance", plots.importance_bars(analysis.importance, objectives=search.objectives))
    keep("param_effects", plots.param_effects(table, params=search.param_keys,
                                              metrics=effect_metrics(search), log_params=logs,
                                              categorical=cats, chosen=analysis.chosen,
                                              ranges={p.key: (p.low, p.high)
                                                      for p in search.params}))
    if search.multi_objective:
        feasible = feasibility(search)
        keep("pareto", plots.pareto(
            table, objectives=search.objectives, front=analysis.front, chosen=analysis.chosen,
            constraints=search.constraints,
            feasible=np.array([feasible.get(int(n), True) is not False for n in table["number"]])
            if feasible else None))
    keep("best_so_far", plots.best_so_far(search.frame, objectives=search.objectives))
    colour = colour_param(search, analysis)
    keep("loss_curves", plots.loss_curves(search.frame, colour_by=colour,
                                          log_colour=colour is not None and search.is_log(colour),
                                          chosen=analysis.chosen))
    if plots.schedule_keys(search.frame):  # a PBT/PB2 search
        keep("schedules", plots.schedules(search.frame, chosen=analysis.chosen,
                                          log_keys=[k for k in plots.schedule_keys(search.frame)
                                                    if search.is_log(k)]))
    if search.confirmation is not None and search.confirmation.finished:
        keep("confirmation", plots.confirmation(search.confirmation))
    if images:
        grid, why = top_trials_grid(search, analysis, n=grid_trials, tiles=grid_tiles)
        if grid is not None:
            keep("top_trials_images", grid)
        notes += why
    return figures, notes


def top_trials_grid(search: Search, analysis: Analysis, *, n: int, tiles: int):
    from stain_search.analysis.samples import top_trial_outputs

    table = analysis.table
    pick = table[table["state"] == "COMPLETE"].head(n)
    if pick.empty:
        pick = table[table["epochs"].notna()].head(n)
    if pick.empty:
        return None, ["image grid: no trial has a checkpoint yet"]
    trials = [{"trial": r["trial"], "run_id": r["run_id"], "label": f"#{r['number']}"}
              for _, r in pick.iterrows()]
    try:
        samples = top_trial_outputs(search, trials, n_tiles=tiles)
    except StainSearchError as err:  # e.g. the dataset is not on this machine
        return None, [f"image grid left out: {err}"]
    if not samples.outputs:
        return None, samples.notes or ["image grid: no checkpoint could be loaded"]
    return plots.image_grid(samples.inputs, samples.outputs, samples.targets), samples.notes


# --- the page ---------------------------------------------------------------------------

def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    """A table cell: 4 significant digits, a dash for missing values."""
    try:
        if value is None or pd.isna(value):
            return "—"
    except (TypeError, ValueError):  # lists and the like: not missing
        pass
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return html.escape(str(value))


def feasibility(search: Search) -> dict[int, bool | None]:
    """Optuna number → whether the trial met the space's constraints (the
    study's ``constraints`` attribute); {} for a search without constraints."""
    from stain_search.study import is_feasible

    if search.study is None:
        return {}
    found = {t.number: is_feasible(t) for t in search.study.get_trials(deepcopy=False)}
    return found if any(v is not None for v in found.values()) else {}


def trials_table_html(search: Search, analysis: Analysis, *, ui: str, top: int) -> str:
    table = analysis.table.head(top)
    feasible = feasibility(search)
    metrics = effect_metrics(search) + (["output_diversity"]
                                        if "output_diversity" in table.columns else [])
    flagged: dict[str, list[str]] = {}
    for f in analysis.flags:
        flagged.setdefault(f.trial, []).append(f.kind.replace("_", " "))
    head = (["rank", "trial", "state", "epochs", "best epoch"] + search.param_keys
            + [plots.metric_label(m) for m in metrics] + (["feasible"] if feasible else [])
            + ["flags"])
    left = {1, 2, len(head) - 1}
    rows = []
    for i, r in table.iterrows():
        name = html.escape(str(r["trial"]))
        if search.experiment_id and isinstance(r["run_id"], str):
            url = mlflow_ui.run_url(ui, search.experiment_id, r["run_id"])
            name = f'<a href="{html.escape(url)}">{name}</a>'
        cells = [str(i + 1), f"{name} (#{_fmt(r['number'])})", _fmt(r["state"] or r["status"]),
                 _fmt(r.get("epochs")), _fmt(r.get("best_epoch"))]
        cells += [_fmt(r.get(k)) for k in search.param_keys]
        cells += [_fmt(r.get(m)) for m in metrics]
        if feasible:  # the space's constraints: ✗ marks a trial that misses one
            number = r["number"]
            ok = (feasible.get(int(number)) if isinstance(number, (int, float, np.number))
                  and number == number else None)
            cells.append({True: "yes", False: "✗ no"}.get(ok, "-"))
        cells.append(html.escape(", ".join(sorted(set(flagged.get(r["trial"], [])))) or ""))
        cls = ' class="chosen"' if r["trial"] == analysis.chosen else ""
        rows.append(f"<tr{cls}>" + "".join(
            f'<td class="l">{c}</td>' if j in left else f"<td>{c}</td>"
            for j, c in enumerate(cells)) + "</tr>")
    header = "".join(f'<th class="l">{html.escape(h)}</th>' if j in left
                     else f"<th>{html.escape(h)}</th>" for j, h in enumerate(head))
    return (f'<div class="wide"><table><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def importance_html(search: Search, analysis: Analysis) -> str:
    parts = [f'<p class="note">{html.escape(m)}</p>' for m in analysis.importance_messages]
    for name, per_metric in analysis.importance.items():
        for metric, scores in per_metric.items():
            ranked = ", ".join(f"<code>{html.escape(k)}</code> {v:.2f}" for k, v in scores.items())
            parts.append(f"<p><b>{html.escape(name)}</b>, {html.escape(plots.metric_label(metric))}"
                         f": {ranked}</p>")
    if analysis.trends:
        items = []
        for t in analysis.trends:
            direction = plots.metric_directions().get(t["metric"])
            better = (t["rho"] < 0) == (direction == "min")
            if abs(t["rho"]) < CLEAR_TREND:
                effect = "no clear trend in "
            else:
                effect = ("higher " if t["rho"] > 0 else "lower ") + (
                    "" if direction is None else "(better) " if better else "(worse) ")
            items.append(f"<li>more <code>{html.escape(t['param'])}</code> → {effect}"
                         f"{html.escape(plots.metric_label(t['metric']))}: "
                         f"Spearman ρ = {t['rho']:+.2f} over {t['n']} complete trials</li>")
        parts.append(f"<p>Direction of each effect (Spearman rank correlation; |ρ| below "
                     f"{CLEAR_TREND} is no clear trend — a valley or a peak, such as a best "
                     f"middle λ, shows as importance without a trend):</p><ul>"
                     + "".join(items) + "</ul>")
    return "".join(parts) or '<p class="note">No complete trials yet.</p>'


def confirmation_html(conf) -> str:
    """The confirmation's table (mean ± std per configuration) and its verdict."""
    e = html.escape

    def pm(c, m: str) -> str:
        if m not in c.mean:
            return "-"
        std = c.std.get(m, float("nan"))
        return f"{_fmt(c.mean[m])} ± {_fmt(std)}" if np.isfinite(std) else _fmt(c.mean[m])

    first = conf.objectives[0][0]
    head = ('<tr><th>rank</th><th class="l">trial</th><th>seeds</th>'
            + "".join(f"<th>{e(plots.metric_label(m))} mean ± std</th>" for m in conf.metrics)
            + f"<th>search's {e(first)}</th></tr>")
    chosen = ' class="chosen"'
    rows = "".join(
        f"<tr{chosen if c.rank == 1 else ''}><td>{c.rank or '-'}</td>"
        f'<td class="l">{e(c.trial)} (#{_fmt(c.number)})</td><td>{c.n}'
        f"{f' ({c.failed} failed)' if c.failed else ''}</td>"
        + "".join(f"<td>{e(pm(c, m))}</td>" for m in conf.metrics)
        + f"<td>{_fmt(c.original.get(first))}</td></tr>" for c in conf.configs)
    verdict = ("" if conf.holds is None else
               f"<p>The search's ranking <b>{'holds' if conf.holds else 'does not survive'}"
               f"</b> over train.seed {e(', '.join(map(str, conf.seeds)))}.</p>")
    notes = "".join(f"<li>{e(n)}</li>" for n in conf.notes)
    deploy = ("" if conf.deploy is None else
              f'<p class="note">After the confirmation, deploy <b>{e(conf.deploy.trial)}</b> at '
              f"epoch {conf.deploy.epoch} (<code>stain-search export {e(conf.search)} "
              f"--confirmed</code>).</p>")
    return (f"<p>{conf.finished} of {conf.expected} re-training runs finished.</p>{verdict}"
            f'<div class="wide"><table>{head}{rows}</table></div>'
            + (f"<ul>{notes}</ul>" if notes else "") + deploy)


def render_html(search: Search, analysis: Analysis, figures: dict[str, Path], *,
                ui: str, top: int, notes: list[str], parquet: Path | None) -> str:
    e = html.escape
    counts = analysis.table["state"].fillna(analysis.table["status"]).value_counts() \
        if not analysis.table.empty else pd.Series(dtype=int)
    states = ", ".join(f"{n} {str(s).lower()}" for s, n in counts.items()) or "no trials yet"
    objectives = ", ".join(plots.objective_label(o) for o in search.objectives)
    chosen = analysis.table[analysis.table["trial"] == analysis.chosen] if analysis.chosen else None
    sections = [f"<h1>Search <code>{e(search.name)}</code></h1>",
                f'<p class="meta">{e(states)} · objective{"s" if search.multi_objective else ""}: '
                f"{e(objectives)} · searched: {e(', '.join(search.param_keys))}<br>"
                f"folder: <code>{e(str(search.search_dir))}</code> · MLflow: <code>"
                f"{e(search.tracking_uri)}</code> · written "
                f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>"]
    if chosen is not None and not chosen.empty:
        r = chosen.iloc[0]
        vals = ", ".join(f"{o.metric} = {_fmt(r.get(o.metric))}" for o in search.objectives)
        params = ", ".join(f"{k} = {_fmt(r.get(k))}" for k in search.param_keys)
        sections.append(f'<p class="note">Chosen, the checkpoint to deploy: <b>'
                        f'{e(str(r["trial"]))}</b> (Optuna #{_fmt(r["number"])}) at epoch '
                        f"{_fmt(analysis.chosen_epoch)} (the rule of <code>stain-search best"
                        f"</code>); trial's last values {vals}; {params}.</p>")

    def figure(name: str, title: str) -> None:
        if name in figures:
            sections.append(f"<h2>{e(title)}</h2><figure>{_img(figures[name], title)}"
                            f"<figcaption>{e(CAPTIONS[name])}</figcaption></figure>")

    if search.confirmation is not None:
        sections.append("<h2>Confirmed over seeds</h2>" + confirmation_html(search.confirmation))
        figure("confirmation", "Top configurations over seeds")
    sections.append("<h2>What mattered</h2>" + importance_html(search, analysis))

    figure("importance", "Parameter importance")
    figure("param_effects", "Parameters against objectives")
    figure("pareto", "Pareto front")
    figure("top_trials_images", "Top trials, same tiles")
    figure("best_so_far", "Search progress")
    figure("schedules", "Schedules (population-based training)")
    figure("loss_curves", "Training losses")
    sections.append("<h2>Flags</h2>")
    if analysis.flags:
        sections += [f'<div class="flag"><b>{e(f.trial)}</b> — {e(f.kind.replace("_", " "))}'
                     f"{'' if f.epoch is None else f' (epoch {f.epoch})'}: {e(f.message)}</div>"
                     for f in analysis.flags]
    else:
        sections.append("<p>No trial lost structure while gaining realism, and none collapsed "
                        "to one output.</p>")
    sections.append(f"<h2>Top trials</h2><p>Links open the trial's MLflow run (start the UI "
                    f"with <code>stain-search ui</code>; links point to {e(ui)}).</p>"
                    + trials_table_html(search, analysis, ui=ui, top=top))
    extra = [f"<li>{e(n)}</li>" for n in notes]
    if parquet is not None:
        extra.append(f"<li>All trials × epochs as Parquet: <code>{e(str(parquet))}</code> "
                     f"(<code>pandas.read_parquet</code>)</li>")
    if extra:
        sections.append("<h2>Notes</h2><ul>" + "".join(extra) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"{GENERATOR}\">"
            f"<title>stain-search report: {e(search.name)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


GENERATOR = "stain-search report"  # in every page's <head>: the mark of a page we may replace


def is_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:  # a folder, or unreadable: not ours
        return False
    # Pages from before the generator tag carry the title alone.
    return f'<meta name="generator" content="{GENERATOR}">' in head or \
        "<title>stain-search report: " in head


def ui_for(uri: str, ui: str | None) -> str:
    if ui:
        return ui
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_UI


def write_report(name: str, *, storage: str | Path | None = None,
                 tracking_uri: str | None = None, out: str | Path | None = None,
                 parquet: str | Path | None = None, top: int = TOP_TRIALS,
                 ui: str | None = None, log_to_mlflow: bool = True,
                 images: bool = True) -> Report:
    """Load the search, analyse it, write the page (and Parquet), log the figures."""
    search = load_search(name, storage=storage, tracking_uri=tracking_uri)
    out = Path(out) if out else search.sdir.report_file
    if out.exists() or out.is_symlink():  # an earlier report is replaced; nothing else is
        check_replaceable(out, ours=is_report, what="a report page `stain-search report` wrote")
    parquet_path = save_parquet(search.frame, parquet) if parquet else None
    analysis = analyse(search)
    folder = out.with_name(f"{out.stem}_figures")
    figures, notes = ({}, ["no trial has logged anything yet"]) if analysis.table.empty else \
        make_figures(search, analysis, folder, images=images)
    page = render_html(search, analysis, figures, ui=ui_for(search.tracking_uri, ui), top=top,
                       notes=notes, parquet=parquet_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    report = Report(html=out, figures=figures, parquet=parquet_path, analysis=analysis, notes=notes)
    if log_to_mlflow and search.parent_run_id:
        c = tracking.client(search.tracking_uri)
        tracking.log_files(c, search.parent_run_id, [*figures.values(), out], artifact_path="report")
        report.logged_to = search.parent_run_id
    return report
