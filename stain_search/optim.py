"""Optimisers for the CycleGAN min-max game, chosen by ``optim.name``.

- ``adam``: Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic
  Optimization"), the CycleGAN reference's choice (lr 2e-4, β1 = 0.5).
- ``optimistic_adam``: Optimistic Adam (Daskalakis, Ilyas, Syrgkanis & Zeng,
  2018, "Training GANs with Optimism"): Adam's normalised step with an
  optimistic correction that anticipates the opponent's next move.
- ``extra_adam``: Extra-Adam (Gidel, Berard, Vignoud, Vincent &
  Lacoste-Julien, 2019, "A Variational Inequality Perspective on Generative
  Adversarial Networks"): extragradient with Adam steps. ``ExtraSGD`` is
  plain extragradient (Korpelevich, 1976), used to test the idea.
- ``consensus``: consensus optimisation (Mescheder, Nowozin & Geiger, 2017,
  "The Numerics of GANs"): Adam on each player's gradient plus γ·∇½‖v‖²,
  where v is the joint gradient field of both players (``optim.consensus_gamma``).
  The correction needs a double backward through G and D; the training step
  computes it with :func:`consensus_correction` (see ``gan.CycleGAN``).

Simultaneous gradient descent–ascent spirals away from the equilibrium of
even the simplest bilinear game min_x max_y x·y; optimism, extragradient and
consensus converge on it (tests/test_optim.py checks exactly this).

TTUR (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule"):
D and G get their own learning rates, ``optim.lr_d`` and ``optim.lr_g``.

The learning-rate schedule is the reference's: constant, then a linear decay
over the last ``train.decay_epochs`` epochs (:func:`linear_decay`).

Extragradient optimisers take two calls per update: ``extrapolation()`` (a
look-ahead step) and ``step()`` (the real one, with the look-ahead's gradient).
They carry ``needs_extrapolation = True``; :func:`minmax_step` alternates the
two exactly as Gidel et al.'s training script does and calls ``step()`` on
every other optimiser, so a training loop needs no special case.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from stain_search.config import OptimConfig
from stain_search.errors import ConfigError

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


def adam_direction(param: Tensor, grad: Tensor, state: dict[str, Any],
                   group: dict[str, Any]) -> Tensor:
    """Update Adam's moments with ``grad``; return m̂_t / (√v̂_t + ε).

    The normalised direction without the learning rate, shared by the Adam
    variants below (Kingma & Ba, 2015, Algorithm 1). Weight decay is the L2
    kind, added to the gradient, as in ``torch.optim.Adam``.
    """
    beta1, beta2 = group["betas"]
    if group["weight_decay"]:
        grad = grad.add(param, alpha=group["weight_decay"])
    if "exp_avg" not in state:  # an extragradient state may hold its saved point
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] += 1
    t = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)  # m_t = β1·m_{t−1} + (1 − β1)·g_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = exp_avg / (1 - beta1 ** t)
    v_hat = exp_avg_sq / (1 - beta2 ** t)
    return m_hat / (v_hat.sqrt() + group["eps"])


def adam_defaults(lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> dict[str, Any]:
    """Checked Adam hyper-parameters, as an optimiser's ``defaults``."""
    if not lr >= 0:
        raise ValueError(f"invalid learning rate {lr}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"invalid betas {betas}: each must lie in [0, 1)")
    if not eps >= 0:
        raise ValueError(f"invalid eps {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay {weight_decay}")
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class OptimisticAdam(Optimizer):
    """Optimistic Adam (Daskalakis et al., 2018, Algorithm 1).

    With d_t = m̂_t / (√v̂_t + ε), Adam's normalised step,

        θ_{t+1} = θ_t − 2η·d_t + η·d_{t−1},

    i.e. a step along the current direction plus a correction that undoes
    half of the previous one: optimistic mirror descent with the last
    gradient as the prediction of the next. d_{t−1} is kept in the state
    (without η, so a scheduled learning rate applies to both terms) and is
    zero before the first step.
    """

    needs_extrapolation = False

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                previous = state.get("previous_direction")
                direction = adam_direction(p, p.grad, state, group)
                p.add_(direction, alpha=-2 * group["lr"])
                if previous is not None:
                    p.add_(previous, alpha=group["lr"])
                state["previous_direction"] = direction
        return loss


class Extragradient(Optimizer, abc.ABC):
    """Extragradient: look ahead with the current gradient, then step from the
    saved point with the look-ahead's gradient (Korpelevich, 1976; Gidel et
    al., 2019, whose ``ExtragradientOptimizer`` this mirrors).

    One update takes two gradient evaluations:

        optimizer.extrapolation()   # θ' = θ + u(∇L(θ)), θ saved
        ... recompute the loss and gradients at θ' ...
        optimizer.step()            # θ ← θ + u(∇L(θ'))

    The saved point lives in the per-parameter state (``extrapolated_from``),
    so a checkpoint taken between the two calls resumes exactly. As in Gidel
    et al.'s code, several extrapolations may precede a step; the point saved
    by the first is the one restored.
    """

    needs_extrapolation = True

    @abc.abstractmethod
    def update(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """The increment u to add to ``param`` for gradient ``grad``."""

    @torch.no_grad()
    def extrapolation(self) -> None:
        """Save θ (unless already saved) and move to the look-ahead point."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "extrapolated_from" not in state:
                    state["extrapolated_from"] = p.detach().clone()
                if p.grad is not None:
                    p.add_(self.update(p, p.grad, group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Restore the saved θ and update it with the look-ahead's gradient."""
        params = [p for group in self.param_groups for p in group["params"]]
        if not any("extrapolated_from" in self.state[p] for p in params):
            raise RuntimeError(f"{type(self).__name__}.step() needs a preceding "
                               "extrapolation(); alternate them (see minmax_step)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                saved = self.state[p].pop("extrapolated_from", None)
                # The increment is computed before θ is restored: Adam's
                # weight decay then sees the look-ahead point, as in Gidel's.
                increment = None if p.grad is None else self.update(p, p.grad, group)
                if saved is not None:
                    p.copy_(saved)
                if increment is not None:
                    p.add_(increment)
        return loss


class ExtraSGD(Extragradient):
    """Plain extragradient: u = −η·∇L."""

    def __init__(self, params: Params, lr: float = 1e-2) -> None:
        if not lr >= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr))

    def update(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        return -group["lr"] * grad


class ExtraAdam(Extragradient):
    """Extra-Adam (Gidel et al., 2019, Algorithm 4): u = −η·m̂/(√v̂ + ε).

    As in the authors' code, both the extrapolation and the update feed
    their gradient into Adam's moments (two moment updates per step).
    """

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay))

    def update(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        return -group["lr"] * adam_direction(param, grad, self.state[param], group)


class ConsensusAdam(torch.optim.Adam):
    """Adam on the consensus-regularised gradient field (Mescheder et al.,
    2017, Algorithm 2, with Adam in place of their RMSProp).

    The step is Adam's; what differs is the gradient it is given: for each
    player i with loss L_i and parameters θ_i,

        g_i = ∇_{θ_i} L_i + γ·∇_{θ_i} ½‖v‖²,   v = (∇_{θ_1} L_1, ∇_{θ_2} L_2),

    the second term pulling both players towards points where the game's
    vector field is small. It needs both losses at once, so the caller adds
    it (:func:`consensus_correction`) before ``step()``; ``needs_consensus``
    tells a training loop to do so.
    """

    needs_extrapolation = False
    needs_consensus = True


def consensus_correction(players: Sequence[tuple[Tensor, Sequence[Tensor]]], *,
                         gamma: float) -> tuple[list[Tensor], list[Tensor]]:
    """(v, γ·∇½‖v‖²) for consensus optimisation, each a list over the
    parameters of every player, in order.

    ``players`` pairs each player's loss with its parameters: v is the
    gradient of each loss with respect to its own player's parameters, built
    with ``create_graph`` so that ½‖v‖² can be differentiated with respect
    to all of them (the double backward). A parameter a loss does not reach
    gets zeros.
    """
    params = [p for _, ps in players for p in ps]
    field: list[Tensor] = []
    for loss, ps in players:
        grads = torch.autograd.grad(loss, list(ps), create_graph=True, allow_unused=True)
        field.extend(torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads))
    half_norm = 0.5 * sum(g.float().pow(2).sum() for g in field)
    if not half_norm.requires_grad:  # v does not depend on any parameter (a linear game)
        correction = [torch.zeros_like(p) for p in params]
    else:
        grads = torch.autograd.grad(half_norm, params, allow_unused=True)
        correction = [torch.zeros_like(p) if g is None else gamma * g
                      for p, g in zip(params, grads)]
    return [g.detach() for g in field], correction


