"""`stain-search run SPACE --warm-start OTHER`: a new search starts from what a
previous one learnt (a new stain, a new dataset, a wider space).

The finished (COMPLETE) trials of OTHER (a search in the same ``--storage``)
are ranked by its own deploy rule, one checkpoint per trial
(``deploy.select.select_dir(..., per_trial=True)``, without constraints), and
each becomes a point the new study starts with, best first:

- a key the new space explores and OTHER's trial had keeps its value, if it
  lies inside the new space (a choice among the choices; a number within
  low..high, whole for an int range, on the grid of a step); otherwise the
  trial is dropped, and the user is told which key and value;
- a key OTHER did not search (or left inactive: a conditional key) takes the
  new space's default, its ``base:`` or the training config's value; a
  default outside the new space is left to the sampler;
- a key OTHER searched that the new space does not is not carried over.

**Enqueue, not add_trial.** ``study.enqueue_trial`` makes the new search's
first trials OTHER's best points, re-trained here; ``study.add_trial`` would
copy OTHER's results without training. Adding is only honest when the data,
the objectives, the fixed settings and the evaluation are all the same — and a
warm start exists precisely for when they are not (a new stain or dataset), so
OTHER's numbers would teach the sampler the wrong landscape and its
checkpoints would not be this search's to deploy. Re-training costs the first
trials of the budget (at most ``num_samples`` points are taken), and in
return every trial of the search is measured the same way. Only a new search
is seeded: a resumed study already holds its first trials.

Each seeded trial keeps where it came from: the study user attribute
``stain_search.warm_start`` (``OTHER #N``), which becomes a tag on its MLflow
run; ``search.json`` records the warm start (``warm_start``) and the parent
run has it as a param. It is not part of the search's identity: it only
changes the first suggestions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from stain_search.search_dir import SearchDir
from stain_search.spaces import Param, SearchSpec
from stain_search.study import WarmPoint

ATTR = "stain_search.warm_start"  # the study user attribute (and MLflow tag) of a seeded trial


@dataclass
class WarmStart:
    source: str  # the other search's name
    search_id: str | None
    points: list[WarmPoint]  # best first
    finished: int  # OTHER's ranked finished trials
    dropped: list[str] = field(default_factory=list)  # one line per dropped trial
    notes: list[str] = field(default_factory=list)  # defaults taken, keys not carried over

    def record(self) -> dict[str, Any]:
        """What ``search.json`` keeps (``SearchRecord.warm_start``)."""
        return {"search": self.source, "search_id": self.search_id,
                "enqueued": len(self.points), "dropped": len(self.dropped)}

    def lines(self) -> list[str]:
        """What the driver says before it starts."""
        n = len(self.points)
        head = (f"warm start from {self.source!r}: {n} of its {self.finished} finished "
                f"trial(s), best first, re-trained as trial(s) 0..{n - 1}" if n else
                f"warm start from {self.source!r}: none of its {self.finished} finished "
                f"trial(s) fits this space; nothing enqueued")
        return [head, *(f"  warm start: {line}" for line in self.notes + self.dropped)]


def inside(p: Param, value: Any) -> bool:
    """Whether ``value`` is one the parameter can take in this space."""
    if p.distribution == "choice":
        return value in p.choices
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    if not p.low <= value <= p.high:
        return False
    if p.distribution in ("int", "logint") and float(value) != int(value):
        return False
    if p.step:
        count = (value - p.low) / p.step
        return math.isclose(count, round(count), rel_tol=0, abs_tol=1e-9)
    return True


def _typed(p: Param, value: Any) -> Any:
    return int(value) if p.distribution in ("int", "logint") else value


def default_of(spec: SearchSpec, key: str) -> Any:
    """The new space's value of ``key`` when it is not searched: base, else the config's."""
    section, name = key.split(".", 1)
    return getattr(getattr(spec.base_config(), section), name)


def _shown(p: Param) -> str:
    return str(list(p.choices)) if p.distribution == "choice" else f"{p.low:g}..{p.high:g}"


def plan_warm_start(spec: SearchSpec, other: SearchDir, *, limit: int,
                    tracking_uri: str | None = None) -> WarmStart:
    """OTHER's finished trials as points of ``spec``'s space, best first (at most
    ``limit``). A missing OTHER is one clear line (ConfigError); nothing is written."""
    from stain_search.deploy.select import select_dir, study_trials

    record = other.read_record()
    selection = select_dir(other, tracking_uri=tracking_uri, space_constraints=False,
                           per_trial=True)
    by_number = {t.number: t for t in study_trials(other, record.name)}
    ranked = [c for c in selection.candidates if c.state == "COMPLETE"]
    old_keys = {p.key for p in record.params}
    new_keys = {p.key for p in spec.params}
    notes, dropped, points = [], [], []
    gone = sorted(old_keys - new_keys)
    if gone:
        notes.append(f"{', '.join(gone)}: searched in {record.name!r} but not here, "
                     f"not carried over")
    defaulted: dict[str, str] = {}
    for c in ranked:
        trial = by_number.get(c.number)
        source = dict(trial.params) if trial is not None else dict(c.params)
        values: dict[str, Any] = {}
        reason = None
        for p in spec.params:
            if any(values.get(parent) not in allowed for parent, allowed in p.when):
                continue  # inactive here (a conditional key)
            if p.key in old_keys and source.get(p.key) is not None:
                value = source[p.key]
                if not inside(p, value):
                    reason = f"{p.key} = {value!r} is outside this space ({_shown(p)})"
                    break
                values[p.key] = _typed(p, value)
                continue
            value = default_of(spec, p.key)
            if inside(p, value):
                values[p.key] = _typed(p, value)
                defaulted.setdefault(p.key, f"{p.key}: not in {record.name!r}'s trials, "
                                            f"this space's default {value!r}")
            else:
                defaulted.setdefault(p.key, f"{p.key}: not in {record.name!r}'s trials and "
                                            f"its default {value!r} is outside this space "
                                            f"({_shown(p)}): the sampler draws it")
        if reason is not None:
            dropped.append(f"dropped {record.name} #{c.number} ({c.trial}): {reason}")
            continue
        points.append(WarmPoint(values, {ATTR: f"{record.name} #{c.number}"}))
    notes += defaulted.values()
    if len(points) > limit:
        notes.append(f"the best {limit} of {len(points)} taken (num_samples {limit})")
        points = points[:limit]
    return WarmStart(source=record.name, search_id=record.search_id, points=points,
                     finished=len(ranked), dropped=dropped, notes=notes)
