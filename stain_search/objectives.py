"""What a space may optimise: the metric names a run can honestly compute.

``frechet`` and ``kernel`` in a space (or ``train.keep_metric``) stand for the
Fréchet and kernel distances the run can compute: ``fid``/``kid`` with the
standard Inception weights, else ``fd_random``/``kd_random`` on fixed random
features (``stain_search.metrics.frechet``). Which metrics a config reports
at all (paired targets, a known stain) is decided here too, before Ray
starts, with the reason when one is missing.
"""

from __future__ import annotations

from stain_search import config as cfg
from stain_search.errors import ConfigError


def frechet_metric_name(config: cfg.Config) -> str:
    from stain_search.metrics.frechet import resolve_feature_extractor

    return resolve_feature_extractor(config.eval).metric_name


def kernel_metric_name(config: cfg.Config) -> str:
    from stain_search.metrics.frechet import resolve_feature_extractor

    return resolve_feature_extractor(config.eval).kernel_name


# Objective names that stand for the metric a run can honestly compute.
METRIC_ALIASES = {"frechet": frechet_metric_name, "kernel": kernel_metric_name}


def reported_metrics(config: cfg.Config) -> set[str]:
    """The metrics a trial on this config will report (checked before Ray starts)."""
    from stain_search.data import resolve_dataset
    from stain_search.evaluate import reported_metrics as evaluator_metrics
    from stain_search.gan import LOSS_NAMES

    files = resolve_dataset(config.data.path, config.data.layout)
    stain = files.stain if config.eval.stain == "auto" else config.eval.stain
    return set(LOSS_NAMES) | set(evaluator_metrics(config.eval, has_pairs=bool(files.pairs),
                                                   stain=stain))


def why_not_reported(metric: str) -> str:
    if metric in ("ssim_gt", "psnr_gt"):
        return "it needs paired targets (test images with the same name in both domains)"
    if metric == "ki67_f1":
        return ("it needs a paired Ki-67 (nuclear DAB) target, e.g. builtin:phantom-ki67, "
                "and `eval.ki67_f1: true`")
    if metric == "fid":
        return ("no Inception weights were found: set eval.fid_weights (or "
                "STAIN_SEARCH_FID_WEIGHTS) to a local pt_inception-2015-12-05 file, "
                "or use `metric: frechet`")
    if metric == "fd_random":
        return "Inception weights are configured, so the run reports `fid` instead"
    if metric == "kid":
        return ("no Inception weights were found (`stain-search weights fetch` gets them), "
                "or use `metric: kernel`")
    if metric == "kd_random":
        return "Inception weights are configured, so the run reports `kid` instead"
    if metric == "stain_od_r":
        return ("it needs paired targets and a known stain: set `eval.stain` (ki67, her2, "
                "ihc, dab, trichrome, pas) if the dataset does not say")
    if metric == "stain_area_error":
        return ("the dataset's stain is unknown: set `eval.stain` (ki67, her2, ihc, dab, "
                "trichrome, pas)")
    return "the README's Metrics section says what each metric needs"


def resolve_metric(metric: object, config: cfg.Config, *, reported: set[str], where: str) -> str:
    """A metric named in a space (``objective``, ``constraints``): an alias made
    the honest name, then checked to be one trials report on this data.
    ``where`` begins the error line (``path: `key```)."""
    from stain_search.evaluate import metric_directions

    directions = metric_directions()
    if metric in METRIC_ALIASES:
        metric = METRIC_ALIASES[metric](config)
    if metric not in directions:
        raise ConfigError(f"{where}: {metric!r} is not a metric trials report"
                          f"{cfg.suggest(str(metric), sorted(directions) + sorted(METRIC_ALIASES))} "
                          f"(known: {', '.join(METRIC_ALIASES)}, {', '.join(sorted(directions))})")
    if metric not in reported:
        raise ConfigError(f"{where}: no trial reports {metric!r} on {config.data.path}: "
                          f"{why_not_reported(str(metric))}")
    return str(metric)
