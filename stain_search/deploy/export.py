"""Export a trained generator G (H&E → stain) as a self-contained model, and
register it in the MLflow Model Registry.

An export is a folder that needs nothing of the search that made it:

    generator.safetensors   G's weights only (safetensors: loading runs no code)
    model.json              format tag, the model config, the input/output
                            normalisation G expects, provenance (search, trial,
                            epoch, metrics, MLflow run, checkpoint), file hashes
    generator.onnx          the same network for use without stain-search
                            (onnxruntime); generator.pt (TorchScript) where the
                            ONNX exporter is not available

Registering logs the folder as an MLflow pyfunc model — RGB image(s) in,
translated image(s) out, tiled as ``stain-search translate`` does — in a run
nested under the trial's run, registers a version and points an alias
(default ``champion``) at it, so that

    mlflow models serve -m models:/<name>@champion --env-manager local

serves it over REST. Nothing here unpickles: checkpoints are read with
``torch.load(weights_only=True)``, exports with safetensors, and a file that
is not one of ours is refused with one clear error.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import mlflow.pyfunc
import numpy as np
import torch
from torch import nn

from stain_search.pbt import SCHEDULE
from stain_search.search_dir import SearchDir
from stain_search import __version__
from stain_search.atomic import atomic_dir, check_replaceable
from stain_search.checkpoint import read_checkpoint
from stain_search.config import ModelConfig
# load_model is re-exported: `from stain_search.deploy.export import load_model` predates
# model_io and callers (the lead's select tests) still use it.
from stain_search.deploy.model_io import (FORMAT, INFO_FILE, WEIGHTS_FILE, ModelError, is_export,  # noqa: F401
                                          load_model, model_config, read_export, sha256)
from stain_search.deploy.translate import Translator, pick_device
from stain_search.data.prepare import manifest_mpp
from stain_search.deploy.stain_norm import training_stain_statistics
from stain_search.errors import ConfigError, StainSearchError
from stain_search.models import build_generator
from stain_search.progress import progress

DEFAULT_ALIAS = "champion"
ONNX_OPSET = 17
PORTABLE_TOLERANCE = 1e-4  # max |Δ| in [-1, 1] between G and its ONNX/TorchScript copy

# How images enter and leave G (what every consumer of an export must do).
INPUT_SPEC = {"channels": "RGB", "dtype": "uint8", "layout": "(H, W, 3)",
              "normalisation": "x / 127.5 - 1", "range": [-1.0, 1.0],
              "tensor": "(B, 3, H, W) float32"}
OUTPUT_SPEC = {"range": [-1.0, 1.0], "tensor": "(B, 3, H, W) float32",
               "to_uint8": "round((clamp(y, -1, 1) + 1) * 127.5)"}

Step = Callable[[str], None]  # "what runs now", for the progress line of `stain-search export`


def _no_step(what: str) -> None:
    pass



def write_onnx(net: nn.Module, path: Path, probe: torch.Tensor) -> dict[str, Any]:
    with warnings.catch_warnings():
        # The TorchScript-based exporter: deprecated upstream, but it needs no
        # onnxscript and writes dynamic H/W; its tracer warnings are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (probe,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["stained"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "stained": {0: "batch", 2: "height", 3: "width"}})
    return {"format": "onnx", "opset": ONNX_OPSET, "input": "image", "output": "stained"}


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


def write_torchscript(net: nn.Module, path: Path, probe: torch.Tensor) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; tracing still works
        traced = torch.jit.trace(net, probe, check_trace=False)
        torch.jit.save(traced, str(path))
    return {"format": "torchscript"}


def run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")(x)


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# format → (file name, writer, runner for the check)
PORTABLE: dict[str, tuple[str, Callable, Callable]] = {
    "onnx": ("generator.onnx", write_onnx, run_onnx),
    "torchscript": ("generator.pt", write_torchscript, run_torchscript),
}


def write_portable(net: nn.Module, folder: Path, fmt: str, *, depth: int,
                   on_step: Step = _no_step) -> dict[str, Any] | None:
    """Write G in a portable format and check it against G on a fresh size.

    ``auto`` tries ONNX (if onnx/onnxruntime import), then TorchScript; a
    named format must work or it is an error; ``none`` writes nothing.
    """
    if fmt == "none":
        return None
    if fmt != "auto" and fmt not in PORTABLE:
        raise ConfigError(f"--portable {fmt!r}: unknown; known: auto, none, {', '.join(PORTABLE)}")
    order = ([f for f in PORTABLE if f != "onnx" or _onnx_available()] if fmt == "auto"
             else [fmt])
    step = 2 ** depth
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 3, 2 * step, 2 * step, generator=gen) * 2 - 1
    check = torch.rand(2, 3, 3 * step, 2 * step, generator=gen) * 2 - 1  # other B, H, W
    failures = []
    for name in order:
        file, write, run = PORTABLE[name]
        path = folder / file
        try:
            on_step(f"writing {file}")
            spec = write(net, path, probe)
            on_step(f"checking {file} against G")
            with torch.inference_mode():
                diff = float((run(path, check) - net(check)).abs().max())
            if not diff <= PORTABLE_TOLERANCE:
                raise RuntimeError(f"differs from G by {diff:.2e}")
        except Exception as err:  # noqa: BLE001 - try the next format, report all at the end
            path.unlink(missing_ok=True)
            first = (str(err).splitlines() or [""])[0][:200]
            failures.append(f"{name}: {type(err).__name__}: {first}")
            continue
        return {"file": file, **spec, "max_abs_diff": diff,
                "usage": "input (B, 3, H, W) float32 RGB in [-1, 1] (x / 127.5 - 1), H and W "
                         f"multiples of {step}; output the same shape, in [-1, 1]"}
    if fmt != "auto":
        raise ModelError(f"cannot write a {fmt} copy of G: {'; '.join(failures)}")
    warnings.warn(f"no portable copy of G written ({'; '.join(failures)})", stacklevel=2)
    return None


def check_out(out: Path, *, overwrite: bool, guarded: tuple[Path, ...] = ()) -> None:
    """Before any work: ``out`` is new, or an earlier export that --overwrite replaces."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise ModelError(f"{out}: already exists; pass --overwrite or choose another --out")
    check_replaceable(out, ours=is_export, what="an export folder (one holding the model.json "
                      "that `stain-search export` writes)", guarded=guarded)


