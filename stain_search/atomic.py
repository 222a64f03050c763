"""Folders that appear complete or not at all.

A result folder (a checkpoint, a model export, a folder of translated
slides) is built under a temporary name beside its destination and renamed
into place in one step. A crash midway leaves a stray ``.tmp-*`` folder that
no reader picks, never half a result under the real name; an older folder of
the same name is replaced, never merged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """``with atomic_dir(dest) as tmp:`` fill ``tmp``; on leaving the block
    it becomes ``dest``. On an exception ``tmp`` is removed and ``dest`` is
    left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
