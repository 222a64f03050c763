"""PyTorch datasets: unpaired training crops and deterministic evaluation crops.

Training follows the CycleGAN reference's ``unaligned_dataset.py`` (Zhu et
al., 2017): item ``i`` is A image ``i`` with a B image drawn at random, and
an epoch is as long as the larger domain. Augmentation is a random crop,
flips and — because tissue has no "up" — 90° rotations. Each item gets one
random number and seeds its own NumPy generator with (seed, index, that
number), so workers never share a random stream (the classic
NumPy-in-workers bug). The training loader's sampler
(:mod:`stain_search.data.loader`) hands each item its number with its index,
so an item's crop depends on (seed, epoch, position) only — never on how
many workers there are; indexed by a bare int, an item draws the number from
torch's generator instead.

Each process decodes a source image once: :class:`DecodedImages` keeps the
decoded (and resized) images, least recently used out first, within a byte
budget. A 1024² JPEG costs tens of milliseconds to decode and its crop well
under one, so without it the loader, not the model, sets the pace.

``EvalDataset`` takes a fixed centre crop of each test image, with its paired
target where one exists (sample figures); the per-epoch evaluation set is
tiled from every test image by :mod:`stain_search.data.eval_crops`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import cachetools
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from stain_search.data.augment import hed_jitter
from stain_search.data.io import IMAGE_EXTENSIONS, image_size, read_image, read_mask
from stain_search.errors import DataError


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [-1, 1] (the generators' tanh range)."""
    array = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(array) / 127.5 - 1.0


