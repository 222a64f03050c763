"""U-Net generator for the CycleGAN mappings G: X→Y and F: Y→X.

Follows ``UnetGenerator`` of the CycleGAN/pix2pix reference
(junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``; Isola et al.,
2017, "Image-to-Image Translation with Conditional Adversarial Networks"),
written as a plain encoder loop and decoder loop instead of the reference's
recursively nested blocks:

* encoder level i (i = 0 … depth-1): [LeakyReLU(0.2)] → Conv 4x4 stride 2 →
  [norm], width ``ngf·min(2^i, 8)``; no activation before the first conv (it
  sees the image) and no norm after the first or the innermost conv (an
  instance norm on the 1x1 bottleneck of unet_256 would zero it);
* decoder level i (i = depth-1 … 0): ReLU → ConvTranspose 4x4 stride 2 →
  [norm] → [dropout], fed with the concatenation of encoder feature i and the
  decoder output from level i+1; the outermost level ends in Tanh, so images
  come out in [-1, 1].

``upsample="resize"`` (``model.upsample``) replaces each ConvTranspose by a
bilinear ×2 resize and a 3x3 conv (Odena et al., 2016, "Deconvolution and
Checkerboard Artifacts"): a stride-2 transposed conv with a 4x4 kernel
gives even and odd output pixels different sums of weights, the checkerboard
that shows in translations of tissue; resizing first gives every output
pixel the same kernel. Same widths, levels and output size; 9/16 of the
transposed conv's weights per level. ``bench/checkerboard.py`` measures both.

Depth 8 with ngf 64 is the reference ``unet_256`` layout. Two deliberate
differences from the reference code:

* A conv has a bias exactly when no norm follows it. The reference keeps
  one before instance norm, where the mean subtraction cancels it (4,928
  parameters of unet_256 that never receive a gradient), and under batch norm
  drops it even on the un-normed first and innermost encoder convs. With
  instance norm, depth 8 and ngf 64 this gives 54,404,675 parameters against
  the reference's 54,409,603, and the same function (tests/test_models.py).
* ``dropout=True`` puts Dropout(0.5) on the 3 innermost decoder levels, as the
  pix2pix paper states ("the first 3 layers of the decoder"); the reference
  code shifts it one level out and has none at all when depth ≤ 5.

Optional attention (``ModelConfig.attention``): ``"gates"`` puts an
:class:`~stain_search.models.attention.AttentionGate` (Oktay et al., 2018) on
every skip connection, gated by the decoder feature arriving at that level;
``"self"`` puts SAGAN :class:`~stain_search.models.attention.SelfAttention2d`
(Zhang et al., 2019) on the bottleneck; ``"both"`` does both. The bottleneck
is the input size / 2**depth: self-attention needs at least two positions
there (a crop of 64 with depth 4 gives 4x4 = 16, depth 5 gives 2x2 = 4; at a
1x1 bottleneck, e.g. unet_256 at 256 px, it would be a mere 1x1 conv), and
the forward pass raises :class:`~stain_search.errors.ConfigError` otherwise.

Encoder convolutions pad by reflection by default (``model.padding``): zero
padding darkens image borders, which shows as seams when a slide is
translated tile by tile; ``zeros`` gives the reference's exact layout.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stain_search.errors import ConfigError
from stain_search.models.attention import AttentionGate, SelfAttention2d

NormLayer = Callable[[int], nn.Module]  # channels → norm module

# attention mode → (gates on the skips, self-attention at the bottleneck)
ATTENTION: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "gates": (True, False),
    "self": (False, True),
    "both": (True, True),
}

DROPOUT_LEVELS = 3  # pix2pix: dropout in the first 3 decoder layers


def transpose_up(in_ch: int, out_ch: int, *, bias: bool, padding_mode: str) -> nn.Module:
    """The reference's ConvTranspose 4x4 stride 2 (transposed convs pad with zeros only)."""
    return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=bias)


