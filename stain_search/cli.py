"""The `stain-search` command line.

Each verb is one small `cmd_*` function, found by its sub-parser's name in
``VERBS`` (the arguments are ``stain_search.cli_parser``'s); the work lives in
the library. A StainSearchError
(bad input a user can fix) becomes one line on stderr and exit status 2 —
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from stain_search.cli_parser import build_parser
from stain_search.cli_warnings import one_line_warnings
from stain_search.progress import is_terminal, progress_enabled
from stain_search.errors import EXIT_INTERRUPTED, ConfigError, SearchInterrupted, StainSearchError

CONFIGS_DIR = Path(__file__).parent / "configs"
EXIT_USAGE = 2


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set loss.lambda_cycle=5 --set model.attention=gates` → {key: value}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set loss.lambda_cycle=5")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def resolve_config_path(name: str | None) -> Path:
    """A path, or the name of a bundled config (`quickstart`)."""
    if name is None:
        return CONFIGS_DIR / "quickstart.yaml"
    path = Path(name)
    if path.exists():
        return path
    bundled = CONFIGS_DIR / f"{Path(name).stem}.yaml"
    if bundled.exists() and path.parent == Path("."):
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    raise ConfigError(f"{name}: no such config file (bundled configs: {known})")


# --- verbs ------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from stain_search.checkpoint import list_checkpoints
    from stain_search.config import load_config
    from stain_search.data.datasets import verify_dataset
    from stain_search.train import LocalReporter, retention_for, run_training

    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data.path"] = args.data
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    config_path = resolve_config_path(args.config)
    config = load_config(config_path, overrides, overrides_from="--set")
    d = config.data
    # Pre-flight before the results folder exists: every image decodes.
    if skipped := verify_dataset(d.path, d.layout, d.crop, eval_crop=d.eval_crop,
                                 load_size=d.load_size):
        print(skipped)
    retention = retention_for(config)
    out = Path(args.out or Path("stain-search-runs") / f"train-{config_path.stem}")
    existing = list_checkpoints(out / "checkpoints")
    if existing and not args.resume:
        raise ConfigError(f"{out} already holds a training run ({existing[-1].name}); "
                          f"pass --resume to continue it or --out to start a new one")
    resume = existing[-1] if existing and args.resume else None
    reporter = LocalReporter(out, retention=retention,
                             generator_snapshots=config.train.generator_snapshots)
    if resume is not None:
        truncate_metrics(out / "metrics.jsonl", upto_epoch=int(resume.name.rsplit("_", 1)[1]))
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"training on {config.data.path} → {out}")
    if retention.keep is not None:
        print(f"keeping the {retention.keep} best checkpoints by {retention.metric} "
              f"and the newest")
    metrics = run_training(config, reporter=reporter, resume=resume)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
                     indent=None))
    print(f"done: checkpoints in {out / 'checkpoints'}, metrics in {out / 'metrics.jsonl'}")
    return 0


def truncate_metrics(path: Path, *, upto_epoch: int) -> None:
    """Drop lines of epochs after the checkpoint we resume from (they re-run).

    Rewritten atomically: an interruption here leaves the old file whole.
    """
    from stain_search.atomic import atomic_write_text

    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= upto_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from stain_search.data import prepare_dataset

    out = prepare_dataset(args.src, args.out, layout=args.layout, tile=args.tile,
                          overlap=args.overlap, min_tissue=args.min_tissue,
                          test_fraction=args.test_fraction, seed=args.seed, mpp=args.mpp,
                          level=args.level, split_by=args.split_by)
    print(f"dataset written to {out} (manifest: {out / 'manifest.parquet'})")
    return 0


def cmd_data_builtin(args: argparse.Namespace) -> int:
    from stain_search.data.phantom import BUILTIN_DATASETS, builtin_dataset

    for name in sorted(BUILTIN_DATASETS):
        path = builtin_dataset(name) if args.generate else None
        print(f"{name}" + (f"  →  {path}" if path else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stain_search.plan import check_hardware, dry_run
    from stain_search.profiles import local_gpus
    from stain_search.search import run_search
    from stain_search.summary import format_summary
    from stain_search.config import check_name
    from stain_search.spaces import load_space

    if args.name:  # before anything is read or written
        check_name(args.name, what="--name")
    profile_by = getattr(args, "profile_by", "--profile")
    overrides = args.overrides if isinstance(getattr(args, "overrides", None), dict) \
        else parse_overrides(getattr(args, "overrides", None) or [])
    if args.dry_run or not (args.address or os.environ.get("RAY_ADDRESS")):
        # Before Ray, only this machine's GPUs are known; a cluster's are Ray's to report.
        planned = load_space(args.space, data=args.data, profile=args.profile,
                             check_objective=False, overrides=overrides, profile_by=profile_by)
        if args.dry_run:
            planned.name = args.name or planned.name
            planned.search.num_samples = args.num_samples or planned.search.num_samples
            planned.search.max_concurrent = args.max_concurrent or planned.search.max_concurrent
            print(dry_run(planned, gpus=local_gpus()))
            return 0
        check_hardware(planned, gpus=local_gpus())

    outcome = run_search(args.space, data=args.data, name=args.name, storage=args.storage,
                         tracking_uri=args.tracking_uri, address=args.address,
                         resume=args.resume, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent,
                         warm_start=getattr(args, "warm_start", None),
                         shared_fs=getattr(args, "shared_fs", False),
                         profile=getattr(args, "profile", None), profile_by=profile_by,
                         overrides=overrides,
                         verbose=args.verbose,
                         live=not args.verbose and is_terminal(sys.stdout),
                         say=lambda line: print(line, flush=True))
    print(format_summary(outcome.selection, tracking_uri=outcome.tracking_uri))
    return 0 if outcome.selection.best() is not None else 1


def cmd_resume(args: argparse.Namespace) -> int:
    """`resume NAME`: the search's own copy of its space, data and profile, and
    its recorded budget (``--num-samples N`` extends it)."""
    from stain_search.search_dir import SearchDir

    sdir = SearchDir.of(args.storage, args.name).pull()
    record = sdir.read_record()
    args.space = str(sdir.space_file)
    args.data = record.data if args.data is None else args.data
    if getattr(args, "profile", None) is None:
        args.profile, args.profile_by = record.profile, "the search's record"
    args.overrides = dict(record.overrides or {})  # `run --set`: part of its identity
    args.resume = True
    return cmd_run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from stain_search.status import format_listing, format_status, list_status, search_status

    if args.name is None:
        rows = list_status(args.storage)
        print(json.dumps([r.to_dict() for r in rows], indent=2, default=str) if args.json
              else format_listing(rows, storage=args.storage))
        return 0
    status = search_status(args.name, storage=args.storage, tracking_uri=args.tracking_uri)
    print(json.dumps(status.to_dict(), indent=2, default=str) if args.json
          else format_status(status))
    return 0


def cmd_spaces(args: argparse.Namespace) -> int:
    """Each bundled space, then each of its profiles: what it is for and what it sets."""
    import textwrap

    from stain_search.plan import scale
    from stain_search.profiles import local_gpus
    from stain_search.spaces import bundled_spaces, load_space

    gpus = local_gpus()
    for path in bundled_spaces():
        default = load_space(path, gpus=gpus, check_objective=False)
        print(textwrap.fill(default.description, 100, initial_indent=f"spaces/{path.name:<18} ",
                            subsequent_indent=" " * 26))
        for name in default.profiles:
            spec = load_space(path, profile=name, check_objective=False)
            raw = yaml.safe_load(path.read_text())["profiles"][name] or {}
            mark = " (default here)" if name == default.profile else ""
            print(f"    --profile {name}{mark}: {raw.get('description', '')}")
            print(f"        {scale(spec.base_config(), spec.resources)}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from stain_search.services import check_port_free, serve, server_log
    from stain_search.mlflow_ui import ui_environment, ui_links
    from stain_search.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):  # a tracking server is its own UI
        from stain_search.tracking import client

        client(uri)  # a server that does not answer: one line
        print(f"MLflow UI: {uri.rstrip('/')}  (the tracking server serves it; nothing to start)")
        links = ui_links(uri, args.search, base=uri.rstrip("/")) if args.search else {}
        for what, link in links.items():
            print(f"{what}: {link}")
        return 0
    # One worker: a viewer for one person. With several, uvicorn's supervisor
    # restarts any worker slow to answer its health check, and on a busy
    # 2-core machine the UI then never came up (workers respawned for minutes).
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        root = Path(uri[len("sqlite:///"):]).parent / "mlartifacts"
        cmd += ["--default-artifact-root", root.resolve().as_uri()]
    base = f"http://{args.host}:{args.port}"
    links = ui_links(uri, args.search, base=base) if args.search else None  # bad name: no server
    check_port_free(args.host, args.port)
    log = server_log("mlflow-ui", args.port)
    print(f"starting the MLflow UI (store: {uri}; server log: {log})", flush=True)

    def announce() -> None:
        print(f"MLflow UI on {base}  (Ctrl-C stops it)", flush=True)
        if links:
            print(f"runs of search {args.search!r}: {links['runs']}")
            print(f"compare its top trials: {links['compare']}")
            print(f"report: {links['report']}", flush=True)

    return serve(cmd, env=ui_environment(), log=log, ready_url=f"{base}/health",
                 what="the MLflow UI", announce=announce)


def cmd_dashboard(args: argparse.Namespace) -> int:
    import shutil

    from stain_search.search_dir import SearchDir
    from stain_search.services import check_port_free, serve, server_log

    journal = SearchDir.of(args.storage, args.name).pull().study_journal
    if not journal.is_file():
        raise ConfigError(f"{journal}: no study of a search named {args.name!r} "
                          f"(looked in {SearchDir.of(args.storage, args.name).where})")
    # The command installed beside this Python first (a venv not on PATH).
    program = (shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
               or shutil.which("optuna-dashboard"))
    if program is None:
        raise ConfigError("optuna-dashboard is not installed: pip install 'stain-search[dashboard]'")
    check_port_free(args.host, args.port)
    from stain_search.analysis.importance import dashboard_note
    from stain_search.study import open_study

    note = dashboard_note(open_study(args.name, journal))
    if note:
        print(note, flush=True)
    log = server_log("optuna-dashboard", args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"starting optuna-dashboard (study: {journal}; server log: {log})", flush=True)
    return serve([program, str(journal), "--storage-class", "JournalFileStorage",
                  "--host", args.host, "--port", str(args.port)], log=log,
                 ready_url=f"{base}/api/meta", what="optuna-dashboard",
                 announce=lambda: print(f"optuna-dashboard on {base}  (Ctrl-C stops it)",
                                        flush=True))


def cmd_report(args: argparse.Namespace) -> int:
    from stain_search.analysis.report import write_report

    report = write_report(args.name, storage=args.storage, tracking_uri=args.tracking_uri,
                          out=args.out, parquet=args.parquet, top=args.top, ui=args.ui_url,
                          log_to_mlflow=not args.no_log)
    for note in report.analysis.importance_messages + report.notes:
        print(f"note: {note}")
    if report.parquet:
        print(f"trials × epochs: {report.parquet}")
    print(report.html)
    return 0


def parse_constraints(args: argparse.Namespace) -> list:
    """--min/--max: on top of the space's own constraints (--no-constraints drops those)."""
    from stain_search.deploy.select import parse_constraint

    return ([parse_constraint(t, bound="min") for t in args.min or []]
            + [parse_constraint(t, bound="max") for t in args.max or []])


