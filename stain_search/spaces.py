"""Search-space files: parse and validate (one clear line per mistake) into a
typed ``SearchSpec`` (Optuna's suggestions from it are ``stain_search.study.suggest``).

    name: lambda
    description: Cycle-consistency weight λ and identity weight.
    data: builtin:phantom-trichrome        # optional; --data overrides
    base:                                  # fixed training settings (dotted keys)
      train.epochs: 6
    space:                                 # what Optuna explores
      loss.lambda_cycle:    {distribution: loguniform, low: 1, high: 50}
      model.attention:      {distribution: choice, choices: [none, gates]}
      model.attention_channels_ratio:      # conditional: only when gates are on
        {distribution: uniform, low: 0.25, high: 1.0, when: {model.attention: [gates]}}
    objective: {metric: kernel, mode: min}       # or a list → Pareto search
    constraints: [{metric: ssim_structure, min: 0.6}]   # optional (stain_search.constraints)
    search: {algorithm: tpe, num_samples: 8, max_concurrent: 2, seed: 0,
             early_stopping: {pruner: median, grace_period: 2}}
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0,
                executor: auto}               # auto | ray_train | in_trial

`frechet` names whichever Fréchet distance the run can honestly compute: `fid`
with the standard Inception weights, else `fd_random` (see metrics.frechet);
`kernel` likewise names the kernel distance, `kid` or `kd_random` (metrics.kernel);
it is resolved here, before Ray starts, and only the resolved name is logged.
Every key is checked against the training config (stain_search.config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stain_search import config as cfg
from stain_search import profiles
from stain_search.errors import ConfigError
from stain_search.constraints import Constraint, parse_constraints
from stain_search.objectives import METRIC_ALIASES, reported_metrics, resolve_metric
from stain_search.pbt import ALGORITHMS as POPULATION_ALGORITHMS
from stain_search.pbt import PBTSettings, check_pbt
from stain_search.space_params import (Param, as_mapping, check_conditions, key_error,
                                       parse_param)

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
if not SPACES_DIR.is_dir():  # installed (non-editable): the bundled copy
    SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"

TOP_KEYS = ("name", "description", "data", "base", "space", "objective", "constraints", "search",
            "resources", "profiles", "storage")  # profiles: scales of one space (stain_search.profiles)
ALGORITHMS = ("tpe", "random", "nsga2", *POPULATION_ALGORITHMS)  # pbt, pb2: stain_search.pbt
PRUNERS = ("none", "median", "successive_halving")


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"


@dataclass
class EarlyStopping:
    pruner: str = "none"
    grace_period: int = 2  # epochs before any trial may be pruned
    min_trials: int = 2  # complete trials needed before the median rule prunes
    metric: str | None = None  # defaults to the (single) objective


@dataclass
class SearchSettings:
    # TPE (Bergstra et al., 2011), also for Pareto searches (multi-objective
    # TPE: better than NSGA-II under ~100 trials); random; nsga2.
    algorithm: str = "tpe"
    num_samples: int = 8
    max_concurrent: int = 1
    seed: int = 0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    # Points to try first, e.g. the paper's defaults: [{loss.lambda_cycle: 10}]
    enqueue: list | None = None
    # Optuna user attributes of each enqueued point, ``stain_search.*`` keys
    # (not from YAML: `stain-search confirm` sets what each run confirms).
    enqueue_attrs: list | None = None
    # NSGA-II's generation size; its first generation is random, so a search
    # needs at least two generations (num_samples ≥ 2 × population_size).
    population_size: int = 8
    # algorithm: pbt | pb2 — the population is num_samples members (stain_search.pbt).
    pbt: PBTSettings = field(default_factory=PBTSettings)


EXECUTORS = ("auto", "ray_train", "in_trial")


@dataclass
class Resources:
    workers_per_trial: int = 1  # Ray Train workers; >1 → data parallel (gloo/NCCL)
    cpus_per_worker: float = 1  # fractions let several small trials share a core
    gpus_per_worker: float = 0
    # Where a trial's training loop runs. ray_train: a TorchTrainer per trial
    # (Ray Train restarts a lost worker from its checkpoint). in_trial: inside
    # the Tune trial process (Tune restarts a lost trial from its checkpoint),
    # saving the ~16 s per trial a TorchTrainer's worker group costs on 2 CPU
    # cores (bench/overhead.py). auto: in_trial for one worker, ray_train for DDP.
    executor: str = "auto"
    max_failures: int = 2  # restarts of a lost worker/trial before it counts as failed

    @property
    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "in_trial" if self.workers_per_trial == 1 else "ray_train"


@dataclass
class SearchSpec:
    name: str
    description: str
    path: Path
    base: dict[str, Any]  # dotted overrides of the training defaults
    params: list[Param]
    objectives: list[Objective]
    search: SearchSettings
    resources: Resources
    profile: str | None = None  # the profile applied (stain_search.profiles); None: none defined
    profile_reason: str = ""  # why that one: --profile, or the hardware's default
    profiles: tuple[str, ...] = ()  # every profile the space file defines
    # What a deployable checkpoint must meet (`constraints:`); the sampler is told.
    constraints: tuple[Constraint, ...] = ()
    storage: str | None = None  # `storage:` run's default --storage: a folder or s3://…
    mutate: tuple[str, ...] = ()  # pbt/pb2: the keys exploits may perturb (stain_search.pbt)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # `run --set`, in base too

    @property
    def population_based(self) -> bool:
        """PBT or PB2: members exploit and explore (stain_search.pbt_scheduler)."""
        return self.search.algorithm in POPULATION_ALGORITHMS

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def trial_config(self, values: Mapping[str, Any]) -> cfg.Config:
        """The full training config of one trial: base + suggested values."""
        return cfg.load_config(None, {**self.base, **values})

    def base_config(self) -> cfg.Config:
        return cfg.load_config(None, self.base)


def resolve_space_path(name: str | Path) -> Path:
    """A file path, or `spaces/NAME.yaml` / `NAME` naming a bundled space."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = SPACES_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if bundled.is_file() and (path.parent in (Path("."), Path("spaces"), Path("search_spaces"))):
        return bundled
    known = ", ".join(p.stem for p in bundled_spaces())
    raise ConfigError(f"{name}: no such search-space file (bundled: {known}; "
                      f"`stain-search spaces` lists them)")


