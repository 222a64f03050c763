"""A local SQLite MLflow store (``sqlite:///…/mlflow.db``), created whole, once.

MLflow creates a SQLite store the first time a client opens it, by running
its schema migrations in place. Two drivers started in the same instant in a
fresh folder both migrate the same file; the loser fails ("table
_alembic_tmp_experiments already exists") and the file is left half-migrated,
unusable by every later command. A crash during those seconds does the same.

So a new store is never migrated in place:

- an empty store made by this MLflow version is kept once per machine in the
  cache (``$STAIN_SEARCH_CACHE/mlflow-store/``), made in a temporary file and
  renamed into place;
- a new ``mlflow.db`` is a copy of it, written beside the destination and
  renamed into place, under an exclusive lock on the folder: the second of two
  drivers finds the store made and opens it;
- a store left half-migrated by a crash or by an older version of this tool
  is recognised. Holding no experiment of its own, it is set aside (renamed
  ``mlflow.db.broken-<time>``) and made again; otherwise the error names it
  and the fix.

Opening a store that exists does nothing here: MLflow upgrades an older
schema itself, as always.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stain_search.atomic import TMP_PREFIX
from stain_search.errors import StainSearchError
from stain_search.storage import cache_root


class BrokenStore(StainSearchError):
    """A SQLite MLflow store that a crash left half-made, holding experiments."""


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def ensure_store(uri: str) -> None:
    """Make sure a ``sqlite:///`` store is whole before MLflow opens it (see the
    module's docstring). Other URIs are MLflow's own business."""
    db = sqlite_path(uri)
    if db is None or (db.exists() and _whole(db)):
        return
    if not db.parent.is_dir():
        return  # MLflow's own error names the path
    with _folder_lock(db.parent):
        if db.exists():
            if _whole(db):
                return  # the other driver made it while this one waited
            _set_aside(db)
        template = _template()
        tmp = db.with_name(f"{TMP_PREFIX}{db.name}-{os.getpid()}")
        try:
            shutil.copyfile(template, tmp)
            with sqlite3.connect(tmp) as con:  # as MLflow would: ./mlruns of this process
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                            (str(Path("mlruns").resolve() / "0"),))
            con.close()
            os.replace(tmp, db)
        finally:
            tmp.unlink(missing_ok=True)


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _whole(db: Path) -> bool:
    """Migrated to the end: MLflow's tables are there and no migration's
    temporary table is left behind."""
    if db.stat().st_size == 0:
        return False
    try:
        tables = _tables(db)
    except sqlite3.DatabaseError:
        return True  # not SQLite at all: MLflow's own error names the file
    return "alembic_version" in tables and "experiments" in tables and \
        not any(t.startswith("_alembic_tmp_") for t in tables)


def _set_aside(db: Path) -> None:
    """A half-made store: set aside when it holds nothing of the user's."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            own = con.execute("SELECT COUNT(*) FROM experiments WHERE experiment_id != 0") \
                .fetchone()[0] if "experiments" in _tables(db) else 0
    except sqlite3.DatabaseError:
        own = 0
    if own:
        raise BrokenStore(
            f"MLflow store {db} was left half-upgraded (a crash during a schema migration) "
            f"and holds {own} experiment(s): back it up, then run `mlflow db upgrade "
            f"sqlite:///{db}` to finish the migration")
    os.replace(db, db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}"))


def _template() -> Path:
    """An empty store made by this MLflow version, kept in the cache."""
    import mlflow
    from mlflow.tracking import MlflowClient

    folder = cache_root() / "mlflow-store"
    template = folder / f"empty-mlflow-{mlflow.__version__}.db"
    if template.exists():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TMP_PREFIX}{template.name}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, template)
    finally:
        tmp.unlink(missing_ok=True)
    return template


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor): no
    lock file is left among the user's files."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
