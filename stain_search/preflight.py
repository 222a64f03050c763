"""A search's pre-flight: everything checked before the driver writes anything
or Ray starts (``stain_search.search`` step 1), each refusal one line.

- :func:`check_search_dir`: the folder is this space's search, or free; no
  driver runs it.
- :func:`resolve_budget`: ``num_samples``/``max_concurrent`` of a new or
  resumed search.
- :func:`check_shared_storage`: a local storage only on a one-node cluster
  (or one every node mounts).
- :func:`verify_data`: every image decodes and is large enough; what else the
  data folders hold is named.
"""

from __future__ import annotations

from stain_search.errors import ConfigError
from stain_search.lock import is_locked, read_driver
from stain_search.search_dir import Budget, SearchDir, SearchRecord, identity_of
from stain_search.spaces import SearchSpec


def resolve_budget(spec: SearchSpec, saved: SearchRecord | None, *, num_samples: int | None,
                   max_concurrent: int | None) -> Budget:
    """The recorded budget on resume (the space file's on a new search), with the
    command line's overrides: ``--num-samples`` extends a search."""
    base = saved.budget if saved is not None else Budget(spec.search.num_samples,
                                                         spec.search.max_concurrent)
    budget = Budget(num_samples if num_samples is not None else base.num_samples,
                    max_concurrent if max_concurrent is not None else base.max_concurrent)
    if budget.num_samples < 1 or budget.max_concurrent < 1:
        raise ConfigError("--num-samples and --max-concurrent must be at least 1")
    return budget


def check_search_dir(spec: SearchSpec, sdir: SearchDir, *, resume: bool) -> SearchRecord | None:
    """Refuse to mix two searches in one folder, or two drivers on one search.
    Returns the saved record when the search exists (resume). Writes nothing."""
    if not sdir.exists():
        if resume:
            raise ConfigError(f"{sdir.where}: no search named {spec.name!r} to resume")
        return None
    saved = sdir.read_record()
    if saved.identity != identity_of(spec):
        now = identity_of(spec)
        changed = [k for k in dict.fromkeys([*saved.identity, *now])
                   if saved.identity.get(k) != now.get(k)]
        raise ConfigError(
            f"{sdir.where}: a search named {spec.name!r} already exists with a different "
            f"{' and '.join(changed) or 'space'}; pass --name to start a new search "
            f"(results are never mixed)")
    if is_locked(sdir.lock_file):
        raise _running(spec, sdir)
    if not resume:
        raise ConfigError(f"{sdir.where}: search {spec.name!r} already exists; pass "
                          f"--resume to continue it (or `stain-search resume {spec.name}`) "
                          f"or --name to start a new one")
    return saved


def _running(spec: SearchSpec, sdir: SearchDir) -> ConfigError:
    other = read_driver(sdir.driver_file)
    who = f"pid {other.pid} on {other.host}, since {other.started}" if other else "another driver"
    return ConfigError(f"search {spec.name!r} is running ({who}); wait for it to finish or stop "
                       f"it, then `stain-search resume {spec.name}` continues it")


def check_shared_storage(sdir: SearchDir, *, shared_fs: bool) -> None:
    """A local --storage on a cluster of several nodes: the other nodes' trials
    would write checkpoints where the driver and later commands never look."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if sdir.remote is None and len(nodes) > 1 and not shared_fs:
        raise ConfigError(
            f"--storage {sdir.root.parent} is a local folder, but the Ray cluster has "
            f"{len(nodes)} nodes and the others cannot see it; pass a URI storage "
            f"(e.g. --storage s3://bucket/runs), or --shared-fs if every node mounts it")


def verify_data(spec: SearchSpec) -> str | None:
    """Every image decodes and is large enough; returns the line naming what
    the data folders hold besides images (None: nothing)."""
    from stain_search.data.datasets import verify_dataset

    d = spec.base_config().data
    return verify_dataset(d.path, d.layout, d.crop, eval_crop=d.eval_crop, load_size=d.load_size)
