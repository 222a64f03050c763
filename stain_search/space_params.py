"""One entry of a space file's ``space:``: a training key, its distribution
(range, step or choices) and its ``when`` conditions, checked so that what
Optuna samples is what the file says (no option drawn twice as often, no
condition that can never hold, both ends of a stepped range reachable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stain_search import config as cfg
from stain_search.errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


@dataclass(frozen=True)
class Param:
    key: str  # dotted training-config key
    distribution: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple = ()
    when: tuple[tuple[str, tuple], ...] = ()  # ((parent key, allowed values), ...)


def key_error(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: `{key}`: {msg}")


def as_mapping(value: Any, *, path: Path, key: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise key_error(path, key, f"expected a mapping, got {value!r}")
    return value


def parse_param(key: str, raw: Any, *, path: Path, types: Mapping[str, Any]) -> Param:
    where = f"space.{key}"
    if key not in types:
        raise key_error(path, where, f"unknown training key{cfg.suggest(key, list(types))}")
    body = dict(as_mapping(raw, path=path, key=where))
    dist = body.pop("distribution", None)
    if dist not in DISTRIBUTIONS:
        raise key_error(path, f"{where}.distribution",
                   f"{dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    when_raw = body.pop("when", None)
    allowed = {"choice": {"choices"}}.get(dist, {"low", "high", "step"})
    for k in body:
        if k not in allowed:
            raise key_error(path, f"{where}.{k}", f"unknown key for a {dist} distribution"
                       f"{cfg.suggest(k, sorted(allowed))} (expected: {', '.join(sorted(allowed))})")
    when: tuple = ()
    if when_raw is not None:
        w = as_mapping(when_raw, path=path, key=f"{where}.when")
        when = tuple((str(k), tuple(v if isinstance(v, list) else [v])) for k, v in w.items())
    if dist == "choice":
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise key_error(path, f"{where}.choices", "a choice needs a non-empty list of options")
        values = [cfg.coerce(c, types[key], key=key, where=f"{path}: space.") for c in choices]
        repeated = sorted({repr(c) for c, v in zip(choices, values) if values.count(v) > 1})
        if repeated:  # Optuna would draw a repeated option more often than the others
            raise key_error(path, f"{where}.choices", f"{', '.join(repeated)} listed more than once: "
                       f"list each option once")
        return Param(key, dist, choices=tuple(choices), when=when)
    for k in ("low", "high"):
        if k not in body:
            raise key_error(path, f"{where}.{k}", f"a {dist} distribution needs `{k}`")
        if not isinstance(body[k], (int, float)) or isinstance(body[k], bool):
            try:
                body[k] = float(body[k])
            except (TypeError, ValueError):
                raise key_error(path, f"{where}.{k}", f"expected a number, got {body[k]!r}") from None
    low, high = body["low"], body["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        raise key_error(path, where, "low and high must be finite")
    if low > high:
        raise key_error(path, where, f"low ({low}) is above high ({high})")
    if dist in ("loguniform", "logint") and low <= 0:
        raise key_error(path, where, f"a log range must be above zero, got low = {low} "
                   f"(use `uniform`, or a positive low such as {high / 1000:g})")
    if dist in ("int", "logint"):
        if float(low) != int(low) or float(high) != int(high):
            raise key_error(path, where, f"an int range needs whole numbers, got {low}..{high}")
        low, high = int(low), int(high)
    kind = types[key]
    numeric = {int, float}
    base_kind = next((a for a in getattr(kind, "__args__", (kind,)) if a in numeric), None)
    if base_kind is None:
        raise key_error(path, where, f"`{key}` is not numeric: use `distribution: choice`")
    if base_kind is int and dist in ("uniform", "loguniform"):
        raise key_error(path, where, f"`{key}` takes whole numbers: use `int` or `logint`")
    step = _parse_step(body.get("step"), dist, low, high, path=path, where=where)
    return Param(key, dist, low=low, high=high, step=step, when=when)


def _parse_step(step: Any, dist: str, low: float, high: float, *, path: Path,
                where: str) -> float | int | None:
    """A grid step that Optuna can sample: positive, on a linear scale, and
    dividing the range, so both ends of the range are reachable."""
    if step is None:
        return None
    key = f"{where}.step"
    if dist in ("loguniform", "logint"):
        linear = "uniform" if dist == "loguniform" else "int"
        raise key_error(path, key, f"a {dist} range has no step (Optuna samples a log scale "
                   f"without a grid): drop `step`, or use `distribution: {linear}` with it")
    if isinstance(step, str):  # YAML reads 1e-2 (no dot) as a string
        try:
            step = float(step)
        except ValueError:
            pass
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
        raise key_error(path, key, f"expected a finite number, got {step!r}")
    if step <= 0:
        raise key_error(path, key, f"must be positive, got {step}")
    if dist == "int":
        if float(step) != int(step):
            raise key_error(path, key, f"an int range needs a whole step, got {step}")
        step = int(step)
    count = (high - low) / step  # grid intervals from low to high
    if high > low and count < 1 - 1e-9:
        raise key_error(path, key, f"{step} is wider than the range {low}..{high}: use a step "
                   f"of at most {high - low:g}")
    if not math.isclose(count, round(count), rel_tol=0, abs_tol=1e-9):
        fits = low + math.floor(count) * step
        raise key_error(path, key, f"{step} does not divide the range {low}..{high}, so high "
                   f"would never be drawn: use a step that does, or high: {fits:g}")
    return step


def _refuse_condition_cycles(by_key: Mapping[str, Param], *, path: Path) -> None:
    """``a`` when ``b``, ``b`` when ``a`` (or a longer loop): none of them is
    ever drawn, since each waits for another."""
    done: set[str] = set()

    def visit(key: str, trail: list[str]) -> None:
        if key in trail:
            loop = " → ".join([*trail[trail.index(key):], key])
            raise key_error(path, f"space.{key}.when", f"the conditions form a loop ({loop}), so "
                       f"none of them is ever drawn: make one of them unconditional")
        if key not in done:
            for parent, _ in by_key[key].when:
                visit(parent, [*trail, key])
            done.add(key)

    for key in by_key:
        visit(key, [])


def check_conditions(params: list[Param], base: Mapping[str, Any], *, path: Path) -> None:
    """Each ``when`` can hold: on another `choice` of the space, naming its
    values, and no loop of conditions; no explored key also fixed in ``base``."""
    by_key = {p.key: p for p in params}
    for p in params:
        for parent, values in p.when:
            if parent == p.key:
                raise key_error(path, f"space.{p.key}.when", "refers to itself, so it can never hold")
            if not values:
                raise key_error(path, f"space.{p.key}.when.{parent}", "an empty list of values can "
                           f"never hold: name the values of `{parent}` it applies to")
            if parent not in by_key or by_key[parent].distribution != "choice":
                raise key_error(path, f"space.{p.key}.when",
                           f"refers to `{parent}`, which is not a `choice` in this space")
            bad = [v for v in values if v not in by_key[parent].choices]
            if bad:
                raise key_error(path, f"space.{p.key}.when", f"{bad} not among the choices of "
                           f"`{parent}` ({list(by_key[parent].choices)})")
        if p.key in base:
            raise key_error(path, f"space.{p.key}", "also fixed in `base`: keep it in one place")
    _refuse_condition_cycles(by_key, path=path)
