"""stain_search.storage and the mirror's rules, without a store (fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stain_search import mirror
from stain_search.checkpoint import (STATE_POINTER, has_state, list_checkpoints, read_meta,
                                     write_checkpoint)
from stain_search.search_dir import SearchDir
from stain_search.storage import Remote, StorageUnreachable, is_uri, mirror_of, scratch_root


@pytest.mark.parametrize("storage, uri", [
    ("s3://bucket/runs", True), ("gs://b/x", True), ("hdfs://nn/p", True),
    ("runs", False), ("/abs/runs", False), ("file:///abs/runs", False), ("C:/runs", False),
    (None, False), (Path("s3:/x"), False)])
def test_what_counts_as_a_uri(storage, uri):
    assert is_uri(storage) is uri


def test_a_uri_search_dir_is_a_mirror_of_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("STAIN_SEARCH_MIRROR", str(tmp_path / "m"))
    sdir = SearchDir.of("s3://bucket/runs", "lambda")
    assert sdir.remote.uri == "s3://bucket/runs/lambda"
    assert sdir.root == tmp_path / "m" / "s3" / "bucket" / "runs" / "lambda"
    assert sdir.where == "s3://bucket/runs/lambda"
    assert sdir.trial_location(3) == "s3://bucket/runs/lambda/trials/trial_003"
    assert sdir.tune_location == "s3://bucket/runs/lambda/tune"
    assert sdir.confirmation.remote.uri == "s3://bucket/runs/lambda/confirm"
    assert mirror_of("gs://b/p/q") == tmp_path / "m" / "gs" / "b" / "p" / "q"
    local = SearchDir.of(tmp_path / "runs", "lambda")
    assert local.remote is None and local.where == str(tmp_path / "runs" / "lambda")


def test_storage_env_is_every_commands_default(tmp_path, monkeypatch):
    monkeypatch.setenv("STAIN_SEARCH_STORAGE", str(tmp_path / "elsewhere"))
    assert SearchDir.of(None, "x").root == (tmp_path / "elsewhere" / "x").resolve()
    assert SearchDir.of(tmp_path / "given", "x").root == (tmp_path / "given" / "x").resolve()


def test_scratch_is_read_on_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("STAIN_SEARCH_SCRATCH", str(tmp_path / "node"))
    assert scratch_root() == tmp_path / "node"


def test_credentials_in_the_uri_are_refused_without_echoing_them():
    with pytest.raises(StorageUnreachable, match="credentials in the URI") as err:
        SearchDir.of("s3://AKIA123:s3cr3t@bucket/runs", "x")
    assert "s3cr3t" not in str(err.value) and "AKIA123" not in str(err.value)


def test_a_mirrored_checkpoint_has_meta_and_a_pointer(tmp_path):
    ckpt = write_checkpoint(tmp_path / "t" / "checkpoint_epoch_0001", state={"w": 1},
                            meta={"epoch": 1, "metrics": {"fd_random": 3.0}})
    (ckpt / "state.pt").unlink()
    assert not has_state(ckpt) and list_checkpoints(tmp_path / "t") == []
    (ckpt / STATE_POINTER).write_text("s3://bucket/runs/x/trials/trial_000/checkpoint_epoch_0001/state.pt\n")
    assert has_state(ckpt) and list_checkpoints(tmp_path / "t") == [ckpt]
    assert read_meta(ckpt)["epoch"] == 1  # metrics without the weights


def test_a_longer_local_journal_that_extends_the_stores_is_kept(tmp_path):
    class FakeRemote:
        def __init__(self, data):
            self.data = data

        def read_bytes(self, rel):
            return self.data

    local = tmp_path / "study.journal"
    local.write_bytes(b"op1\nop2\nop3\n")
    mirror._pull_journal(FakeRemote(b"op1\nop2\n"), "study.journal", local)
    assert local.read_bytes() == b"op1\nop2\nop3\n"  # ours is newer: kept
    mirror._pull_journal(FakeRemote(b"op1\nop2\nop3\nop4\n"), "study.journal", local)
    assert local.read_bytes() == b"op1\nop2\nop3\nop4\n"  # theirs is newer
    local.write_bytes(b"other\nlonger history\n")
    mirror._pull_journal(FakeRemote(b"op1\n"), "study.journal", local)
    assert local.read_bytes() == b"op1\n"  # not an extension: the store is the truth


def test_remote_join_and_name():
    r = Remote("s3://bucket/runs/")
    assert r.uri == "s3://bucket/runs" and r.join("a", "b").uri == "s3://bucket/runs/a/b"
    assert r.join("lambda").name == "lambda"


def test_a_space_can_name_its_storage(tmp_path):
    from conftest import tiny_space_yaml
    from stain_search.errors import ConfigError
    from stain_search.spaces import load_space

    space = tmp_path / "s.yaml"
    space.write_text(tiny_space_yaml(name="s") + "storage: s3://bucket/runs\n")
    assert load_space(space).storage == "s3://bucket/runs"
    space.write_text(tiny_space_yaml(name="s") + "storage: [a]\n")
    with pytest.raises(ConfigError, match="storage"):
        load_space(space)


def test_a_donor_checkpoint_is_pulled_at_the_scored_epoch_or_else_the_newest(tmp_path):
    """A PBT exploit with a URI storage pulls the donor's checkpoint PBT scored
    (issue 25, item 5); if retention dropped it, the newest."""
    from stain_search.checkpoint import PREFIX

    class FolderRemote:  # the store's listing and download, over a local folder
        def __init__(self, root):
            self.root = root

        def list(self, rel="", *, recursive=False):
            return [(str(p.relative_to(self.root)), p.is_dir()) for p in self.root.rglob("*")]

        def download(self, rel, local):
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes((self.root / rel).read_bytes())
            return local

    store = tmp_path / "store"
    for epoch in (1, 2, 3):
        write_checkpoint(store / f"{PREFIX}{epoch:04d}", state={"w": epoch},
                         meta={"epoch": epoch, "metrics": {}})
    remote = FolderRemote(store)
    got = mirror.pull_checkpoint(remote, tmp_path / "a", epoch=2)
    assert got.name == f"{PREFIX}0002" and read_meta(got)["epoch"] == 2
    shutil.rmtree(store / f"{PREFIX}0002")
    got = mirror.pull_checkpoint(remote, tmp_path / "b", epoch=2)
    assert read_meta(got)["epoch"] == 3
    (tmp_path / "empty").mkdir()
    assert mirror.pull_checkpoint(FolderRemote(tmp_path / "empty"), tmp_path / "c", epoch=1) is None