def write_export(state: dict[str, torch.Tensor], model: ModelConfig, out: str | Path, *,
                 provenance: dict[str, Any], portable: str = "auto",
                 overwrite: bool = False, data: dict[str, Any] | None = None,
                 on_step: Step = _no_step, guarded: tuple[Path, ...] = ()) -> Path:
    """Write an export folder for G's ``state`` (built under a temporary name,
    renamed into place at the end); ``on_step`` hears what runs now.
    ``overwrite`` replaces only an earlier export, never the working folder or
    a ``guarded`` one (the storage), nor a folder above them."""
    from safetensors.torch import save_file

    out = Path(out)
    check_out(out, overwrite=overwrite, guarded=guarded)
    net = build_generator(model).eval()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"the G weights do not fit the model config "
                         f"({str(err).splitlines()[0]})") from None
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        on_step(f"writing {WEIGHTS_FILE}")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        portable_spec = write_portable(net, tmp, portable, depth=model.depth, on_step=on_step)
        files = [WEIGHTS_FILE] + ([portable_spec["file"]] if portable_spec else [])
        info = {
            "format": FORMAT,
            "direction": "G: H&E → stain",
            "model": asdict(model),
            "input": {**INPUT_SPEC, "size_multiple": 2 ** model.depth},
            "output": OUTPUT_SPEC,
            "provenance": {**provenance, "stain_search_version": __version__,
                           "created": dt.datetime.now(dt.timezone.utc).isoformat(
                               timespec="seconds")},
            "portable": portable_spec,
            "files": {name: {"sha256": sha256(tmp / name)} for name in files},
            # data.mpp: the µm/px translate reads slides at; stain_reference: the
            # training H&E's Macenko/Reinhard statistics (translate --normalize).
            "data": {k: v for k, v in (data or {}).items() if k != "stain_reference"},
            "stain_reference": (data or {}).get("stain_reference"),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        for name in files:  # safetensors writes 0600; every file of an export has the umask's mode
            shutil.copymode(tmp / INFO_FILE, tmp / name)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *,
                      provenance: dict[str, Any] | None = None, portable: str = "auto",
                      overwrite: bool = False, on_step: Step = _no_step,
                      guarded: tuple[Path, ...] = ()) -> Path:
    """A training checkpoint (``checkpoint_epoch_XXXX/``) → an export folder."""
    checkpoint = Path(checkpoint)
    check_out(Path(out), overwrite=overwrite, guarded=guarded)
    on_step("reading the checkpoint")
    state, meta = read_checkpoint(checkpoint)
    if not isinstance(state, dict) or "G" not in state:
        raise ModelError(f"{checkpoint}: checkpoint holds no generator G")
    model = model_config((meta.get("config") or {}).get("model", {}), where=str(checkpoint))
    data_cfg = (meta.get("config") or {}).get("data") or {}
    prov = {"checkpoint": str(checkpoint.resolve()), "epoch": meta.get("epoch"),
            "metrics": meta.get("metrics", {}), "data": data_cfg.get("path"),
            # a PBT member's: the values its weights were trained with, epoch by epoch
            **({"schedule": meta[SCHEDULE]} if meta.get(SCHEDULE) else {}),
            **(provenance or {})}
    on_step("stain statistics of the training data")
    data = training_data(data_cfg)
    return write_export(state["G"], model, out, provenance=prov, portable=portable,
                        overwrite=overwrite, data=data, on_step=on_step, guarded=guarded)


