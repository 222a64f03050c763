"""A search read back as tidy data: one pandas row per trial × epoch.

Two sources, joined on the Optuna trial number:

- MLflow, through :mod:`stain_search.tracking`: each trial's child run —
  params (every config key, dotted, stored as strings: typed again here
  against the config dataclasses), each epoch's metrics (step = epoch), the
  ``stain_search.status`` tag and the run id.
- The Optuna study, ``<search_dir>/study.journal``: each trial's state
  (COMPLETE, PRUNED, FAIL, RUNNING) and its typed parameters. A trial the
  study knows but MLflow does not (it failed before its run opened) still
  gets a row, with no epoch; a run the study does not know takes its state
  from its MLflow status (finished → COMPLETE, ...).

It reads a running search as well as a finished one: unfinished trials bring
the epochs they have logged so far. Nothing is written anywhere.

``Search.frame`` follows Wickham's "tidy data" (J. Stat. Softw., 2014), one
observation per row::

    trial  number  run_id  status  state  epoch  time  <param>...  <metric>...

where ``<param>`` are the searched keys (``loss.lambda_cycle``, ...) and
``<metric>`` everything the trial logged (losses, ``fd_random`` or ``fid``,
``ssim_structure``, ``output_diversity``, timings); NaN where an epoch did not
log a metric (``train.eval_every`` > 1). ``frame.attrs`` carries the search
name, objectives and parameter list, and survives the Parquet file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from stain_search import config as cfg
from stain_search import tracking
from stain_search.errors import ConfigError
from stain_search.search_dir import SearchDir
from stain_search.spaces import Objective, Param

ID_COLUMNS = ["trial", "number", "run_id", "status", "state", "epoch", "time"]
# Study states → the words the MLflow status tag uses for the same outcome.
STATE_STATUS = {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed",
                "RUNNING": "running", "WAITING": "waiting"}
SKIPPED_METRICS = {"epoch"}  # MLflow holds it as a metric too; it is the step already


@dataclass
class Search:
    """Everything the analysis knows about one search."""

    name: str
    search_dir: Path
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str | None
    objectives: list[Objective]
    params: list[Param]
    base: dict[str, Any]
    study: Any  # optuna.Study, or None when the journal is missing
    frame: pd.DataFrame = field(repr=False)
    # stain_search.deploy.confirmed.Confirmation: `stain-search confirm`'s, if it ran
    confirmation: Any = field(default=None, repr=False)
    # the space's `constraints:` (stain_search.constraints.Constraint)
    constraints: tuple = ()
    remote: Any = None  # stain_search.storage.Remote: a URI storage's folder (search_dir: its mirror)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def sdir(self) -> SearchDir:
        return SearchDir(self.search_dir, self.remote)

    @property
    def param_keys(self) -> list[str]:
        return [p.key for p in self.params if p.key in self.frame.columns]

    def is_log(self, key: str) -> bool:
        """Whether the space samples this parameter on a log scale (plots follow)."""
        return any(p.key == key and p.distribution in ("loguniform", "logint")
                   for p in self.params)

    def is_categorical(self, key: str) -> bool:
        return any(p.key == key and p.distribution == "choice" for p in self.params)


# --- the search folder --------------------------------------------------------

def open_study(path: Path, name: str):
    """The search's Optuna study, read-only in effect; None if it does not exist."""
    from stain_search.study import open_study as open_journal

    if not Path(path).is_file():  # the journal backend would create an empty file
        return None
    try:
        return open_journal(name, Path(path))
    except KeyError:  # the driver stopped before creating the study
        return None


# --- MLflow params and metrics -----------------------------------------------------

def typed_param(key: str, text: str | None) -> Any:
    """An MLflow param string back to its config type ("10.0" → 10.0 for a float key)."""
    if text is None or text == "None":
        return None
    section, _, name = key.partition(".")
    hints = cfg.field_types(cfg.SECTIONS[section]) if section in cfg.SECTIONS else {}
    if name not in hints:
        return text
    try:
        return cfg.coerce(yaml.safe_load(text), hints[name], key=key, where="")
    except (ConfigError, yaml.YAMLError):
        return text


