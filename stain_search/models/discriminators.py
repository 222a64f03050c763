"""VGG-style patch discriminator for D_X and D_Y.

A PatchGAN (Isola et al., 2017; the CycleGAN reference's ``NLayerDiscriminator``)
built from VGG blocks (Simonyan & Zisserman, 2015) instead of 4x4 convs: each
block is a 3x3 conv and a 3x3 stride-2 conv, each followed by LeakyReLU(0.2),
with widths ``ndf·min(2^i, 8)``; a last 3x3 conv gives one logit per patch,
(B, 1, H/2^blocks, W/2^blocks). As in the reference, the first block has no
norm (normalising the raw image throws away its colour statistics, which are
what a stain discriminator judges).

With ``spectral_norm=True`` every conv is spectrally normalised (Miyato et
al., 2018) and the activation norm is dropped, as in SN-GAN and SAGAN: the
Lipschitz bound is the point, and a batch/instance norm would undo it. The
generator keeps ``model.norm`` either way.

All convs pad by reflection so that D cannot spot the image border by a frame
of zeros. The receptive field (``receptive_field``) is 6·2^blocks − 3 px:
45 px at 3 blocks, 93 px at 4, against 70 px for the reference's 3-layer
PatchGAN.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from stain_search.errors import ConfigError

NormLayer = Callable[[int], nn.Module]  # channels → norm module


def conv_unit(in_ch: int, out_ch: int, *, stride: int, norm_layer: NormLayer | None,
              spectral: bool) -> list[nn.Module]:
    """3x3 conv → [norm] → LeakyReLU(0.2); no bias where a norm follows."""
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, padding_mode="reflect",
                     bias=norm_layer is None)
    layers: list[nn.Module] = [apply_spectral_norm(conv) if spectral else conv]
    if norm_layer is not None:
        layers.append(norm_layer(out_ch))
    layers.append(nn.LeakyReLU(0.2))
    return layers


class VGGDiscriminator(nn.Module):
    """(B, in, H, W) → patch logits (B, 1, ⌈H/2^blocks⌉, ⌈W/2^blocks⌉).

    Inputs need at least 2^(blocks+1) px per side, so that at least 2x2
    patches are judged (and an instance norm never sees a single pixel).
    """

    def __init__(self, in_channels: int = 3, *, ndf: int = 64, blocks: int = 3,
                 norm_layer: NormLayer | None = nn.InstanceNorm2d,
                 spectral_norm: bool = False):
        super().__init__()
        for key, value in [("model.ndf", ndf), ("model.d_blocks", blocks)]:
            if value < 1:
                raise ConfigError(f"`{key}` must be at least 1, got {value}")
        self.blocks = blocks
        if spectral_norm:
            norm_layer = None
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i in range(blocks):
            width = ndf * min(2 ** i, 8)
            norm = norm_layer if i > 0 else None
            layers += conv_unit(in_ch, width, stride=1, norm_layer=norm, spectral=spectral_norm)
            layers += conv_unit(width, width, stride=2, norm_layer=norm, spectral=spectral_norm)
            in_ch = width
        head = nn.Conv2d(in_ch, 1, 3, padding=1, padding_mode="reflect")
        layers.append(apply_spectral_norm(head) if spectral_norm else head)
        self.model = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input window that one output logit sees."""
        size, jump = 1, 1
        for module in self.model.modules():
            if isinstance(module, nn.Conv2d):
                size += (module.kernel_size[0] - 1) * jump
                jump *= module.stride[0]
        return size

    def check_size(self, height: int, width: int) -> None:
        least = 2 ** (self.blocks + 1)
        if min(height, width) < least:
            raise ConfigError(
                f"input of {height}x{width} px is too small for a discriminator with "
                f"`model.d_blocks` = {self.blocks}: it halves the image {self.blocks} times and "
                f"needs at least {least} px per side; use a larger `data.crop` or fewer "
                f"`model.d_blocks`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_size(*x.shape[-2:])
        return self.model(x)  # (B, 1, h, w) logits, one per patch