def training_data(data: dict[str, Any]) -> dict[str, Any]:
    """What translate needs to know of the training data: its µm/px (the
    config's ``data.mpp``, else a ``data prepare`` manifest's) and its stain
    statistics (for ``translate --normalize`` without ``--reference``)."""
    path, layout = data.get("path"), data.get("layout", "auto")
    mpp, where = data.get("mpp"), "data.mpp" if data.get("mpp") else None
    if mpp is None and path and not str(path).startswith("builtin:"):
        mpp = manifest_mpp(Path(path))
        where = "manifest.parquet" if mpp else None
    out: dict[str, Any] = {"path": path, "mpp": mpp, "mpp_from": where}
    try:
        out["stain_reference"] = training_stain_statistics(path, layout)
    except (StainSearchError, OSError) as err:  # export still works; --reference then needed
        warnings.warn(f"no stain statistics of the training data stored ({err}); "
                      f"`translate --normalize` will need --reference", stacklevel=2)
    return out



# --- the pyfunc model and the registry ----------------------------------------------------

class StainTranslatorModel(mlflow.pyfunc.PythonModel):
    """pyfunc: (H, W, 3) or (B, H, W, 3) uint8 RGB H&E → the same shape, stained.

    The export folder travels as the model's artifact ``export``; images are
    translated tile by tile (``stain_search.deploy.translate``), so any size
    works. The model config holds :class:`~stain_search.deploy.translate.Translator`
    settings (tile, overlap, norm_stats, device...). Logged as "models from
    code" (:data:`PYFUNC_ENTRY`): loading it runs that file, never unpickles.
    """

    def __init__(self) -> None:
        self.translator = None

    def load_context(self, context) -> None:
        exported = read_export(Path(context.artifacts["export"]))
        options = dict(getattr(context, "model_config", None) or {})
        device = pick_device(options.pop("device", None))
        self.translator = Translator(exported.generator(device=device), depth=exported.depth,
                                     device=device, **options)

    def predict(self, context, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ModelError(f"expected RGB images of shape (H, W, 3) or (B, H, W, 3), got "
                             f"{images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 \
                    or images.max() > 255:
                raise ModelError(f"expected uint8 pixels in 0..255, got {images.dtype}")
            images = images.astype(np.uint8)
        return np.stack([self.translator.translate_array(image) for image in images])


# The file MLflow runs to build the pyfunc ("models from code": no pickle).
PYFUNC_ENTRY = """\
# stain-search pyfunc model: MLflow runs this file to load the model.
import mlflow

from stain_search.deploy.export import StainTranslatorModel

mlflow.models.set_model(StainTranslatorModel())
"""


def pyfunc_signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])  # (B, H, W, 3)
    return ModelSignature(inputs=images, outputs=images)


