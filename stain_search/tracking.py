"""Everything stain-search says to MLflow, in one module.

When MLflow's API changes (it does, every few releases) this file changes
(and ``stain_search.registry``, its Model Registry half).

Schema (what analysis/ and deploy/ read back):
    experiment  = the search name, tag mlflow.experimentKind=custom_model_development
                  (the UI opens it on its runs table, not the GenAI overview)
    parent run  = one per search (per search id), tags  stain_search.role=search,
                  stain_search.search, stain_search.search_id,
                  stain_search.objective (JSON), stain_search.study,
                  stain_search.search_dir; artifacts: space.yaml, search.json;
                  metric best_so_far_<objective> (step = finished trials)
    child run   = one per trial, named by trial_run_name (``t03 λ=10.6 id=0.54``),
                  tags  mlflow.parentRunId, stain_search.role=trial,
                  stain_search.tune_trial_id,
                  stain_search.search_id (every look-up filters on it),
                  stain_search.trial (trial name), stain_search.optuna_trial
                  (number), stain_search.status (running|finished|pruned|failed),
                  stain_search.error, stain_search.checkpoints (folder),
                  stain_search.resumed_from_epoch (after a restart),
                  stain_search.diverged (the NaN/inf message);
                  params = every config key, dotted (loss.lambda_cycle, ...);
                  metrics per epoch (step = epoch): LOSS_NAMES, fid or fd_random,
                  ssim_structure, ssim_gt, psnr_gt, ki67_f1, output_diversity...;
                  artifacts: samples/epoch_XXXX.png, best/ (best checkpoint)
    confirmation = `stain-search confirm`: a search of its own (own search id),
                  its parent run nested under the search's (stain_search.confirms_search
                  = the search's id); each child run also tagged stain_search.confirms
                  (the trial it re-trains) and stain_search.seed

The default store is MLflow's own default, a SQLite file ``mlflow.db`` in the
folder the command runs from — resolved to an absolute URI on the driver,
because Ray Tune moves each trial into its own working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from stain_search.errors import StainSearchError
from stain_search.mlflow_store import BrokenStore, ensure_store

ROLE, SEARCH, TRIAL, STATUS, ERROR = ("stain_search.role", "stain_search.search",
                                      "stain_search.trial", "stain_search.status",
                                      "stain_search.error")
OPTUNA_TRIAL, OBJECTIVE, STUDY = ("stain_search.optuna_trial", "stain_search.objective",
                                  "stain_search.study")
SEARCH_DIR, CHECKPOINTS, PARENT = ("stain_search.search_dir", "stain_search.checkpoints",
                                   "mlflow.parentRunId")
RESUMED_FROM, DIVERGED = "stain_search.resumed_from_epoch", "stain_search.diverged"
# The search's unique id (search.json): two searches of one name in one store
# (two folders, a team's server) never share or mix runs.
SEARCH_ID = "stain_search.search_id"
TUNE_TRIAL = "stain_search.tune_trial_id"
# A confirmation (`stain-search confirm`): its runs re-train a search's trial
# with another train.seed. On its parent run: the search id it confirms; on
# each child: the trial (trial_NNN) and the seed.
CONFIRMS, CONFIRMS_SEARCH, SEED = ("stain_search.confirms", "stain_search.confirms_search",
                                   "stain_search.seed")
CONFIRMS_NUMBER = "stain_search.confirms_number"  # that trial's Optuna number
# A space's constraints: "true"/"false" on each told trial's run, with the
# values (Optuna's convention: ≤ 0 holds) beside it.
FEASIBLE, CONSTRAINT_VALUES = "stain_search.feasible", "stain_search.constraints"
# `run --warm-start OTHER`: on the parent run (param) and on each seeded trial (tag,
# from its study user attribute): the search and trial its point came from.
WARM_START = "stain_search.warm_start"
# The Ray node id rank 0 of a trial runs on (its latest start): where a cluster put it.
NODE = "stain_search.node"
STATUSES = ("running", "finished", "pruned", "failed")


class TrackingError(StainSearchError):
    """The MLflow store cannot be reached or used."""


def resolve_tracking_uri(uri: str | None = None, *, base: Path | None = None) -> str:
    """An absolute tracking URI: the argument, $MLFLOW_TRACKING_URI, or ./mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    base = Path(base or Path.cwd()).resolve()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare path: a SQLite file if it ends in .db, else a file store
        path = (base / uri).resolve()
        return f"sqlite:///{path}" if path.suffix == ".db" else path.as_uri()
    return uri


