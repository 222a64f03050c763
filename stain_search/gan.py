"""The CycleGAN update, step by step (Zhu et al., 2017, "Unpaired Image-to-Image
Translation using Cycle-Consistent Adversarial Networks").

Paper names → code names:
    X = H&E domain ("A"),  Y = target-stain domain ("B")
    G: X → Y  (the model users deploy)      F: Y → X
    D_Y judges stain images, D_X judges H&E images
    λ = loss.lambda_cycle; identity weight = λ · loss.lambda_identity
    R1 (Mescheder et al., 2018): (γ/2)·E‖∇D(y_real)‖², every k D-steps (lazy)
    consensus (Mescheder et al., 2017): + γ·∇½‖v‖², v = (∇_{G,F} L_G, ∇_D L_D)

One short function per update (`generator_step`, `discriminator_step`), a
line per loss term, and LOSS_NAMES driving what is logged. Data parallelism
is explicit: after each backward, `stain_search.distributed.sync_gradients`
averages the gradients of one network group with one all-reduce (why not
DistributedDataParallel: see that module).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from stain_search.config import Config
from stain_search.distributed import broadcast_parameters, sync_gradients
from stain_search.errors import TrainingDiverged
from stain_search.losses import cycle_loss, gan_loss, identity_loss, r1_term
from stain_search.models import build_discriminator, build_generator, init_weights
from stain_search.optim import build_optimizers, consensus_correction, minmax_step
from stain_search.pool import ImagePool

# Every loss the step reports, in the order a person reads them.
LOSS_NAMES = ("loss_D_X", "loss_D_Y", "loss_G", "loss_F", "loss_cycle", "loss_identity", "loss_R1")


def set_requires_grad(nets: list[nn.Module], flag: bool) -> None:
    # Freezing D during the G step saves its weight gradients (reference trick).
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


@dataclass
class Batch:
    x: torch.Tensor  # real H&E, (B, 3, H, W) in [-1, 1]
    y: torch.Tensor  # real stain, (B, 3, H, W) in [-1, 1]


class CycleGAN(nn.Module):
    """The four networks, their optimisers and the image pools."""

    def __init__(self, config: Config, *, device: torch.device, seed: int = 0):
        super().__init__()
        self.config = config
        self.device = device
        torch.manual_seed(seed)  # identical initial weights on every worker
        self.G = build_generator(config.model)  # X → Y
        self.F = build_generator(config.model)  # Y → X
        self.D_X = build_discriminator(config.model)
        self.D_Y = build_discriminator(config.model)
        for net in (self.G, self.F, self.D_X, self.D_Y):
            init_weights(net)
        self.to(device)
        self.memory_format = (torch.channels_last if config.train.channels_last
                              else torch.contiguous_format)
        if config.train.channels_last:
            self.to(memory_format=torch.channels_last)
        self.gan = gan_loss(config.loss.gan_mode)
        self.opt_g, self.opt_d = build_optimizers(
            list(self.G.parameters()) + list(self.F.parameters()),
            list(self.D_X.parameters()) + list(self.D_Y.parameters()),
            config.optim)
        self.pool_x = ImagePool(config.train.pool_size, seed=seed + 1)
        self.pool_y = ImagePool(config.train.pool_size, seed=seed + 2)
        self.steps = 0  # optimiser steps taken (drives lazy R1 and extragradient)
        # Consensus optimisation: γ·∇½‖v‖² per parameter, computed at the start
        # of a step and added to that parameter's gradient by its optimiser step.
        self.uses_consensus = getattr(self.opt_g, "needs_consensus", False)
        self.consensus: dict[nn.Parameter, torch.Tensor] = {}
        use_bf16 = (config.train.precision == "bf16"
                    or (config.train.precision == "auto" and device.type == "cuda"))
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if use_bf16 else nullcontext
        # Consensus differentiates twice through all four nets, which compiled
        # modules do not support: with it every net stays eager.
        if config.train.compile and not self.uses_consensus:
            # In place (Module.compile): parameters, state_dict keys and so
            # checkpoints stay those of the eager nets.
            for net in (self.G, self.F) + (() if config.loss.r1_gamma > 0 else (self.D_X, self.D_Y)):
                net.compile()

    @property
    def generator_params(self) -> list[nn.Parameter]:
        return list(self.G.parameters()) + list(self.F.parameters())

    @property
    def discriminator_params(self) -> list[nn.Parameter]:
        return list(self.D_X.parameters()) + list(self.D_Y.parameters())

    def broadcast(self) -> None:
        broadcast_parameters(self)

    # --- the two updates -------------------------------------------------------

    def generator_losses(self, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """G and F's loss terms, and the fakes (F(y), G(x)) they were computed on."""
        lam, lam_id = self.config.loss.lambda_cycle, self.config.loss.lambda_identity
        with self.autocast():
            fake_y = self.G(x)  # G(x): H&E → stain
            rec_x = self.F(fake_y)  # F(G(x)) ≈ x
            fake_x = self.F(y)  # F(y): stain → H&E
            rec_y = self.G(fake_x)  # G(F(y)) ≈ y
            losses = {
                "loss_G": self.gan.g_loss(self.D_Y(fake_y)),
                "loss_F": self.gan.g_loss(self.D_X(fake_x)),
                "loss_cycle": lam * (cycle_loss(rec_x, x) + cycle_loss(rec_y, y)),
            }
            if lam_id > 0:  # G should leave a stain image as it is (and F an H&E one)
                losses["loss_identity"] = lam * lam_id * (identity_loss(self.G(y), y)
                                                          + identity_loss(self.F(x), x))
        return losses, fake_x, fake_y

    def generator_step(self, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Update G and F against frozen D_X, D_Y; return losses and fakes."""
        set_requires_grad([self.D_X, self.D_Y], False)
        self.opt_g.zero_grad(set_to_none=True)
        losses, fake_x, fake_y = self.generator_losses(batch.x, batch.y)
        total = sum(losses.values())
        values = check_finite(losses, step=self.steps)  # before any weight moves
        total.backward()
        sync_gradients(self.generator_params)
        self._optimizer_step(self.opt_g)
        set_requires_grad([self.D_X, self.D_Y], True)
        return values, {"fake_x": fake_x.detach(), "fake_y": fake_y.detach()}

    def discriminator_step(self, batch: Batch, fakes: dict[str, torch.Tensor]) -> dict[str, float]:
        """Update D_X and D_Y on real images and pooled past fakes (+ lazy R1)."""
        gamma, k = self.config.loss.r1_gamma, self.config.loss.r1_interval
        # With extragradient, steps 2j and 2j+1 make one update: both see R1
        # together, so a lazy interval never puts it in the look-ahead alone.
        update = self.steps // 2 if self.extragradient else self.steps
        with_r1 = gamma > 0 and update % k == 0
        self.opt_d.zero_grad(set_to_none=True)
        fake_y = self.pool_y.query(fakes["fake_y"])
        fake_x = self.pool_x.query(fakes["fake_x"])
        losses: dict[str, torch.Tensor] = {}
        r1 = torch.zeros((), device=self.device)
        for name, D, real, fake in (("loss_D_Y", self.D_Y, batch.y, fake_y),
                                    ("loss_D_X", self.D_X, batch.x, fake_x)):
            real = real.detach().requires_grad_(with_r1)
            with self.autocast():
                real_logits = D(real)
                fake_logits = D(fake.detach())
                losses[name] = self.gan.d_loss(real_logits, fake_logits)
            if with_r1:  # in fp32: the penalty is a gradient norm, sensitive to rounding
                r1 = r1 + r1_term(real_logits.float(), real, gamma=gamma, interval=k)
        losses["loss_R1"] = r1
        values = check_finite(losses, step=self.steps)
        sum(losses.values()).backward()
        sync_gradients(self.discriminator_params)
        self._optimizer_step(self.opt_d)
        return values

    def consensus_step(self, batch: Batch) -> None:
        """γ·∇½‖v‖² for every parameter, at the current point of the game
        (Mescheder et al., 2017), kept for the G and D updates that follow.

        v = (∇_{G,F} L_G, ∇_{D_X,D_Y} L_D), with L_G the whole generator
        objective and L_D the discriminators' adversarial loss on the current
        fakes (the game's own field: pooled past fakes and R1 are the D step's
        business). Both players' corrections come from this one point, so the
        D step uses the pre-update θ: as simultaneous as the alternating
        G-then-D update allows. With data parallelism each worker regularises
        its own batch's field; the corrections are then averaged like gradients.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The fused attention kernels have no double backward; the math one has.
        with sdpa_kernel([SDPBackend.MATH]):
            losses, fake_x, fake_y = self.generator_losses(batch.x, batch.y)
            with self.autocast():
                loss_d = (self.gan.d_loss(self.D_Y(batch.y), self.D_Y(fake_y))
                          + self.gan.d_loss(self.D_X(batch.x), self.D_X(fake_x)))
            params = self.generator_params + self.discriminator_params
            _, correction = consensus_correction(
                [(sum(losses.values()), self.generator_params),
                 (loss_d, self.discriminator_params)], gamma=self.config.optim.consensus_gamma)
        for p, g in zip(params, correction):
            p.grad = g
        sync_gradients(params)
        self.consensus = {p: p.grad for p in params}
        for p in params:
            p.grad = None

    @property
    def extragradient(self) -> bool:
        return getattr(self.opt_g, "needs_extrapolation", False)

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Extragradient (Gidel et al., 2019) alternates a look-ahead step and
        # an update from the look-ahead gradient, as their reference code does.
        for group in optimizer.param_groups:
            for p in group["params"]:
                extra = self.consensus.pop(p, None)
                if extra is not None:
                    p.grad = extra if p.grad is None else p.grad.add_(extra)
        minmax_step(optimizer, iteration=self.steps)

    def train_step(self, batch: Batch) -> dict[str, float]:
        if self.memory_format is not torch.contiguous_format:
            batch = Batch(x=batch.x.contiguous(memory_format=self.memory_format),
                          y=batch.y.contiguous(memory_format=self.memory_format))
        if self.uses_consensus:
            self.consensus_step(batch)
        g_losses, fakes = self.generator_step(batch)
        d_losses = self.discriminator_step(batch, fakes)
        self.steps += 1
        return {**{name: 0.0 for name in LOSS_NAMES}, **g_losses, **d_losses}

    # --- state ---------------------------------------------------------------

    def state_dict_full(self) -> dict:
        """Everything needed to resume exactly (nets, optimisers, pools, step)."""
        return {
            "G": self.G.state_dict(), "F": self.F.state_dict(),
            "D_X": self.D_X.state_dict(), "D_Y": self.D_Y.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "pool_x": self.pool_x.state_dict(), "pool_y": self.pool_y.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict_full(self, state: dict) -> None:
        for name in ("G", "F", "D_X", "D_Y"):
            getattr(self, name).load_state_dict(state[name])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.pool_x.load_state_dict(state["pool_x"])
        self.pool_y.load_state_dict(state["pool_y"])
        self.steps = int(state["steps"])


def check_finite(losses: dict[str, torch.Tensor], *, step: int) -> dict[str, float]:
    """The losses as floats, read in one device→host copy (one GPU sync, not
    one per loss); stop at the first NaN/inf: a diverged GAN never recovers,
    and later epochs would only waste compute and pollute the search."""
    names = list(losses)
    values = dict(zip(names, torch.stack([losses[n].detach().float().reshape(())
                                          for n in names]).tolist()))
    for name, v in values.items():
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"{name} became {v} at step {step}: training diverged. Lower the "
                f"learning rate (optim.lr_g / optim.lr_d) or add an R1 penalty (loss.r1_gamma).")
    return values
