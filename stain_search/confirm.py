"""`stain-search confirm NAME --top K --seeds N`: the top trials, re-trained with new seeds.

A confirmation is a search over fixed configurations: the search's top-K
trials (by the deploy rule, each trial's best checkpoint), each re-trained
with the same N new ``train.seed`` values. It is run by the search driver
itself (``stain_search.search.search_spec``), so it runs in the same
executors, keeps its folder the same way and resumes the same way:

    <search>/confirm/      a search folder: search.json, study.journal, trials/

- Its study holds the K × N runs, enqueued with what they confirm as user
  attributes (``stain_search.confirms``, ``stain_search.seed``); each
  trial's MLflow run carries them as tags, under a parent run nested in the
  search's own parent run.
- Running the same ``confirm`` again continues it: interrupted runs resume
  from their checkpoints, finished ones are not repeated. Other --top or
  --seeds on an existing confirmation are refused; nothing is overwritten.
- No pruning: every seed trains to the end, or the spread would be of
  truncated runs.

What it found is read back by ``stain_search.deploy.confirmed``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stain_search import tracking
from stain_search.checkpoint import read_meta
from stain_search.deploy.confirmed import Confirmation, confirmation
from stain_search.deploy.select import select_dir, study_trials
from stain_search.errors import ConfigError
from stain_search.pbt import schedule_of
from stain_search.search import ParentRun, search_spec
from stain_search.search_dir import SearchDir, identity_of
from stain_search.spaces import EarlyStopping, Param, SearchSpec, load_space
from stain_search.study import REPLAY

SEED_KEY = "train.seed"
MAX_SEED = 2**31 - 1


def new_seeds(base_seed: int, n: int) -> list[int]:
    """N seeds none of the search's runs used (they all ran with the base seed)."""
    return [(base_seed + 1 + i) % MAX_SEED for i in range(n)]


def confirmation_spec(sdir: SearchDir, *, top: int, seeds: int,
                      tracking_uri: str | None = None) -> SearchSpec:
    """The confirmation of the search in ``sdir`` as a search space: the top-K
    trials' values × N seeds, enqueued in order, nothing sampled."""
    if top < 1 or seeds < 1:
        raise ConfigError("--top and --seeds must be at least 1 (e.g. --top 3 --seeds 3)")
    record = sdir.read_record()
    ranked = select_dir(sdir, tracking_uri=tracking_uri, per_trial=True).candidates
    if not ranked:
        raise ConfigError(f"search {record.name!r} has no trial with a kept checkpoint to "
                          f"confirm; `stain-search status {record.name}` shows its trials")
    by_number = {t.number: t for t in study_trials(sdir, record.name)}
    spec = load_space(sdir.space_file, data=record.data, profile=record.profile)
    spec.name = record.name
    values = new_seeds(int(spec.base_config().train.seed), seeds)
    points, attrs = [], []
    for c in ranked[:top]:
        searched = by_number.get(c.number)
        params = dict(searched.params) if searched is not None else dict(c.params)
        # A PBT member's checkpoint: its weights' schedule is replayed from epoch 0
        # (the values its lineage started from, then each exploit's).
        schedule = schedule_of(read_meta(c.checkpoint))
        if schedule:
            params = {k: v for k, v in schedule[0]["values"].items() if k in params}
        params.pop(SEED_KEY, None)
        for seed in values:
            points.append({**params, SEED_KEY: seed})
            attrs.append({tracking.CONFIRMS: c.trial, tracking.CONFIRMS_NUMBER: str(c.number),
                          tracking.SEED: str(seed), **({REPLAY: schedule} if schedule else {})})
    spec.params = [p for p in spec.params if p.key != SEED_KEY] + [
        Param(key=SEED_KEY, distribution="int", low=0, high=MAX_SEED)]
    spec.mutate = ()  # fixed configurations (a PBT search's schedules replayed), no exploits
    spec.search = dataclasses.replace(
        spec.search, algorithm="random", num_samples=len(points), enqueue=points,
        enqueue_attrs=attrs,
        early_stopping=EarlyStopping(pruner="none", metric=spec.search.early_stopping.metric))
    return spec


def check_same_confirmation(spec: SearchSpec, cdir: SearchDir) -> None:
    """An existing confirmation continues only with the same runs to do."""
    if not cdir.exists():
        return
    saved = cdir.read_record()
    if saved.identity == identity_of(spec):
        return
    planned = saved.identity.get("search", {}).get("enqueue_attrs") or []
    trials = sorted({a.get(tracking.CONFIRMS) for a in planned} - {None})
    n_seeds = len({a.get(tracking.SEED) for a in planned} - {None})
    raise ConfigError(
        f"{cdir.where}: this search already has a confirmation of other runs "
        f"(--top {len(trials)} --seeds {n_seeds}: {', '.join(trials) or '?'}); rerun "
        f"`stain-search confirm {spec.name} --top {len(trials)} --seeds {n_seeds}` to continue "
        f"it, or move that folder away to confirm afresh (if the search's top trials changed "
        f"since, the same flags name other trials)")


@dataclasses.dataclass
class ConfirmOutcome:
    confirmation: Confirmation
    search_dir: SearchDir
    tracking_uri: str
    elapsed_s: float


def run_confirm(name: str, *, top: int, seeds: int, storage: str | Path | None = None,
                tracking_uri: str | None = None, address: str | None = None,
                max_concurrent: int | None = None, verbose: int = 1, live: bool = False,
                say=None, shared_fs: bool = False) -> ConfirmOutcome:
    """Run (or continue) the confirmation of search ``name``."""
    sdir = SearchDir.of(storage, name).pull()
    spec = confirmation_spec(sdir, top=top, seeds=seeds, tracking_uri=tracking_uri)
    cdir = sdir.confirmation
    check_same_confirmation(spec, cdir)
    record = sdir.read_record()
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    experiment = tracking.find_experiment(c, record.name)
    parent = (tracking.search_run(c, experiment, search=record.name, search_id=record.search_id)
              if experiment else None)
    outcome = search_spec(
        spec, cdir, tracking_uri=uri, address=address, resume=cdir.exists(),
        max_concurrent=max_concurrent, verbose=verbose, live=live, say=say, shared_fs=shared_fs,
        parent_run=ParentRun(nested_in=parent.info.run_id if parent else None,
                             run_name=f"{record.name} confirm top {top} × {seeds} seeds",
                             tags={tracking.CONFIRMS_SEARCH: record.search_id or ""},
                             resume_command=f"stain-search confirm {record.name} --top {top} "
                                            f"--seeds {seeds}"))
    return ConfirmOutcome(confirmation=confirmation(sdir, tracking_uri=uri), search_dir=sdir,
                          tracking_uri=uri, elapsed_s=outcome.elapsed_s)