def resize_up(in_ch: int, out_ch: int, *, bias: bool, padding_mode: str) -> nn.Module:
    """Bilinear ×2, then a 3x3 conv: every output pixel sees the same kernel."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                         nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias,
                                   padding_mode=padding_mode))


# model.upsample → (in, out, *, bias, padding_mode) → a ×2 upsampling layer
UPSAMPLERS: dict[str, Callable[..., nn.Module]] = {"transpose": transpose_up,
                                                  "resize": resize_up}


def level_width(ngf: int, level: int) -> int:
    """Channels of encoder level ``level``: doubling from ngf, capped at 8·ngf."""
    return ngf * min(2 ** level, 8)


def down_block(in_ch: int, out_ch: int, *, outermost: bool, innermost: bool,
               norm_layer: NormLayer | None, padding_mode: str = "reflect") -> nn.Sequential:
    normed = norm_layer is not None and not (outermost or innermost)
    layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=not normed,
                            padding_mode=padding_mode))
    if normed:
        layers.append(norm_layer(out_ch))
    return nn.Sequential(*layers)


def up_block(in_ch: int, out_ch: int, *, outermost: bool, norm_layer: NormLayer | None,
             dropout: bool, upsample: str = "transpose",
             padding_mode: str = "reflect") -> nn.Sequential:
    normed = norm_layer is not None and not outermost
    layers: list[nn.Module] = [
        nn.ReLU(),
        UPSAMPLERS[upsample](in_ch, out_ch, bias=not normed, padding_mode=padding_mode),
    ]
    if outermost:
        layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    if normed:
        layers.append(norm_layer(out_ch))
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


class UNetGenerator(nn.Module):
    """U-Net with ``depth`` stride-2 levels; (B, in, H, W) → (B, out, H, W) in [-1, 1].

    H and W must be multiples of 2**depth. ``norm_layer`` builds the norm for
    a channel count (None: no norm); ``attention`` is one of ``ATTENTION``,
    ``upsample`` one of ``UPSAMPLERS``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, *, ngf: int = 64,
                 depth: int = 8, norm_layer: NormLayer | None = nn.InstanceNorm2d,
                 dropout: bool = False, attention: str = "none",
                 attention_channels_ratio: float = 0.5, padding_mode: str = "reflect",
                 upsample: str = "transpose"):
        super().__init__()
        if attention not in ATTENTION:
            raise ConfigError(f"`model.attention`: unknown attention {attention!r}; "
                              f"known: {', '.join(sorted(ATTENTION))}")
        if upsample not in UPSAMPLERS:
            raise ConfigError(f"`model.upsample`: unknown upsampling {upsample!r}; "
                              f"known: {', '.join(sorted(UPSAMPLERS))}")
        if not attention_channels_ratio > 0:
            raise ConfigError(f"`model.attention_channels_ratio` must be positive, "
                              f"got {attention_channels_ratio}")
        for key, value in [("model.ngf", ngf), ("model.depth", depth)]:
            if value < 1:
                raise ConfigError(f"`{key}` must be at least 1, got {value}")
        self.depth = depth
        use_gates, use_self = ATTENTION[attention]
        widths = [level_width(ngf, i) for i in range(depth)]

        self.down = nn.ModuleList(
            down_block(in_channels if i == 0 else widths[i - 1], widths[i],
                       outermost=i == 0, innermost=i == depth - 1, norm_layer=norm_layer,
                       padding_mode=padding_mode)
            for i in range(depth))
        # up[i] maps level i+1's resolution to level i's: its input is the
        # bottleneck (innermost) or [skip i, decoder output i+1] concatenated.
        self.up = nn.ModuleList(
            up_block(widths[i] if i == depth - 1 else 2 * widths[i],
                     out_channels if i == 0 else widths[i - 1],
                     outermost=i == 0, norm_layer=norm_layer,
                     dropout=dropout and 0 < i and i >= depth - DROPOUT_LEVELS,
                     upsample=upsample, padding_mode=padding_mode)
            for i in range(depth))
        # gates[i] weighs skip i (width w_i) by decoder output i+1 (also w_i wide).
        self.gates = nn.ModuleList(
            AttentionGate(widths[i], widths[i], max(1, round(widths[i] * attention_channels_ratio)))
            for i in range(depth - 1)) if use_gates else None
        self.bottleneck_attention = SelfAttention2d(widths[-1]) if use_self else None

    def check_size(self, height: int, width: int) -> None:
        """Raise ConfigError unless an input of this size fits the U-Net."""
        step = 2 ** self.depth
        if height % step or width % step:
            raise ConfigError(
                f"input of {height}x{width} px: a U-Net of `model.depth` = {self.depth} halves "
                f"the image {self.depth} times, so height and width must be multiples of "
                f"{step}; crop or pad to a multiple of {step} (`data.crop`) or lower "
                f"`model.depth`")
        if self.bottleneck_attention is not None and (height // step) * (width // step) == 1:
            raise ConfigError(
                f"input of {height}x{width} px with `model.depth` = {self.depth} leaves a 1x1 "
                f"bottleneck: self-attention (`model.attention` self/both) there attends to a "
                f"single position; use a crop of at least {2 * step} px or a smaller "
                f"`model.depth`")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_size(*x.shape[-2:])
        skips = []
        for down in self.down:
            x = down(x)  # (B, w_i, H/2^(i+1), W/2^(i+1))
            skips.append(x)
        if self.bottleneck_attention is not None:
            x = self.bottleneck_attention(x)
        x = self.up[-1](x)  # (B, w_{depth-2}, ...) at level depth-2's resolution
        for i in reversed(range(self.depth - 1)):
            skip = skips[i]
            if self.gates is not None:
                skip = self.gates[i](skip, x)
            x = self.up[i](torch.cat([skip, x], dim=1))
        return x  # (B, out, H, W), Tanh: in [-1, 1]
