"""The MLflow Model Registry: registering an export, fetching a registered model.

Beside ``stain_search.tracking`` (runs, params, metrics), with the same
client and errors: ``stain-search export`` registers each export as a new
version of a named model with an alias (``@champion``) and a description a
person can read; ``translate models:/NAME@ALIAS`` downloads it again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stain_search.tracking import PARENT, TrackingError, client, get_or_create_experiment, log_epoch


def describe_model_version(provenance: dict[str, Any]) -> str:
    """The description of a registered model version (Markdown, which the
    MLflow UI renders): the search, trial, epoch, metrics and data of an
    export's provenance (keys search, trial, optuna_trial, epoch, metrics,
    data, objectives; any may be missing)."""
    get = provenance.get
    trial = f"trial **{get('trial')}**" + (f" (#{get('optuna_trial')})"
                                           if get("optuna_trial") is not None else "")
    lines = [f"Exported by stain-search from search **{get('search') or '?'}**, {trial}, "
             f"epoch **{get('epoch') if get('epoch') is not None else '?'}**.",
             "", f"Data: `{get('data') or '?'}`"]
    objective = {o["metric"]: o["mode"] for o in get("objectives") or []}
    metrics = {k: v for k, v in (get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        for key in sorted(metrics, key=lambda k: (k not in objective, k)):
            note = f" (objective, {objective[key]})" if key in objective else ""
            lines.append(f"| {key}{note} | {metrics[key]:.4g} |")
    return "\n".join(lines)


class _Environment:
    """Environment variables set for a while (MLflow reads some per call)."""

    def __init__(self, values: dict[str, str]):
        self.values = values

    def __enter__(self) -> None:
        self.before = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: Any) -> None:
        for key, value in self.before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def register_pyfunc_model(uri: str, *, experiment: str, run_name: str,
                          parent_run_id: str | None, tags: dict[str, str],
                          metrics: dict[str, float], model_name: str, alias: str,
                          description: str | None = None, **pyfunc: Any) -> tuple[str, str]:
    """Save a pyfunc model (``pyfunc`` goes to ``mlflow.pyfunc.save_model``) as
    the artifact ``model`` of a new run nested under ``parent_run_id`` (e.g. the
    trial's run), register it as a new version of ``model_name`` tagged with
    ``tags``, and point ``alias`` at it. Client calls only: MLflow's global
    tracking/registry URIs are left alone. Returns (version, run id)."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    if uri.startswith("file:"):
        raise TrackingError(f"{uri}: the MLflow Model Registry needs a database store "
                            f"(sqlite:///path/mlflow.db) or a tracking server; pass "
                            f"--tracking-uri, or --no-register to only write the folder")
    c = client(uri)
    experiment_id = get_or_create_experiment(c, experiment, uri=uri)
    run = c.create_run(experiment_id, run_name=run_name,
                       tags={**tags, **({PARENT: parent_run_id} if parent_run_id else {})})
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="stain-search-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(path=str(local), **pyfunc)
            c.log_artifacts(run_id, str(local), artifact_path="model")
        log_epoch(c, run_id, metrics, epoch=0)
        try:
            c.get_registered_model(model_name)
        except MlflowException:  # the first version of this name
            c.create_registered_model(model_name)
        version = str(c.create_model_version(model_name, source=f"runs:/{run_id}/model",
                                             run_id=run_id, tags=tags,
                                             description=description).version)
        c.set_registered_model_alias(model_name, alias, version)
    except MlflowException as err:
        c.set_terminated(run_id, status="FAILED")
        raise TrackingError(f"registering model {model_name!r} in {uri} failed: "
                            f"{_first_line(err)}") from None
    c.set_terminated(run_id, status="FINISHED")
    return version, run_id


def download_model(uri: str, ref: str, dst: Path) -> Path:
    """The files of a registered model (``models:/name@alias`` or
    ``models:/name/version``) copied into ``dst``.

    Resolved with this store's client: MLflow's own ``models:/`` download
    asks the process-wide registry URI, whatever store it is given."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    body = ref[len("models:/"):] if ref.startswith("models:/") else ""
    name, at, alias = body.partition("@")
    if not at:
        name, _, alias = body.partition("/")
    if not name or not alias:
        raise TrackingError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    c = client(uri)
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    try:
        version = str(c.get_model_version_by_alias(name, alias).version) if at else alias
        location = c.get_model_version_download_uri(name, version)
        with _Environment(quiet):
            path = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                       tracking_uri=uri)
    except MlflowException as err:
        raise TrackingError(f"{ref}: not found in the model registry of {uri} "
                            f"({_first_line(err)}); check the name and alias (MLflow UI → "
                            f"Models) and --tracking-uri") from None
    return Path(path)
