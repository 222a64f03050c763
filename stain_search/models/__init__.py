"""The CycleGAN networks, built by name from ``ModelConfig``.

``build_generator`` gives G: X→Y or F: Y→X (3 → 3 channels) and
``build_discriminator`` gives D_X or D_Y; both return freshly constructed
networks with PyTorch's default initialisation. ``init_weights`` then applies
the CycleGAN reference's scheme (junyanz/pytorch-CycleGAN-and-pix2pix,
``networks.init_weights``): conv weights N(0, 0.02), biases 0, norm scales
N(1, 0.02).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, TypeVar

from torch import nn
from torch.nn.utils import parametrize

from stain_search.config import ModelConfig
from stain_search.errors import ConfigError
from stain_search.models.attention import AttentionGate, SelfAttention2d
from stain_search.models.discriminators import VGGDiscriminator
from stain_search.models.generators import ATTENTION, UPSAMPLERS, UNetGenerator

__all__ = ["ATTENTION", "DISCRIMINATORS", "GENERATORS", "INITS", "NORMS", "AttentionGate",
           "SelfAttention2d", "UNetGenerator", "UPSAMPLERS", "VGGDiscriminator",
           "build_discriminator", "build_generator", "count_parameters", "init_weights"]

IMAGE_CHANNELS = 3  # RGB in, RGB out: H&E and the special stains alike

GENERATORS: dict[str, type[nn.Module]] = {"unet": UNetGenerator}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"vgg": VGGDiscriminator}

# channels → norm module; None: no norm (convs then keep their bias).
NORMS: dict[str, Callable[[int], nn.Module] | None] = {
    # affine=False, no running stats: the reference's instance norm.
    "instance": functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False),
    "batch": nn.BatchNorm2d,
    "none": None,
}

# (weight tensor, gain) → None, in place; names and formulas as the reference.
INITS: dict[str, Callable] = {
    "normal": lambda w, gain: nn.init.normal_(w, 0.0, gain),
    "xavier": lambda w, gain: nn.init.xavier_normal_(w, gain=gain),
    "kaiming": lambda w, gain: nn.init.kaiming_normal_(w, a=0, mode="fan_in"),
    "orthogonal": lambda w, gain: nn.init.orthogonal_(w, gain=gain),
}

# Norms with an optional learnable scale/shift that init_weights sets.
NORM_MODULES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.InstanceNorm2d, nn.GroupNorm)

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, *, key: str) -> T:
    """``registry[name]``, or a ConfigError naming the key and the known names."""
    if name not in registry:
        raise ConfigError(f"`{key}`: unknown name {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def build_generator(cfg: ModelConfig) -> nn.Module:
    """A generator (G or F) as ``cfg`` describes it, 3 → 3 channels."""
    cls = lookup(GENERATORS, cfg.generator, key="model.generator")
    return cls(IMAGE_CHANNELS, IMAGE_CHANNELS, ngf=cfg.ngf, depth=cfg.depth,
               norm_layer=lookup(NORMS, cfg.norm, key="model.norm"), dropout=cfg.dropout,
               attention=cfg.attention, attention_channels_ratio=cfg.attention_channels_ratio,
               padding_mode=cfg.padding, upsample=cfg.upsample)


def build_discriminator(cfg: ModelConfig) -> nn.Module:
    """A discriminator (D_X or D_Y) as ``cfg`` describes it, on 3-channel images."""
    cls = lookup(DISCRIMINATORS, cfg.discriminator, key="model.discriminator")
    return cls(IMAGE_CHANNELS, ndf=cfg.ndf, blocks=cfg.d_blocks,
               norm_layer=lookup(NORMS, cfg.norm, key="model.norm"),
               spectral_norm=cfg.spectral_norm)


def init_weights(net: nn.Module, *, init: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise ``net`` in place as the reference does; returns it.

    Conv/linear weights follow ``init`` (normal: N(0, gain)), their biases
    become 0; norm scales become N(1, gain) and shifts 0. Other parameters
    (SAGAN's γ) keep their own initialisation. For a spectrally normalised
    conv the raw weight is set; its power-iteration vectors then converge
    again by one step per training forward, as in Miyato et al., where they
    start at random.
    """
    init_fn = lookup(INITS, init, key="init")
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if parametrize.is_parametrized(module, "weight"):
                init_fn(module.parametrizations.weight.original.data, gain)
            else:
                init_fn(module.weight.data, gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias.data)
        elif isinstance(module, NORM_MODULES):
            if module.weight is not None:
                nn.init.normal_(module.weight.data, 1.0, gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias.data)
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in net.parameters())
