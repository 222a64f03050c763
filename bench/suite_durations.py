"""Where the test suite's time goes, from pytest's JUnit XML.

    pytest -q --junitxml=/tmp/suite.xml          # the suite, recording each test's time
    python bench/suite_durations.py /tmp/suite.xml [--top 30] [--json out.json]

Prints the time per test file (setup, call and teardown together, so a
module's fixtures count where they are made), the slowest tests, and the
totals; ``--vs OTHER.xml`` puts a second run's figures beside each file (for
the before/after table in docs/testing.md). With pytest-xdist the per-file
times add up to more than the wall time: they are summed over the workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def read(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    files: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    tests, outcomes = [], defaultdict(int)
    for suite in suites:
        for case in suite.iter("testcase"):
            seconds = float(case.get("time") or 0)
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            module = case.get("classname", "").split(".")
            file = next((f"tests/{m}.py" for m in module if m.startswith("test_")), module[-1])
            files[file] += seconds
            counts[file] += 1
            tests.append((seconds, name))
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            outcomes[kind] += 1
    wall = sum(float(s.get("time") or 0) for s in suites)
    return {"files": dict(files), "counts": dict(counts), "tests": sorted(tests, reverse=True),
            "outcomes": dict(outcomes), "wall_s": wall, "sum_s": sum(files.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("xml")
    ap.add_argument("--vs", help="a second run's JUnit XML, shown beside (e.g. before → after)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    run = read(args.xml)
    other = read(args.vs) if args.vs else None
    names = sorted(set(run["files"]) | set(other["files"] if other else ()),
                   key=lambda f: -(other or run)["files"].get(f, 0))
    if other:
        print("| test file | tests before | s before | tests after | s after |")
        print("|---|---:|---:|---:|---:|")
        for f in names:
            print(f"| {f} | {other['counts'].get(f, 0)} | {other['files'].get(f, 0):.0f} "
                  f"| {run['counts'].get(f, 0)} | {run['files'].get(f, 0):.0f} |")
    else:
        print("| test file | tests | seconds |")
        print("|---|---:|---:|")
        for f in names:
            print(f"| {f} | {run['counts'][f]} | {run['files'][f]:.0f} |")
    print(f"\nslowest {args.top} tests ({args.xml}):")
    for seconds, name in run["tests"][:args.top]:
        print(f"  {seconds:7.1f} s  {name}")
    print(f"\ntests: {sum(run['outcomes'].values())} {dict(run['outcomes'])}; "
          f"summed test time {run['sum_s']:.0f} s; wall time as pytest reports it {run['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in run.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
