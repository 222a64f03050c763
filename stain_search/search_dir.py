"""One search folder: every path in it, and ``search.json`` read into types.

Everything a search keeps lives under one folder::

    <storage>/<name>/
        space.yaml      the space file as given
        search.json     the search's record: its id, identity and budget (below)
        study.journal   the Optuna study (optuna-dashboard opens it)
        driver.json     the live driver: pid, host, start, heartbeat (while it runs)
        driver.lock     held (flock) by the live driver; a second one is refused
        tune/           Ray Tune's experiment files (logs; resume does not need them)
        trials/trial_NNN/checkpoint_epoch_XXXX/   kept checkpoints of Optuna trial NNN
        summary.json    the checkpoint to deploy, when the search ends
        confirm/        `stain-search confirm`: the top trials re-trained with new seeds,
                        itself laid out as a search folder (search.json, study.journal, trials/)
        exports/        `stain-search export` output

``search.json`` holds three things, kept apart on purpose:

- ``search_id``: a random id made when the search starts. It is tagged on
  every MLflow run the search creates and used in every look-up, so two
  searches of the same name (two folders, one tracking store) never share
  or mix runs.
- ``identity``: what changes results (base settings, data, the space, the
  objectives, the constraints (only when the space has any: older records
  stay comparable), the sampler and pruner). Resuming with a different
  identity is refused.
- ``budget``: ``num_samples`` and ``max_concurrent``. Resume uses the
  recorded budget; ``--num-samples N`` extends it.

Beside them, ``warm_start`` (when `run --warm-start OTHER` seeded the study):
which search the first trials came from and how many were taken. It is not
identity: it only changes the first suggestions.

Every reader (``stain-search best``, ``export``, ``report``, ``status``,
``resume``) goes through :class:`SearchDir`; nothing else knows these names.

With a URI ``--storage`` (``s3://bucket/runs``) the folder is
``s3://bucket/runs/<name>/``, laid out the same, and :class:`SearchDir`'s paths
are its local mirror: :meth:`SearchDir.pull` brings it up to date before a
command reads it, and the driver's writes go to the store as they happen
(``stain_search.mirror``). A trial's checkpoints are written on its own node
and uploaded there; ``driver.json``/``driver.lock`` stay on the driver's machine.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import tempfile
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stain_search.atomic import atomic_write_text
from stain_search.config import check_name
from stain_search.errors import ConfigError
from stain_search.storage import Remote, is_uri, local_path, mirror_of
from stain_search.constraints import Constraint
from stain_search.spaces import Objective, Param, SearchSpec

DEFAULT_STORAGE = "stain-search-runs"
STORAGE_ENV = "STAIN_SEARCH_STORAGE"  # every command's --storage when it is not given


def storage_or_default(storage: str | Path | None) -> str | Path:
    """--storage, else $STAIN_SEARCH_STORAGE, else ./stain-search-runs."""
    import os

    return storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
RECORD_FORMAT = "stain-search-search/2"
TRIAL_PREFIX = "trial_"


def trial_name(number: int) -> str:
    """The folder and MLflow name of Optuna trial ``number``: deterministic, so a
    resumed trial finds its checkpoints and its run again."""
    return f"{TRIAL_PREFIX}{number:03d}"


def identity_of(spec: SearchSpec) -> dict[str, Any]:
    """What makes two searches comparable: everything that changes results, and
    nothing that is only budget (num_samples, max_concurrent) or placement
    (resources)."""
    search = asdict(spec.search)
    for budget_key in ("num_samples", "max_concurrent"):
        search.pop(budget_key)
    if not spec.population_based:  # absent: records older than PBT stay comparable
        search.pop("pbt")
    record = {"base": spec.base, "params": [asdict(p) for p in spec.params],
              "objectives": [asdict(o) for o in spec.objectives], "search": search}
    if spec.constraints:  # absent, not empty, without: older records stay comparable
        record["constraints"] = [asdict(c) for c in spec.constraints]
    return json.loads(json.dumps(record, default=str))  # tuples → lists, as read back


@dataclass(frozen=True)
class Budget:
    num_samples: int
    max_concurrent: int


@dataclass(frozen=True)
class SearchRecord:
    """``search.json`` as types."""

    name: str
    search_id: str | None  # None only for searches made before ids existed
    created: str
    identity: dict[str, Any]
    budget: Budget
    profile: str | None
    # `run --warm-start`: {"search", "search_id", "enqueued", "dropped"}; None: a cold start
    warm_start: dict[str, Any] | None = None
    # `run --set KEY=VALUE`: what `resume` applies again (also in identity's base)
    overrides: dict[str, Any] | None = None

    @property
    def constraints(self) -> list[Constraint]:
        return [Constraint(c["metric"], c["bound"], float(c["value"]))
                for c in self.identity.get("constraints") or ()]

    @property
    def objectives(self) -> list[Objective]:
        return [Objective(o["metric"], o["mode"]) for o in self.identity["objectives"]]

    @property
    def params(self) -> list[Param]:
        return [Param(key=p["key"], distribution=p.get("distribution", ""), low=p.get("low"),
                      high=p.get("high"), step=p.get("step"),
                      choices=tuple(p.get("choices") or ()),
                      when=tuple((k, tuple(v)) for k, v in (p.get("when") or ())))
                for p in self.identity["params"]]

    @property
    def base(self) -> dict[str, Any]:
        return dict(self.identity["base"])

    @property
    def data(self) -> str | None:
        return self.identity["base"].get("data.path")

    @property
    def multi_objective(self) -> bool:
        return len(self.identity["objectives"]) > 1

    def to_json(self) -> dict[str, Any]:
        # base/params/objectives also at the top level: the file reads well alone.
        return {"format": RECORD_FORMAT, "name": self.name, "search_id": self.search_id,
                "created": self.created, "profile": self.profile,
                "budget": asdict(self.budget), "identity": self.identity,
                **({"warm_start": self.warm_start} if self.warm_start else {}),
                **({"overrides": self.overrides} if self.overrides else {})}

    @classmethod
    def new(cls, spec: SearchSpec) -> "SearchRecord":
        return cls(name=spec.name, search_id=uuid.uuid4().hex,
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   identity=identity_of(spec),
                   budget=Budget(spec.search.num_samples, spec.search.max_concurrent),
                   profile=getattr(spec, "profile", None),
                   overrides=dict(getattr(spec, "overrides", None) or {}) or None)

    @classmethod
    def from_json(cls, raw: dict[str, Any], *, where: Path) -> "SearchRecord":
        try:
            if "identity" not in raw:  # format 1: the parsed space at the top level
                identity = {"base": raw.get("base", {}), "params": raw.get("params", []),
                            "objectives": raw["objectives"]}
                identity["search"] = {k: v for k, v in raw.get("search", {}).items()
                                      if k not in ("num_samples", "max_concurrent")}
                search = raw.get("search", {})
                return cls(name=raw["name"], search_id=None, created="", identity=identity,
                           budget=Budget(int(search.get("num_samples", 1)),
                                         int(search.get("max_concurrent", 1))),
                           profile=None)
            budget = raw["budget"]
            return cls(name=raw["name"], search_id=raw.get("search_id"),
                       created=raw.get("created", ""), identity=raw["identity"],
                       budget=Budget(int(budget["num_samples"]), int(budget["max_concurrent"])),
                       profile=raw.get("profile"), warm_start=raw.get("warm_start"),
                       overrides=raw.get("overrides"))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: not a stain-search search record (missing or bad "
                              f"{err}); it was not written by `stain-search run`") from None


@dataclass(frozen=True)
class SearchDir:
    """The folder of one search. Paths only: creating it is the driver's job."""

    root: Path
    remote: Remote | None = None  # a URI storage's folder; ``root`` is then its mirror

    @classmethod
    def of(cls, storage: str | Path | None, name: str) -> "SearchDir":
        check_name(name)
        storage = storage_or_default(storage)
        if is_uri(storage):
            remote = Remote(str(storage)).join(name)
            return cls(mirror_of(remote.uri), remote)
        return cls((local_path(storage) / name).resolve())

    @property
    def name(self) -> str:
        return self.root.name

    def check_writable(self, *, source: str = "--storage") -> None:
        """A local folder can be made here: every existing part of the path is
        a folder, and the nearest one takes a file (tried, then removed).
        Writes nothing that stays; ``source`` names where the path came from."""
        if self.remote is not None:
            return
        where = self.root.parent
        existing = next(p for p in (where, *where.parents) if p.exists() or p.is_symlink())
        if not existing.is_dir():
            raise ConfigError(f"{source} {where}: {existing} is a file, not a folder; choose "
                              f"a storage folder elsewhere")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            why = "read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err))
            raise ConfigError(f"{source} {where}: cannot write in {existing} ({why}); choose a "
                              f"storage folder you can write to") from None

    @property
    def where(self) -> str:
        """The folder as a user names it: its URI, or its path."""
        return self.remote.uri if self.remote is not None else str(self.root)

    def pull(self) -> "SearchDir":
        """Bring a URI storage's mirror up to date (a local folder: nothing to do)."""
        from stain_search import mirror

        mirror.pull(self)
        return self

    def push(self, *paths: Path) -> None:
        """Send these files of the folder to a URI storage (a local one: nothing)."""
        from stain_search import mirror

        mirror.push(self, *paths)

    def trial_location(self, number: int) -> str:
        """Where trial ``number``'s checkpoints are kept, as a user names it."""
        if self.remote is not None:
            return self.remote.join("trials", trial_name(number)).uri
        return str(self.trial(number))

    def trial_remote(self, number: int) -> Remote | None:
        return self.remote.join("trials", trial_name(number)) if self.remote else None

    @property
    def tune_location(self) -> str:
        """Ray Tune's and Train's ``storage_path``: in the store when there is one."""
        return self.remote.join("tune").uri if self.remote is not None else str(self.tune)

    def tune_runs(self) -> int:
        """How many driver runs have had a Tune experiment folder."""
        if self.remote is not None:
            return sum(1 for rel, is_dir in self.remote.list("tune")
                       if is_dir and rel.split("/")[-1].startswith("run-"))
        return len([p for p in self.tune.glob("run-*") if p.is_dir()]) if self.tune.is_dir() else 0

    @property
    def space_file(self) -> Path:
        return self.root / "space.yaml"

    @property
    def record_file(self) -> Path:
        return self.root / "search.json"

    @property
    def study_journal(self) -> Path:
        return self.root / "study.journal"

    @property
    def driver_file(self) -> Path:
        return self.root / "driver.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "driver.lock"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, number: int) -> Path:
        return self.trials / trial_name(number)

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    @property
    def confirmation(self) -> "SearchDir":
        """``confirm/``: `stain-search confirm`'s runs, a search folder of its own
        (its record, study and trials) inside the search it confirms."""
        return SearchDir(self.root / "confirm", self.remote.join("confirm") if self.remote else None)

    @property
    def outputs(self) -> Path:
        """Where commands write what a user opens on this machine (exports, the
        report): the folder itself; for a URI storage, not its hidden mirror but
        ``./stain-search-runs/<name>/`` in the working directory."""
        if self.remote is None:
            return self.root
        return (Path.cwd() / DEFAULT_STORAGE / self.name).resolve()

    @property
    def exports(self) -> Path:
        return self.outputs / "exports"

    @property
    def report_file(self) -> Path:
        return self.outputs / "report.html"

    def exists(self) -> bool:
        return self.record_file.is_file()

    def read_record(self) -> SearchRecord:
        """The search's record; a missing or unreadable one is one clear line."""
        if not self.record_file.is_file():
            raise ConfigError(
                f"{self.where}: no search named {self.name!r} (no search.json); pass the "
                f"--storage the search ran with (default ./{DEFAULT_STORAGE}), or "
                f"`stain-search status` to list the searches there")
        try:
            raw = json.loads(self.record_file.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.record_file}: unreadable ({err}); pass --name to start "
                              f"a new search") from None
        return SearchRecord.from_json(raw, where=self.record_file)

    def create(self, spec: SearchSpec, *, budget: Budget | None = None,
               warm_start: dict[str, Any] | None = None) -> SearchRecord:
        """A new search's folder: its space file and a fresh record (a new id)."""
        import shutil

        record = dataclasses.replace(SearchRecord.new(spec), warm_start=warm_start)
        if budget is not None:
            record = dataclasses.replace(record, budget=budget)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.path, self.space_file)
        self.push(self.space_file)
        self.write_record(record)
        return record

    def write_record(self, record: SearchRecord) -> None:
        atomic_write_text(self.record_file, json.dumps(record.to_json(), indent=2, default=str))
        self.push(self.record_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=2, default=str))
        self.push(self.summary_file)

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_file.is_file():
            return None
        try:
            return json.loads(self.summary_file.read_text())
        except ValueError:
            return None


def list_searches(storage: str | Path | None) -> list[SearchDir]:
    """Every search folder under ``storage`` (those with a search.json)."""
    storage = storage_or_default(storage)
    if is_uri(storage):
        base = Remote(str(storage))
        names = sorted(rel.split("/")[0] for rel, is_dir in base.list(recursive=True)
                       if not is_dir and rel.count("/") == 1 and rel.endswith("/search.json"))
        return [SearchDir.of(storage, n) for n in names]
    root = local_path(storage).resolve()
    if not root.is_dir():
        return []
    return [SearchDir(p) for p in sorted(root.iterdir()) if (p / "search.json").is_file()]
