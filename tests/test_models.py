"""Contract tests for the CycleGAN networks: every generator × attention × norm,
the discriminator with and without spectral norm, the attention blocks, and the
U-Net against the CycleGAN reference's recursive ``UnetGenerator``."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from stain_search.config import ModelConfig
from stain_search.errors import ConfigError
from stain_search.models import (ATTENTION, DISCRIMINATORS, GENERATORS, INITS, NORMS,
                                 UPSAMPLERS, AttentionGate, SelfAttention2d, UNetGenerator,
                                 VGGDiscriminator, build_discriminator, build_generator,
                                 count_parameters, init_weights)

TINY = dict(ngf=8, ndf=8, depth=4, d_blocks=2)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def open_self_attention(net: nn.Module, gamma: float = 0.5) -> None:
    """SAGAN starts with γ = 0, which blocks the gradient to q/k/v; open it."""
    for module in net.modules():
        if isinstance(module, SelfAttention2d):
            module.gamma.data.fill_(gamma)


def assert_every_parameter_learns(net: nn.Module) -> None:
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


# --- generators -----------------------------------------------------------------------------

@pytest.mark.parametrize("generator", sorted(GENERATORS))
@pytest.mark.parametrize("attention", sorted(ATTENTION))
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("upsample", sorted(UPSAMPLERS))
def test_generator_contract(generator, attention, norm, upsample):
    cfg = ModelConfig(generator=generator, attention=attention, norm=norm, dropout=True,
                      upsample=upsample, **TINY)
    net = init_weights(build_generator(cfg)).train()
    open_self_attention(net)
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square: H and W are handled apart
    y = net(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert y.min() >= -1 and y.max() <= 1
    assert y.std() > 0  # not a constant image
    y.mean().backward()
    assert_every_parameter_learns(net)


@pytest.mark.parametrize("generator", sorted(GENERATORS))
def test_generator_output_stays_in_range_when_driven_hard(generator):
    cfg = ModelConfig(generator=generator, norm="none", **TINY)
    net = init_weights(build_generator(cfg), gain=1.0)  # N(0, 1) weights: huge activations
    y = net(torch.randn(2, 3, 32, 32) * 10)
    assert y.abs().max() <= 1
    assert y.abs().max() > 0.99  # the output layer really was pushed into saturation


@pytest.mark.parametrize("attention", sorted(ATTENTION))
def test_generator_runs_under_bf16_autocast(attention):
    net = build_generator(ModelConfig(attention=attention, **TINY)).eval()
    open_self_attention(net)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert y.shape == (1, 3, 32, 32) and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("size", [(36, 32), (32, 40), (8, 8)])
def test_generator_rejects_sizes_not_divisible_by_2_pow_depth(size):
    net = build_generator(ModelConfig(**TINY))  # depth 4: multiples of 16
    with pytest.raises(ConfigError, match=r"multiples of 16.*model.depth"):
        net(torch.zeros(1, 3, *size))


@pytest.mark.parametrize("attention", ["self", "both"])
def test_self_attention_refuses_a_1x1_bottleneck(attention):
    net = build_generator(ModelConfig(attention=attention, **TINY))
    with pytest.raises(ConfigError, match="1x1 bottleneck"):
        net(torch.zeros(1, 3, 16, 16))
    assert net(torch.zeros(1, 3, 16, 32)).shape == (1, 3, 16, 32)  # 1x2: two positions
    # Without self-attention a 1x1 bottleneck is the reference's unet_256 at 256 px.
    plain = build_generator(ModelConfig(attention="gates", **TINY))
    assert plain(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("upsample", sorted(UPSAMPLERS))
def test_every_upsampling_trains(upsample):
    from stain_search.config import load_config
    from stain_search.train import run_training

    from conftest import TINY_BASE

    config = load_config(None, {**TINY_BASE, "train.epochs": 1, "train.steps_per_epoch": 2,
                                "model.upsample": upsample})
    seen = []
    metrics = run_training(config, reporter=type("Keep", (), {
        "report": lambda self, m, *, checkpoint, grid: seen.append(checkpoint is not None)})(),
        log=lambda m: None)
    assert seen == [True]
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0
               for k in ("loss_G", "loss_F", "loss_cycle", "loss_D_X", "loss_D_Y"))


def test_resize_upsampling_leaves_no_checkerboard():
    # A constant feature map: bilinear x2 keeps it constant, so a 3x3 conv
    # gives one value inside the image; a stride-2 4x4 transposed conv gives
    # even and odd pixels different sums of its weights (Odena et al., 2016).
    resize = build_generator(ModelConfig(upsample="resize", **TINY)).up[1][1]
    transpose = build_generator(ModelConfig(upsample="transpose", **TINY)).up[1][1]
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in resize.modules())
    assert isinstance(transpose, nn.ConvTranspose2d)
    x = torch.ones(1, resize[1].in_channels, 8, 8)
    with torch.no_grad():
        smooth, checkered = resize(x)[..., 2:-2, 2:-2], transpose(x)[..., 2:-2, 2:-2]
    assert smooth.shape == checkered.shape == (1, resize[1].out_channels, 12, 12)
    assert torch.allclose(smooth, smooth[..., :1, :1].expand_as(smooth), atol=1e-5)
    assert (checkered[..., 0::2, 0::2] - checkered[..., 1::2, 1::2]).abs().max() > 1e-3


def test_unknown_upsampling_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model.upsample.*known: resize, transpose"):
        UNetGenerator(upsample="pixelshuffle", ngf=4, depth=2)


@pytest.mark.parametrize("ngf, depth", [(4, 1), (8, 3), (6, 6)])
def test_build_generator_honours_ngf_and_depth(ngf, depth):
    net = build_generator(ModelConfig(ngf=ngf, depth=depth))
    downs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(downs) == depth
    assert [m.out_channels for m in downs] == [ngf * min(2 ** i, 8) for i in range(depth)]
    side = 2 ** max(depth, 2)
    assert net(torch.zeros(1, 3, side, side)).shape == (1, 3, side, side)


def test_dropout_sits_on_the_three_innermost_decoder_levels():
    net = build_generator(ModelConfig(ngf=4, depth=6, dropout=True))
    with_dropout = [i for i, up in enumerate(net.up)
                    if any(isinstance(m, nn.Dropout) for m in up.modules())]
    assert with_dropout == [3, 4, 5]
    assert all(m.p == 0.5 for m in net.modules() if isinstance(m, nn.Dropout))
    plain = build_generator(ModelConfig(ngf=4, depth=6, dropout=False))
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())


def test_gates_sit_on_every_skip_connection():
    net = build_generator(ModelConfig(attention="gates", attention_channels_ratio=0.25, **TINY))
    gates = [m for m in net.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == TINY["depth"] - 1
    assert [g.w_x.out_channels for g in gates] == [2, 4, 8]  # 0.25 · (8, 16, 32)


# The reference (junyanz/pytorch-CycleGAN-and-pix2pix, models/networks.py),
# re-stated as an oracle: recursive blocks, in-place activations and all.
class ReferenceUnetBlock(nn.Module):
    def __init__(self, outer_nc, inner_nc, input_nc=None, submodule=None, outermost=False,
                 innermost=False, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.outermost = outermost
        func = norm_layer.func if isinstance(norm_layer, functools.partial) else norm_layer
        use_bias = func == nn.InstanceNorm2d
        input_nc = input_nc or outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, 2, 1, bias=use_bias)
        if outermost:
            model = [downconv, submodule, nn.ReLU(True),
                     nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1), nn.Tanh()]
        elif innermost:
            model = [nn.LeakyReLU(0.2, True), downconv, nn.ReLU(True),
                     nn.ConvTranspose2d(inner_nc, outer_nc, 4, 2, 1, bias=use_bias),
                     norm_layer(outer_nc)]
        else:
            model = [nn.LeakyReLU(0.2, True), downconv, norm_layer(inner_nc), submodule,
                     nn.ReLU(True),
                     nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=use_bias),
                     norm_layer(outer_nc)]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


def reference_unet(num_downs: int, ngf: int, norm_layer) -> nn.Module:
    block = ReferenceUnetBlock(ngf * 8, ngf * 8, innermost=True, norm_layer=norm_layer)
    for _ in range(num_downs - 5):
        block = ReferenceUnetBlock(ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer)
    for mult in (4, 2, 1):
        block = ReferenceUnetBlock(ngf * mult, ngf * mult * 2, submodule=block,
                                   norm_layer=norm_layer)
    return ReferenceUnetBlock(3, ngf, input_nc=3, submodule=block, outermost=True,
                              norm_layer=norm_layer)


def test_depth_8_is_the_reference_unet_256():
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    ref = reference_unet(8, 8, norm)
    ours = build_generator(ModelConfig(ngf=8, depth=8, norm="instance", padding="zeros"))
    # The reference visits encoder i, then level i+1, then decoder i; ours
    # lists the encoder, then the decoder: reverse the decoder to line them up.
    ordered = [*ours.down, *reversed(ours.up)]
    kinds = (nn.Conv2d, nn.ConvTranspose2d)
    ref_convs = [m for m in ref.modules() if isinstance(m, kinds)]
    our_convs = [m for block in ordered for m in block.modules() if isinstance(m, kinds)]
    assert [(type(m), m.weight.shape) for m in our_convs] == \
           [(type(m), m.weight.shape) for m in ref_convs]
    dead = 0  # reference biases right before an instance norm, which subtracts them away
    for mine, theirs in zip(our_convs, ref_convs):
        state = theirs.state_dict()
        if mine.bias is None:
            dead += state.pop("bias").numel()
        mine.load_state_dict(state)
    assert dead == sum(m.num_features for m in ref.modules() if isinstance(m, nn.InstanceNorm2d))
    assert count_parameters(ours) == count_parameters(ref) - dead
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


# --- attention blocks -----------------------------------------------------------------------

def test_self_attention_starts_as_identity():
    block = init_weights(SelfAttention2d(16))
    assert block.gamma.item() == 0
    x = torch.randn(2, 16, 4, 5)
    assert torch.equal(block(x), x)


def test_self_attention_is_softmax_attention_over_positions():
    block = SelfAttention2d(16)
    block.gamma.data.fill_(0.7)
    x = torch.randn(2, 16, 3, 4)
    q = torch.einsum("oc,bcn->bno", block.query.weight[:, :, 0, 0], x.flatten(2))  # (B, N, 2)
    k = torch.einsum("oc,bcn->bno", block.key.weight[:, :, 0, 0], x.flatten(2))
    v = torch.einsum("oc,bcn->bno", block.value.weight[:, :, 0, 0], x.flatten(2))  # (B, N, 8)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 12))
    o = torch.einsum("co,bno->bcn", block.out.weight[:, :, 0, 0], weights @ v).reshape(x.shape)
    torch.testing.assert_close(block(x), 0.7 * o + x, rtol=1e-5, atol=1e-5)
    assert block.query.out_channels == 2 and block.value.out_channels == 8  # C/8, C/2


@pytest.mark.parametrize("gate_size", [8, 4])  # same level, or one level coarser
def test_attention_gate_scales_the_skip_by_alpha(gate_size):
    gate = AttentionGate(skip_channels=6, gate_channels=10, inter_channels=3)
    skip = torch.randn(2, 6, 8, 8)
    g = torch.randn(2, 10, gate_size, gate_size)
    alpha = gate.attention_map(skip, g)
    assert alpha.shape == (2, 1, 8, 8)
    assert (alpha > 0).all() and (alpha < 1).all()
    torch.testing.assert_close(gate(skip, g), skip * alpha)
    assert not torch.allclose(gate.attention_map(skip, torch.randn_like(g)), alpha)


def test_attention_gate_can_close_a_skip():
    gate = AttentionGate(4, 4, 2)
    gate.psi.bias.data.fill_(-60.0)  # ψ's bias alone drives α to 0
    skip = torch.randn(1, 4, 8, 8)
    assert gate(skip, torch.randn(1, 4, 8, 8)).abs().max() < 1e-6


# --- discriminators -------------------------------------------------------------------------

@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_discriminator_contract(spectral_norm, blocks, norm):
    cfg = ModelConfig(ndf=8, d_blocks=blocks, norm=norm, spectral_norm=spectral_norm)
    net = init_weights(build_discriminator(cfg)).train()
    x = torch.rand(2, 3, 32, 64) * 2 - 1
    logits = net(x)
    assert logits.shape == (2, 1, 32 // 2 ** blocks, 64 // 2 ** blocks)
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    assert_every_parameter_learns(net)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_discriminator_takes_32_to_256_px(size):
    net = build_discriminator(ModelConfig(ndf=8))  # d_blocks 3, the default
    assert net(torch.zeros(1, 3, size, size)).shape == (1, 1, size // 8, size // 8)


def test_discriminator_rejects_inputs_smaller_than_its_patches():
    net = build_discriminator(ModelConfig(ndf=8, d_blocks=3))
    with pytest.raises(ConfigError, match=r"at least 16 px.*model.d_blocks"):
        net(torch.zeros(1, 3, 8, 64))


@pytest.mark.parametrize("blocks", [2, 3])
def test_discriminator_receptive_field(blocks):
    net = VGGDiscriminator(ndf=4, blocks=blocks, norm_layer=None)  # a norm couples all pixels
    assert net.receptive_field == 6 * 2 ** blocks - 3
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits = net(x)
    centre = logits.shape[-1] // 2
    logits[0, 0, centre, centre].backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    assert rows.max() - rows.min() + 1 == net.receptive_field


def test_spectral_norm_bounds_every_conv():
    net = build_discriminator(ModelConfig(ndf=8, d_blocks=2, norm="batch", spectral_norm=True))
    init_weights(net).train()
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    with torch.no_grad():
        for _ in range(30):  # one power iteration per training forward
            net(torch.randn(1, 3, 32, 32))
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_discriminator_supports_r1_double_backward(spectral_norm):
    net = build_discriminator(ModelConfig(ndf=8, d_blocks=2, spectral_norm=spectral_norm))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()  # R1 = ‖∇_x D(x)‖², differentiated w.r.t. D
    # ∇_x D of a piecewise-linear net does not depend on the biases: weights only.
    weights = [(n, p) for n, p in net.named_parameters() if p.dim() > 1]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in weights)


@pytest.mark.parametrize("ndf, blocks", [(4, 1), (16, 4)])
def test_build_discriminator_honours_ndf_and_blocks(ndf, blocks):
    net = build_discriminator(ModelConfig(ndf=ndf, d_blocks=blocks))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == ndf
    assert sum(m.stride == (2, 2) for m in convs) == blocks
    assert net(torch.zeros(1, 3, 64, 64)).shape[-1] == 64 // 2 ** blocks


# --- registries, init, counting -------------------------------------------------------------

@pytest.mark.parametrize("key, value, known", [
    ("generator", "resnet_9blocks", ", ".join(sorted(GENERATORS))),
    ("discriminator", "patch", ", ".join(sorted(DISCRIMINATORS))),
    ("norm", "layer", ", ".join(sorted(NORMS))),
])
def test_unknown_names_raise_config_error_listing_known(key, value, known):
    cfg = ModelConfig(**{key: value})
    build = build_discriminator if key == "discriminator" else build_generator
    with pytest.raises(ConfigError, match=f"model.{key}.*{value}.*known: {known}"):
        build(cfg)


def test_unknown_attention_and_init_raise_config_error_listing_known():
    with pytest.raises(ConfigError, match="known: both, gates, none, self"):
        UNetGenerator(attention="cbam", ngf=4, depth=2)
    with pytest.raises(ConfigError, match="known: kaiming, normal, orthogonal, xavier"):
        init_weights(nn.Conv2d(1, 1, 1), init="uniform")


def test_init_weights_follows_the_reference():
    net = build_generator(ModelConfig(ngf=16, depth=4, norm="batch", attention="self"))
    init_weights(net, gain=0.02)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert weights.mean().item() == pytest.approx(0, abs=2e-3)
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight for m in norms])
    assert scales.mean().item() == pytest.approx(1, abs=0.01)
    assert scales.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(not m.bias.any() for m in norms)
    assert all(m.gamma.item() == 0 for m in net.modules() if isinstance(m, SelfAttention2d))


def test_init_weights_reaches_spectrally_normalised_weights():
    net = build_discriminator(ModelConfig(ndf=16, spectral_norm=True))
    init_weights(net, gain=0.02)
    raw = torch.cat([m.parametrizations.weight.original.flatten()
                     for m in net.modules() if isinstance(m, nn.Conv2d)])
    assert raw.std().item() == pytest.approx(0.02, rel=0.02)


@pytest.mark.parametrize("init", sorted(INITS))
def test_every_init_rewrites_the_weights(init):
    conv = nn.Conv2d(8, 8, 3)
    before = conv.weight.detach().clone()
    init_weights(conv, init=init, gain=1.0)
    assert not torch.equal(conv.weight, before)
    assert not conv.bias.any()


def test_count_parameters_counts_shared_tensors_once():
    shared = nn.Linear(3, 4)  # 16 parameters
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 16
    assert count_parameters(nn.Conv2d(3, 8, 3, bias=False)) == 3 * 8 * 9