def epoch_rows(histories: dict[str, list[tuple[int, float, int]]]) -> list[dict[str, Any]]:
    """key → [(step, value, ms)] into one dict per epoch, with the epoch's latest time."""
    rows: dict[int, dict[str, Any]] = {}
    for key, points in histories.items():
        if key in SKIPPED_METRICS:
            continue
        for step, value, ms in points:
            row = rows.setdefault(int(step), {"epoch": int(step), "_ms": 0})
            row[key] = float(value)
            row["_ms"] = max(row["_ms"], int(ms))
    return [rows[k] for k in sorted(rows)]


def run_record(c, run, *, study_trials: dict[int, Any]) -> tuple[dict[str, Any], list[dict]]:
    """(the trial's fixed columns, its epoch rows) for one MLflow child run."""
    tags = run.data.tags
    number = int(tags[tracking.OPTUNA_TRIAL]) if tags.get(tracking.OPTUNA_TRIAL) else None
    st = study_trials.get(number) if number is not None else None
    searched = json.loads(tags.get("stain_search.searched", "[]"))
    params = {key: typed_param(key, run.data.params.get(key)) for key in searched}
    if st is not None:
        params.update(st.params)  # Optuna keeps the exact suggested values and types
    fixed = {"trial": tags.get(tracking.TRIAL, run.info.run_name), "number": number,
             "run_id": run.info.run_id, "status": tags.get(tracking.STATUS, "running"),
             "state": st.state.name if st is not None else None, **params}
    histories = tracking.metric_histories(c, run.info.run_id, run.data.metrics.keys())
    return fixed, epoch_rows(histories)


def study_only_record(trial) -> dict[str, Any]:
    """A trial the study knows and MLflow does not (it never started training)."""
    return {"trial": f"optuna_{trial.number}", "number": trial.number, "run_id": None,
            "status": STATE_STATUS.get(trial.state.name, trial.state.name.lower()),
            "state": trial.state.name, **trial.params}


def metric_order(columns: list[str]) -> list[str]:
    """Losses first (the CycleGAN's own order), then evaluation metrics, then the rest."""
    from stain_search.evaluate import METRIC_DIRECTIONS
    from stain_search.gan import LOSS_NAMES

    known = list(LOSS_NAMES) + list(METRIC_DIRECTIONS)
    return [k for k in known if k in columns] + sorted(c for c in columns if c not in known)


def build_frame(records: list[tuple[dict[str, Any], list[dict]]], *,
                param_keys: list[str]) -> pd.DataFrame:
    rows = []
    for fixed, epochs in records:
        for epoch in epochs or [{"epoch": None}]:  # a trial with no epoch yet keeps one row
            rows.append({**fixed, **epoch})
    frame = pd.DataFrame(rows)
    for col in ID_COLUMNS + ["_ms"]:
        if col not in frame.columns:
            frame[col] = None
    frame["time"] = pd.to_datetime(frame.pop("_ms"), unit="ms", utc=True)
    # Without a study (journal lost), the MLflow status names the same outcome.
    status_state = {v: k for k, v in STATE_STATUS.items()}
    frame["state"] = frame["state"].fillna(frame["status"].map(status_state))
    frame["number"] = frame["number"].astype("Int64")
    frame["epoch"] = frame["epoch"].astype("Int64")
    params = [k for k in param_keys if k in frame.columns]
    metrics = metric_order([c for c in frame.columns if c not in ID_COLUMNS and c not in params])
    frame = frame[ID_COLUMNS + params + metrics]
    return frame.sort_values(["number", "trial", "epoch"], na_position="last").reset_index(drop=True)


def empty_frame(param_keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=ID_COLUMNS + param_keys)


def _store_hint(search_dir: Path, uri: str) -> str:
    """`stain-search run` keeps mlflow.db beside the storage folder by default."""
    guess = Path(search_dir).parent.parent / "mlflow.db"
    if guess.is_file() and f"sqlite:///{guess.resolve()}" != uri:
        return f" (perhaps --tracking-uri sqlite:///{guess.resolve()})"
    return ""