def cmd_confirm(args: argparse.Namespace) -> int:
    from stain_search.confirm import run_confirm
    from stain_search.deploy.confirmed import format_confirmation

    # --json: stdout is the result alone; the search's console goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        outcome = run_confirm(args.name, top=args.top, seeds=args.seeds, storage=args.storage,
                              tracking_uri=args.tracking_uri, address=args.address,
                              max_concurrent=args.max_concurrent, verbose=args.verbose,
                              shared_fs=args.shared_fs,
                              live=not args.verbose and is_terminal(sys.stdout),
                              say=lambda line: print(line, flush=True))
    conf = outcome.confirmation
    print(json.dumps(conf.to_dict(), indent=2, default=str) if args.json
          else format_confirmation(conf))
    return 0 if conf.deploy is not None else 1


def read_confirmation(args: argparse.Namespace):
    """``--confirmed``: the search's confirmation, or one line on how to make it."""
    from stain_search.deploy.confirmed import confirmation
    from stain_search.search_dir import SearchDir

    if args.min or args.max:
        raise ConfigError("--confirmed ranks configurations by their mean over seeds; "
                          "--min/--max apply to single checkpoints: drop one of them")
    sdir = SearchDir.of(args.storage, args.name).pull()
    sdir.read_record()  # no such search: one line
    conf = confirmation(sdir, tracking_uri=args.tracking_uri)
    if conf is None:
        raise ConfigError(f"search {args.name!r} has no confirmation yet; run `stain-search "
                          f"confirm {args.name} --top 3 --seeds 3` first")
    return conf