def artifact_root_for(uri: str, *, base: Path | None = None) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite file."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def client(uri: str):
    """An MlflowClient, after a cheap check that the store answers."""
    from mlflow.tracking import MlflowClient

    try:  # a new SQLite store is made whole, once, even by two drivers at once
        ensure_store(uri)
    except BrokenStore as err:
        raise TrackingError(str(err)) from None
    except OSError as err:
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be created: {err.strerror} "
                            f"({err.filename}); pass a --tracking-uri in a writable "
                            f"folder") from None
    try:  # the constructor opens the store (and upgrades an older schema)
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        with _fail_fast(uri):
            c.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "unreachable"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if uri.startswith(("http://", "https://")) and (why := _no_answer(first)):
            raise TrackingError(f"MLflow tracking server {uri} does not answer ({why}): start "
                                f"it (`mlflow server --host HOST --port PORT`) or pass the "
                                f"--tracking-uri of a running one") from None
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used: {first[:300]}. "
                            f"Check --tracking-uri (a server must be running; "
                            f"a sqlite:/// path must be writable).") from None
    return c


def _no_answer(error: str) -> str | None:
    """Why a server did not answer, in a word (None: it answered, with an error)."""
    for needle, why in (("refused", "connection refused"), ("NewConnectionError", "no connection"),
                        ("timed out", "timed out"), ("Timeout", "timed out"),
                        ("NameResolution", "unknown host"), ("Name or service", "unknown host")):
        if needle in error:
            return why
    return None


@contextlib.contextmanager
def _fail_fast(uri: str):
    """One quick try for the reachability check: MLflow's HTTP client retries
    with backoff for minutes by default (right for a long search's logging,
    wrong for telling a user their --tracking-uri is a typo)."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in fast}
    os.environ.update(fast)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# MLflow 3 opens an experiment on its GenAI overview (traces, token usage)
# unless this tag says the experiment trains models: then on the runs table.
EXPERIMENT_KIND, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(c, name: str, *, uri: str) -> str:
    """The experiment of a search (created, restored or found), marked as model
    development so that the MLflow UI opens it on its runs table."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(uri, name),
                                       tags={EXPERIMENT_KIND: MODEL_DEVELOPMENT})
        except MlflowException as e:  # another driver made it between our look and our make
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = c.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND) != MODEL_DEVELOPMENT:  # made before the tag existed
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return exp.experiment_id


def _artifact_location(uri: str, name: str) -> str | None:
    root = artifact_root_for(uri)
    return f"{root}/{name}" if root else None


def find_run(c, experiment_id: str, *, tags: dict[str, str]) -> Any | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filter_string=flt, max_results=2)
    return runs[0] if runs else None


def start_search_run(c, experiment_id: str, *, search: str, search_id: str, objective: Any,
                     study: Path, search_dir: Path, artifacts: Iterable[Path] = (),
                     nested_in: str | None = None, run_name: str | None = None,
                     extra_tags: dict[str, str] | None = None) -> str:
    """The parent run of a search; found again (not duplicated) on resume, by the
    search's id: another search of the same name gets its own parent run.
    ``nested_in``: the run it shows under in the UI (a confirmation's search)."""
    run = find_run(c, experiment_id, tags={ROLE: "search", SEARCH_ID: search_id})
    if run is None:
        tags = {ROLE: "search", SEARCH: search, SEARCH_ID: search_id,
                OBJECTIVE: json.dumps(objective), STUDY: str(study),
                SEARCH_DIR: str(search_dir), **(extra_tags or {})}
        if nested_in:
            tags[PARENT] = nested_in
        run = c.create_run(experiment_id, run_name=run_name or f"{search} {search_id[:6]}",
                           tags=tags)
        for path in artifacts:
            c.log_artifact(run.info.run_id, str(path))
    elif run.info.status != "RUNNING":
        c.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def start_trial_run(c, experiment_id: str, *, parent_run_id: str, search: str,
                    search_id: str, trial: str, optuna_trial: int | None,
                    params: dict[str, Any], searched: Iterable[str], checkpoints: Path,
                    run_name: str | None = None, tune_trial_id: str | None = None,
                    extra_tags: dict[str, str] | None = None) -> str:
    """The child run of one trial; a restarted or resumed trial continues its own run.
    ``extra_tags``: more tags for a new run (e.g. what a confirmation run confirms)."""
    run = find_run(c, experiment_id, tags={ROLE: "trial", SEARCH_ID: search_id, TRIAL: trial})
    if run is not None:
        c.update_run(run.info.run_id, status="RUNNING")
        c.set_tag(run.info.run_id, STATUS, "running")
        return run.info.run_id
    tags = {PARENT: parent_run_id, ROLE: "trial", SEARCH: search, SEARCH_ID: search_id,
            TRIAL: trial, STATUS: "running", CHECKPOINTS: str(checkpoints),
            "stain_search.searched": json.dumps(sorted(searched))}
    if optuna_trial is not None:
        tags[OPTUNA_TRIAL] = str(optuna_trial)
    if tune_trial_id is not None:
        tags[TUNE_TRIAL] = tune_trial_id
    tags = {**tags, **(extra_tags or {})}
    run = c.create_run(experiment_id, run_name=run_name or trial, tags=tags)
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # the store's batch limit
        c.log_batch(run_id, params=items[i: i + 100])