def load_search(name: str, *, storage: str | Path | None = None,
                tracking_uri: str | None = None) -> Search:
    """Read a search (finished or running) from its folder, study and MLflow store.
    Reads only: nothing is created, not even an empty SQLite store."""
    sdir = SearchDir.of(storage, name).pull()
    search_dir = sdir.root
    record = sdir.read_record()
    name = record.name
    objectives = record.objectives
    params = record.params
    study = open_study(sdir.study_journal, name)
    study_trials = {t.number: t for t in study.get_trials(deepcopy=False)} if study else {}

    uri = tracking.resolve_tracking_uri(tracking_uri)
    missing = (Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None)
    if missing is not None and missing.exists():
        missing = None
    experiment_id = None
    if missing is None:  # a SQLite URI to no file would create an empty store: not here
        c = tracking.client(uri)
        experiment_id = tracking.find_experiment(c, name)
    if experiment_id is None:
        raise tracking.TrackingError(
            f"search {name!r}: no MLflow experiment of that name in {uri}"
            f"{' (no such file)' if missing is not None else ''}; pass --tracking-uri with "
            f"the store the search logged to{_store_hint(search_dir, uri)}")
    parent_run = tracking.search_run(c, experiment_id, search=name, search_id=record.search_id)
    parent = parent_run.info.run_id if parent_run is not None else None
    records = [run_record(c, run, study_trials=study_trials)
               for run in tracking.trial_runs(c, experiment_id, search=name,
                                              search_id=record.search_id)]
    seen = {fixed["number"] for fixed, _ in records}
    records += [(study_only_record(t), []) for n, t in sorted(study_trials.items()) if n not in seen]
    keys = [p.key for p in params]
    frame = build_frame(records, param_keys=keys) if records else empty_frame(keys)
    frame.attrs = {"search": name, "objectives": [[o.metric, o.mode] for o in objectives],
                   "params": keys}
    from stain_search.deploy.confirmed import confirmation

    return Search(name=name, search_dir=search_dir, tracking_uri=uri,
                  experiment_id=experiment_id, parent_run_id=parent, objectives=objectives,
                  params=params, base=record.base, study=study, frame=frame,
                  confirmation=confirmation(sdir, tracking_uri=uri),
                  constraints=tuple(record.constraints), remote=sdir.remote)


def save_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """The trials frame as a Parquet file (pyarrow) for users' own notebooks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, engine="pyarrow", index=False)
    return path


# --- one row per trial ------------------------------------------------------------

def metric_columns(frame: pd.DataFrame, *, params: list[str] = ()) -> list[str]:
    return [c for c in frame.columns if c not in ID_COLUMNS and c not in params]


def _best_index(rows: pd.DataFrame, objective: Objective) -> list:
    """Per trial, the row index of its best value of ``objective``."""
    grouped = rows.groupby("trial", sort=False)[objective.metric]
    return list(grouped.idxmin() if objective.mode == "min" else grouped.idxmax())


def trial_table(frame: pd.DataFrame, *, params: list[str],
                objectives: list[Objective]) -> pd.DataFrame:
    """One row per trial: its parameters, the last value of every metric (what the
    study was told), the epochs run, and the epoch of its best first objective
    (the checkpoint a user would deploy)."""
    if frame.empty:
        return frame.copy()
    metrics = metric_columns(frame, params=params)
    ordered = frame.sort_values(["number", "trial", "epoch"], na_position="first")
    groups = ordered.groupby("trial", sort=False, dropna=False)
    table = groups[["number", "run_id", "status", "state", *params]].first()
    table["epochs"] = groups["epoch"].max()
    table = table.join(groups[metrics].last())  # last non-missing value of each metric
    if objectives and objectives[0].metric in frame.columns:
        first = objectives[0]
        scored = ordered.dropna(subset=[first.metric])
        best = scored.loc[_best_index(scored, first)]
        table["best_epoch"] = best.set_index("trial")["epoch"].reindex(table.index)
        table[f"best_{first.metric}"] = best.set_index("trial")[first.metric].reindex(table.index)
    return table.reset_index().sort_values("number", na_position="last").reset_index(drop=True)
