"""Losses against hand-computed values; R1 against analytic and independent gradients."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from stain_search.config import LossConfig
from stain_search.errors import ConfigError
from stain_search.losses import (GAN_LOSSES, cycle_loss, gan_loss, identity_loss, r1_penalty,
                                 r1_term)

MODES = list(GAN_LOSSES)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ---------------------------------------------------------------- adversarial losses

def test_lsgan_matches_hand_computed_values():
    real = torch.tensor([0.5, 1.5])
    fake = torch.tensor([0.0, 1.0])
    # MSE(real, 1) = (0.25 + 0.25) / 2 = 0.25; MSE(fake, 0) = (0 + 1) / 2 = 0.5
    assert gan_loss("lsgan").d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    # MSE(fake, 1) = (1 + 0) / 2
    assert gan_loss("lsgan").g_loss(fake).item() == pytest.approx(0.5)


def test_vanilla_matches_hand_computed_values():
    real = torch.tensor([0.0, 2.0])
    fake = torch.tensor([0.0, -1.0])
    # BCE(z, 1) = softplus(-z); BCE(z, 0) = softplus(z)
    d_real = (softplus(0.0) + softplus(-2.0)) / 2
    d_fake = (softplus(0.0) + softplus(-1.0)) / 2
    assert gan_loss("vanilla").d_loss(real, fake).item() == pytest.approx(0.5 * (d_real + d_fake))
    # Non-saturating: -log sigmoid(fake) = softplus(-fake)
    g = (softplus(0.0) + softplus(1.0)) / 2
    assert gan_loss("vanilla").g_loss(fake).item() == pytest.approx(g)


def test_hinge_matches_hand_computed_values():
    real = torch.tensor([0.5, 2.0])   # relu(1 - real) = [0.5, 0]  → mean 0.25
    fake = torch.tensor([-2.0, 0.5])  # relu(1 + fake) = [0, 1.5]  → mean 0.75
    assert gan_loss("hinge").d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert gan_loss("hinge").g_loss(fake).item() == pytest.approx(0.75)


@pytest.mark.parametrize("mode", MODES)
def test_loss_signs_are_sane(mode):
    loss = gan_loss(mode)
    low, high = torch.full((2, 1, 4, 4), 0.1), torch.full((2, 1, 4, 4), 0.9)
    # D is better off when it scores real images higher and fakes lower...
    assert loss.d_loss(high, low) < loss.d_loss(low, low)
    assert loss.d_loss(high, low) < loss.d_loss(high, high)
    # ...and G is better off when D scores its fakes higher.
    assert loss.g_loss(high) < loss.g_loss(low)
    # The same, as gradients: pushing real logits up / fake logits down helps D.
    real, fake = low.clone().requires_grad_(), low.clone().requires_grad_()
    loss.d_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_losses_reduce_patch_maps_to_float_scalars(mode):
    loss = gan_loss(mode)
    torch.manual_seed(0)
    real = torch.randn(2, 1, 6, 6, dtype=torch.bfloat16)  # a patch map under autocast
    fake = torch.randn(2, 1, 6, 6, dtype=torch.bfloat16)
    for value in (loss.d_loss(real, fake), loss.g_loss(fake)):
        assert value.shape == () and value.dtype == torch.float32
        assert torch.isfinite(value)


def test_registry_covers_every_configurable_mode():
    modes = typing.get_args(typing.get_type_hints(LossConfig)["gan_mode"])
    assert set(modes) == set(GAN_LOSSES)
    for mode in modes:
        assert gan_loss(mode) is GAN_LOSSES[mode]


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        gan_loss("wgan")
    message = str(err.value)
    assert "loss.gan_mode" in message and "'wgan'" in message
    assert all(mode in message for mode in GAN_LOSSES)


# ---------------------------------------------------------------- reconstruction losses

def test_cycle_and_identity_are_l1_means():
    a = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    b = torch.tensor([[0.5, 1.0], [0.0, 1.0]])
    # |diffs| = 0.5, 0, 2, 2 → mean 1.125
    assert cycle_loss(a, b).item() == pytest.approx(1.125)
    assert identity_loss(a, b).item() == pytest.approx(1.125)
    assert cycle_loss(a, a).item() == 0.0


# ---------------------------------------------------------------- R1

def linear_d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """D(x) = w·x + 1 per sample: ∇_x D = w, so R1 = ‖w‖²."""
    return (x * w).flatten(1).sum(1) + 1.0  # (B,)


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 8)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    penalty = r1_penalty(linear_d(x, w), x)
    assert penalty.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_r1_of_a_quadratic_discriminator():
    # D(x) = (a/2)·‖x‖² per sample: ∇_x D = a·x, so R1 = mean_b a²‖x_b‖².
    torch.manual_seed(0)
    a = 0.7
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (a / 2) * x.pow(2).flatten(1).sum(1)
    expected = (a ** 2) * x.detach().pow(2).flatten(1).sum(1).mean()
    assert r1_penalty(logits, x).item() == pytest.approx(expected.item(), rel=1e-5)


def small_patch_d() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.LeakyReLU(0.2),
        torch.nn.Conv2d(4, 1, 3, padding=1)).double()  # patch logits # (B, 1, h, w)


def test_r1_of_a_patch_discriminator_matches_torch_func():
    d = small_patch_d()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    penalty = r1_penalty(d(x), x)
    # Independent per-sample gradients of the summed patch scores.
    grad_d = torch.func.grad(lambda xi: d(xi[None]).sum())
    per_sample = torch.stack([grad_d(xi) for xi in x.detach()])
    expected = per_sample.pow(2).flatten(1).sum(1).mean()
    assert penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=0)


def test_r1_gradient_matches_finite_differences():
    d = small_patch_d()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    # Central differences of Σ D(x) at a few pixels.
    h = 1e-6
    for index in [(0, 0, 0, 0), (1, 2, 5, 3), (0, 1, 7, 7)]:
        bump = torch.zeros_like(x)
        bump[index] = h
        with torch.no_grad():
            numeric = (d(x + bump).sum() - d(x - bump).sum()) / (2 * h)
        assert grad[index].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8)


def test_r1_reaches_the_discriminator_weights():
    # create_graph=True: ∂R1/∂w = ∂‖w‖²/∂w = 2w for the linear D.
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    r1_penalty(linear_d(x, w), x).backward()
    torch.testing.assert_close(w.grad, 2 * w.detach())
    # And through a conv net: every weight receives a gradient.
    d = small_patch_d()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    r1_penalty(d(images), images).backward()
    for p in d.parameters():
        if p.dim() > 1:  # weights (the last bias has no effect on ∇_x D)
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_r1_term_applies_gamma_over_two_and_the_lazy_interval():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = linear_d(x, w)
    penalty = w.pow(2).sum().item()
    term = r1_term(logits, x, gamma=10.0, interval=4)
    assert term.item() == pytest.approx(10.0 / 2 * 4 * penalty, rel=1e-5)
    assert r1_term(logits, x, gamma=10.0).item() == pytest.approx(5 * penalty, rel=1e-5)


def test_r1_term_with_gamma_zero_costs_nothing():
    x = torch.randn(2, 3, 4, 4)  # no requires_grad: nothing is differentiated
    assert r1_term(x.flatten(1).sum(1), x, gamma=0.0, interval=4).item() == 0.0


def test_r1_needs_images_that_require_grad():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(x.flatten(1).sum(1), x)
