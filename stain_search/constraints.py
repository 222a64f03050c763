"""Constraints: the bounds a checkpoint must meet to be deployed.

Written in a space (``constraints: [{metric: ssim_structure, min: 0.6}]``) or
given to ``best``/``export`` (``--min``/``--max``). The sampler sees a space's
constraints through Optuna's convention (``stain_search.study``): one value per
constraint, ≤ 0 when it holds, else the amount by which the metric misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stain_search import config as cfg
from stain_search.errors import ConfigError
from stain_search.objectives import METRIC_ALIASES, reported_metrics, resolve_metric


def _err(path: Path, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: `{key}`: {msg}")  # as every space error reads


@dataclass(frozen=True)
class Constraint:
    """A bound a checkpoint must meet to be deployed (`constraints:` in a space,
    or `--min`/`--max` of `best` and `export`). The sampler sees it too, through
    Optuna's convention (stain_search.study): one value per constraint, ≤ 0 when
    it holds — the amount by which the metric misses its bound otherwise."""

    metric: str
    bound: str  # "min": metric ≥ value; "max": metric ≤ value
    value: float

    def violation(self, metrics: Mapping[str, Any]) -> float:
        v = metrics.get(self.metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return math.inf  # not reported, or NaN: never feasible
        return self.value - v if self.bound == "min" else v - self.value

    def holds(self, metrics: Mapping[str, Any]) -> bool:
        return self.violation(metrics) <= 0

    def __str__(self) -> str:
        return f"{self.metric} {'≥' if self.bound == 'min' else '≤'} {self.value:g}"


def parse_constraints(raw: Any, *, path: Path, base_config: cfg.Config,
                       check: bool) -> tuple[Constraint, ...]:
    """`constraints: [{metric: ssim_structure, min: 0.6}, ...]`: each a metric the
    trials report and exactly one finite bound."""
    from stain_search.evaluate import metric_directions

    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _err(path, "constraints", "expected a list, e.g. "
                   "[{metric: ssim_structure, min: 0.6}, {metric: stain_area_error, max: 0.05}]")
    directions = metric_directions()
    reported = reported_metrics(base_config) if check else set(directions) | set(METRIC_ALIASES)
    out = []
    for i, item in enumerate(raw):
        key = f"constraints[{i}]"
        if not isinstance(item, Mapping):
            raise _err(path, key, f"expected a mapping, got {item!r}")
        unknown = set(item) - {"metric", "min", "max"}
        if unknown:
            raise _err(path, f"{key}.{sorted(map(str, unknown))[0]}",
                       "unknown key (expected metric and one of min, max)")
        metric = item.get("metric")
        metric = resolve_metric(metric, base_config, reported=reported,
                                where=f"{path}: `{key}.metric`")
        bounds = [b for b in ("min", "max") if b in item]
        if len(bounds) != 1:
            raise _err(path, key, f"give exactly one of `min` (at least) or `max` (at most), "
                       f"got {' and '.join(bounds) or 'neither'}; a range is two constraints")
        bound, value = bounds[0], item[bounds[0]]
        if isinstance(value, str):  # YAML reads 1e-2 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise _err(path, f"{key}.{bound}", f"expected a finite number, got {value!r}")
        out.append(Constraint(str(metric), bound, float(value)))
    return tuple(out)