def bundled_spaces() -> list[Path]:
    return sorted(SPACES_DIR.glob("*.yaml"))


def load_space(name: str | Path, *, data: str | None = None, profile: str | None = None,
               gpus: int | None = None, check_objective: bool = True,
               overrides: Mapping[str, Any] | None = None,
               profile_by: str = "--profile") -> SearchSpec:
    """Parse a space file under ``profile`` (None: the default for ``gpus`` GPUs,
    None: this machine's; see stain_search.profiles). ``overrides`` (``run
    --set``) fix training keys over the space's base and profile. ``profile_by``:
    who asked for ``profile`` (said in the plan line)."""
    path = resolve_space_path(name)
    raw = cfg.read_yaml(path)
    return parse_space(raw, path=path, data=data, profile=profile, gpus=gpus,
                       check_objective=check_objective, overrides=overrides,
                       profile_by=profile_by)


def _flatten_base(raw: Mapping, *, path: Path) -> dict[str, Any]:
    """Accept `base` as dotted keys or as nested sections (or both)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in cfg.SECTIONS and isinstance(value, Mapping):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[str(key)] = value
    return out


def _dataclass_from(cls, raw: Any, *, path: Path, key: str):
    raw = dict(as_mapping(raw, path=path, key=key))
    names = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise key_error(path, f"{key}.{k}", f"unknown key{cfg.suggest(k, list(names))} "
                       f"(known: {', '.join(names)})")
    hints = cfg.field_types(cls)
    values = {}
    for k, v in raw.items():
        if dataclasses.is_dataclass(hints[k]):
            values[k] = _dataclass_from(hints[k], v, path=path, key=f"{key}.{k}")
        else:
            values[k] = cfg.coerce(v, hints[k], key=f"{key}.{k}", where=f"{path}: ")
    return cls(**values)


def _storage(value: Any, *, path: Path) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value and value.strip()
    raise key_error(path, "storage", f"{value!r}: give a folder or a URI such as s3://bucket/runs")


def parse_space(raw: Any, *, path: Path, data: str | None = None,
                check_objective: bool = True, profile: str | None = None,
                gpus: int | None = None, overrides: Mapping[str, Any] | None = None,
                profile_by: str = "--profile") -> SearchSpec:
    """A space file's mapping → SearchSpec, under the chosen profile (if it has any)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}, "
                          f"got {type(raw).__name__}")
    explored = set(map(str, raw["space"])) if isinstance(raw.get("space"), Mapping) else set()
    resource_keys = tuple(f.name for f in dataclasses.fields(Resources))
    choice = profiles.choose(profiles.parse_profiles(raw.get("profiles"), path=path,
                                                     explored=explored,
                                                     resource_keys=resource_keys),
                             profile, path=path, gpus=gpus, requested_by=profile_by)
    if choice.profile is not None:
        raw = profiles.merge(raw, choice.profile, path=path)
    if overrides:
        raw = with_overrides(raw, dict(overrides), explored=explored, path=path)
    try:
        spec = _parse_resolved(raw, path=path, data=data, check_objective=check_objective)
    except ConfigError as err:
        raise profiles.blame(err, choice) from None
    spec.profile = choice.profile.name if choice.profile else None
    spec.profile_reason, spec.profiles = choice.reason, choice.known
    spec.overrides = dict(overrides or {})
    return spec