def check_tracking_server(args: argparse.Namespace) -> None:
    """A tracking server the user named must answer: one line and exit 2 at once,
    not a listing without its run ids (``best``) or an export that fails after
    writing its folder, after minutes of MLflow's retries. (A local SQLite store
    is not probed: opening it would create it.)"""
    from stain_search import tracking

    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):
        tracking.client(uri)


def cmd_best(args: argparse.Namespace) -> int:
    from stain_search.deploy.select import format_table, select
    from stain_search.search_dir import SearchDir

    check_tracking_server(args)
    if args.confirmed:
        from stain_search.deploy.confirmed import format_confirmation

        conf = read_confirmation(args)
        print(json.dumps(conf.to_dict(), indent=2, default=str) if args.json
              else format_confirmation(conf))
        return 0 if conf.deploy is not None else 1
    selection = select(args.name, storage=args.storage, tracking_uri=args.tracking_uri,
                       constraints=parse_constraints(args),
                       space_constraints=not args.no_constraints,
                       include_failed=args.include_failed, per_trial=args.per_trial)
    top = args.top or len(selection.candidates) or len(selection.infeasible)
    if args.json:
        out = selection.to_dict()
        out["candidates"] = out["candidates"][:top]
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_table(selection, top=top))
        if SearchDir(selection.search_dir).confirmation.exists():
            print(f"note: this search has a confirmation over seeds: `stain-search best "
                  f"{args.name} --confirmed` ranks its configurations by their mean")
    return 0 if selection.candidates else 1


