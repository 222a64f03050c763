"""Finding a dataset's images in the folder layouts users actually have.

A dataset is two domains — A (H&E) and B (the target stain) — each with a
train and a test split. Public datasets arrive in a few layouts:

- ``cyclegan``: ``trainA/ trainB/ testA/ testB/`` (Zhu et al., 2017; also the
  built-in phantom);
- ``bci``: ``HE/{train,test}/ IHC/{train,test}/`` (BCI, Liu et al., 2022);
- ``mist``: ``[TrainValAB/]trainA/ trainB/ valA/ valB/`` (MIST, Li et al., 2023);
- ``pair``: two flat folders ``A/ B/`` (or ``HE/ IHC/``), split here into
  train and test by hashing file names, so the split never changes when
  files are added and a registered pair always lands in the same split.

``auto`` recognises the layout from the sub-folders; test images of A and
B with the same file stem are pairs (a ground truth for SSIM/PSNR).
A folder written by ``stain-search data prepare`` (or its
``manifest.parquet``) is read through the manifest
(:mod:`stain_search.data.manifest`). ``builtin:<name>`` resolves to the generated phantom
(:mod:`stain_search.data.phantom`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stain_search.data.io import IMAGE_EXTENSIONS, is_image_file
from stain_search.data.manifest import manifest_file, read_manifest
from stain_search.data.phantom import builtin_dataset
from stain_search.data.slides import SLIDE_EXTENSIONS
from stain_search.errors import ConfigError, DataError

SPLITS = ("train_a", "train_b", "test_a", "test_b")


@dataclass
class DatasetFiles:
    """Every image of a dataset, by domain and split."""

    root: Path
    layout: str
    train_a: list[Path]
    train_b: list[Path]
    test_a: list[Path]
    test_b: list[Path]
    pairs: list[tuple[Path, Path]]  # (test A, test B) with the same stem
    key: str  # fingerprint of the file list, sizes and mtimes (caches FID reference stats)
    masks: dict[str, Path] = field(default_factory=dict)  # test stem → positive-nucleus mask
    stain: str | None = None  # target stain where known: "ki67", "her2", "ihc" or "trichrome"


# --- listing --------------------------------------------------------------------

def list_images(folder: Path, *, slides: bool = False) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name;
    ``slides``: whole-slide files too (.svs, .ndpi, .mrxs, ...: `data prepare`
    tiles them, training reads only tiles)."""
    return sorted(p for p in folder.iterdir() if is_image_file(p) or (
        slides and p.is_file() and not p.name.startswith(".")
        and p.suffix.lower() in SLIDE_EXTENSIONS))


def _images(folder: Path, *, layout: str, expected: str, slides: bool = False) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: missing folder for the {layout} layout "
                        f"(expected {expected})")
    images = list_images(folder, slides=slides)
    if not images:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        found = (f"it holds {len(others)} other entries, e.g. {', '.join(others[:3])}"
                 if others else "it is empty")
        hint = ""
        if not slides and any(Path(o).suffix.lower() in SLIDE_EXTENSIONS for o in others):
            hint = "; whole slides are tiled into a dataset with `stain-search data prepare`"
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"{found}. The {layout} layout expects {expected}{hint}")
    return images


def _pairs(test_a: list[Path], test_b: list[Path]) -> list[tuple[Path, Path]]:
    by_stem = {p.stem: p for p in test_b}
    return [(a, by_stem[a.stem]) for a in test_a if a.stem in by_stem]