def with_overrides(raw: Mapping, overrides: dict[str, Any], *, explored: set[str],
                   path: Path) -> dict:
    """The space with ``run --set`` pairs fixed in its ``base`` (they win over the
    profile's): each checked as ``train --set`` checks it, and never a key the
    space explores."""
    searched = sorted(set(overrides) & explored)
    if searched:
        raise ConfigError(f"--set {searched[0]}: {path.name} explores it (space:); drop the "
                          f"--set, or move the key from space: to base: in the space file")
    cfg.load_config(None, overrides, overrides_from="--set")  # names and types, as `train`
    base = _flatten_base(as_mapping(raw.get("base"), path=path, key="base"), path=path)
    return {**raw, "base": {**base, **overrides}}


def _parse_resolved(raw: Mapping, *, path: Path, data: str | None,
                    check_objective: bool) -> SearchSpec:
    for key in raw:
        if key not in TOP_KEYS:
            raise key_error(path, str(key), f"unknown key{cfg.suggest(str(key), list(TOP_KEYS))} "
                       f"(known: {', '.join(TOP_KEYS)})")
    name = cfg.check_name(str(raw.get("name") or path.stem), what=f"{path}: `name`:")
    types = {f"{s}.{k}": t for s, c in cfg.SECTIONS.items() for k, t in cfg.field_types(c).items()}
    base = _flatten_base(as_mapping(raw.get("base"), path=path, key="base"), path=path)
    if raw.get("data") is not None:
        base["data.path"] = str(raw["data"])
    if data is not None:
        base["data.path"] = data
    if "data.path" in base and not str(base["data.path"]).startswith("builtin:"):
        # Trials run in other working directories (and on other nodes).
        base["data.path"] = str(Path(str(base["data.path"])).expanduser().resolve())
    try:
        base_config = cfg.load_config(None, base)
    except ConfigError as err:
        raise ConfigError(f"{path}: base: {str(err).removeprefix('overrides: ')}") from None

    space_raw = as_mapping(raw.get("space"), path=path, key="space")
    if not space_raw:
        raise key_error(path, "space", "empty: name at least one training key to explore")
    params = [parse_param(str(k), v, path=path, types=types) for k, v in space_raw.items()]
    check_conditions(params, base, path=path)

    search = _dataclass_from(SearchSettings, raw.get("search"), path=path, key="search")
    if "pbt" in as_mapping(raw.get("search"), path=path, key="search") and \
            search.algorithm not in POPULATION_ALGORITHMS:
        raise key_error(path, "search.pbt", f"settings of population-based training, but the "
                   f"algorithm is {search.algorithm}: use algorithm: pbt (or pb2), or drop it")
    resources = _dataclass_from(Resources, raw.get("resources"), path=path, key="resources")
    objectives = _parse_objectives(raw.get("objective"), path=path, base_config=base_config,
                                   check=check_objective)
    if search.early_stopping.metric in METRIC_ALIASES:  # as in `objective`: the honest one
        search.early_stopping.metric = METRIC_ALIASES[search.early_stopping.metric](base_config)
    constraints = parse_constraints(raw.get("constraints"), path=path, base_config=base_config,
                                    check=check_objective)
    _check_search(search, objectives, resources, path=path)
    _check_enqueue(search, params, path=path)
    spec = SearchSpec(name=name, description=str(raw.get("description") or ""), path=path.resolve(),
                      base=base, params=params, objectives=objectives, search=search,
                      resources=resources, constraints=constraints,
                      storage=_storage(raw.get("storage"), path=path))
    if spec.population_based:
        t = base_config.train
        spec.mutate = check_pbt(search.pbt, params, algorithm=search.algorithm,
                                num_samples=search.num_samples,
                                pruner=search.early_stopping.pruner,
                                objectives=len(objectives), epochs=t.epochs,
                                eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                                path=path)
    _check_extremes(spec)
    return spec


