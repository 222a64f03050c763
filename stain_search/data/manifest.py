"""A dataset read through the Parquet manifest that `stain-search data prepare` writes.

``data.path: DIR/manifest.parquet`` (or ``DIR`` itself, when it holds one)
takes the tiles, their domains and their splits from the manifest's rows
rather than from the folder listing, so what was prepared is what is
trained on, and the split is the one ``prepare`` chose (per source, or per
tile hash). Only the ``domain``, ``split`` and ``path`` columns are read:
a manifest with more columns (slide coordinates, tissue fractions) reads
the same. Paths are relative to the manifest's folder (or absolute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from stain_search.errors import DataError

MANIFEST = "manifest.parquet"
COLUMNS = ("domain", "split", "path")
SPLIT_KEYS = {("train", "A"): "train_a", ("train", "B"): "train_b",
              ("test", "A"): "test_a", ("test", "B"): "test_b"}
PARAMS_KEY = b"stain_search.prepare"  # schema metadata: prepare's settings


def manifest_file(path: str | Path) -> Path | None:
    """The manifest ``path`` names (the file, or a folder holding one), else None."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return path
    if path.is_dir() and (path / MANIFEST).is_file():
        return path / MANIFEST
    return None


def read_manifest(path: Path) -> tuple[dict[str, list[Path]], dict]:
    """(split key → tile paths sorted by name, prepare's settings) from a manifest."""
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet manifest ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path}: manifest has no column {missing[0]!r} (it needs "
                        f"{', '.join(COLUMNS)}); write it with `stain-search data prepare`")
    rows = pq.read_table(path, columns=list(COLUMNS)).to_pylist()
    root = path.parent
    splits: dict[str, list[Path]] = {key: [] for key in SPLIT_KEYS.values()}
    for i, row in enumerate(rows):
        key = SPLIT_KEYS.get((row["split"], row["domain"]))
        if key is None:
            raise DataError(f"{path}: row {i} has split {row['split']!r} and domain "
                            f"{row['domain']!r}; expected split train/test and domain A/B")
        splits[key].append(root / row["path"])
    for key, files in splits.items():
        if not files:
            raise DataError(f"{path}: the manifest lists no {key.replace('_', ' ')} tiles; "
                            f"prepare the dataset again with more sources or a lower "
                            f"min_tissue")
        absent = next((p for p in files if not p.is_file()), None)
        if absent is not None:
            raise DataError(f"{absent}: listed in {path} but missing; the prepared folder "
                            f"was moved or edited: prepare it again")
        files.sort(key=lambda p: p.name)
    raw = (schema.metadata or {}).get(PARAMS_KEY)
    return splits, json.loads(raw) if raw else {}
