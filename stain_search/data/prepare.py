"""`stain-search data prepare`: cut large images into a training dataset.

Whole slides and large fields are cut into ``tile`` × ``tile`` tiles (with
optional overlap); tiles that are mostly glass are dropped with a tissue
mask — Otsu's threshold on colour saturation (Otsu, 1979; as whole-slide
tools such as TIAToolbox's ``OtsuTissueMasker`` do), because glass is grey
whatever the lamp's brightness while stained tissue is coloured. The
three-class variant (glass / pale tissue / dense tissue) keeps pale
stroma that two-class Otsu would call glass. Pale IHC (haematoxylin-only
stroma) is nearly grey and still partly missed on its own — hence the
pair rule below. The result is a CycleGAN
layout (``trainA/ trainB/ testA/ testB/``) plus ``manifest.parquet``, one
row per tile: where it came from and where it went.

Splits: a source that already has train/test splits (cyclegan, bci, mist
layouts) keeps them, so no slide leaks from train into test. A ``pair``
source (flat ``A/`` and ``B/`` folders, often one slide each) is split per
tile by hashing (name, x, y), at ``test_fraction``.

Sources with the same name and size in A and B (a registered pair, e.g.
consecutive sections) are cut at the same positions and kept or dropped
together, by the tissue in the H&E image: pale IHC tissue would otherwise
be mistaken for glass, and test tiles stay pairs (same file name).

The output is written to a temporary folder and renamed at the end, so an
error or interruption never leaves a half-written dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage
from skimage.filters import threshold_multiotsu

from stain_search.atomic import atomic_dir
from stain_search.data.folders import (LAYOUTS, detect_layout, list_images, name_fraction,
                                       pair_folders, resolve_dataset, split_by_name)
from stain_search.data.io import image_size, write_image
from stain_search.data.resolution import ResampledSource, plan_resolution
from stain_search.data.slides import OPENSLIDE_EXTENSIONS, SlideSource, open_slide
from stain_search.errors import ConfigError, DataError
from stain_search.progress import Advance, progress

# The Otsu threshold is clipped into this saturation range, measured on the
# BCI/MIST samples: glass sits below 0.02 (JPEG chroma noise), and a cut
# above 0.10 means an image with no glass at all, where Otsu splits the
# tissue instead of separating it from glass.
SATURATION_RANGE = (0.02, 0.10)
MIN_BRIGHTNESS = 40  # darker pixels (labels, black borders) are not tissue

MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()), ("domain", pa.string()), ("x", pa.int64()), ("y", pa.int64()),
    ("tile", pa.int32()), ("tissue_fraction", pa.float32()), ("split", pa.string()),
    ("path", pa.string()),
    # Where on the slide (x, y above are level-0 px): the pyramid level read,
    # level-0 px per tile px (level down-sample ÷ resampling), the tile's µm/px
    # (null when the source does not say).
    ("level", pa.int32()), ("downsample", pa.float32()), ("mpp", pa.float32())])
# How train and test were split, stored in the manifest's metadata ("split_by").
SPLIT_BY = {
    "layout": "the source's own train/test folders: each source file in one split",
    "slide": "by slide: every tile of a slide in the same split, so no test tile comes "
             "from a training slide",
    "tile": "by tile: each tile hashed on (source, x, y) at test_fraction; tiles of one "
            "image can land in both splits",
}


# --- tissue mask -----------------------------------------------------------------

def saturation(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) HSV saturation in [0, 1]."""
    rgb = rgb.astype(np.float32)
    top, bottom = rgb.max(-1), rgb.min(-1)
    return np.where(top > 0, (top - bottom) / np.maximum(top, 1.0), 0.0)


def tissue_threshold(rgb: np.ndarray) -> float:
    """Saturation threshold for an image (a thumbnail will do): the lower of
    three-class Otsu's two cuts, clipped into :data:`SATURATION_RANGE`."""
    sat = ndimage.gaussian_filter(saturation(rgb), 1.0)
    try:
        cut = threshold_multiotsu(sat, classes=3)[0]
    except ValueError:  # fewer than three grey levels: blank glass
        cut = SATURATION_RANGE[0]
    return float(np.clip(cut, *SATURATION_RANGE))


