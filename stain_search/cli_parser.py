"""The `stain-search` command line's grammar: every verb and its arguments.

Each sub-parser names its verb (``set_defaults(verb=...)``); ``stain_search.cli``
maps the name to the function that does it (its ``VERBS`` registry).
"""

from __future__ import annotations

import argparse


def at_least(low: int):
    """An argparse type: a whole number ``low`` or more (``--top -3`` is a mistake,
    not a request for minus three rows)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    parse.__name__ = "count"
    return parse


def add_search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset folder or builtin:NAME (overrides the space's data)")
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db, SQLite)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--shared-fs", action="store_true",
                   help="--storage is a local path every node of the --address cluster sees "
                   "(NFS, Lustre...); without it a multi-node cluster needs a URI storage, "
                   "e.g. s3://bucket/runs")
    p.add_argument("--num-samples", type=at_least(1), help="override search.num_samples")
    p.add_argument("--max-concurrent", type=at_least(1), help="override search.max_concurrent")
    p.add_argument("--profile", help="the space's scale, e.g. demo or gpu (default: gpu "
                   "where a GPU is visible, else demo; `stain-search spaces` lists them)")
    p.add_argument("--warm-start", metavar="OTHER_SEARCH",
                   help="a new search starts with the finished trials of OTHER_SEARCH (same "
                   "--storage), best first, re-trained here; keys it lacked take this "
                   "space's defaults, values outside this space are dropped")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, space, "
                   "objective, resources and profile, then exit without starting Ray")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="Ray Tune's own tables and every trial's output (default: the "
                   "search's compact view)")


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """Where a finished search is, and which of its checkpoints count (best, export)."""
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db, SQLite)")
    p.add_argument("--min", action="append", metavar="METRIC=VALUE",
                   help="only checkpoints with METRIC ≥ VALUE, e.g. --min ssim_structure=0.7")
    p.add_argument("--max", action="append", metavar="METRIC=VALUE",
                   help="only checkpoints with METRIC ≤ VALUE, e.g. --max fid=80")
    p.add_argument("--no-constraints", action="store_true",
                   help="leave out the space's own `constraints:` (--min/--max still apply)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stain-search",
        description="Hyper-parameter search for CycleGAN virtual staining (H&E → special stains).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train one CycleGAN model (no search)")
    p.add_argument("config", nargs="?", help="training config YAML, or a bundled name "
                   "(default: quickstart)")
    p.add_argument("--data", help="dataset folder or builtin:NAME (overrides data.path)")
    p.add_argument("--out", help="results folder (default: stain-search-runs/train-<config>)")
    p.add_argument("--epochs", type=at_least(1), help="override train.epochs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set loss.lambda_cycle=5")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.set_defaults(verb="train")

    p = sub.add_parser("data", help="prepare datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    q = dsub.add_parser("prepare", help="tile large images into a dataset + Parquet manifest")
    q.add_argument("src", help="source folder (any supported layout)")
    q.add_argument("out", help="output folder (must not exist or be empty)")
    q.add_argument("--layout", default="auto", help="auto|cyclegan|bci|mist|pair")
    q.add_argument("--tile", type=int, default=256)
    q.add_argument("--overlap", type=int, default=0)
    q.add_argument("--min-tissue", type=float, default=0.5,
                   help="drop tiles with less tissue than this fraction")
    q.add_argument("--test-fraction", type=float, default=0.1)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--mpp", type=float, help="cut slides at this µm/px (resampled from the "
                   "nearest finer pyramid level)")
    q.add_argument("--level", type=int, help="cut slides at this pyramid level as stored")
    q.add_argument("--split-by", default="auto", choices=["auto", "slide", "tile"],
                   help="split sources without a train/test split by whole slide or by "
                   "tile (auto: slide for scanner slides or with --mpp/--level)")
    q.set_defaults(verb="data_prepare")
    q = dsub.add_parser("builtin", help="list (and --generate) the built-in phantom datasets")
    q.add_argument("--generate", action="store_true")
    q.set_defaults(verb="data_builtin")

    p = sub.add_parser("run", help="run a hyper-parameter search (Ray Tune + Optuna + MLflow)")
    p.add_argument("space", help="search-space YAML, or spaces/NAME.yaml for a bundled one")
    p.add_argument("--name", help="search name (default: the space's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="fix a training key for this search, over the space's base (repeatable; "
                   "not a key the space explores), e.g. --set eval.stain=trichrome; part of "
                   "the search's identity, and `resume` keeps it")
    add_search_options(p)
    p.set_defaults(verb="run")

    p = sub.add_parser("resume", help="continue an interrupted search by name")
    p.add_argument("name")
    add_search_options(p)
    p.set_defaults(verb="resume")

    p = sub.add_parser("confirm", help="re-train a search's top trials with new seeds: "
                       "mean ± std per configuration, and whether the ranking holds")
    p.add_argument("name", help="search name")
    p.add_argument("--top", type=int, default=3, help="configurations to confirm: the "
                   "search's best K trials by the deploy rule (default 3)")
    p.add_argument("--seeds", type=int, default=3, help="new train.seed values per "
                   "configuration (default 3; the same seeds for every configuration)")
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db, SQLite)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--shared-fs", action="store_true",
                   help="--storage is a local path every node of the cluster sees")
    p.add_argument("--max-concurrent", type=at_least(1), help="runs at once (default: the search's)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="Ray Tune's own tables and every run's output")
    p.set_defaults(verb="confirm")

    p = sub.add_parser("status", help="a search's trials, best so far and driver, without "
                       "Ray (no NAME: every search in --storage)")
    p.add_argument("name", nargs="?", help="search name (default: list the searches)")
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db, SQLite)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(verb="status")

    p = sub.add_parser("spaces", help="list the bundled search spaces")
    p.set_defaults(verb="spaces")

    p = sub.add_parser("ui", help="start the MLflow UI on the search store")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--search", help="also print links to this search's runs, its top "
                   "trials side by side, and its report")
    p.set_defaults(verb="ui")

    p = sub.add_parser("dashboard", help="serve a search's Optuna study in optuna-dashboard "
                       "(the `dashboard` extra)")
    p.add_argument("name", help="search name")
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1 only)")
    p.add_argument("--port", type=int, default=8080, help="default: 8080")
    p.set_defaults(verb="dashboard")

    p = sub.add_parser("report", help="one HTML page on what a search taught us "
                       "(importance, Pareto front, plots, flags)")
    p.add_argument("name", help="search name")
    p.add_argument("--storage", help="where searches are kept: a folder or a URI such as s3://bucket/runs "
                   "(default: $STAIN_SEARCH_STORAGE, else ./stain-search-runs)")
    p.add_argument("--tracking-uri", help="MLflow store (default: ./mlflow.db, SQLite)")
    p.add_argument("--out", help="HTML file (default: <storage>/<name>/report.html)")
    p.add_argument("--parquet", help="also save all trials × epochs as this Parquet file")
    p.add_argument("--top", type=at_least(1), default=10, help="rows in the top-trials table")
    p.add_argument("--ui-url", help="MLflow UI the run links point to "
                   "(default: the tracking server, or http://127.0.0.1:5000)")
    p.add_argument("--no-log", action="store_true",
                   help="do not log the figures to the search's MLflow run")
    p.set_defaults(verb="report")

    p = sub.add_parser("best", help="rank a search's trial × epoch checkpoints "
                       "(objectives, constraints, Pareto front)")
    p.add_argument("name", help="search name")
    p.add_argument("--top", type=at_least(0), default=10, help="rows to show (0: all; default 10)")
    add_selection_options(p)
    p.add_argument("--per-trial", action="store_true", help="only each trial's best checkpoint")
    p.add_argument("--confirmed", action="store_true", help="rank the configurations "
                   "`stain-search confirm` re-trained, by their mean over seeds")
    p.add_argument("--include-failed", action="store_true",
                   help="also rank checkpoints of failed (diverged) trials")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(verb="best")

    p = sub.add_parser("export", help="export the best (or a chosen) checkpoint as a "
                       "self-contained model and register it in MLflow")
    p.add_argument("name", help="search name")
    p.add_argument("--trial", help="trial folder name, its id, or Optuna number "
                   "(default: the best checkpoint overall)")
    p.add_argument("--epoch", type=int, help="epoch of the checkpoint (default: the trial's best)")
    p.add_argument("--out", help="export folder (default: <storage>/<name>/exports/<trial>_epoch_N)")
    add_selection_options(p)
    p.add_argument("--confirmed", action="store_true", help="export the best checkpoint of "
                   "the configuration best by its confirmed mean (`stain-search confirm`)")
    p.add_argument("--model-name", help="registered model name (default: the search name)")
    p.add_argument("--alias", default="champion", help="registry alias to set (default: champion)")
    p.add_argument("--no-register", action="store_true", help="only write the export folder")
    p.add_argument("--portable", default="auto",
                   choices=["auto", "onnx", "torchscript", "none"],
                   help="also write G as ONNX or TorchScript (auto: ONNX if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.set_defaults(verb="export")

    p = sub.add_parser("translate", help="translate H&E tiles, images or whole slides "
                       "(tiled, seam-free, pyramidal TIFF out)")
    p.add_argument("model", help="export folder, or models:/NAME@ALIAS from the registry")
    p.add_argument("input", help="image, whole slide (.svs, .ndpi, .mrxs, .scn, TIFF, ... "
                   "via OpenSlide/tifffile), or folder of them")
    p.add_argument("output", help="output file (.ome.tif: OME-TIFF for QuPath/Bio-Formats; "
                   ".tif: pyramidal TIFF OpenSlide reads; .png, .jpg) or folder")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ (default: ./mlflow.db)")
    p.add_argument("--tile", type=int, help="tile size in px (default: from model depth)")
    p.add_argument("--overlap", type=int, help="tile overlap in px (default: covers the "
                   "receptive field)")
    p.add_argument("--norm-stats", default="global", choices=["global", "kernel", "tile"],
                   help="instance-norm statistics: global = as whole-image inference "
                   "(default), kernel = KIN, tile = per tile")
    p.add_argument("--kernel", type=int, default=3, help="KIN neighbourhood in tiles (odd)")
    p.add_argument("--min-tissue", type=float, default=0.01,
                   help="tiles with less tissue pass through unchanged (0: translate all)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib", "none"],
                   help="TIFF output tiles (default: jpeg, as scanners write; zlib: lossless)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--mpp", type=float, help="µm/px G reads the slide at (default: the "
                   "model's, recorded at training); the level is picked and resampled to it")
    p.add_argument("--level", type=int, help="read this pyramid level as stored (instead of "
                   "--mpp)")
    p.add_argument("--normalize", default="none", choices=["none", "macenko", "reinhard"],
                   help="stain-normalise the input first (default: none)")
    p.add_argument("--reference", help="reference H&E image for --normalize (default: the "
                   "training set's statistics stored at export)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(verb="translate")

    p = sub.add_parser("weights", help="the Inception weights FID/KID need: fetch, or "
                       "see which features runs use")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    q = wsub.add_parser("fetch", help="download torch-fidelity's Inception weights, "
                        "SHA-256 checked")
    q.add_argument("--to", metavar="PATH", help="file or folder to write (default: the torch "
                   "hub cache, where runs look without further settings)")
    q.add_argument("--url", help="download from a mirror (default: $STAIN_SEARCH_WEIGHTS_URL, "
                   "else torch-fidelity's release)")
    q.set_defaults(verb="weights")
    q = wsub.add_parser("status", help="which features a run would use, and why")
    q.add_argument("config", nargs="?", help="training config YAML, or a bundled name "
                   "(default: quickstart)")
    q.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set eval.fid_weights=PATH")
    q.set_defaults(verb="weights")

    return parser
