"""Files and folders that appear complete or not at all.

A result (a checkpoint folder, a model export, an image, a manifest, cached
statistics) is written under a temporary name beside its destination and
renamed into place in one step (``os.replace``, atomic on one filesystem).
A crash midway leaves at most a stray ``.tmp-*`` entry that no reader picks,
never half a result under the real name; readers racing a writer see the
old version or the new one, nothing in between.

- :func:`atomic_dir`: fill a temporary folder; it becomes the destination.
- :func:`atomic_path`: a temporary file path for any writer (PIL, tifffile,
  NumPy, Arrow); on success it is flushed to disk and renamed.
- :func:`atomic_write_bytes`, :func:`atomic_write_text`: the common cases.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from stain_search.errors import StainSearchError

class OutputRefused(StainSearchError):
    """An output path that --overwrite must not replace."""


TMP_PREFIX = ".tmp-"  # every temporary entry starts so: readers skip it, cleaners find it


@contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """``with atomic_dir(dest) as tmp:`` fill ``tmp``; on leaving the block
    it becomes ``dest``. On an exception ``tmp`` is removed and ``dest`` is
    left as it was.

    ``overwrite=False`` never replaces a non-empty ``dest``: the rename then
    fails (``OSError``) and ``tmp`` is removed. Several writers of the same
    content can race this way: the first rename wins.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folders are private (0700); this keeps the umask's mode.
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and (dest.exists() or dest.is_symlink()):
            _swap_in(tmp, dest)
        else:  # onto an empty folder a rename succeeds; onto a non-empty one it fails
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, dest: Path) -> None:
    """``new`` becomes ``dest``: the old ``dest`` is renamed aside first and
    only removed once ``new`` stands in its place (if the second rename fails,
    the old one is put back), so a crash never leaves neither."""
    old = dest.parent / f"{TMP_PREFIX}old-{dest.name}-{secrets.token_hex(6)}"
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


# Written into every output folder made for a user (a translated folder); an
# export's own model.json says the same of an export. --overwrite replaces
# only a folder that says so.
OUTPUT_MARKER = ".stain-search-output"


def check_replaceable(dest: str | Path, *, ours: Callable[[Path], bool], what: str,
                      guarded: Iterable[str | Path] = ()) -> None:
    """Refuse (``OutputRefused``) to replace ``dest`` unless it is ``what`` this
    tool wrote (``ours(dest)``), and never the working folder, a ``guarded``
    folder (the storage) or a folder above any of them, whatever it holds."""
    dest = Path(dest).resolve()
    for folder, name in [(Path.cwd(), "the working folder"),
                         *((Path(g), "the storage folder") for g in guarded)]:
        folder = folder.resolve()
        if dest == folder or dest in folder.parents:
            where = name if dest == folder else f"a folder above {name} ({folder})"
            raise OutputRefused(f"{dest}: is {where}; --overwrite never replaces it: choose "
                                f"another --out")
    if not ours(dest):
        raise OutputRefused(f"{dest}: exists and is not {what}; --overwrite replaces only "
                            f"{what}, never other files: choose another --out, or move it "
                            f"away yourself")


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """``with atomic_path(dest) as tmp:`` write the file ``tmp`` (by any
    means); on leaving the block it is fsynced and renamed to ``dest``.

    ``tmp`` lies in ``dest``'s folder (one filesystem, so the rename is
    atomic) and ends with ``dest``'s name, so writers that pick a format by
    extension pick the right one. It does not exist yet: the writer creates
    it, with the mode the umask gives (``tempfile.mkstemp`` would make it
    private, 0600). On any exception, or if the block leaves no file,
    ``tmp`` is removed and ``dest`` is left as it was.

    ``fsync=False`` keeps the rename's atomicity against a crashing process
    but not against a power cut: for the many files of a folder that is
    itself built by :func:`atomic_dir`, where one fsync per small file would
    double the cost of writing it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{TMP_PREFIX}{secrets.token_hex(6)}-{dest.name}"
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: the writer left no file to rename to {dest}")
        if fsync:
            with open(tmp, "rb") as f:  # the data reaches the disk before the name does
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(dest.parent)


def atomic_write_bytes(dest: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically; returns ``dest``."""
    with atomic_path(dest) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(dest)


def atomic_write_text(dest: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``dest`` atomically; returns ``dest``."""
    return atomic_write_bytes(dest, text.encode(encoding))
