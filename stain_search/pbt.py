"""Population-based training in a search (Jaderberg et al., 2017): what a
space may mutate, and a member's schedule.

``search.algorithm: pbt`` (or ``pb2``, Parker-Holder et al., 2020) runs
``num_samples`` members at once under Ray Tune's scheduler
(``stain_search.pbt_scheduler``). Every ``perturbation_interval`` epochs a
member in the bottom ``quantile_fraction`` *exploits* one in the top: it
takes that member's checkpoint PBT scored (weights, optimiser moments, image
pools, the epoch and so the learning-rate decay) and its configuration,
then *explores*: PBT multiplies each mutated key by 0.8 or 1.2, or resamples
it (``resample_probability``), PB2 picks the values from a GP bandit; either
way clipped to the space's bounds.

Only continuous training settings that the loop reads afresh every step or
epoch may be mutated (:data:`MUTABLE`). Anything that shapes the networks or
the optimiser's state (attention, widths, depth, upsampling, the optimiser's
name) is drawn once per member and never mutated; an exploit carries the
donor's with its weights, so a member never loads weights of another
architecture. A space that asks to mutate one is refused before Ray starts.

A member's *schedule* is the list of segments its weights were trained
under, kept in every checkpoint's ``meta.json`` (``schedule``): from epoch
``epoch`` on, member ``trial`` trained with ``values``; an exploit adds a
segment naming its ``donor``. An exported checkpoint carries it in its
provenance, so the model can be re-trained: the donor's history up to the
exploit, then the new values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from stain_search.errors import ConfigError

ALGORITHMS = ("pbt", "pb2")

# Training keys PBT may change between epochs, and why that is safe.
MUTABLE: dict[str, str] = {
    "optim.lr_g": "set on G's optimiser at the start of every epoch",
    "optim.lr_d": "set on D's optimiser at the start of every epoch",
    "loss.lambda_cycle": "read at every generator step",
    "loss.lambda_identity": "read at every generator step",
    "loss.r1_gamma": "read at every discriminator step",
    "optim.consensus_gamma": "read at every consensus step",
}
# Why the rest may not change mid-training (the first matching prefix).
FIXED_WHY: tuple[tuple[str, str], ...] = (
    ("model.", "it changes the networks' shapes"),
    ("optim.name", "it changes the optimiser and the state it keeps"),
    ("optim.", "the optimiser's state was built with it"),
    ("data.", "it changes what the networks were trained on"),
    ("", "PBT mutates only continuous training settings"),
)

SCHEDULE = "schedule"  # meta.json key: the segments a checkpoint's weights were trained under
COPIED_FROM = "copied_from"  # meta.json key of a donor's checkpoint an exploit copied in


@dataclass
class PBTSettings:
    """``search.pbt`` of a space (used with ``algorithm: pbt`` or ``pb2``)."""

    perturbation_interval: int = 2  # epochs between a member's exploit/explore decisions
    quantile_fraction: float = 0.25  # the bottom fraction exploits the top fraction
    resample_probability: float = 0.25  # PBT: resample instead of perturb (PB2 ignores it)
    synch: bool = False  # wait for every member at each perturbation (Ray's synch mode)
    mutate: list | None = None  # None: every continuous key of the space that may change


def why_fixed(key: str) -> str:
    return next(why for prefix, why in FIXED_WHY if key.startswith(prefix))


def check_pbt(settings: PBTSettings, params: list, *, algorithm: str, num_samples: int,
              pruner: str, objectives: int, epochs: int, eval_every: int,
              checkpoint_every: int, path: Path) -> tuple[str, ...]:
    """Refuse a PBT space that cannot run (one line each); return the keys it mutates."""
    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{path}: `{key}`: {msg}")

    by_key = {p.key: p for p in params}
    if settings.mutate is None:
        mutate = [p.key for p in params if p.key in MUTABLE and not p.when
                  and p.distribution in ("uniform", "loguniform")]
        if not mutate:
            raise err("search.pbt.mutate", f"{algorithm} needs a continuous key to mutate and "
                      f"the space has none of {', '.join(MUTABLE)}: add one to `space:`")
    else:
        mutate = [str(k) for k in settings.mutate]
        if not mutate:
            raise err("search.pbt.mutate", "empty: name at least one key to mutate")
    for key in mutate:
        where = f"search.pbt.mutate: {key}"
        if key not in MUTABLE:
            raise err(where, f"cannot change during training ({why_fixed(key)}): {algorithm} "
                      f"draws it once per member and never mutates it; remove it from "
                      f"search.pbt.mutate (mutable: {', '.join(MUTABLE)})")
        p = by_key.get(key)
        if p is None:
            raise err(where, "not a key of `space:`: give it a range there")
        if p.distribution not in ("uniform", "loguniform"):
            raise err(where, f"a {p.distribution} distribution cannot be perturbed: use "
                      f"uniform or loguniform")
        if p.when:
            raise err(where, "a conditional key (`when:`) is missing from some members and "
                      "cannot be mutated: make it unconditional, or leave it out of mutate")
    if len(set(mutate)) != len(mutate):
        raise err("search.pbt.mutate", "a key is listed twice")
    if num_samples < 2:
        raise err("search.num_samples", f"{algorithm}: the population needs at least 2 members")
    if algorithm == "pb2":
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise err("search.algorithm", "pb2 fits its GP bandit with scikit-learn, which is "
                      "not installed: `pip install scikit-learn`, or use algorithm: pbt")
    if pruner != "none":
        raise err("search.early_stopping.pruner", f"{algorithm} replaces pruning (weak members "
                  f"exploit strong ones instead of stopping): use pruner: none")
    if objectives > 1:
        raise err("objective", f"{algorithm} ranks members by one metric: give one objective "
                  f"(constraints: can bound the others)")
    interval = settings.perturbation_interval
    if interval < 1:
        raise err("search.pbt.perturbation_interval", "must be at least 1 epoch")
    if interval >= epochs:
        raise err("search.pbt.perturbation_interval", f"{interval} epochs, but a member "
                  f"trains {epochs} (train.epochs): it would never exploit; use fewer")
    for every, name in ((eval_every, "train.eval_every"),
                        (checkpoint_every, "train.checkpoint_every")):
        if interval % every:
            raise err("search.pbt.perturbation_interval", f"{interval} is not a multiple of "
                      f"{name} ({every}): a perturbation needs an evaluated, checkpointed epoch")
    if not 0 < settings.quantile_fraction <= 0.5:
        raise err("search.pbt.quantile_fraction", "must be in (0, 0.5]")
    if not 0 <= settings.resample_probability <= 1:
        raise err("search.pbt.resample_probability", "must be in [0, 1]")
    return tuple(mutate)


# --- a member's schedule ------------------------------------------------------------------

def first_segment(trial: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The schedule of a member that starts from scratch."""
    return [{"epoch": 0, "trial": trial, "values": dict(values)}]