def _parse_objectives(raw: Any, *, path: Path, base_config: cfg.Config, check: bool) -> list[Objective]:
    from stain_search.evaluate import metric_directions

    items = raw if isinstance(raw, list) else [raw]
    if raw is None or not items:
        raise key_error(path, "objective", "missing: e.g. {metric: frechet, mode: min}")
    directions = metric_directions()
    reported = reported_metrics(base_config) if check else set(directions) | set(METRIC_ALIASES)
    out = []
    for i, item in enumerate(items):
        key = "objective" if not isinstance(raw, list) else f"objective[{i}]"
        item = as_mapping(item, path=path, key=key)
        unknown = set(item) - {"metric", "mode"}
        if unknown:
            raise key_error(path, f"{key}.{sorted(unknown)[0]}", "unknown key (expected metric, mode)")
        metric, mode = item.get("metric"), item.get("mode")
        if mode not in ("min", "max"):
            raise key_error(path, f"{key}.mode", f"{mode!r}: expected min or max")
        metric = resolve_metric(metric, base_config, reported=reported,
                                where=f"{path}: `{key}.metric`")
        if directions[metric] != mode:
            raise key_error(path, f"{key}.mode", f"{metric} is better when "
                       f"{'lower' if directions[metric] == 'min' else 'higher'}: "
                       f"use mode: {directions[metric]}")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise key_error(path, "objective", "the same metric is listed twice")
    return out


def _check_search(search: SearchSettings, objectives: list[Objective], resources: Resources,
                  *, path: Path) -> None:
    if search.algorithm not in ALGORITHMS:
        raise key_error(path, "search.algorithm", f"{search.algorithm!r} is not one of "
                   f"{', '.join(ALGORITHMS)}")
    if search.num_samples < 1:
        raise key_error(path, "search.num_samples", "must be at least 1")
    if search.max_concurrent < 1:
        raise key_error(path, "search.max_concurrent", "must be at least 1")
    es = search.early_stopping
    if es.pruner not in PRUNERS:
        raise key_error(path, "search.early_stopping.pruner",
                   f"{es.pruner!r} is not one of {', '.join(PRUNERS)}")
    if es.pruner != "none" and len(objectives) > 1 and es.metric is None:
        raise key_error(path, "search.early_stopping.metric", "a Pareto search has several "
                   "objectives: name the one metric that decides pruning")
    if es.pruner == "successive_halving" and len(objectives) > 1:
        raise key_error(path, "search.early_stopping.pruner", "successive halving ranks trials "
                   "by one value and cannot prune a Pareto search: use `median` (applied to "
                   "early_stopping.metric) or `none`")
    if search.algorithm == "nsga2" and search.num_samples < 2 * search.population_size:
        raise key_error(path, "search.algorithm", f"NSGA-II with population_size "
                   f"{search.population_size} and num_samples {search.num_samples} only "
                   f"draws its random first generation: use `algorithm: tpe` (multi-"
                   f"objective TPE), or num_samples ≥ {2 * search.population_size}")
    if search.population_size < 2:
        raise key_error(path, "search.population_size", "must be at least 2")
    if es.grace_period < 1:
        raise key_error(path, "search.early_stopping.grace_period", "must be at least 1 epoch")
    if resources.workers_per_trial < 1:
        raise key_error(path, "resources.workers_per_trial", "must be at least 1")
    if resources.gpus_per_worker < 0 or resources.cpus_per_worker <= 0:
        raise key_error(path, "resources", "cpus_per_worker > 0 and gpus_per_worker ≥ 0")
    if resources.executor not in EXECUTORS:
        raise key_error(path, "resources.executor",
                   f"{resources.executor!r} is not one of {', '.join(EXECUTORS)}")
    if resources.executor == "in_trial" and resources.workers_per_trial > 1:
        raise key_error(path, "resources.executor", "in_trial runs one worker; use ray_train "
                   "(or auto) for workers_per_trial > 1")
    if resources.max_failures < 0:
        raise key_error(path, "resources.max_failures", "must be 0 or more")


def _check_enqueue(search: SearchSettings, params: list[Param], *, path: Path) -> None:
    by_key = {p.key: p for p in params}
    for i, point in enumerate(search.enqueue or []):
        where = f"search.enqueue[{i}]"
        point = as_mapping(point, path=path, key=where)
        for key, value in point.items():
            p = by_key.get(key)
            if p is None:
                raise key_error(path, f"{where}.{key}", f"not a parameter of this space"
                           f"{cfg.suggest(str(key), list(by_key))}")
            inside = (value in p.choices if p.distribution == "choice"
                      else isinstance(value, (int, float)) and p.low <= value <= p.high)
            if not inside:
                raise key_error(path, f"{where}.{key}", f"{value!r} is outside the space "
                           f"({list(p.choices) if p.choices else f'{p.low}..{p.high}'})")


def _check_extremes(spec: SearchSpec) -> None:
    """Every corner of the space must make a valid training config (before Ray)."""
    for p in spec.params:
        values = p.choices if p.distribution == "choice" else (p.low, p.high)
        for v in values:
            parents = {parent: vals[0] for parent, vals in p.when}
            try:
                spec.trial_config({**parents, p.key: v})
            except ConfigError as err:
                raise ConfigError(f"{spec.path}: space.{p.key} = {v!r}: "
                                  f"{str(err).removeprefix('overrides: ')}") from None


# --- Optuna ------------------------------------------------------------------