def log_epoch(c, run_id: str, metrics: dict[str, Any], *, epoch: int) -> None:
    """One epoch's numbers in one request (batched: cheap even on SQLite)."""
    import time as _time

    from mlflow.entities import Metric

    now = int(_time.time() * 1000)
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
    if batch:
        c.log_batch(run_id, metrics=batch)


def last_logged_epoch(c, run_id: str) -> int:
    history = c.get_metric_history(run_id, "epoch")
    return max((m.step for m in history), default=0)


def note_restart(c, run_id: str, *, epoch: int) -> None:
    """A trial continued from its checkpoint of ``epoch`` (worker failure or
    resumed search): visible in the UI, and read back by the fault tests."""
    c.set_tag(run_id, RESUMED_FROM, str(epoch))


EXPLOITS = "stain_search.exploits"  # a PBT member's count; each is stain_search.exploit.<k>


def note_exploit(c, run_id: str, record: dict[str, Any]) -> int:
    """A PBT exploit on the member's run: its epoch, donor, old and new values
    (one JSON tag per exploit, numbered; the values per epoch are the run's
    ``schedule/<key>`` metrics). Returns its number."""
    count = int(c.get_run(run_id).data.tags.get(EXPLOITS, "0")) + 1
    c.set_tag(run_id, f"stain_search.exploit.{count}", json.dumps(record, default=str)[:5000])
    c.set_tag(run_id, "stain_search.last_donor", str(record.get("donor")))
    c.set_tag(run_id, EXPLOITS, str(count))
    return count


def recorded_exploits(c, run_id: str) -> set[str]:
    """The ids of the exploits the member's run holds."""
    tags = c.get_run(run_id).data.tags
    out = set()
    for k in range(1, int(tags.get(EXPLOITS, "0")) + 1):
        try:
            out.add(json.loads(tags.get(f"stain_search.exploit.{k}", "{}")).get("id"))
        except ValueError:  # cut at the tag limit
            continue
    return out - {None}


def note_node(c, run_id: str, node_id: str) -> None:
    """The Ray node rank 0 of the trial runs on (re-set when the trial restarts)."""
    c.set_tag(run_id, NODE, node_id)


def note_diverged(c, run_id: str, error: str) -> None:
    """Set by the worker whose loss became NaN/inf; the trial's driver reads
    it back (Ray Train keeps only results that carry a checkpoint)."""
    c.set_tag(run_id, DIVERGED, error[:4000])


def diverged_error(c, run_id: str) -> str | None:
    return c.get_run(run_id).data.tags.get(DIVERGED)


def log_image(c, run_id: str, image: np.ndarray, artifact_file: str) -> None:
    c.log_image(run_id, image, artifact_file=artifact_file)


def log_checkpoint(c, run_id: str, folder: Path, *, artifact_path: str = "best") -> None:
    """The checkpoint's weights and meta.json (fetched first from a URI storage)."""
    from stain_search.checkpoint import META_FILE, state_file

    dest = f"{artifact_path}/{Path(folder).name}"
    c.log_artifact(run_id, str(state_file(folder)), artifact_path=dest)
    c.log_artifact(run_id, str(Path(folder) / META_FILE), artifact_path=dest)