def exploit_segment(schedule: list[dict[str, Any]], *, epoch: int, trial: str, donor: str,
                    values: Mapping[str, Any], exploit: str) -> list[dict[str, Any]]:
    """The donor's schedule, continued by ``trial`` with ``values`` from ``epoch``."""
    return [*schedule, {"epoch": int(epoch), "trial": trial, "donor": donor,
                        "values": dict(values), "exploit": exploit}]


def schedule_of(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(meta.get(SCHEDULE) or [])


def exploits_in(schedule: Iterable[Mapping[str, Any]]) -> set[str]:
    return {s["exploit"] for s in schedule if s.get("exploit")}


def values_at(schedule: list[Mapping[str, Any]], epoch: int) -> dict[str, Any]:
    """The values in force while training epoch ``epoch`` (1-based)."""
    active = [s for s in schedule if s["epoch"] < epoch] or list(schedule[:1])
    return dict(active[-1]["values"]) if active else {}


def clip(value: float, low: float, high: float) -> float:
    """A perturbed value back inside the space's bounds."""
    if not math.isfinite(value):
        return low
    return min(max(value, low), high)


# --- the checkpoint a member hands Tune --------------------------------------------------
# Tune's PBT exploits a member only through a checkpoint it reported. The
# weights stay where the search keeps them (the trial's folder, or the store);
# what Tune copies is this pointer: which member, at which epoch.
POINTER_FILE = "member.json"


def write_pointer(folder: Path, *, trial: str, number: int, epoch: int) -> Path:
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POINTER_FILE).write_text(json.dumps({"trial": trial, "number": int(number),
                                                   "epoch": int(epoch)}))
    return folder


def read_pointer(folder: Path) -> dict[str, Any] | None:
    """The member a Tune checkpoint points at (None: not one of ours)."""
    import json

    path = Path(folder) / POINTER_FILE
    try:
        pointer = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return pointer if {"trial", "number", "epoch"} <= set(pointer) else None
