"""Checkpoints: a folder per epoch, written atomically, loaded without pickle.

    checkpoint_epoch_0003/
        state.pt     tensors and plain containers only (torch.load weights_only=True)
        meta.json    format tag, epoch, metrics, the resolved config, and
                     state.pt's size and SHA-256 (``files``), checked before use

A checkpoint folder is built under a temporary name and renamed into place
in one step, so a crash mid-write leaves a stray ``.tmp-*`` folder that no
reader picks, never a half checkpoint under a real name.

In the local mirror of a URI storage (``stain_search.storage``) a checkpoint
holds ``meta.json`` and, instead of its weights, ``state.pt.remote``: the
URI of its ``state.pt``. Everything that only reads metrics (selection, the
report) works on that; :func:`state_file` fetches the weights the first time
something loads them, so `best` never downloads every trial's weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stain_search.atomic import atomic_dir
from stain_search.errors import StainSearchError

if TYPE_CHECKING:
    import torch

FORMAT = "stain-search-checkpoint/1"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
STATE_POINTER = "state.pt.remote"  # in a mirror: where state.pt is (one URI)
PREFIX = "checkpoint_epoch_"
FILES = "files"  # in meta.json: each weights file's size and SHA-256 at writing


class CheckpointError(StainSearchError):
    """A folder or file that is not a usable stain-search checkpoint."""


def checkpoint_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:04d}"


def write_checkpoint(folder: Path, *, state: dict, meta: dict[str, Any]) -> Path:
    """Write state + meta into ``folder`` (created; must not exist yet)."""
    folder = Path(folder)
    # Serialised in memory, then written as plain bytes: torch's zip writer turns
    # a full disk into a RuntimeError ("unexpected pos"), a file write into the
    # OSError (ENOSPC, EDQUOT) that tells a search to stop and say why.
    import torch  # here, not above: readers of meta.json (status, best) never load torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    # What the weights were when written: a file that no longer matches is never trusted.
    files = {STATE_FILE: {"size": buffer.getbuffer().nbytes,
                          "sha256": hashlib.sha256(buffer.getbuffer()).hexdigest()}}
    with atomic_dir(folder) as tmp:  # re-written after a resume: replaced, never merged
        (tmp / STATE_FILE).write_bytes(buffer.getbuffer())
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, **meta, FILES: files},
                                                indent=2, default=str))
    return folder


def state_problem(folder: Path, meta: dict[str, Any], *, full: bool = False) -> str | None:
    """Why the checkpoint's weights cannot be trusted, or None: their size (and,
    ``full``, their SHA-256) differ from what ``meta.json`` recorded at writing.
    Checkpoints from before the record, and weights not yet fetched from a URI
    storage (unless ``full``), are taken as they are."""
    recorded = (meta.get(FILES) or {}).get(STATE_FILE)
    local = Path(folder) / STATE_FILE
    if not recorded or not (full or local.is_file()):
        return None
    path = state_file(folder)
    size = path.stat().st_size
    if size != recorded.get("size"):
        return f"{path}: {size:,} bytes, but {recorded.get('size'):,} were written (truncated or replaced)"
    if full and recorded.get("sha256"):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != recorded["sha256"]:
            return f"{path}: its SHA-256 differs from the one recorded when it was written (damaged)"
    return None


def has_state(folder: Path) -> bool:
    """The weights are here, or (a mirror) their URI is."""
    return (Path(folder) / STATE_FILE).is_file() or (Path(folder) / STATE_POINTER).is_file()


def state_file(folder: Path) -> Path:
    """The local ``state.pt``, fetched from the storage first in a mirror."""
    local = Path(folder) / STATE_FILE
    pointer = Path(folder) / STATE_POINTER
    if not local.is_file() and pointer.is_file():
        from stain_search.storage import Remote

        uri = pointer.read_text().strip()
        parent, _, name = uri.rpartition("/")
        Remote(parent).download(name, local)
    return local


def read_meta(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not has_state(folder) or not meta_path.is_file():
        raise CheckpointError(f"{folder}: not a stain-search checkpoint "
                              f"(expected {STATE_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: checkpoint format {meta.get('format')!r} is not "
                              f"{FORMAT!r}; it was not written by this version of stain-search")
    return meta


def read_checkpoint(folder: Path, *, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return (state, meta), after checking the weights against the size and hash
    recorded at writing. Never executes pickled code."""
    meta = read_meta(folder)
    if problem := state_problem(folder, meta, full=True):
        raise CheckpointError(f"{problem}; this checkpoint cannot be used: pick another "
                              f"(`stain-search best` ranks the usable ones)")
    try:
        import torch

        state = torch.load(state_file(folder), map_location=map_location, weights_only=True)
    except StainSearchError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise CheckpointError(f"{Path(folder) / STATE_FILE}: cannot be loaded safely "
                              f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return state, meta


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest epoch first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and (p / META_FILE).is_file()
             and has_state(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def store_checkpoint(src: Path, root: Path) -> Path:
    """Copy the checkpoint folder ``src`` to ``root/<its name>``, atomically:
    the copy appears complete or not at all (it replaces an older one)."""
    dest = Path(root) / Path(src).name
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return dest


def _score(folder: Path, metric: str) -> float | None:
    try:
        value = read_meta(folder)["metrics"].get(metric)
    except (CheckpointError, KeyError):
        return None
    return float(value) if isinstance(value, (int, float)) and value == value else None


def best_checkpoint_in(root: Path, *, metric: str, mode: str) -> Path | None:
    """The complete checkpoint under ``root`` with the best ``metric`` (None if none has it)."""
    scored = [(s, p) for p in list_checkpoints(root) if (s := _score(p, metric)) is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda t: t[0])[1]


def prune_checkpoints(root: Path, *, keep: int, metric: str, mode: str) -> list[Path]:
    """Keep the ``keep`` best checkpoints by ``metric`` and the newest one (a
    restart continues from it); delete the rest. Returns what was deleted."""
    found = list_checkpoints(root)
    if len(found) <= keep:
        return []
    scored = [(s, p) for p in found if (s := _score(p, metric)) is not None]
    scored.sort(key=lambda t: t[0], reverse=(mode == "max"))
    kept = {p for _, p in scored[:keep]} | {found[-1]}
    gone = [p for p in found if p not in kept]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
