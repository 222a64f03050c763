"""Loading a stain-search model: an export folder, a training checkpoint, or a
registered ``models:/name@alias`` — without unpickling anything.

An export (``stain-search export``, :mod:`~stain_search.deploy.export`) is
``model.json`` (format tag, model config, provenance, the training data's
µm/px, file hashes) beside ``generator.safetensors``. Checkpoints are read
with ``torch.load(weights_only=True)``; a file that is not one of ours is one
:class:`ModelError`. Both the exporter and the translator import this module.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stain_search.checkpoint import CheckpointError, read_checkpoint
from stain_search.config import Config, ModelConfig, apply_overrides
from stain_search.errors import ConfigError, StainSearchError
from stain_search.models import build_generator

FORMAT = "stain-search-model/1"
WEIGHTS_FILE = "generator.safetensors"
INFO_FILE = "model.json"


class ModelError(StainSearchError):
    """A path or file that is not a usable stain-search model."""


# --- the export folder --------------------------------------------------------------

def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an export this tool wrote: its model.json names
    the format. The marker `export --overwrite` asks for before replacing it."""
    try:
        return json.loads((Path(folder) / INFO_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class ExportedModel:
    """An export (or a training checkpoint) loaded into memory."""

    source: str  # where it came from: a folder, a checkpoint, models:/name@alias
    info: dict[str, Any]  # model.json
    model: ModelConfig
    state: dict[str, torch.Tensor]  # G's state dict

    @property
    def depth(self) -> int:
        return self.model.depth

    @property
    def mpp(self) -> float | None:
        """µm/px of the data G was trained on (None: not known at training)."""
        value = (self.info.get("data") or {}).get("mpp")
        return float(value) if value else None

    def generator(self, *, device: str | torch.device = "cpu") -> nn.Module:
        net = build_generator(self.model)
        try:
            net.load_state_dict(self.state, strict=True)
        except RuntimeError as err:
            raise ModelError(f"{self.source}: the weights do not fit the model config in "
                             f"{INFO_FILE} ({str(err).splitlines()[0]})") from None
        return net.to(device).eval()


def model_config(raw: Any, *, where: str) -> ModelConfig:
    """ModelConfig from a mapping, every key checked (as training configs are)."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: `model` must be a mapping of model settings")
    try:
        return apply_overrides(Config(), {f"model.{k}": v for k, v in raw.items()},
                               where=where).model
    except ConfigError as err:
        raise ModelError(f"{where}: {err}") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_export(folder: str | Path) -> ExportedModel:
    """Load an export folder, checking its format tag and file hashes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    folder = Path(folder)
    info_path = folder / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{info_path}: unreadable model description ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelError(f"{folder}: {INFO_FILE} is not a {FORMAT!r} description (format "
                         f"{info.get('format') if isinstance(info, dict) else None!r}); "
                         f"export a model with `stain-search export`")
    weights = folder / WEIGHTS_FILE
    expected = (info.get("files") or {}).get(WEIGHTS_FILE, {}).get("sha256")
    if not weights.is_file():
        raise ModelError(f"{folder}: {WEIGHTS_FILE} is missing")
    if expected and sha256(weights) != expected:
        raise ModelError(f"{weights}: does not match the hash in {INFO_FILE} (changed or "
                         f"damaged since export); export the model again")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tag = (f.metadata() or {}).get("format")
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: not a safetensors file ({err})") from None
    if tag != FORMAT:
        raise ModelError(f"{weights}: safetensors file without the {FORMAT!r} tag; it was not "
                         f"written by `stain-search export`")
    return ExportedModel(source=str(folder), info=info,
                         model=model_config(info.get("model"), where=str(info_path)), state=state)


def read_checkpoint_model(folder: Path) -> ExportedModel:
    """A training checkpoint used directly as a model (weights_only load)."""
    try:
        state, meta = read_checkpoint(folder)
    except CheckpointError as err:
        raise ModelError(str(err)) from None
    if not isinstance(state, dict) or "G" not in state:
        raise ModelError(f"{folder}: checkpoint holds no generator G")
    model = model_config((meta.get("config") or {}).get("model", {}), where=str(folder))
    info = {"format": FORMAT, "model": asdict(model),
            "provenance": {"checkpoint": str(folder), "epoch": meta.get("epoch"),
                           "metrics": meta.get("metrics", {})}}
    return ExportedModel(source=str(folder), info=info, model=model, state=state["G"])


def load_model(ref: str | Path, *, tracking_uri: str | None = None) -> ExportedModel:
    """An export folder (or its model.json / generator.safetensors), a training
    checkpoint folder, or ``models:/name@alias`` / ``models:/name/version``."""
    from stain_search import registry, tracking
    from stain_search.checkpoint import META_FILE, has_state

    text = str(ref)
    if text.startswith("models:/"):
        with tempfile.TemporaryDirectory(prefix="stain-search-model-") as tmp:
            local = registry.download_model(tracking.resolve_tracking_uri(tracking_uri), text,
                                            Path(tmp))
            found = [p.parent for p in local.rglob(INFO_FILE)]
            if not found:
                raise ModelError(f"{text}: the registered model holds no {INFO_FILE}; it was "
                                 f"not registered by `stain-search export`")
            model = read_export(found[0])
            model.source = text
            return model
    path = Path(ref)
    if not path.exists():
        raise ModelError(f"{path}: no such model folder (give an export folder from "
                         f"`stain-search export`, or models:/NAME@ALIAS)")
    if path.is_file():
        if path.name in (INFO_FILE, WEIGHTS_FILE):
            return read_export(path.parent)
        raise ModelError(f"{path}: not a stain-search model; give the export folder (with "
                         f"{INFO_FILE} and {WEIGHTS_FILE}) made by `stain-search export`")
    if (path / INFO_FILE).is_file():
        return read_export(path)
    if (path / META_FILE).is_file() and has_state(path):
        return read_checkpoint_model(path)
    raise ModelError(f"{path}: not a stain-search model folder (no {INFO_FILE}); export one "
                     f"with `stain-search export NAME`")
