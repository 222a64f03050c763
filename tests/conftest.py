"""Shared fixtures.

A real search costs ~0.5-2 minutes on 2 CPU cores (Ray start, then per
trial an in-trial loop or a TorchTrainer), so one tiny finished search is made once per test session and
shared by the tests of search, deploy, analysis and the UI. Tests that
change a search make their own.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

# The cluster tests' real services (a two-node Ray, an S3 store): registered
# here, once, so every test module shares one of each per session (a module
# that imported them itself would start its own).
from cluster_services import ray_cluster, s3_server  # noqa: F401

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"

# The smallest model that still is the real one: 32 px crops, depth 3, width 8.
TINY_BASE = {
    "data.crop": 32, "data.batch_size": 2, "data.eval_crops": 4,
    "model.depth": 3, "model.ngf": 8, "model.ndf": 8, "model.d_blocks": 2,
    "train.epochs": 3, "train.steps_per_epoch": 3,
}


def tiny_space_yaml(*, name: str, num_samples: int = 3, max_concurrent: int = 2,
                    data: str = "builtin:phantom-trichrome", epochs: int = 3,
                    pruner: str = "median", extra_space: str = "", search_extra: str = "",
                    objective: str = "{metric: frechet, mode: min}", base: dict | None = None,
                    min_trials: int = 2,
                    resources: str = "{workers_per_trial: 1, cpus_per_worker: 1}",
                    space: str = "  loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}\n"
                    ) -> str:
    # a key given as None in `base` is left out (a space that searches it)
    base = {k: v for k, v in {**TINY_BASE, "train.epochs": epochs, **(base or {})}.items()
            if v is not None}
    base_lines = "\n".join(f"  {k}: {v}" for k, v in base.items())
    return textwrap.dedent(f"""\
        name: {name}
        description: tiny test search
        data: {data}
        base:
        """) + base_lines + "\n" + textwrap.dedent("""\
        space:
        """) + space + extra_space + textwrap.dedent(f"""\
        objective: {objective}
        search: {{algorithm: tpe, num_samples: {num_samples}, max_concurrent: {max_concurrent}, seed: 0,
                 early_stopping: {{pruner: {pruner}, grace_period: 1, min_trials: {min_trials}}}{search_extra}}}
        resources: {resources}
        """)


# With pytest-xdist (`pytest -n 2`), one worker takes a whole module, so a module's
# fixtures (a search it makes once) are made once; the modules that use the
# session's two-node Ray and S3 server all go to one worker, which starts them once.
CLUSTER_FIXTURES = ("ray_cluster", "s3_server")


def cluster_modules(tests: Path) -> set[str]:
    """Test modules that use the two-node Ray or the S3 server, or are marked
    ``cluster`` (read from their source)."""
    return {f"tests/{path.name}" for path in tests.glob("test_*.py")
            if "pytest.mark.cluster" in (text := path.read_text(encoding="utf-8"))
            or any(name in text for name in CLUSTER_FIXTURES)}


def pytest_xdist_make_scheduler(config, log):
    """Whole modules to a worker (as ``--dist loadfile``), the cluster modules as one,
    in collection order (``LONGEST_FIRST`` below): xdist would otherwise reorder them
    by their number of tests, and the one-test end-to-end modules (the README, the
    interrupt test) came last and ran alone while the other worker idled."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False
    cluster = cluster_modules(Path(__file__).parent)

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "cluster" if module in cluster else module

    return ModuleScheduling(config, log)


# The longest units first (docs/testing.md: the cluster modules together, then the
# longest modules), so that on two workers none of them is left to run alone at the
# end while the other worker idles.
LONGEST_FIRST = ("cluster", "tests/test_pbt.py", "tests/test_faults.py",
                 "tests/test_bench_smoke.py", "tests/test_readme.py", "tests/test_bad_inputs.py",
                 "tests/test_confirm.py", "tests/test_interrupt.py", "tests/test_mlflow_server.py",
                 "tests/test_gpu_check.py", "tests/test_resume.py", "tests/test_storage_full.py")


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    cluster = cluster_modules(Path(__file__).parent)

    def unit(item) -> str:
        module = item.nodeid.split("::", 1)[0]
        return "cluster" if module in cluster else module

    items.sort(key=lambda item: rank.get(unit(item), len(rank)))


def run_on_terminal(argv: list[str], *, cwd, env: dict[str, str], timeout: float = 600
                    ) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal, as a person
    at a terminal would; returns (exit status, what it printed, ANSI codes dropped)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            if not select.select([master], [], [], timeout)[0]:
                pytest.fail(f"no output for {timeout:.0f} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=timeout)
        os.close(master)
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "",
                                   b"".join(chunks).decode(errors="replace"))


def wait_until_gone(session: int, *, timeout: float = 120) -> None:
    """Wait until every live process of the process session ``session`` has
    exited (a driver started with ``start_new_session=True`` and SIGKILLed with
    its group: the Ray it started may take a moment to go): psutil waits on
    them, bounded by ``timeout``."""
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    _, alive = psutil.wait_procs(members, timeout=timeout)
    still = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not still, f"still running {timeout:.0f} s after the kill: {[p.pid for p in still]}"


def ensure_local_ray() -> None:
    """The session's one local Ray for searches run in this process: started on
    first use by the product's own ``init_ray`` (as `stain-search run` starts its
    private one) and kept, so each in-process search skips Ray's start and stop
    (about 10 s on 2 busy cores). A search that finds Ray running uses it and
    leaves it running: the path of a driver given ``--address``."""
    import ray

    from stain_search.search import init_ray

    if not ray.is_initialized():
        init_ray(None, verbose=0)


@pytest.fixture
def local_ray():
    ensure_local_ray()
    yield


def stop_local_ray() -> None:
    """Before a test that starts (or connects) Ray itself, or whose trials must
    inherit environment variables it sets: the shared Ray goes first."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture
def own_ray():
    stop_local_ray()
    yield


@pytest.fixture(scope="session", autouse=True)
def _stop_local_ray():
    yield
    stop_local_ray()


@dataclass
class FinishedSearch:
    name: str
    root: Path  # where the space file, mlflow.db and storage live
    search_dir: Path
    tracking_uri: str
    space_file: Path
    outcome: object  # stain_search.search.SearchOutcome


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory) -> FinishedSearch:
    """A finished 3-trial search on the tiny phantom with median pruning.

    Trials run one at a time so the outcome is deterministic: the first two
    (enqueued) train at sensible learning rates and complete (the median rule
    waits for two complete trials); the third barely moves (lr 1e-7) and is
    pruned at its first epoch.
    """
    from stain_search.search import run_search

    ensure_local_ray()
    root = tmp_path_factory.mktemp("finished-search")
    space = root / "tiny.yaml"
    space.write_text(tiny_space_yaml(
        name="tiny", base={"train.steps_per_epoch": 6}, max_concurrent=1,
        space="  optim.lr_g: {distribution: loguniform, low: 1.0e-7, high: 1.0e-3}\n"
              "  loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}\n",
        search_extra=", enqueue: [{optim.lr_g: 2.0e-4, loss.lambda_cycle: 10},"
                     " {optim.lr_g: 4.0e-4, loss.lambda_cycle: 5},"
                     " {optim.lr_g: 1.0e-7, loss.lambda_cycle: 10}]"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    outcome = run_search(space, storage=root / "runs", tracking_uri=uri, verbose=0)
    return FinishedSearch(name="tiny", root=root, search_dir=root / "runs" / "tiny",
                          tracking_uri=uri, space_file=space, outcome=outcome)
