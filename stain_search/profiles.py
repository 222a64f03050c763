"""Profiles: one search space, sized for the machine it runs on.

A bundled space explores the same keys on a 2-core laptop and on a GPU;
what changes is the scale — crop, U-Net widths and depth, epochs, the
evaluation set, what a trial asks Ray for, the budget. A space file keeps
one ``space:`` and names its scales under ``profiles:``::

    profiles:
      demo: {description: the 2-core CPU quickstart, as `base` says}
      gpu:
        description: the CycleGAN reference scale (U-Net-256 at 256 px)
        data: builtin:phantom-trichrome-512     # --data still wins
        base: {data.crop: 256, model.depth: 8, model.ngf: 64, model.ndf: 64,
               train.epochs: 200, train.decay_epochs: 100}
        resources: {cpus_per_worker: 4, gpus_per_worker: 1}
        search: {early_stopping: {grace_period: 20}}

What a profile may hold (``PROFILE_KEYS``), each merged over the space's own
section of the same name:

- ``description``: one line for ``stain-search spaces``;
- ``data``: the dataset this scale trains on by default (``--data`` wins);
- ``base``: fixed training keys (dotted or nested, as in ``base``), never a
  key the space explores — a profile sizes the search, it does not fix
  what is searched;
- ``resources``: any ``resources`` key;
- ``search``: the budget only (``SEARCH_KEYS``: ``num_samples``,
  ``max_concurrent``, ``early_stopping.grace_period``/``min_trials`` and
  ``pbt.perturbation_interval``, which count epochs and so scale with them). The algorithm, seed, enqueued points,
  pruner and its metric define the search and stay in the space's ``search``;
  the ``objective`` is what the space means and is never in a profile.

The default follows the hardware (:func:`default_profile`): ``gpu`` where a
GPU is visible, else ``demo``; a space without the preferred one falls back
to ``demo``, then to its first profile. A space without ``profiles:`` runs as
written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stain_search import config as cfg
from stain_search.errors import ConfigError
from stain_search.space_params import as_mapping, key_error

PROFILE_KEYS = ("description", "data", "base", "resources", "search")
SEARCH_KEYS = ("num_samples", "max_concurrent", "early_stopping", "pbt")
EARLY_STOPPING_KEYS = ("grace_period", "min_trials")
PBT_KEYS = ("perturbation_interval",)
NESTED = {"early_stopping": EARLY_STOPPING_KEYS, "pbt": PBT_KEYS}  # search sections, epoch counts only
GPU_PROFILE, CPU_PROFILE = "gpu", "demo"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    data: str | None = None
    base: dict[str, Any] = field(default_factory=dict)  # dotted keys
    resources: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)  # SEARCH_KEYS only


@dataclass(frozen=True)
class Choice:
    """The profile a space runs under, and why (printed on the first line)."""
    profile: Profile | None
    reason: str
    known: tuple[str, ...]


def local_gpus() -> int:
    """CUDA devices this process can see (the driver's machine, before Ray starts)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_profile(gpus: int) -> str:
    """The profile a machine (or a Ray cluster) with ``gpus`` GPUs runs by default."""
    return GPU_PROFILE if gpus > 0 else CPU_PROFILE


def _mapping(value: Any, *, path: Path, key: str) -> dict:
    return dict(as_mapping(value, path=path, key=key))  # a copy: merged into, never shared


def flatten(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` as dotted keys, whether written dotted or as nested sections."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in cfg.SECTIONS and isinstance(value, Mapping):
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            out[str(key)] = value
    return out


def _check_keys(body: Mapping, allowed: tuple[str, ...], *, path: Path, key: str,
                why: str = "") -> None:
    for k in body:
        if k not in allowed:
            raise key_error(path, f"{key}.{k}", f"a profile cannot set this{why}"
                       f"{cfg.suggest(str(k), list(allowed))} (allowed: {', '.join(allowed)})")


def _parse_one(name: str, raw: Any, *, path: Path, explored: set[str],
               resource_keys: tuple[str, ...]) -> Profile:
    where = f"profiles.{name}"
    body = _mapping(raw, path=path, key=where)
    _check_keys(body, PROFILE_KEYS, path=path, key=where)
    base = flatten(_mapping(body.get("base"), path=path, key=f"{where}.base"))
    for key in base:
        if key in explored:
            raise key_error(path, f"{where}.base.{key}", "explored in `space`: a profile sizes "
                       "the search, it does not fix what is searched")
    search = _mapping(body.get("search"), path=path, key=f"{where}.search")
    _check_keys(search, SEARCH_KEYS, path=path, key=f"{where}.search",
                why=" (the algorithm, seed, enqueued points and pruner define the search: "
                    "they stay in the space's `search`)")
    for section, keys in NESTED.items():
        if section in search:
            nested = _mapping(search[section], path=path, key=f"{where}.search.{section}")
            _check_keys(nested, keys, path=path, key=f"{where}.search.{section}",
                        why=" (only the epoch counts scale with a profile)")
            search[section] = nested
    resources = _mapping(body.get("resources"), path=path, key=f"{where}.resources")
    _check_keys(resources, resource_keys,
                path=path, key=f"{where}.resources")
    data = body.get("data")
    if data is not None and not isinstance(data, str):
        raise key_error(path, f"{where}.data", f"expected a folder or builtin:NAME, got {data!r}")
    return Profile(name=name, description=str(body.get("description") or ""), data=data,
                   base=base, resources=resources, search=search)


def parse_profiles(raw: Any, *, path: Path, explored: set[str],
                   resource_keys: tuple[str, ...]) -> dict[str, Profile]:
    """The ``profiles:`` section, validated; ``explored`` are the keys of ``space``."""
    body = _mapping(raw, path=path, key="profiles")
    if raw is not None and not body:
        raise key_error(path, "profiles", f"empty: name at least one, e.g. {CPU_PROFILE}: {{}}")
    out = {}
    for name in body:
        text = str(name)
        if not text.replace("-", "").replace("_", "").isalnum():
            raise key_error(path, f"profiles.{text}", "a profile name uses letters, digits, "
                       "'-' and '_' only")
        out[text] = _parse_one(text, body[name], path=path, explored=explored,
                               resource_keys=resource_keys)
    return out


def choose(profiles: Mapping[str, Profile], requested: str | None, *, path: Path,
           gpus: int | None = None, requested_by: str = "--profile") -> Choice:
    """The profile to run: ``requested`` (by ``requested_by``: ``--profile``, or
    the search's record on resume), else the hardware's default.

    ``gpus``: the GPUs the search can use (e.g. what Ray reports); None asks
    this machine's CUDA.
    """
    known = tuple(profiles)
    if requested is not None:
        if not profiles:
            raise ConfigError(f"{path}: --profile {requested}: this space defines no "
                              f"`profiles:`; drop --profile (it runs as written)")
        if requested not in profiles:
            raise ConfigError(f"{path}: --profile {requested}: no such profile"
                              f"{cfg.suggest(requested, list(known))} (this space's profiles: "
                              f"{', '.join(known)})")
        return Choice(profiles[requested], f"chosen with {requested_by}", known)
    if not profiles:
        return Choice(None, "the space defines no profiles: it runs as written", known)
    gpus = local_gpus() if gpus is None else gpus
    preferred = default_profile(gpus)
    seen = f"{gpus} GPU{'s' if gpus != 1 else ''} visible" if gpus else "no GPU visible"
    name = next(n for n in (preferred, CPU_PROFILE, known[0]) if n in profiles)
    why = f"default: {seen}" + ("" if name == preferred else
                                f", and the space has no `{preferred}` profile")
    return Choice(profiles[name], why, known)


def merge(raw: Mapping[str, Any], profile: Profile, *, path: Path) -> dict[str, Any]:
    """The space file's mapping with the profile's overrides applied."""
    out = {k: v for k, v in raw.items() if k != "profiles"}
    out["base"] = {**flatten(_mapping(raw.get("base"), path=path, key="base")), **profile.base}
    if profile.data is not None:
        out["data"] = profile.data
    out["resources"] = {**_mapping(raw.get("resources"), path=path, key="resources"),
                        **profile.resources}
    search = _mapping(raw.get("search"), path=path, key="search")
    for key, value in profile.search.items():
        search[key] = ({**_mapping(search.get(key), path=path, key=f"search.{key}"), **value}
                       if key in NESTED else value)
    out["search"] = search
    return out


def blame(err: ConfigError, choice: Choice) -> ConfigError:
    """``err`` (found after merging), naming the profile and how to choose another."""
    if choice.profile is None:
        return err
    others = [n for n in choice.known if n != choice.profile.name]
    hint = f"; other profiles: {', '.join(others)} (--profile NAME)" if others else ""
    return ConfigError(f"{err} [under profile `{choice.profile.name}`{hint}]")
