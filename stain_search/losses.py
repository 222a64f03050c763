"""CycleGAN losses: adversarial (three flavours), cycle, identity and R1.

Adversarial losses, chosen by ``loss.gan_mode``:

- ``lsgan``: least squares (Mao et al., 2017, "Least Squares Generative
  Adversarial Networks"), the CycleGAN reference's default.
- ``vanilla``: the original cross-entropy GAN (Goodfellow et al., 2014,
  "Generative Adversarial Nets") with the non-saturating generator loss
  −log D(G(x)) the same paper recommends in practice.
- ``hinge``: hinge loss (Lim & Ye, 2017, "Geometric GAN").

Each takes the discriminator's raw outputs ("logits"): a patch map
``# (B, 1, h, w)`` from the VGG discriminators, or any shape; every loss is a
mean over all elements, so patch maps and scalars are treated alike.

**The ½ on every discriminator loss.** The CycleGAN reference
(junyanz/pytorch-CycleGAN-and-pix2pix, ``backward_D_basic``) halves D's loss,
``(loss_D_real + loss_D_fake) * 0.5``; the paper (Zhu et al., 2017, training
details) divides D's objective by 2 to slow D's learning relative to G's.
The reference does so for every GAN mode,
so we do too — hinge included — which keeps one meaning for the R1 weight γ
across modes (R1 is added to this halved loss). With Adam the overall scale of
a loss barely matters; its ratio to R1 and to weight decay does.

Reconstruction terms (Zhu et al., 2017, "Unpaired Image-to-Image Translation
using Cycle-Consistent Adversarial Networks"): the cycle loss
‖F(G(x)) − x‖₁ and the identity loss ‖G(y) − y‖₁, both L1 means. The caller
weights them (λ and λ·λ_identity, as in the reference).

R1 (Mescheder et al., 2018, "Which Training Methods for GANs do actually
Converge?"): the penalty E_x‖∇_x D(x)‖² on real images, weighted γ/2, with
StyleGAN2's lazy regularisation (Karras et al., 2020): computed only every
k-th D step and multiplied by k so its average strength is unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from stain_search.errors import ConfigError

# Reference CycleGAN: loss_D = (loss_D_real + loss_D_fake) * 0.5 (see above).
D_LOSS_SCALE = 0.5


class GANLoss(Protocol):
    """What the training step needs from an adversarial loss."""

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        """Discriminator loss: low when real logits are high and fake ones low."""

    def g_loss(self, fake_logits: Tensor) -> Tensor:
        """Generator loss: low when D scores the fakes as real."""


class LSGANLoss:
    """Least squares: D regresses real → 1, fake → 0; G pushes fakes to 1."""

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real, fake = real_logits.float(), fake_logits.float()
        real_term = F.mse_loss(real, torch.ones_like(real))
        fake_term = F.mse_loss(fake, torch.zeros_like(fake))
        return D_LOSS_SCALE * (real_term + fake_term)

    def g_loss(self, fake_logits: Tensor) -> Tensor:
        fake = fake_logits.float()
        return F.mse_loss(fake, torch.ones_like(fake))


class VanillaGANLoss:
    """Cross-entropy on logits; G uses the non-saturating −log D(G(x))."""

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real, fake = real_logits.float(), fake_logits.float()
        real_term = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        fake_term = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return D_LOSS_SCALE * (real_term + fake_term)

    def g_loss(self, fake_logits: Tensor) -> Tensor:
        # Non-saturating: maximise log D(G(x)) rather than minimise
        # log(1 − D(G(x))), whose gradient vanishes when D wins early on.
        fake = fake_logits.float()
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


class HingeGANLoss:
    """Hinge: D wants real ≥ 1 and fake ≤ −1; G raises D's score of fakes."""

    def d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        real_term = F.relu(1.0 - real_logits.float()).mean()
        fake_term = F.relu(1.0 + fake_logits.float()).mean()
        return D_LOSS_SCALE * (real_term + fake_term)

    def g_loss(self, fake_logits: Tensor) -> Tensor:
        return -fake_logits.float().mean()


GAN_LOSSES: dict[str, GANLoss] = {
    "lsgan": LSGANLoss(),
    "vanilla": VanillaGANLoss(),
    "hinge": HingeGANLoss(),
}


def gan_loss(mode: str) -> GANLoss:
    """The adversarial loss named by ``loss.gan_mode``."""
    try:
        return GAN_LOSSES[mode]
    except KeyError:
        raise ConfigError(f"`loss.gan_mode`: unknown GAN loss {mode!r}; "
                          f"known: {', '.join(GAN_LOSSES)}") from None


def cycle_loss(reconstructed: Tensor, real: Tensor) -> Tensor:
    """‖F(G(x)) − x‖₁ (or ‖G(F(y)) − y‖₁), averaged over every element."""
    return F.l1_loss(reconstructed.float(), real.float())


def identity_loss(same: Tensor, real: Tensor) -> Tensor:
    """‖G(y) − y‖₁: G should leave an image already in its target domain alone."""
    return F.l1_loss(same.float(), real.float())


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """E_x ‖∇_x D(x)‖² over real images; differentiable w.r.t. D's parameters.

    ``real_images`` # (B, C, H, W) must have ``requires_grad=True`` and
    ``real_logits`` must be D's output on them. A patch discriminator's map
    is summed per sample, so the gradient is that of the summed patch scores
    (the usual choice for patch and multi-output discriminators). The squared
    norm is summed over channels and pixels per sample, then averaged over
    the batch. ``create_graph=True`` lets the penalty's gradient reach D's
    weights.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must require grad; call "
                         "real_images.requires_grad_(True) before D's forward pass")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    # At least float32: a bf16 sum of squares over a whole image loses digits.
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return grad.pow(2).flatten(start_dim=1).sum(dim=1).mean()


def r1_term(real_logits: Tensor, real_images: Tensor, *, gamma: float,
            interval: int = 1) -> Tensor:
    """(γ/2)·k·E‖∇_x D(x)‖², the R1 term to add to D's loss every k-th D step.

    Lazy regularisation (StyleGAN2, Karras et al., 2020, §3.1): the penalty
    changes slowly, so computing it only every ``interval`` = k D steps and
    multiplying it by k keeps its average weight at γ/2 while saving most of
    its (double-backward) cost. The caller decides which steps are due; with
    γ = 0 the term is a zero that costs nothing.
    """
    if gamma == 0:
        return real_logits.new_zeros((), dtype=torch.float32)
    return (gamma / 2) * interval * r1_penalty(real_logits, real_images)