def tissue_mask(rgb: np.ndarray, *, threshold: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) bool, True on tissue.

    ``threshold`` (saturation) defaults to :func:`tissue_threshold` of this
    image; pass a whole slide's threshold when masking its tiles.
    """
    if threshold is None:
        threshold = tissue_threshold(rgb)
    sat = ndimage.gaussian_filter(saturation(rgb), 3.0)  # tissue regions, not single pixels
    return (sat > threshold) & (rgb.max(-1) >= MIN_BRIGHTNESS)


# --- sources ----------------------------------------------------------------------

@dataclass
class Source:
    path: Path
    domain: str  # "A" or "B"
    split: str | None  # "train" / "test", or None: split per tile


def _gather(src: str | Path, layout: str) -> tuple[list[Source], str]:
    """Every source image with its domain and (if the layout has one) split."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (the images to tile)")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if layout == "pair":
        folders = pair_folders(root)
        if folders is None:
            raise DataError(f"{root}: missing folders for the pair layout "
                            f"(expected {LAYOUTS['pair'].expected})")
        sources = [Source(p, domain, None) for domain, folder in zip("AB", folders)
                   for p in list_images(folder, slides=True)]
        for domain, folder in zip("AB", folders):
            if not any(s.domain == domain for s in sources):
                raise DataError(f"{folder}: no images to tile")
        return sources, layout
    files = resolve_dataset(root, layout, slides=True)
    return ([Source(p, d, s) for (d, s, paths) in [
        ("A", "train", files.train_a), ("B", "train", files.train_b),
        ("A", "test", files.test_a), ("B", "test", files.test_b)] for p in paths], layout)


def _check_unique(sources: list[Source]) -> None:
    seen: dict[tuple[str, str | None, str], Path] = {}
    for s in sources:
        key = (s.domain, s.split, s.path.stem)
        if key in seen:
            raise DataError(f"{s.path} and {seen[key]} share the name {s.path.stem!r}; tiles "
                            f"are named after their source, so rename one of them")
        seen[key] = s.path


# --- tiling -----------------------------------------------------------------------

