"""Two drivers started in the same instant in a fresh folder, many times over.

Each pair gets a fresh folder and runs ``stain-search run tiny.yaml`` twice at
once (both processes import the CLI, then wait on one go, so they reach the
MLflow store and the search folder together: :func:`start_together`). Every pair must end with:

- exactly one driver that ran the search (exit 0) and one refused in one line
  (exit 2, ``stain-search: error: …``), never a traceback;
- one search folder holding one finished search;
- an MLflow store that a third command opens (``stain-search status NAME``
  exits 0) and whose experiment holds one search run.

Run by hand (a pair is a tiny one-trial search, ~30-60 s on 2 cores):

    python bench/driver_race.py --pairs 50        # the acceptance run
    python bench/driver_race.py --pairs 3         # a quick look
    python bench/driver_race.py --pairs 50 --stop-winner   # Ctrl-C the winner once the
                                                  # other is refused: ~15 s a pair
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import begin, finish, format_table  # noqa: E402

SPACE = textwrap.dedent("""\
    name: race
    data: builtin:phantom-trichrome
    base: {data.crop: 32, data.batch_size: 2, data.eval_crops: 4, model.depth: 3, model.ngf: 8,
           model.ndf: 8, model.d_blocks: 2, train.epochs: 1, train.steps_per_epoch: 1}
    space:
      loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}
    objective: {metric: frechet, mode: min}
    search: {algorithm: random, num_samples: 1, max_concurrent: 1, seed: 0,
             early_stopping: {pruner: none}}
    resources: {workers_per_trial: 1, cpus_per_worker: 1}
    """)
# A child of start_together: after its imports it says "ready" on stdout and
# blocks on stdin until every child is ready; then it runs its code (sys.argv[1]).
BARRIER = "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nexec(sys.argv[1])"


def start_together(imports: str, code: str, argvs: list[list[str]],
                   **popen) -> list[subprocess.Popen]:
    """One Python process per ``argvs`` entry (its ``sys.argv[2:]``): each runs
    ``imports``, says it is ready (a line on stdout, read blocking), and runs
    ``code`` once all of them have the go (a line on stdin): the same instant."""
    procs = [subprocess.Popen([sys.executable, "-c", f"{imports}\n{BARRIER}", code, *argv],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, **popen)
             for argv in argvs]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":  # "" when it died first
            raise RuntimeError(f"a process did not start:\n{proc.stderr.read()[-2000:]}")
    for proc in procs:  # stdin stays open: communicate() closes it
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def wait_refused_and_started(procs: list[subprocess.Popen], timeout: float):
    """Read the drivers' output lines as they come (select, no polling) until
    one has ended (its stdout closed) and another has printed its "search …"
    line, which the driver says once its study and MLflow run exist."""
    selector = selectors.DefaultSelector()
    for proc in procs:
        selector.register(proc.stdout, selectors.EVENT_READ, proc)
    ended, studied = [], None
    while selector.get_map() and not (ended and studied):
        events = selector.select(timeout)
        if not events:
            break
        for key, _ in events:
            line = key.fileobj.readline()
            if not line:
                ended.append(key.data)
                selector.unregister(key.fileobj)
            elif line.startswith("search "):
                studied = key.data
    selector.close()
    return ended, studied


def one_pair(folder: Path, env: dict[str, str], timeout: float, *, stop_winner: bool = False
             ) -> dict:
    """``stop_winner``: once the loser is refused, the winner gets Ctrl-C (SIGINT)
    and ends resumable (exit 130): the race is the same, the pair is quicker."""
    (folder / "tiny.yaml").write_text(SPACE)
    procs = start_together("from stain_search.cli import main", "sys.exit(main(sys.argv[2:]))",
                           [["run", "tiny.yaml"]] * 2, cwd=folder, env=env,
                           start_new_session=True)
    if stop_winner:  # once one has ended and the other says "search …" (its study exists)
        ended, studied = wait_refused_and_started(procs, timeout)
        if studied is not None and studied.poll() is None and ended:
            os.killpg(studied.pid, signal.SIGINT)
    outs = [p.communicate(timeout=timeout) for p in procs]
    codes = sorted(p.returncode for p in procs)
    won = [0, 130] if stop_winner else [0]
    refused = [err.strip().splitlines() for (_, err), p in zip(outs, procs) if p.returncode == 2]
    one_line = bool(refused) and all(lines and lines[-1].startswith("stain-search: error: ")
                                     and "Traceback" not in "\n".join(lines) for lines in refused)
    status = subprocess.run([sys.executable, "-m", "stain_search.cli", "status", "race"],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    from stain_search import tracking

    c = tracking.client(f"sqlite:///{folder / 'mlflow.db'}")
    exp = c.get_experiment_by_name("race")
    parents = [r for r in c.search_runs([exp.experiment_id])
               if r.data.tags.get(tracking.ROLE) == "search"] if exp else []
    winner = [code for code in codes if code != 2]  # the other was refused (exit 2)
    ok = (codes.count(2) == 1 and winner[0] in won and one_line
          and status.returncode == 0 and len(parents) == 1)
    return {"codes": codes, "one_line": one_line, "status_rc": status.returncode,
            "search_runs": len(parents), "ok": ok,
            "refusal": refused[0][-1] if refused and refused[0] else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pair")
    ap.add_argument("--stop-winner", action="store_true",
                    help="Ctrl-C the winning driver once the other is refused (quicker pairs)")
    ap.add_argument("--json", help="where to write the record (default bench/results/)")
    args = ap.parse_args()
    info = begin("driver_race", None)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="driver-race-") as tmp:
        env.setdefault("STAIN_SEARCH_CACHE", str(Path(tmp) / "cache"))
        for i in range(args.pairs):
            folder = Path(tmp) / f"pair-{i:03d}"
            folder.mkdir()
            t0 = time.perf_counter()
            row = {"pair": i, **one_pair(folder, env, args.timeout, stop_winner=args.stop_winner),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"pair {i}: {'ok' if row['ok'] else 'FAILED'} {row['codes']} {row['refusal'][:120]}",
                  flush=True)
    good = sum(r["ok"] for r in rows)
    print(format_table(rows, ["pair", "codes", "one_line", "status_rc", "search_runs", "ok",
                              "seconds"]))
    print(f"{good} of {len(rows)} pairs ended with one search and a usable store")
    finish("driver_race", args.json, info, {"pairs": len(rows), "ok": good, "rows": rows})
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