def to_image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] → (H, W, 3) or (B, H, W, 3) uint8."""
    x = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _size_after_load(size: tuple[int, int], load_size: int | None) -> tuple[int, int]:
    """(H, W) once the shorter side is scaled to ``load_size`` (None: unchanged)."""
    if load_size is None:
        return size
    h, w = size
    return (load_size, max(load_size, round(w * load_size / h))) if h <= w \
        else (max(load_size, round(h * load_size / w)), load_size)


def _resize_shorter(image: np.ndarray, size: int, *,
                    resample: Image.Resampling = Image.BICUBIC) -> np.ndarray:
    """Scale so the shorter side is ``size`` (bicubic, as the reference)."""
    h, w = image.shape[:2]
    new = _size_after_load((h, w), size)
    return np.asarray(Image.fromarray(image).resize((new[1], new[0]), resample))


def _too_small(path: Path, size: tuple[int, int], crop: int, load_size: int | None) -> DataError:
    resized = f", {load_size} px on the shorter side after `data.load_size`" if load_size else ""
    return DataError(f"{path}: image is {size[1]}x{size[0]} px{resized}, smaller than the "
                     f"{crop}x{crop} crop; lower `data.crop` (or raise `data.load_size`) "
                     f"or remove the image")


def check_files(files: Iterable[str | Path], crop: int, *, load_size: int | None = None) -> None:
    """Fail early: every file is an image at least ``crop`` on each side.

    Reads headers only (cheap), so a trainer can check a whole dataset
    before it writes anything. Damaged pixel data still surfaces later,
    when the image is decoded.
    """
    for path in map(Path, files):
        size = image_size(path)
        if min(_size_after_load(size, load_size)) < crop:
            raise _too_small(path, size, crop, load_size)


def verify_dataset(path: str, layout: str, crop: int, *, eval_crop: int | None = None,
                   load_size: int | None = None) -> str | None:
    """Pre-flight for a training run or a search: every file of the dataset
    decodes and is large enough, checked before anything is written or Ray
    starts (a truncated tile must cost a second, not a failed trial).

    Decodes every image once, unlike ``check_files`` (headers only): damage
    in the pixel data is found here too. Returns the line naming what the
    folders hold besides images (:func:`left_out_line`), or None.
    """
    from stain_search.data.folders import resolve_dataset

    files = resolve_dataset(path, layout)
    for group, size in (((*files.train_a, *files.train_b), crop),
                        ((*files.test_a, *files.test_b), eval_crop or crop)):
        check_files(group, size, load_size=load_size)
        for file in group:
            _load(Path(file), size, load_size)
    return left_out_line(files)


def left_out_line(files) -> str | None:
    """One line naming what the dataset's image folders hold besides its images
    (a subfolder, a note, a format it does not read), or None: every file the
    user gave is either used or named."""
    used = {Path(p) for split in (files.train_a, files.train_b, files.test_a, files.test_b)
            for p in split}
    folders = sorted({p.parent for p in used})
    left = sorted(p for folder in folders for p in folder.iterdir()
                  if not p.name.startswith(".") and p not in used)
    if not left:
        return None
    root = Path(files.root)
    names = [str(p.relative_to(root)) if root in p.parents else str(p) for p in left]
    shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
    return (f"{len(left)} entr{'y' if len(left) == 1 else 'ies'} of {root} skipped (not an "
            f"image this tool reads: {', '.join(sorted(IMAGE_EXTENSIONS))}): {shown}")


def _load(path: Path, crop: int, load_size: int | None) -> np.ndarray:
    image = read_image(path)
    if load_size is not None:
        image = _resize_shorter(image, load_size)
    if min(image.shape[:2]) < crop:
        raise _too_small(path, image.shape[:2], crop, load_size)
    return image


def decoded_bytes(size: tuple[int, int], load_size: int | None) -> int:
    """Bytes of an (H, W) image once decoded to RGB uint8 (and resized)."""
    h, w = _size_after_load(size, load_size)
    return h * w * 3


class DecodedImages:
    """Decoded training images of one process, LRU by bytes.

    ``max_bytes`` 0 keeps nothing: every call decodes (the behaviour before
    the cache). Pickling (a spawned DataLoader worker) carries the budget,
    not the images: each worker fills its own.
    """

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = int(max_bytes)
        self._images: cachetools.LRUCache | None = (
            cachetools.LRUCache(maxsize=self.max_bytes, getsizeof=lambda a: a.nbytes)
            if self.max_bytes > 0 else None)
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    def __len__(self) -> int:
        return 0 if self._images is None else len(self._images)

    @property
    def bytes(self) -> int:
        return 0 if self._images is None else int(self._images.currsize)

    def load(self, path: Path, crop: int, load_size: int | None) -> np.ndarray:
        """The decoded image at ``path`` (read-only: crops are views of it)."""
        if self._images is None:
            return _load(path, crop, load_size)
        key = (str(path), load_size)
        image = self._images.get(key)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        image = _load(path, crop, load_size)
        image.setflags(write=False)
        if image.nbytes <= self.max_bytes:  # larger than the whole budget: not kept
            self._images[key] = image
        return image


def _cap(files: Sequence[str | Path], max_images: int | None) -> list[Path]:
    return [Path(p) for p in files][:max_images]


class UnpairedDataset(Dataset):
    """Items {"A": (3, crop, crop), "B": (3, crop, crop)} in [-1, 1], unaligned.

    ``max_images`` keeps the first N files (sorted order) of each domain;
    ``cache_bytes`` is this process's :class:`DecodedImages` budget (0: decode
    every item, as the reference does). Index with ``i`` or ``(i, number)``.
    """

    def __init__(self, files_a: Sequence[str | Path], files_b: Sequence[str | Path], *,
                 crop: int, load_size: int | None = None, flip: bool = True,
                 rot90: bool = True, max_images: int | None = None, seed: int = 0,
                 cache_bytes: int = 0, hed_jitter: float = 0.0) -> None:
        self.files_a = _cap(files_a, max_images)
        self.files_b = _cap(files_b, max_images)
        if not self.files_a or not self.files_b:
            empty = "A" if not self.files_a else "B"
            raise DataError(f"no training images in domain {empty}")
        self.crop, self.load_size = crop, load_size
        self.flip, self.rot90 = flip, rot90
        self.seed, self.hed_jitter = seed, hed_jitter  # data.hed_jitter (data.augment)
        self.images = DecodedImages(cache_bytes)

    def set_cache(self, max_bytes: int) -> None:
        """Give each process that reads items a cache of ``max_bytes`` (emptied)."""
        self.images = DecodedImages(max_bytes)

    def decoded_bytes(self) -> int:
        """What caching every training image would take (from the headers)."""
        unique = {*self.files_a, *self.files_b}
        return sum(decoded_bytes(image_size(p), self.load_size) for p in unique)

    def __len__(self) -> int:
        return max(len(self.files_a), len(self.files_b))

    def _augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        image = image[y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.flip and rng.random() < 0.5:
            image = image[::-1]
        if self.rot90:
            image = np.rot90(image, int(rng.integers(0, 4)))
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        if isinstance(key, tuple):
            index, draw = map(int, key)
        else:
            index, draw = int(key), int(torch.randint(0, 2**62, (1,)).item())
        rng = np.random.default_rng([self.seed, index, draw])
        path_a = self.files_a[index % len(self.files_a)]
        path_b = self.files_b[int(rng.integers(len(self.files_b)))]
        a = self._augment(self.images.load(path_a, self.crop, self.load_size), rng)
        b = self._augment(self.images.load(path_b, self.crop, self.load_size), rng)
        a = hed_jitter(a, self.hed_jitter, rng)  # H&E only; draws nothing when off
        return {"A": to_tensor(a), "B": to_tensor(b),
                "A_path": str(path_a), "B_path": str(path_b)}


def centre_crop(image: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None:
        return image
    h, w = image.shape[:2]
    y, x = (h - crop) // 2, (w - crop) // 2
    return image[y:y + crop, x:x + crop]


class EvalDataset(Dataset):
    """Items {"A", ["B"], ["mask"], "name"}: fixed centre crops for evaluation.

    With ``pairs`` (``(a, b)`` paths), every item carries its target "B" and
    A files without a partner are skipped, so batches stay uniform. With
    ``masks`` (stem → mask file, see ``DatasetFiles.masks``), every item also
    carries its (1, crop, crop) bool "mask", found by file stem.
    ``crop=None`` keeps whole images; ``load_size`` resizes as in training
    (masks are resized with nearest-neighbour).
    """

    def __init__(self, files_a: Sequence[str | Path], *,
                 pairs: Sequence[tuple[str | Path, str | Path]] | None = None,
                 crop: int | None, load_size: int | None = None,
                 masks: dict[str, str | Path] | None = None) -> None:
        files = [Path(p) for p in files_a]
        self.targets: dict[Path, Path] | None = None
        if pairs is not None:
            self.targets = {Path(a): Path(b) for a, b in pairs}
            files = [p for p in files if p in self.targets]
            if not files:
                raise DataError("none of the evaluation images has a paired target")
        if masks is not None:
            missing = [p for p in files if p.stem not in masks]
            if missing:
                raise DataError(f"{missing[0]}: no mask with the same name among the "
                                f"{len(masks)} masks given")
        self.files, self.crop, self.load_size, self.masks = files, crop, load_size, masks

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, path: Path) -> torch.Tensor:
        return to_tensor(centre_crop(_load(path, self.crop or 0, self.load_size), self.crop))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        path = self.files[index]
        item: dict[str, torch.Tensor | str] = {"A": self._image(path), "name": path.stem}
        if self.targets is not None:
            item["B"] = self._image(self.targets[path])
        if self.masks is not None:
            mask = read_mask(self.masks[path.stem])
            if self.load_size is not None:
                mask = _resize_shorter(mask.astype(np.uint8) * 255, self.load_size,
                                       resample=Image.NEAREST) > 127
            mask = np.ascontiguousarray(centre_crop(mask, self.crop))
            item["mask"] = torch.from_numpy(mask)[None]  # (1, crop, crop)
        return item