def fingerprint(root: Path, files: list[Path]) -> str:
    """Stable across runs while the files stay put; changes when any file is
    added, removed, resized or rewritten (or copied with new mtimes)."""
    h = hashlib.sha256()
    for p in files:
        stat = p.stat()
        h.update(f"{p.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- layouts ----------------------------------------------------------------------

def _subdir(root: Path, name: str) -> bool:
    return (root / name).is_dir()


def _split_folders(layout: str, expected: str, folders: dict[str, Path], *,
                   slides: bool = False) -> dict[str, list[Path]]:
    return {split: _images(folders[split], layout=layout, expected=expected, slides=slides)
            for split in SPLITS}


def _cyclegan(root: Path, test_fraction: float, *, slides: bool = False
              ) -> dict[str, list[Path]]:
    return _split_folders("cyclegan", LAYOUTS["cyclegan"].expected, {
        "train_a": root / "trainA", "train_b": root / "trainB",
        "test_a": root / "testA", "test_b": root / "testB"}, slides=slides)


def _bci(root: Path, test_fraction: float, *, slides: bool = False
         ) -> dict[str, list[Path]]:
    return _split_folders("bci", LAYOUTS["bci"].expected, {
        "train_a": root / "HE" / "train", "train_b": root / "IHC" / "train",
        "test_a": root / "HE" / "test", "test_b": root / "IHC" / "test"}, slides=slides)


def _mist_base(root: Path) -> Path:
    return root / "TrainValAB" if _subdir(root, "TrainValAB") else root


def _mist(root: Path, test_fraction: float, *, slides: bool = False
          ) -> dict[str, list[Path]]:
    base = _mist_base(root)
    return _split_folders("mist", LAYOUTS["mist"].expected, {
        "train_a": base / "trainA", "train_b": base / "trainB",
        "test_a": base / "valA", "test_b": base / "valB"}, slides=slides)


def pair_folders(root: Path) -> tuple[Path, Path] | None:
    """The (A, B) folders of a pair layout, or None."""
    for a, b in (("A", "B"), ("HE", "IHC")):
        if _subdir(root, a) and _subdir(root, b):
            return root / a, root / b
    return None


def name_fraction(stem: str, *, seed: int = 0) -> float:
    """A file name's fixed pseudo-random position in [0, 1): the split key."""
    digest = hashlib.sha256(f"{seed}:{stem}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_name(stems: set[str], *, test_fraction: float, seed: int = 0) -> set[str]:
    """Stems that go to the test split: those hashing below ``test_fraction``,
    at least one. Depends only on each name, so adding files moves none."""
    test = {s for s in stems if name_fraction(s, seed=seed) < test_fraction}
    if not test and stems:
        test = {min(stems, key=lambda s: name_fraction(s, seed=seed))}
    return test


def _pair(root: Path, test_fraction: float, *, slides: bool = False) -> dict[str, list[Path]]:
    expected = LAYOUTS["pair"].expected
    folders = pair_folders(root)
    if folders is None:
        raise DataError(f"{root}: missing folders for the pair layout (expected {expected})")
    a = _images(folders[0], layout="pair", expected=expected, slides=slides)
    b = _images(folders[1], layout="pair", expected=expected, slides=slides)
    test = split_by_name({p.stem for p in a + b}, test_fraction=test_fraction)
    files = {"train_a": [p for p in a if p.stem not in test],
             "train_b": [p for p in b if p.stem not in test],
             "test_a": [p for p in a if p.stem in test],
             "test_b": [p for p in b if p.stem in test]}
    for split, folder in [("train_a", folders[0]), ("train_b", folders[1]),
                          ("test_a", folders[0]), ("test_b", folders[1])]:
        if not files[split]:
            kind = split.split("_")[0]
            raise DataError(f"{folder}: no images left for the {kind} split after holding out "
                            f"{test_fraction:.0%} of names for testing; the pair layout needs at "
                            f"least two images per folder (one to train on, one to test). "
                            f"Add images or arrange them as {LAYOUTS['cyclegan'].expected}")
    return files


@dataclass(frozen=True)
class Layout:
    expected: str  # shown in error messages
    detect: Callable[[Path], bool]  # does this folder look like this layout?
    # (root, test_fraction, *, slides) → splits; slides: list whole-slide files too
    collect: Callable[..., dict[str, list[Path]]]


LAYOUTS: dict[str, Layout] = {
    "cyclegan": Layout(
        "trainA/ trainB/ testA/ testB/",
        lambda r: (_subdir(r, "trainA") or _subdir(r, "trainB"))
        and (_subdir(r, "testA") or _subdir(r, "testB")
             or not (_subdir(r, "valA") or _subdir(r, "valB"))),
        _cyclegan),
    "bci": Layout(
        "HE/train/ HE/test/ IHC/train/ IHC/test/",
        lambda r: any(_subdir(r / d, s) for d in ("HE", "IHC") for s in ("train", "test")),
        _bci),
    "mist": Layout(
        "[TrainValAB/]trainA/ trainB/ valA/ valB/",
        lambda r: _subdir(r, "TrainValAB")
        or ((_subdir(r, "trainA") or _subdir(r, "trainB")) and (_subdir(r, "valA")
                                                              or _subdir(r, "valB"))),
        _mist),
    "pair": Layout(
        "two folders of images, A/ and B/ (or HE/ and IHC/), split by file name",
        lambda r: pair_folders(r) is not None
        and not any(_subdir(d, s) for d in pair_folders(r) for s in ("train", "test")),
        _pair),
}


def detect_layout(root: Path) -> str:
    """The one layout ``root`` matches; an error listing what was looked for otherwise."""
    matches = [name for name, layout in LAYOUTS.items() if layout.detect(root)]
    if len(matches) == 1:
        return matches[0]
    looked = "; ".join(f"{name}: {layout.expected}" for name, layout in LAYOUTS.items())
    if not matches:
        found = sorted(p.name + "/" for p in root.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found \
            else "no sub-folders"
        raise DataError(f"{root}: no known dataset layout (found {shown}). Looked for — "
                        f"{looked}. Arrange the folders so, or cut large images into a "
                        f"dataset with `stain-search data prepare`")
    raise DataError(f"{root}: matches several layouts ({', '.join(matches)}); set "
                    f"`data.layout` to one of them (or remove the extra folders)")


# --- the entry point ----------------------------------------------------------------

def _dataset_stain(root: Path, layout: str) -> str | None:
    meta = root / "phantom.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("stain")
    # BCI and MIST as shipped are HER2 IHC: DAB on membranes, not nuclei.
    if layout in ("bci", "mist"):
        return "her2"
    # A pair layout's IHC/ folder: DAB immunohistochemistry, marker unknown.
    return "ihc" if layout == "pair" and _subdir(root, "IHC") else None


def _masks(root: Path, test_b: list[Path]) -> dict[str, Path]:
    folder = root / "testB_mask"
    if not folder.is_dir():
        return {}
    stems = {p.stem for p in test_b}
    return {p.stem: p for p in list_images(folder) if p.stem in stems}


def _from_manifest(path: Path) -> DatasetFiles:
    splits, params = read_manifest(path)
    root = path.parent
    masks = _masks(root, splits["test_b"])
    every = [p for split in SPLITS for p in splits[split]] + sorted(masks.values())
    source = Path(params.get("source", root))
    return DatasetFiles(root=root, layout="manifest", **splits,
                        pairs=_pairs(splits["test_a"], splits["test_b"]),
                        key=fingerprint(root, [path, *every]), masks=masks,
                        stain=_dataset_stain(source, params.get("layout", "")))


def resolve_dataset(path: str | Path, layout: str = "auto", *,
                    test_fraction: float = 0.1, slides: bool = False) -> DatasetFiles:
    """Find every image of the dataset at ``path`` (a folder or ``builtin:<name>``).

    ``test_fraction`` applies only to the ``pair`` layout, which has no split.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(f"`data.layout`: unknown layout {layout!r}; known: auto, "
                          f"{', '.join(LAYOUTS)}")
    text = str(path)
    if text.startswith("builtin:"):
        if layout not in ("auto", "cyclegan"):
            raise ConfigError(f"`data.layout`: built-in datasets use the cyclegan layout, "
                              f"not {layout!r}; set it to auto")
        root, layout = builtin_dataset(text), "cyclegan"
    else:
        root = Path(text).expanduser()
        if not root.exists():
            raise DataError(f"{root}: no such folder (`data.path`); give a dataset folder or "
                            f"one of builtin:phantom-trichrome, builtin:phantom-ki67")
        # A `data prepare` output: its manifest, not the listing, says what is what.
        manifest = manifest_file(root) if layout == "auto" or root.is_file() else None
        if manifest is not None:
            return _from_manifest(manifest)
        if not root.is_dir():
            raise DataError(f"{root}: not a folder (`data.path` names the dataset's folder, "
                            f"which holds e.g. {LAYOUTS['cyclegan'].expected})")
        if layout == "auto":
            layout = detect_layout(root)
    splits = LAYOUTS[layout].collect(root, test_fraction, slides=slides)
    masks = _masks(root, splits["test_b"])
    every = [p for split in SPLITS for p in splits[split]] + sorted(masks.values())
    return DatasetFiles(root=root, layout=layout, **splits,
                        pairs=_pairs(splits["test_a"], splits["test_b"]),
                        key=fingerprint(root, every), masks=masks,
                        stain=_dataset_stain(root, layout))