def end_trial_run(c, run_id: str, *, status: str, error: str | None = None) -> None:
    """Mark a trial's outcome; MLflow's own status mirrors it (pruned = KILLED)."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}")
    c.set_tag(run_id, STATUS, status)
    if error:
        c.set_tag(run_id, ERROR, error[:4000])
    c.set_terminated(run_id, status={"finished": "FINISHED", "pruned": "KILLED",
                                     "failed": "FAILED", "running": "RUNNING"}[status])


def mark_feasibility(c, experiment_id: str, *, search_id: str, trial: str,
                     values: list[float]) -> None:
    """Tag a told trial's run feasible or not under the space's constraints
    (nothing when the run cannot be found: the study holds the values too)."""
    from mlflow.exceptions import MlflowException

    try:
        run = find_run(c, experiment_id,
                       tags={ROLE: "trial", SEARCH_ID: search_id, TRIAL: trial})
        if run is None:
            return
        c.set_tag(run.info.run_id, FEASIBLE, str(all(v <= 0 for v in values)).lower())
        c.set_tag(run.info.run_id, CONSTRAINT_VALUES, json.dumps([float(v) for v in values]))
    except MlflowException:  # a tag must not fail the search: the study holds the values
        return


def end_search_run(c, run_id: str, *, status: str = "FINISHED", summary: dict | None = None) -> None:
    if summary is not None:
        c.log_dict(run_id, summary, "summary.json")
    c.set_terminated(run_id, status=status)


def trial_runs(c, experiment_id: str, *, search: str, search_id: str | None = None) -> list[Any]:
    """All child runs of a search (every page): of the search with this id, or,
    for searches recorded before ids existed, of every search of this name."""
    flt = f"tags.`{ROLE}` = 'trial' and tags.`{SEARCH}` = '{search}'"
    if search_id:
        flt += f" and tags.`{SEARCH_ID}` = '{search_id}'"
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=flt, max_results=1000,
                             page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# Short labels of searched keys in trial run names; any other key shows its last part.
RUN_NAME_LABELS = {"loss.lambda_cycle": "λ", "loss.lambda_identity": "id", "loss.r1_gamma": "γ",
                   "optim.consensus_gamma": "γc", "model.attention": "att"}


def trial_run_name(number: int | None, params: dict[str, Any]) -> str:
    """A run name a person can read in the UI: ``t03 λ=10.6 id=0.54``.

    The trial's Optuna number, then each searched key (short label) with its
    value to 3 significant figures, in the order given. Names need not be
    unique: runs are found by their tags (stain_search.trial, the Tune id).
    """
    def value(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    head = f"t{number:02d}" if number is not None else "t?"
    parts = [f"{RUN_NAME_LABELS.get(k, k.rsplit('.', 1)[-1])}={value(v)}" for k, v in params.items()]
    return " ".join([head, *parts])[:250]  # the UI truncates long names anyway


BEST_SO_FAR = "best_so_far"


def log_best_so_far(c, parent_run_id: str, metric: str, value: float, step: int) -> None:
    """The best objective value so far on the search's parent run, as the
    metric ``best_so_far_<metric>`` at step = finished trials: the search's
    progress as one chart in the MLflow UI."""
    import time as _time

    from mlflow.entities import Metric

    if np.isfinite(value):
        c.log_batch(parent_run_id, metrics=[Metric(f"{BEST_SO_FAR}_{metric}", float(value),
                                                   int(_time.time() * 1000), int(step))])


def fail_orphans(c, experiment_id: str, *, search: str, search_id: str,
                 keep: Iterable[str] = ()) -> int:
    """Trial runs still RUNNING once every trial of a search has ended (none of
    them can finish any more) are marked failed."""
    keep = set(keep)
    n = 0
    for run in trial_runs(c, experiment_id, search=search, search_id=search_id):
        if run.info.status == "RUNNING" and run.info.run_id not in keep:
            end_trial_run(c, run.info.run_id, status="failed",
                          error="interrupted: the search driver stopped while this trial ran")
            n += 1
    return n


# --- reading back (analysis/: stain-search report) ---------------------------

def search_run(c, experiment_id: str, *, search: str, search_id: str | None) -> Any | None:
    """The parent run of a search, by its id (by name for searches without one)."""
    tags = {ROLE: "search", SEARCH_ID: search_id} if search_id else {ROLE: "search", SEARCH: search}
    return find_run(c, experiment_id, tags=tags)


def find_experiment(c, name: str) -> str | None:
    """The id of the experiment of a search, or None when the store has none."""
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


def metric_histories(c, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float, int]]]:
    """Every logged value of each metric: key → [(step, value, timestamp_ms), ...]."""
    return {key: [(m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, key)]
            for key in keys}


def download_artifacts(c, run_id: str, path: str, dst: Path) -> Path:
    """A run's artifact folder (or file) copied to a local folder."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(c.download_artifacts(run_id, path, dst_path=str(dst)))


def list_artifacts(c, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in c.list_artifacts(run_id, path)]


def log_files(c, run_id: str, paths: Iterable[Path], *, artifact_path: str) -> None:
    """Attach local files (report figures, the HTML page) to a run."""
    for path in paths:
        c.log_artifact(run_id, str(path), artifact_path=artifact_path)