def _positions(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left (y, x) of every whole tile; a strip narrower than a tile at
    the right/bottom edge is left out."""
    step = tile - overlap
    return [(y, x) for y in range(0, height - tile + 1, step)
            for x in range(0, width - tile + 1, step)]


def _tile_split(stem: str, y: int, x: int, *, test_fraction: float, seed: int) -> str:
    return "test" if name_fraction(f"{stem}:{x}:{y}", seed=seed) < test_fraction else "train"


@dataclass
class _Job:
    """Sources cut together: one image, or a same-named, same-sized A/B pair."""

    stem: str
    split: str | None
    paths: dict[str, Path]  # domain → source; "A" decides what is tissue when both


def _size(path: Path) -> tuple[int, int]:
    """(height, width) of level 0, from the header where the format allows."""
    if path.suffix.lower() in OPENSLIDE_EXTENSIONS:
        source = open_slide(path)
        source.close()
        return source.levels[0].height, source.levels[0].width
    return image_size(path)


def _jobs(sources: list[Source]) -> list[_Job]:
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for s in sources:
        groups.setdefault((s.split or "", s.path.stem), {})[s.domain] = s.path
    jobs = []
    for (split, stem), paths in sorted(groups.items()):
        if len({_size(p) for p in paths.values()}) == 1:
            jobs.append(_Job(stem, split or None, paths))
        else:  # same name, different size: not registered, cut each on its own
            jobs += [_Job(stem, split or None, {d: p}) for d, p in paths.items()]
    return jobs


def _open(path: Path, *, mpp: float | None, level: int | None) -> SlideSource:
    """A source at the requested µm/px or level (default: level 0 as stored)."""
    source = open_slide(path)
    try:
        if mpp is None and level is None:
            return source
        plan = plan_resolution(source, model_mpp=None, mpp=mpp, level=level)
        return source if plan.scale == 1.0 else ResampledSource(source, plan.scale)
    except BaseException:
        source.close()
        raise


def _where(source: SlideSource) -> tuple[int, float, float | None]:
    """(level read, level-0 px per px read, µm/px read) of an opened source."""
    if isinstance(source, ResampledSource):
        inner = source.inner
        return inner.level, inner.levels[inner.level].downsample / source.scale, source.mpp
    return source.level, source.levels[source.level].downsample, source.level_mpp(source.level)


def _decider(paths: dict[str, Path]) -> str:
    """The domain whose tissue decides what a job keeps: the H&E ("A") when both."""
    return "A" if "A" in paths else next(iter(paths))


def _tile_count(job: _Job, *, tile: int, overlap: int, mpp: float | None,
                level: int | None) -> int:
    """How many positions ``_cut`` visits for ``job`` (for the progress bar): from the
    header at level 0 as stored, else from the source opened at the requested
    resolution (OpenSlide and TIFF read headers only; a plain image is decoded)."""
    path = job.paths[_decider(job.paths)]
    if mpp is None and level is None:
        height, width = _size(path)
    else:
        source = _open(path, mpp=mpp, level=level)
        height, width = source.height, source.width
        source.close()
    return len(_positions(height, width, tile, overlap))


def _cut(job: _Job, tmp: Path, *, tile: int, overlap: int, min_tissue: float,
         test_fraction: float, seed: int, mpp: float | None = None,
         level: int | None = None, advance: Advance | None = None) -> list[dict]:
    """Write the kept tiles of one job; return their manifest rows. Sources are
    read region by region (memory: a tile and the reader's small cache).
    ``advance`` is called once per position visited, kept or not."""
    images: dict[str, SlideSource] = {}
    try:
        for d, p in job.paths.items():
            images[d] = _open(p, mpp=mpp, level=level)
        return _cut_open(job, images, tmp, tile=tile, overlap=overlap, min_tissue=min_tissue,
                         test_fraction=test_fraction, seed=seed, advance=advance)
    finally:
        for im in images.values():
            im.close()


def _cut_open(job: _Job, images: dict[str, SlideSource], tmp: Path, *, tile: int, overlap: int,
              min_tissue: float, test_fraction: float, seed: int,
              advance: Advance | None = None) -> list[dict]:
    thresholds = {d: tissue_threshold(im.thumbnail()) for d, im in images.items()}
    where = {d: _where(im) for d, im in images.items()}
    decider = _decider(images)
    ref = images[decider]
    rows = []
    for y, x in _positions(ref.height, ref.width, tile, overlap):
        if advance is not None:
            advance()  # counted before the tissue test: dropped glass is work done too
        tiles = {d: im.read(y, x, tile, tile) for d, im in images.items()}
        fractions = {d: float(tissue_mask(t, threshold=thresholds[d]).mean())
                     for d, t in tiles.items()}
        if fractions[decider] < min_tissue:
            continue
        _, down, _ = where[decider]
        x0, y0 = round(x * down), round(y * down)  # level-0 px: the slide's own coordinates
        split = job.split or _tile_split(job.stem, y0, x0, test_fraction=test_fraction,
                                         seed=seed)
        name = f"{job.stem}__x{x0:06d}_y{y0:06d}.png"
        for domain, pixels in tiles.items():
            rel = f"{split}{domain}/{name}"
            write_image(tmp / rel, pixels, fsync=False)  # the folder is renamed whole
            lv, ds, tile_mpp = where[domain]
            rows.append({"source": str(job.paths[domain].resolve()), "domain": domain,
                         "x": x0, "y": y0, "tile": tile, "tissue_fraction": fractions[domain],
                         "split": split, "path": rel, "level": lv, "downsample": ds,
                         "mpp": tile_mpp})
    return rows


def _split_slides(jobs: list[_Job], *, test_fraction: float, seed: int) -> None:
    """Whole slides (by name, A and B together) to train or test; at least one
    to each when there are two or more names."""
    stems = {job.stem for job in jobs}
    if len(stems) < 2:
        raise DataError(f"splitting by slide needs at least two slides per domain; found "
                        f"{len(stems)} ({', '.join(sorted(stems))}); add slides or pass "
                        f"--split-by tile")
    test = split_by_name(stems, test_fraction=test_fraction, seed=seed)
    if test == stems:
        test = {min(stems, key=lambda s: name_fraction(s, seed=seed))}
    for job in jobs:
        job.split = "test" if job.stem in test else "train"


def _ensure_test_tiles(rows: list[dict], tmp: Path, *, seed: int) -> None:
    """Tile-split sources: if hashing sent no tile of a domain to test, move
    the one that hashes lowest (with its partner, keeping the pair)."""
    for domain in "AB":
        if any(r["domain"] == domain and r["split"] == "test" for r in rows):
            continue
        train = [r for r in rows if r["domain"] == domain]
        if len(train) < 2:
            continue  # nothing to spare; the final check reports the empty split
        name = min((Path(r["path"]).name for r in train),
                   key=lambda n: name_fraction(n, seed=seed))
        for r in rows:
            if Path(r["path"]).name == name and r["split"] == "train":
                new = f"test{r['domain']}/{name}"
                (tmp / new).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / r["path"], tmp / new)
                r["split"], r["path"] = "test", new


def _check_complete(out: Path, rows: list[dict], min_tissue: float) -> None:
    for split in ("train", "test"):
        for domain in "AB":
            if not any(r["split"] == split and r["domain"] == domain for r in rows):
                raise DataError(
                    f"{out}: no tiles for {split}{domain} ({len(rows)} tiles in all with "
                    f"min_tissue={min_tissue}); use a smaller tile, a lower min_tissue, or "
                    f"more source images (nothing was written)")


def manifest_mpp(folder: Path) -> float | None:
    """The µm/px of a prepared dataset's tiles (its manifest's median), or None."""
    path = folder / "manifest.parquet"
    if not path.is_file():
        return None
    try:
        schema = pq.read_schema(path)
        if "mpp" not in schema.names:
            return None
        values = [v for v in pq.read_table(path, columns=["mpp"]).column("mpp").to_pylist()
                  if v is not None]
    except (OSError, pa.ArrowException):
        return None
    return float(np.median(values)) if values else None


def _write_manifest(path: Path, rows: list[dict], params: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({"stain_search.prepare": json.dumps(params)})
    pq.write_table(table, path)


def prepare_dataset(src: str | Path, out: str | Path, *, layout: str = "auto", tile: int = 256,
                    overlap: int = 0, min_tissue: float = 0.5, test_fraction: float = 0.1,
                    seed: int = 0, mpp: float | None = None, level: int | None = None,
                    split_by: str = "auto") -> Path:
    """Tile the images and slides under ``src`` into a CycleGAN-layout dataset at ``out``.

    ``min_tissue``: the least tissue fraction a kept tile has;
    ``test_fraction`` and ``seed`` split sources without a split; ``mpp`` /
    ``level``: cut slides at that µm/px (resampled from the nearest finer
    level) or that pyramid level; ``split_by`` (:data:`SPLIT_BY`, for sources
    without a split): ``slide`` or ``tile``; ``auto`` is ``slide`` when any
    source is a scanner slide or ``mpp``/``level`` is given, else ``tile``.
    Returns ``out``.
    """
    if split_by not in ("auto", "slide", "tile"):
        raise ConfigError(f"--split-by {split_by!r}: unknown; known: auto, slide, tile")
    if tile < 16 or not 0 <= overlap < tile:
        raise ConfigError(f"tile must be ≥ 16 px and 0 ≤ overlap < tile; got tile={tile}, "
                          f"overlap={overlap}")
    if not 0 <= min_tissue <= 1 or not 0 < test_fraction < 1:
        raise ConfigError(f"min_tissue must be in [0, 1] and test_fraction in (0, 1); got "
                          f"{min_tissue}, {test_fraction}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not empty; choose a new folder or "
                        f"delete it")
    sources, layout = _gather(src, layout)
    _check_unique(sources)
    jobs = _jobs(sources)
    if layout != "pair":
        split_by = "layout"
    elif split_by == "auto":
        scanner = any(s.path.suffix.lower() in OPENSLIDE_EXTENSIONS for s in sources)
        split_by = "slide" if scanner or mpp is not None or level is not None else "tile"
    if split_by == "slide":
        _split_slides(jobs, test_fraction=test_fraction, seed=seed)
    total = sum(_tile_count(job, tile=tile, overlap=overlap, mpp=mpp, level=level)
                for job in jobs)
    with atomic_dir(out, overwrite=False) as tmp, \
            progress("tiling", total=total, unit="tiles") as advance:  # quiet off a terminal
        rows: list[dict] = []
        for i, job in enumerate(jobs, 1):
            advance(0, description=f"tiling {job.stem} ({i}/{len(jobs)})")
            rows += _cut(job, tmp, tile=tile, overlap=overlap, min_tissue=min_tissue,
                         test_fraction=test_fraction, seed=seed, mpp=mpp, level=level,
                         advance=advance)
        if split_by == "tile":
            _ensure_test_tiles(rows, tmp, seed=seed)
        _check_complete(out, rows, min_tissue)
        rows.sort(key=lambda r: (r["split"], r["domain"], r["path"]))
        _write_manifest(tmp / "manifest.parquet", rows, {
            "source": str(Path(src).expanduser().resolve()), "layout": layout, "tile": tile,
            "overlap": overlap, "min_tissue": min_tissue, "test_fraction": test_fraction,
            "seed": seed, "mpp": mpp, "level": level, "split_by": split_by,
            "split": SPLIT_BY[split_by]})
    return out
