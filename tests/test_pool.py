"""ImagePool: the reference's history-buffer behaviour, made reproducible and resumable."""

from __future__ import annotations

import io

import pytest
import torch

from stain_search.errors import ConfigError
from stain_search.pool import ImagePool


def batches(count, *, batch=2):
    """Distinct images: image k is filled with the value k."""
    values = torch.arange(count * batch, dtype=torch.float32) + 1
    return [values[i * batch:(i + 1) * batch].view(batch, 1, 1, 1).expand(batch, 3, 4, 4).clone()
            for i in range(count)]


def ids(images):
    return [int(image[0, 0, 0]) for image in images]


def test_size_zero_passes_through_detached():
    pool = ImagePool(0)
    images = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = pool.query(images)
    assert torch.equal(out, images) and not out.requires_grad
    assert len(pool) == 0


def test_fills_first_then_returns_new_or_past_images():
    pool = ImagePool(4, seed=0)
    data = batches(2) + batches(116, batch=1)[4:]  # images 1–4, then 5–116 one by one
    assert ids(pool.query(data[0])) == [1, 2] and ids(pool.query(data[1])) == [3, 4]
    assert sorted(ids(pool.images)) == [1, 2, 3, 4]
    swapped = kept = 0
    for images in data[2:]:
        before = ids(pool.images)
        out = ids(pool.query(images))
        after = ids(pool.images)
        for new, returned in zip(ids(images), out):
            if returned == new:
                kept += 1
            else:
                # A past image came back and the new one took its place.
                assert returned in before
                swapped += 1
        assert len(after) == 4
        assert sorted(before + ids(images)) == sorted(after + out)  # nothing lost or invented
    # With probability ½ each, over 112 images (σ ≈ 5.3).
    assert 56 - 20 < swapped < 56 + 20 and swapped + kept == 112


def test_outputs_keep_shape_dtype_and_are_detached():
    pool = ImagePool(3, seed=0)
    for _ in range(5):
        images = torch.randn(2, 3, 4, 4, requires_grad=True).to(torch.bfloat16)
        out = pool.query(images)
        assert out.shape == images.shape and out.dtype == torch.bfloat16
        assert not out.requires_grad


def test_same_seed_same_history_and_different_seed_differs():
    data = batches(30)
    runs = {}
    for seed in (0, 0, 1):
        pool = ImagePool(3, seed=seed)
        runs.setdefault(seed, []).append([ids(pool.query(images)) for images in data])
    assert runs[0][0] == runs[0][1]
    assert runs[0][0] != runs[1][0]


def test_default_seed_follows_torch_manual_seed():
    data = batches(20)
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)
        pool = ImagePool(3)
        outputs.append([ids(pool.query(images)) for images in data])
    assert outputs[0] == outputs[1]


def test_state_dict_round_trip_resumes_exactly():
    data = batches(40)
    pool = ImagePool(5, seed=3)
    for images in data[:10]:
        pool.query(images)
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(image.device.type == "cpu" for image in state["images"])

    resumed = ImagePool(5, seed=999)  # its own seed is overridden by the state
    resumed.load_state_dict(state)
    for images in data[10:]:
        assert torch.equal(pool.query(images), resumed.query(images))


def test_resuming_with_another_size_is_a_config_error():
    pool = ImagePool(5, seed=0)
    pool.query(batches(1)[0])
    with pytest.raises(ConfigError, match="pool_size"):
        ImagePool(3).load_state_dict(pool.state_dict())
