"""The speed switches (train.channels_last, optim.fused, train.compile) are
the same training, only faster: same losses and weights as the default step
to float tolerance, the same checkpoint format, and clear errors where a
switch cannot apply. Their speed is bench/train_step.py's business."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_BASE
from stain_search.config import load_config
from stain_search.errors import ConfigError
from stain_search.gan import Batch, CycleGAN

BASE = {**TINY_BASE, "loss.r1_gamma": 0.5, "model.attention": "both", "model.depth": 2}


def two_steps(**switches):
    config = load_config(None, {**BASE, **switches})
    model = CycleGAN(config, device=torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(2):
        x, y = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
        losses.append(model.train_step(Batch(x=x, y=y)))
    return model, losses


def assert_same_training(a, b, *, atol):
    (ma, la), (mb, lb) = a, b
    for step_a, step_b in zip(la, lb):
        assert step_a.keys() == step_b.keys()
        for k in step_a:
            assert step_a[k] == pytest.approx(step_b[k], abs=atol, rel=atol), k
    sa, sb = ma.state_dict_full(), mb.state_dict_full()
    for net in ("G", "F", "D_X", "D_Y"):
        assert sa[net].keys() == sb[net].keys()  # checkpoints stay interchangeable
        for key in sa[net]:
            assert torch.allclose(sa[net][key], sb[net][key], atol=atol, rtol=atol), (net, key)


@pytest.fixture(scope="module")
def default():
    return two_steps()


def test_channels_last_is_the_same_training(default):
    model, _ = two_steps(**{"train.channels_last": True})
    conv = next(m for m in model.G.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training(default, (model, _), atol=1e-4)


def test_fused_adam_is_the_same_training(default):
    model, losses = two_steps(**{"optim.fused": True})
    assert model.opt_g.defaults["fused"] is True and model.opt_d.defaults["fused"] is True
    assert_same_training(default, (model, losses), atol=1e-4)


def test_fused_needs_adam():
    with pytest.raises(ConfigError, match="optim.fused.*adam"):
        load_config(None, {**BASE, "optim.fused": True, "optim.name": "extra_adam"}).validate()


def test_compile_is_the_same_training(default, monkeypatch):
    # Dynamo + AOTAutograd for real, without Inductor's C++ toolchain (and
    # its minutes of compiling on 2 cores): the graph capture is what we own.
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: real(self, **{"backend": "aot_eager", **kw}))
    torch._dynamo.reset()
    model, losses = two_steps(**{"train.compile": True})
    # G and F compiled in place; D stays eager under R1 (double backward).
    assert model.G._compiled_call_impl is not None and model.F._compiled_call_impl is not None
    assert model.D_X._compiled_call_impl is None
    assert_same_training(default, (model, losses), atol=1e-4)
