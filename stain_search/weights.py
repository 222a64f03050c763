"""The Inception weights FID needs: fetch them once, see which features a run uses, resolve once.

- :func:`fetch_weights` (`stain-search weights fetch [--to PATH]`) downloads
  torch-fidelity's standard ``pt_inception-2015-12-05`` file, checks its
  SHA-256, and writes it atomically — by default where torch-fidelity's own
  download would land (the torch hub cache), which ``feature_extractor:
  auto`` searches, so nothing else needs setting.
- :func:`weights_status` (`stain-search weights status`) says which features a
  run with a given config would use, and why.
- :func:`resolve_eval` is called once by the driver: it turns
  ``feature_extractor: auto`` into ``inception`` with an absolute
  ``fid_weights`` path, or into ``random``, so every worker uses the
  extractor the driver saw and none resolves, or downloads, for itself.

``$STAIN_SEARCH_WEIGHTS_URL`` / ``$STAIN_SEARCH_WEIGHTS_SHA256`` point the
fetch at a mirror (and its file's digest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from stain_search.atomic import atomic_path
from stain_search.config import Config
from stain_search.errors import StainSearchError
from stain_search.metrics.frechet import (INCEPTION_URL, WEIGHTS_ENV, find_inception_weights,
                                          hub_cache_weights, resolve_feature_extractor)

# SHA-256 of torch-fidelity's weights-inception-2015-12-05-6726825d.pth. The file
# name carries its first 8 hex digits (torch.hub's check_hash convention, which
# tests/test_weights.py checks against this constant).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
URL_ENV = "STAIN_SEARCH_WEIGHTS_URL"
SHA256_ENV = "STAIN_SEARCH_WEIGHTS_SHA256"
CHUNK = 1 << 20
TIMEOUT_S = 30


class WeightsError(StainSearchError):
    """The weights could not be fetched or are not the expected file."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _offline_hint(dest: Path) -> str:
    return (f"On a machine without internet, download {INCEPTION_URL} elsewhere and copy it "
            f"to {dest} (or point `eval.fid_weights` at it); or set "
            f"`eval.feature_extractor: random` to log fd_random/kd_random instead")


def _progress(total: int | None, name: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not sys.stderr.isatty(), file=sys.stderr)


def fetch_weights(dest: str | Path | None = None, *, url: str | None = None,
                  sha256: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Download the Inception weights to ``dest`` (default: the torch hub cache), checked.

    Nothing is left at ``dest`` unless the whole file arrived with the
    expected SHA-256; an existing good file is kept without downloading.
    """
    dest = Path(dest).expanduser().resolve() if dest else hub_cache_weights()
    url = url or os.environ.get(URL_ENV) or INCEPTION_URL
    expected = (sha256 or os.environ.get(SHA256_ENV) or INCEPTION_SHA256).lower()
    if dest.is_dir():
        dest = dest / INCEPTION_URL.rsplit("/", 1)[1]
    if dest.is_file() and sha256_of(dest) == expected:
        log(f"{dest}: already there, SHA-256 verified")
        return dest
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 (https or a mirror)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(f"could not download {url}: {reason}. {_offline_hint(dest)}") from None
    digest = hashlib.sha256()
    try:
        with response, atomic_path(dest) as tmp, open(tmp, "xb") as out:
            length = response.headers.get("Content-Length")
            with _progress(int(length) if length else None, dest.name) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            out.flush()
            if digest.hexdigest() != expected:
                raise WeightsError(f"{url}: downloaded file has SHA-256 {digest.hexdigest()}, "
                                   f"not the expected {expected}: refused, nothing written "
                                   f"(a changed or truncated file, or a wrong mirror)")
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"download of {url} failed midway: {err}. {_offline_hint(dest)}") from None
    log(f"{dest}: downloaded, SHA-256 verified")
    if dest != hub_cache_weights():
        log(f"point runs at it with `eval.fid_weights: {dest}` or ${WEIGHTS_ENV}={dest}")
    return dest


def resolve_eval(config: Config) -> Config:
    """``config`` with the feature extractor decided: 'inception' + an absolute
    ``eval.fid_weights``, or 'random'. Call once, on the driver."""
    spec = resolve_feature_extractor(config.eval)
    weights = str(Path(spec.weights_path).resolve()) if spec.weights_path else None
    resolved = dataclasses.replace(config.eval, feature_extractor=spec.name, fid_weights=weights)
    return dataclasses.replace(config, eval=resolved)


def weights_status(config: Config) -> list[str]:
    """Lines saying which features a run with ``config`` uses, and why."""
    choice = config.eval.feature_extractor
    if choice == "random":
        return ["features: random CNN (`eval.feature_extractor: random`): metrics fd_random, "
                "kd_random — comparable only with each other, never with published FID"]
    weights, where = find_inception_weights(config.eval)
    if weights is None:
        missing = (f"no Inception weights: `eval.fid_weights` unset, ${WEIGHTS_ENV} unset, "
                   f"nothing at {hub_cache_weights()}")
        fix = "get them with `stain-search weights fetch` (needs internet once)"
        if choice == "inception":
            return [f"features: none — `eval.feature_extractor: inception` but {missing}: "
                    f"a run would stop with an error", fix]
        return [f"features: random CNN — {missing}", "metrics: fd_random, kd_random (not FID/KID)",
                f"for FID/KID: {fix}"]
    digest = sha256_of(weights)
    check = ("SHA-256 verified: the standard file" if digest == INCEPTION_SHA256 else
             f"SHA-256 {digest[:12]}… differs from the standard file's: values are not FID "
             f"comparable with published ones")
    return [f"features: Inception-v3 pool3 (pt_inception-2015-12-05) from {weights} ({where})",
            f"metrics: fid, kid; {check}"]
