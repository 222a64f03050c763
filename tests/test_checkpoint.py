"""Checkpoint retention for the in_trial executor: the k best by the
objective plus the newest (a restart continues from it), nothing else."""

from __future__ import annotations

import torch

from stain_search.checkpoint import (best_checkpoint_in, checkpoint_name, list_checkpoints,
                                     prune_checkpoints, store_checkpoint, write_checkpoint)


def _write(root, epoch, fd):
    metrics = {"fd_random": fd} if fd is not None else {}
    return write_checkpoint(root / checkpoint_name(epoch), state={"w": torch.zeros(1)},
                            meta={"epoch": epoch, "metrics": metrics, "config": {}})


def test_keeps_the_k_best_and_the_newest(tmp_path):
    for epoch, fd in [(1, 5.0), (2, 1.0), (3, 3.0), (4, 2.0), (5, 9.0)]:
        _write(tmp_path, epoch, fd)
    gone = prune_checkpoints(tmp_path, keep=2, metric="fd_random", mode="min")
    assert sorted(p.name for p in gone) == [checkpoint_name(1), checkpoint_name(3)]
    assert [p.name for p in list_checkpoints(tmp_path)] == \
        [checkpoint_name(2), checkpoint_name(4), checkpoint_name(5)]
    assert best_checkpoint_in(tmp_path, metric="fd_random", mode="min").name == checkpoint_name(2)


def test_max_mode_and_unscored_epochs(tmp_path):
    for epoch, fd in [(1, 0.2), (2, None), (3, 0.9), (4, None)]:  # 2, 4: not evaluated
        _write(tmp_path, epoch, fd)
    prune_checkpoints(tmp_path, keep=1, metric="fd_random", mode="max")
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(3), checkpoint_name(4)]
    assert best_checkpoint_in(tmp_path, metric="fd_random", mode="max").name == checkpoint_name(3)
    assert best_checkpoint_in(tmp_path, metric="ssim_gt", mode="max") is None


def test_store_replaces_atomically(tmp_path):
    src = _write(tmp_path / "tmp", 1, 4.0)
    first = store_checkpoint(src, tmp_path / "kept")
    again = store_checkpoint(src, tmp_path / "kept")
    assert first == again and list_checkpoints(tmp_path / "kept") == [first]
    assert not [p for p in (tmp_path / "kept").iterdir() if p.name.startswith(".tmp")]