def pip_requirements() -> list[str]:
    """What the pyfunc imports (stain-search itself travels as code)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "numpy", "scipy", "scikit-image", "pillow", "tifffile", "imagecodecs",
                 "pyyaml", "pyarrow", "safetensors", "tqdm"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


@dataclass
class Registered:
    name: str
    version: str
    alias: str
    run_id: str
    uri: str  # models:/name@alias
    tracking_uri: str


def register_export(folder: str | Path, *, tracking_uri: str | None, model_name: str,
                    alias: str = DEFAULT_ALIAS, experiment: str | None = None,
                    parent_run_id: str | None = None, options: dict[str, Any] | None = None
                    ) -> Registered:
    """Log an export folder as a pyfunc model, register a version, set ``alias``."""
    from stain_search import registry, tracking

    folder = Path(folder)
    exported = read_export(folder)  # refuse to register anything that does not load
    prov = exported.info.get("provenance", {})
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tags = {"stain_search.role": "export", "stain_search.export_format": FORMAT}
    for key, tag in [("search", tracking.SEARCH), ("trial", tracking.TRIAL),
                     ("optuna_trial", tracking.OPTUNA_TRIAL), ("epoch", "stain_search.epoch"),
                     ("checkpoint", tracking.CHECKPOINTS)]:
        if prov.get(key) is not None:
            tags[tag] = str(prov[key])
    import stain_search

    with tempfile.TemporaryDirectory(prefix="stain-search-pyfunc-") as tmp:
        entry = Path(tmp) / "stain_search_pyfunc.py"
        entry.write_text(PYFUNC_ENTRY)
        with warnings.catch_warnings():
            # MLflow's advice to add predict type hints / an input example: the
            # explicit tensor signature below already says what goes in and out.
            warnings.filterwarnings("ignore", message=".*(type hints|input example).*")
            version, run_id = registry.register_pyfunc_model(
                uri, experiment=experiment or model_name, run_name=f"export-{folder.name}",
                parent_run_id=parent_run_id, tags=tags,
                metrics={k: v for k, v in (prov.get("metrics") or {}).items()
                         if isinstance(v, (int, float))},
                model_name=model_name, alias=alias,
                description=registry.describe_model_version(prov), python_model=str(entry),
                model_config=dict(options or {}), artifacts={"export": str(folder)},
                # stain-search travels with the model: serving needs only the
                # pip requirements, not this package installed.
                code_paths=[str(Path(stain_search.__file__).parent)],
                signature=pyfunc_signature(), pip_requirements=pip_requirements())
    return Registered(name=model_name, version=version, alias=alias, run_id=run_id,
                      uri=f"models:/{model_name}@{alias}", tracking_uri=uri)


# --- `stain-search export`: best checkpoint → export folder → registry ---------------------

@dataclass
class ExportResult:
    folder: Path
    candidate: Any  # stain_search.deploy.select.Candidate
    objectives: list[tuple[str, str]]  # the search's (metric, mode)
    registered: Registered | None


def export_search(name: str, *, storage: str | Path | None = None,
                  tracking_uri: str | None = None, trial: str | None = None,
                  epoch: int | None = None, out: str | Path | None = None,
                  constraints=(), space_constraints: bool = True, register: bool = True,
                  model_name: str | None = None,
                  alias: str = DEFAULT_ALIAS, portable: str = "auto",
                  overwrite: bool = False, confirmed: bool = False) -> ExportResult:
    """Export the best checkpoint of search ``name`` (or ``trial``/``epoch``); at a
    terminal a spinner on stderr says which step runs (an ONNX export takes a while).
    ``confirmed``: the checkpoint ``stain-search confirm`` names instead (the deploy
    rule within the configuration best by its mean over seeds)."""
    from stain_search.deploy.select import pick, select

    with progress("export: ranking checkpoints") as advance:
        def step(what: str) -> None:
            advance(0, description=f"export: {what}")

        if confirmed:
            chosen, _, objectives = _confirmed_choice(
                name, storage=storage, tracking_uri=tracking_uri, trial=trial, epoch=epoch,
                constraints=constraints)
        else:
            selection = select(name, storage=storage, tracking_uri=tracking_uri,
                               constraints=constraints, space_constraints=space_constraints)
            chosen = pick(selection, trial=trial, epoch=epoch)
            objectives = selection.objectives
        name_out = f"{chosen.trial}_epoch_{chosen.epoch:04d}"
        sdir = SearchDir.of(storage, name)
        out = Path(out) if out else sdir.exports / name_out
        provenance = {"search": name, "search_dir": sdir.where,
                      "trial": chosen.trial, "optuna_trial": chosen.number,
                      "trial_state": chosen.state, "mlflow_run_id": chosen.run_id,
                      "params": chosen.params, "rank": chosen.rank, "confirmed": confirmed,
                      "objectives": [{"metric": m, "mode": mode} for m, mode in objectives]}
        guarded = (sdir.root.parent,) if sdir.remote is None else ()
        folder = export_checkpoint(chosen.checkpoint, out, provenance=provenance,
                                   portable=portable, overwrite=overwrite, on_step=step,
                                   guarded=guarded)
        registered = None
        if register:
            step("registering the model in MLflow")
            registered = register_export(folder, tracking_uri=tracking_uri,
                                         model_name=model_name or name, alias=alias,
                                         experiment=name, parent_run_id=chosen.run_id)
    return ExportResult(folder=folder, candidate=chosen, objectives=objectives,
                        registered=registered)


def _confirmed_choice(name: str, *, storage, tracking_uri, trial, epoch, constraints):
    """(candidate, search folder, objectives) of the confirmation's choice."""
    from stain_search.deploy.confirmed import confirmation

    if trial is not None or epoch is not None or constraints:
        raise ConfigError("--confirmed exports the confirmation's choice; --trial, --epoch, "
                          "--min and --max pick a checkpoint themselves: drop one of them")
    sdir = SearchDir.of(storage, name).pull()
    sdir.read_record()  # no such search: one line
    conf = confirmation(sdir, tracking_uri=tracking_uri)
    if conf is None:
        raise ConfigError(f"search {name!r} has no confirmation yet; run `stain-search "
                          f"confirm {name} --top 3 --seeds 3` first")
    if conf.deploy is None:
        raise ConfigError(f"search {name!r}: no confirmation run has finished; continue it "
                          f"with `stain-search confirm {name}` and the same --top/--seeds")
    return conf.deploy, sdir.root, conf.objectives