def minmax_step(optimizer: Optimizer, *, iteration: int) -> None:
    """Apply this iteration's gradients: extrapolate on even iterations and
    step on odd ones for extragradient optimisers (Gidel et al.'s loop), step
    every iteration otherwise."""
    if getattr(optimizer, "needs_extrapolation", False) and iteration % 2 == 0:
        optimizer.extrapolation()
    else:
        optimizer.step()


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adam": torch.optim.Adam,
    "optimistic_adam": OptimisticAdam,
    "extra_adam": ExtraAdam,
    "consensus": ConsensusAdam,
}


def build_optimizers(params_g: Params, params_d: Params,
                     cfg: OptimConfig) -> tuple[Optimizer, Optimizer]:
    """(optimiser for G and F, optimiser for D_X and D_Y) from ``cfg``.

    D's learning rate is ``cfg.lr_d`` when set (TTUR), else ``cfg.lr_g``.
    """
    try:
        cls = OPTIMIZERS[cfg.name]
    except KeyError:
        raise ConfigError(f"`optim.name`: unknown optimizer {cfg.name!r}; "
                          f"known: {', '.join(OPTIMIZERS)}") from None
    lr_d = cfg.lr_d if cfg.lr_d is not None else cfg.lr_g
    common = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.fused:
        if cfg.name != "adam":
            raise ConfigError(f"`optim.fused` needs `optim.name: adam`, not {cfg.name!r}")
        common["fused"] = True
    return cls(params_g, lr=cfg.lr_g, **common), cls(params_d, lr=lr_d, **common)


def linear_decay(epochs: int, decay_epochs: int) -> Callable[[int], float]:
    """LR multiplier per epoch for ``torch.optim.lr_scheduler.LambdaLR``.

    1 for the first ``epochs − decay_epochs`` epochs, then falling linearly
    by 1/(decay_epochs + 1) per epoch, to 1/(decay_epochs + 1) in the last
    epoch: the reference's ``lambda_rule`` (``1 − max(0, epoch + 1 −
    n_epochs) / (n_epochs_decay + 1)``) with the scheduler stepped at the end
    of each epoch. Epochs are counted from 0. Never negative.
    """
    if not 0 <= decay_epochs <= epochs:
        raise ConfigError(f"`train.decay_epochs` ({decay_epochs}) must lie between 0 and "
                          f"`train.epochs` ({epochs})")
    constant = epochs - decay_epochs

    def multiplier(epoch: int) -> float:
        return max(0.0, 1.0 - max(0, epoch + 1 - constant) / (decay_epochs + 1))

    return multiplier
