"""Attention blocks for the U-Net generator.

* :class:`AttentionGate` — the additive attention gate of Oktay et al., 2018,
  "Attention U-Net: Learning Where to Look for the Pancreas": a coarse,
  context-rich gating signal ``g`` decides, pixel by pixel, how much of a skip
  connection ``x`` reaches the decoder,

      α = σ₂(ψᵀ σ₁(W_xᵀ x + W_gᵀ g + b_g) + b_ψ),      output = x · α,

  with σ₁ = ReLU, σ₂ = sigmoid and 1x1 convolutions for W_x, W_g, ψ.
* :class:`SelfAttention2d` — the self-attention block of SAGAN (Zhang et al.,
  2019, "Self-Attention Generative Adversarial Networks"): every position
  attends to every other one, and a learnable scalar γ, initialised to 0, adds
  the result to the input (``γ·o + x``), so the block starts as the identity
  and the network learns how much non-local evidence to use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., 2018) on one skip connection.

    The paper brings the skip down to the gate's resolution with a strided
    W_x and upsamples α back. Here the projected gate ``W_g·g`` is upsampled
    to the skip instead (bilinear, only when the sizes differ), so α is
    computed at full skip resolution with no second resampling. In the U-Net
    the gate is the decoder feature at the skip's own level, which already
    carries the coarser levels' context through the transposed convolution.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        if min(skip_channels, gate_channels, inter_channels) < 1:
            raise ValueError(f"AttentionGate needs positive channel counts, got skip="
                             f"{skip_channels}, gate={gate_channels}, inter={inter_channels}")
        self.w_x = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.w_g = nn.Conv2d(gate_channels, inter_channels, 1)  # its bias is b_g
        self.psi = nn.Conv2d(inter_channels, 1, 1)  # its bias is b_ψ

    def attention_map(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """α in (0, 1), shape (B, 1, H, W) of ``skip``."""
        theta = self.w_x(skip)  # (B, I, H, W)
        phi = self.w_g(gate)  # (B, I, h, w)
        if phi.shape[-2:] != theta.shape[-2:]:
            phi = F.interpolate(phi, size=theta.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.psi(F.relu(theta + phi)))  # (B, 1, H, W)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.attention_map(skip, gate)  # (B, C, H, W)


class SelfAttention2d(nn.Module):
    """SAGAN self-attention over all H·W positions of a feature map.

    Query and key live in C/8 channels and the value in C/2 channels, with a
    1x1 output projection back to C, as in the SAGAN/BigGAN reference code
    (convolutions without bias). One deliberate difference: the logits are
    scaled by 1/√d_k (Vaswani et al., 2017) — SAGAN leaves them unscaled, which
    saturates the softmax at wide bottlenecks (d_k = 64 at 512 channels).
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"SelfAttention2d needs channels ≥ 1, got {channels}")
        key_channels = max(1, channels // 8)
        value_channels = max(1, channels // 2)
        self.query = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.key = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.value = nn.Conv2d(channels, value_channels, 1, bias=False)
        self.out = nn.Conv2d(value_channels, channels, 1, bias=False)
        # γ = 0: the block starts as the identity (SAGAN, Sec. 3).
        self.gamma = nn.Parameter(torch.zeros(()))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output o before the γ-weighted residual, (B, C, H, W)."""
        b, _, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C/8), N = H·W
        k = self.key(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, N, C/2)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax over the N key positions
        return self.out(o.transpose(1, 2).reshape(b, -1, h, w))  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.attend(x) + x