def cmd_export(args: argparse.Namespace) -> int:
    from stain_search.deploy.export import export_search

    check_tracking_server(args)
    result = export_search(args.name, storage=args.storage, tracking_uri=args.tracking_uri,
                           trial=args.trial, epoch=args.epoch, out=args.out,
                           constraints=parse_constraints(args),
                           space_constraints=not args.no_constraints,
                           register=not args.no_register,
                           model_name=args.model_name, alias=args.alias, portable=args.portable,
                           overwrite=args.overwrite, confirmed=args.confirmed)
    c = result.candidate
    scores = ", ".join(f"{k}={v:.4g}" for k, v in c.metrics.items()
                       if k in (*[m for m, _ in result.objectives], "ssim_structure"))
    print(f"exported {c.trial} (#{c.number}, {c.state.lower()}) at epoch {c.epoch} "
          f"[{scores}] → {result.folder}")
    print("  files: " + ", ".join(sorted(p.name for p in result.folder.iterdir())))
    r = result.registered
    if r is not None:
        print(f"registered {r.name!r} version {r.version}, alias @{r.alias} "
              f"(store: {r.tracking_uri})")
        print(f"  serve over REST:  MLFLOW_TRACKING_URI={r.tracking_uri} "
              f"mlflow models serve -m {r.uri} --env-manager local --port 5001")
    print(f"  translate:        stain-search translate {result.folder} INPUT OUTPUT")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from stain_search.deploy.translate import translate

    outputs = translate(args.model, args.input, args.output, tracking_uri=args.tracking_uri,
                        overwrite=args.overwrite, device=args.device, tile=args.tile,
                        overlap=args.overlap, norm_stats=args.norm_stats, kernel=args.kernel,
                        min_tissue=args.min_tissue, batch_size=args.batch_size,
                        compression=args.compression, quality=args.quality, mpp=args.mpp,
                        level=args.level, normalize=args.normalize, reference=args.reference,
                        progress=not args.no_progress and progress_enabled())
    print(f"translated {len(outputs)} image(s) → {args.output}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from stain_search.config import load_config
    from stain_search.weights import fetch_weights, weights_status

    if args.weights_command == "fetch":
        fetch_weights(args.to, url=args.url)
        return 0
    config = load_config(resolve_config_path(args.config), parse_overrides(args.set),
                         overrides_from="--set")
    print("\n".join(weights_status(config)))
    return 0


# --- the registry: each sub-parser's verb → the function that does it ---------------

VERBS = {
    "train": cmd_train,
    "data_prepare": cmd_data_prepare,
    "data_builtin": cmd_data_builtin,
    "run": cmd_run,
    "resume": cmd_resume,
    "confirm": cmd_confirm,
    "status": cmd_status,
    "spaces": cmd_spaces,
    "ui": cmd_ui,
    "dashboard": cmd_dashboard,
    "report": cmd_report,
    "best": cmd_best,
    "export": cmd_export,
    "translate": cmd_translate,
    "weights": cmd_weights,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        with one_line_warnings():
            return int(VERBS[args.verb](args) or 0)
    except StainSearchError as err:
        print(f"stain-search: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SearchInterrupted as err:
        print(f"stain-search: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `stain-search best NAME | head`: the reader left
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("stain-search: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
