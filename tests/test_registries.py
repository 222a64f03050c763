"""Every closed set of the training config is a Literal equal to its registry.

The Literal is what validation checks before Ray starts (a space's
``choices: [adam, adamw]`` is refused there); the registry is what a trial
builds from. If the two drift apart, a name either passes validation and
fails in every trial, or exists and cannot be chosen. A Literal-typed key
with no registry must say why in NO_REGISTRY.
"""

from __future__ import annotations

import importlib
import typing
from typing import Literal, get_args, get_origin

import pytest

from stain_search import config as cfg

# key → (module, registry, names the config adds that no registry holds)
CLOSED_SETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "model.generator": ("stain_search.models", "GENERATORS", ()),
    "model.discriminator": ("stain_search.models", "DISCRIMINATORS", ()),
    "model.norm": ("stain_search.models", "NORMS", ()),
    "model.attention": ("stain_search.models.generators", "ATTENTION", ()),
    "model.upsample": ("stain_search.models.generators", "UPSAMPLERS", ()),
    "loss.gan_mode": ("stain_search.losses", "GAN_LOSSES", ()),
    "optim.name": ("stain_search.optim", "OPTIMIZERS", ()),
    "data.layout": ("stain_search.data.folders", "LAYOUTS", ("auto",)),  # auto: detected
    # auto: inception with the standard weights, else random (metrics.frechet).
    "eval.feature_extractor": ("stain_search.metrics.frechet", "FEATURE_EXTRACTORS", ("auto",)),
    # auto: the stain the data layer knows (metrics.stain).
    "eval.stain": ("stain_search.metrics.stain", "DATASET_STAINS", ("auto",)),
}

NO_REGISTRY = {
    "model.padding": "passed to torch.nn.Conv2d as padding_mode",
    "train.device": "resolved by train.resolve_device",
    "train.precision": "two branches in gan.CycleGAN (bf16 autocast or not)",
    "data.num_workers": "a number, or auto",
    "data.cache_mb": "a number, or auto",
}


def literal_options(annotation) -> tuple | None:
    """The options of a Literal, also inside ``X | None`` or ``int | Literal[...]``."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    found = [o for a in get_args(annotation) if (o := literal_options(a)) is not None]
    return tuple(v for o in found for v in o) if found else None


def closed_keys() -> dict[str, tuple]:
    out = {}
    for section, cls in cfg.SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            options = literal_options(hint)
            if options is not None:
                out[f"{section}.{name}"] = options
    return out


@pytest.mark.parametrize("key", sorted(CLOSED_SETS))
def test_registry_keys_equal_the_literal(key):
    module, name, extra = CLOSED_SETS[key]
    registry = getattr(importlib.import_module(module), name)
    options = closed_keys()[key]
    assert len(set(options)) == len(options), f"{key}: an option is listed twice"
    assert set(options) == set(registry) | set(extra), (
        f"`{key}` Literal {sorted(options)} != {module}.{name} {sorted(registry)} + {list(extra)}")


def test_every_closed_set_is_paired_or_says_why_not():
    keys = set(closed_keys())
    unlisted = keys - set(CLOSED_SETS) - set(NO_REGISTRY)
    assert not unlisted, f"Literal keys with no registry pairing here: {sorted(unlisted)}"
    assert not (set(CLOSED_SETS) | set(NO_REGISTRY)) - keys, "listed keys that are no Literal"


def test_a_name_outside_the_literal_is_refused_before_any_build():
    with pytest.raises(cfg.ConfigError, match="`optim.name`: 'adamw' is not one of"):
        cfg.load_config(None, {"optim.name": "adamw"})
    with pytest.raises(cfg.ConfigError, match="`model.generator`"):
        cfg.from_dict({"model": {"generator": "resnet"}})
