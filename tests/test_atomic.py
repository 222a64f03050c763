"""Write-then-rename: a file or folder is complete under its name, or absent.

Each failure is injected at a different moment (while the writer writes,
at the fsync, at the rename, on Ctrl-C) and must leave the destination as
it was and no temporary entry behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stain_search import atomic
from stain_search.atomic import (TMP_PREFIX, atomic_dir, atomic_path, atomic_write_bytes,
                                 atomic_write_text)
from stain_search.cli import truncate_metrics
from stain_search.data.io import read_image, write_image


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_text_and_bytes_are_written_and_replace_the_old_file(tmp_path):
    dest = tmp_path / "sub" / "notes.json"
    assert atomic_write_text(dest, "first") == dest  # the folder is created
    atomic_write_text(dest, "zweite Fassung ✓")
    assert dest.read_text(encoding="utf-8") == "zweite Fassung ✓"
    atomic_write_bytes(dest, b"\x00\x01")
    assert dest.read_bytes() == b"\x00\x01"
    assert leftovers(dest.parent) == []


def test_the_temporary_path_is_beside_the_target_keeps_its_extension_and_is_new(tmp_path):
    dest = tmp_path / "tile.png"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent  # one filesystem: the rename is atomic
        assert tmp.name.startswith(TMP_PREFIX) and tmp.name.endswith("tile.png")
        assert not tmp.exists() and not dest.exists()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp)  # format from the name
    assert Image.open(dest).format == "PNG"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_files_and_folders_keep_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("exc", [RuntimeError("writer failed"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_writer_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, exc):
    dest = tmp_path / "stats.npz"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half of the new")
            raise exc
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "search.json"
    dest.write_text("old")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError) as info:
        atomic_write_text(dest, "new")
    assert info.value.errno == errno.ENOSPC
    assert dest.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_failing_rename_leaves_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    monkeypatch.setattr(atomic.os, "replace", enospc)
    with pytest.raises(OSError):
        atomic_write_text(dest, "new")
    assert dest.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_writer_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="left no file"):
        with atomic_path(tmp_path / "out.tif"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_fsync_false_still_renames_without_syncing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)  # would fail if called
    with atomic_path(tmp_path / "t.png", fsync=False) as tmp:
        tmp.write_bytes(b"png")
    assert (tmp_path / "t.png").read_bytes() == b"png"


def test_write_image_that_fails_midway_leaves_no_half_image(tmp_path, monkeypatch):
    target = tmp_path / "tile.png"

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")  # the start of a PNG, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        write_image(target, np.zeros((8, 8, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_image_round_trips(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name in ("a.png", "a.tif"):
        write_image(tmp_path / name, pixels)
        assert np.array_equal(read_image(tmp_path / name), pixels)
    assert leftovers(tmp_path) == []


# --- folders -------------------------------------------------------------------

def test_a_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    dest = tmp_path / "checkpoint"
    dest.mkdir()
    (dest / "stale.pt").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "state.pt").write_text("new")
        assert not (dest / "state.pt").exists()  # nothing under the real name yet
    assert sorted(p.name for p in dest.iterdir()) == ["state.pt"]  # replaced, not merged
    assert leftovers(tmp_path) == []


def test_a_failing_folder_leaves_the_old_one(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "model.pt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "model.pt").write_text("half")
            raise RuntimeError
    assert (dest / "model.pt").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_without_overwrite_the_first_folder_wins(tmp_path):
    dest = tmp_path / "dataset"
    dest.mkdir()  # an empty folder may be filled
    with atomic_dir(dest, overwrite=False) as tmp:
        (tmp / "phantom.json").write_text("first")
    with pytest.raises(OSError):
        with atomic_dir(dest, overwrite=False) as tmp:
            (tmp / "phantom.json").write_text("second")
    assert (dest / "phantom.json").read_text() == "first"
    assert leftovers(tmp_path) == []


# --- the users: metrics.jsonl on resume ------------------------------------------

def _metrics(path: Path, epochs: range) -> str:
    text = "".join(json.dumps({"epoch": e, "loss_G": 0.5}) + "\n" for e in epochs)
    path.write_text(text)
    return text


def test_truncate_metrics_keeps_the_epochs_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, range(1, 6))
    truncate_metrics(path, upto_epoch=3)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_truncate_metrics_that_fails_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    before = _metrics(path, range(1, 6))
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError):
        truncate_metrics(path, upto_epoch=3)
    assert path.read_text() == before
    assert leftovers(tmp_path) == []
