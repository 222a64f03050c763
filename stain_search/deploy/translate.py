"""Translate tiles and whole slides with an exported generator G: H&E → stain.

The translator runs G over a slide in overlapping tiles
(:mod:`~stain_search.deploy.tiling`), with the instance-norm statistics the
``norm_stats`` strategy picks (:mod:`~stain_search.deploy.norm_stats`), at
the resolution G was trained at (:mod:`~stain_search.data.resolution`),
optionally stain-normalised first (:mod:`~stain_search.deploy.stain_norm`),
and hands the result to a pyramid writer (:mod:`~stain_search.deploy.pyramid`).
Slides are read through :mod:`stain_search.data.slides` (OpenSlide, tifffile,
Pillow).

Background. Tiles with less tissue than ``min_tissue`` — read off the tissue
mask of ``stain_search.data`` computed once on a thumbnail of the whole
slide, as whole-slide tools do, so no glass tile is decoded just to judge it
— are copied through untouched and left out of the statistics; a slide with
no tissue at all is an error, not a copy.

Memory. Tiles are visited column strip by column strip, each strip top to
bottom, in every pass, so the decoded-segment cache and the blending buffer
are one strip wide and one tile row high whatever the slide's size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from stain_search.atomic import OUTPUT_MARKER, atomic_dir, check_replaceable
from stain_search.data.io import is_image_file, write_image
from stain_search.data.prepare import tissue_mask, tissue_threshold
from stain_search.data.slides import (SLIDE_EXTENSIONS, ArraySource, SlideSource, TiffSource,
                                      open_slide, read_padded)
from stain_search.deploy.model_io import load_model
from stain_search.deploy.norm_stats import NORM_STATS, Fixed, StopPass, with_stats_norms
from stain_search.deploy.pyramid import (DEFAULT_QUALITY, Piece, SlideMeta,
                                         assemble, check_output_suffix, compression_options,
                                         pyramid_writer, write_pyramid)
from stain_search.data.resolution import ResampledSource, plan_resolution
from stain_search.deploy.stain_norm import Normalizer, build_normalizer
from stain_search.deploy.tiling import (STRIP_PX, Blender, Grid, Tile, default_overlap,
                                        default_tile)
from stain_search.errors import ConfigError, DataError

MAX_IN_MEMORY_PIXELS = 16384 * 16384  # non-TIFF outputs are built in memory


@dataclass
class RunStats:
    """What one translation did (the benchmark reads it)."""

    tiles: int = 0
    tissue_tiles: int = 0
    passes: int = 0  # statistics passes before the output pass
    forwards: int = 0  # tile forwards, all passes (a strip-boundary tile counts twice)
    seconds: float = 0.0
    level: int = 0  # the slide level read
    scale: float = 1.0  # resampling of that level
    mpp: float | None = None  # µm/px G saw


class Run:
    """One source through one translator: tissue flags, passes, blending."""

    def __init__(self, tr: "Translator", source: SlideSource):
        self.tr, self.source = tr, source
        self.grid = Grid.build(source.height, source.width, tile=tr.tile, overlap=tr.overlap,
                               depth=tr.depth)
        self.tiles = self.grid.tiles()  # row-major: index row * ncols + col
        self.strips = self.grid.strips(width=tr.strip)
        if isinstance(source, TiffSource):
            widest = max(s.bx1 - s.bx0 for s in self.strips)
            source.keep_region(self.grid.tile_h, widest)
        self.tissue: list[bool] = [True] * len(self.tiles)
        self.normalize: Callable[[np.ndarray], np.ndarray] | None = None
        name = getattr(source, "name", "image")
        if tr.min_tissue > 0 or tr.normalizer is not None:
            thumb = source.thumbnail()
            mask = tissue_mask(thumb, threshold=tissue_threshold(thumb))
            if tr.min_tissue > 0:
                if not mask.any():
                    raise DataError(f"{name}: no tissue anywhere on the slide (its tissue mask "
                                    f"is empty); check the file, or pass --min-tissue 0 to "
                                    f"translate it all")
                self.tissue = self.tissue_flags(mask)
            if tr.normalizer is not None:  # the slide's stain colours, estimated once
                self.normalize = tr.normalizer.for_slide(thumb[mask], name=name)
        self.stats = RunStats(tiles=len(self.tiles))

    def visits(self, *, once: bool) -> list[Tile]:
        """Tiles strip by strip, each strip row by row; ``once``: a tile shared
        by two strips only in the first (statistics passes)."""
        ncols, seen, out = len(self.grid.xs), set(), []
        for strip in self.strips:
            for row in range(len(self.grid.ys)):
                for col in strip.cols:
                    i = row * ncols + col
                    if once and i in seen:
                        continue
                    seen.add(i)
                    out.append(self.tiles[i])
        return out

    def index(self, tile: Tile) -> int:
        return tile.row * len(self.grid.xs) + tile.col

    def pixels(self, tile: Tile) -> np.ndarray:
        """The tile as stored (what background tiles pass through)."""
        return read_padded(self.source, tile.y, tile.x, self.grid.tile_h, self.grid.tile_w)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:  # (B, h, w, 3) uint8
        return pixels if self.normalize is None else self.normalize(pixels)

    def tissue_flags(self, mask: np.ndarray) -> list[bool]:
        """Per tile: is its tissue fraction, read off the thumbnail's tissue mask
        (one mask for the slide, no tile decoded for it), at least min_tissue?"""
        sy, sx = mask.shape[0] / self.source.height, mask.shape[1] / self.source.width
        th, tw = self.grid.tile_h, self.grid.tile_w
        flags = []
        for t in self.tiles:
            y1, x1 = min(t.y + th, self.source.height), min(t.x + tw, self.source.width)
            part = mask[int(t.y * sy):max(int(t.y * sy) + 1, int(np.ceil(y1 * sy))),
                        int(t.x * sx):max(int(t.x * sx) + 1, int(np.ceil(x1 * sx)))]
            flags.append(bool(part.size) and float(part.mean()) >= self.tr.min_tissue)
        return flags

    def is_tissue(self, tile: Tile) -> bool:
        return self.tissue[self.index(tile)]

    def tissue_batches(self, desc: str) -> Iterator[tuple[list[Tile], np.ndarray]]:
        """Batches of tissue tiles (background ones skipped), each tile once."""
        batch: list[tuple[Tile, np.ndarray]] = []
        for tile in self.tr.progress_bar(self.visits(once=True), desc):
            if not self.is_tissue(tile):
                continue
            batch.append((tile, self.model_input(self.pixels(tile))))
            if len(batch) == self.tr.batch_size:
                yield [t for t, _ in batch], np.stack([p for _, p in batch])
                batch = []
        if batch:
            yield [t for t, _ in batch], np.stack([p for _, p in batch])

    def forward(self, pixels: np.ndarray, fixed: Fixed) -> torch.Tensor | None:
        """(B, h, w, 3) uint8 → (B, h, w, 3) float32 in [0, 255] on the device;
        None when a hook stopped the pass early."""
        tr = self.tr
        # NCHW-contiguous, as to_tensor makes it: another memory layout may pick
        # another conv algorithm (and differ in the last float bit).
        x = torch.from_numpy(pixels).to(tr.device).permute(0, 3, 1, 2).contiguous()
        x = x.float() / 127.5 - 1.0
        for norm, stats in zip(tr.norms, fixed):
            norm.fixed = stats
        self.stats.forwards += len(pixels)
        try:
            y = tr.net(x)  # (B, 3, h, w) in [-1, 1]
        except StopPass:
            return None
        finally:
            for norm in tr.norms:
                norm.fixed = None
        return ((y.clamp(-1, 1) + 1.0) * 127.5).permute(0, 2, 3, 1)

    def statistics_pass(self, desc: str, fixed: Callable[[list[Tile]], Fixed],
                        hooks: dict[int, Callable[[torch.Tensor, list[Tile]], None]],
                        *, stop_after: int | None = None) -> None:
        self.stats.passes += 1
        current: list[Tile] = []
        for k, fn in hooks.items():
            def hook(x, fn=fn, k=k):
                fn(x, current)
                if k == stop_after:
                    raise StopPass
            self.tr.norms[k].hook = hook
        try:
            for tiles, pixels in self.tissue_batches(desc):
                current[:] = tiles
                self.forward(pixels, fixed(tiles))
        finally:
            for norm in self.tr.norms:
                norm.hook = None

    def output(self, fixed: Callable[[list[Tile]], Fixed]) -> Iterator[Piece]:
        """The translated image as (y, x, block) pieces, strip by strip."""
        pending: list[tuple[Tile, np.ndarray, bool]] = []
        bar = iter(self.tr.progress_bar(self.visits(once=False), "translating"))

        def run_pending(blender: Blender) -> Iterator[Piece]:
            todo = [i for i, (_, _, tissue) in enumerate(pending) if tissue]
            out = None
            if todo:
                tiles = [pending[i][0] for i in todo]
                out = self.forward(self.model_input(np.stack([pending[i][1] for i in todo])),
                                   fixed(tiles))
                out = out.cpu().numpy()
            j = 0
            for tile, pixels, tissue in pending:
                if tissue:
                    result, j = out[j], j + 1
                else:  # background: the input itself
                    result = pixels.astype(np.float32)
                yield from blender.add(tile, result)
            pending.clear()

        for strip in self.strips:
            blender = Blender(self.grid, strip)
            for _ in range(len(self.grid.ys) * len(strip.cols)):
                tile = next(bar)
                pixels = self.pixels(tile)
                pending.append((tile, pixels, self.is_tissue(tile)))
                # Background tiles wait only for the tissue tiles before them; the
                # cap bounds how many pile up in a batch's wake.
                if sum(t for _, _, t in pending) == self.tr.batch_size \
                        or len(pending) >= 4 * self.tr.batch_size:
                    yield from run_pending(blender)
            yield from run_pending(blender)
            yield from blender.close()
        self.stats.tissue_tiles = sum(bool(t) for t in self.tissue)


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device


class Translator:
    """G, ready to translate arrays, files and folders tile by tile.

    ``depth`` is the U-Net's (``model.depth``); ``tile``/``overlap`` default
    to :func:`~stain_search.deploy.tiling.default_tile`/``default_overlap``;
    ``norm_stats`` is a key of ``NORM_STATS``; ``kernel`` the KIN
    neighbourhood in tiles; ``min_tissue`` the tissue fraction below which a
    tile passes through (0: translate every tile); ``model_mpp`` the µm/px G
    was trained at; ``normalizer`` a
    :class:`~stain_search.deploy.stain_norm.Normalizer`, fitted to each slide
    and applied to every tile G sees; ``strip`` the
    column-strip width in px (memory).
    """

    def __init__(self, generator: nn.Module, *, depth: int,
                 device: str | torch.device | None = None,
                 tile: int | None = None, overlap: int | None = None, norm_stats: str = "global",
                 kernel: int = 3, min_tissue: float = 0.01, batch_size: int = 4,
                 progress: bool = False, compression: str = "jpeg",
                 quality: int = DEFAULT_QUALITY, model_mpp: float | None = None,
                 normalizer: Normalizer | None = None,
                 strip: int = STRIP_PX):
        self.depth, self.step = depth, 2 ** depth
        self.tile = default_tile(depth) if tile is None else tile
        self.overlap = default_overlap(depth, self.tile) if overlap is None else overlap
        self.check_options(norm_stats=norm_stats, kernel=kernel, min_tissue=min_tissue,
                           batch_size=batch_size, compression=compression, quality=quality)
        self.norm_stats, self.kernel, self.min_tissue = norm_stats, kernel, min_tissue
        self.batch_size, self.progress = batch_size, progress
        self.compression, self.quality = compression, quality
        self.model_mpp, self.normalizer, self.strip = model_mpp, normalizer, strip
        self.device = pick_device(device)
        self.net, self.norms = with_stats_norms(generator, step=self.step, device=self.device)
        self.last_run: RunStats | None = None

    def check_options(self, *, norm_stats: str, kernel: int, min_tissue: float,
                      batch_size: int, compression: str, quality: int) -> None:
        step, tile, overlap = self.step, self.tile, self.overlap
        if tile < step or tile % step:
            raise ConfigError(f"--tile {tile}: must be a positive multiple of 2**model.depth "
                              f"= {step} (the U-Net halves the image that many times)")
        if overlap < 0 or overlap % step or overlap >= tile:
            raise ConfigError(f"--overlap {overlap}: must be a multiple of {step} between 0 and "
                              f"the tile size {tile} (exclusive)")
        if norm_stats not in NORM_STATS:
            raise ConfigError(f"--norm-stats {norm_stats!r}: unknown; known: "
                              f"{', '.join(NORM_STATS)}")
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"--kernel {kernel}: must be an odd number of tiles ≥ 1")
        if not 0.0 <= min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue {min_tissue}: must be a fraction in [0, 1]")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        compression_options(compression, quality=quality)

    def progress_bar(self, items: list, desc: str) -> Iterable:
        if not self.progress:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="tile", leave=False, dynamic_ncols=True)

    def pieces(self, source: SlideSource) -> Iterator[Piece]:
        """The translated image of ``source``, as (y, x, block) pieces strip by strip."""
        t0 = time.perf_counter()
        run = Run(self, source)
        self.last_run = run.stats
        # One tile is the whole (padded) image: its own statistics are the
        # whole image's, exactly — no passes, and plain inference bit for bit.
        mode = "tile" if len(run.tiles) == 1 else self.norm_stats
        with torch.inference_mode():
            fixed = NORM_STATS[mode](run)
            for piece in run.output(fixed):
                # Updated before each yield: a consumer may stop at the last piece.
                run.stats.seconds = time.perf_counter() - t0
                yield piece

    def translate_array(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → (H, W, 3) uint8."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} "
                            f"{image.dtype}")
        h, w = image.shape[:2]
        return assemble(self.pieces(ArraySource(image)), height=h, width=w)

    def translate_file(self, src: str | Path, dst: str | Path, *, mpp: float | None = None,
                       level: int | None = None) -> Path:
        """One slide or image → ``dst`` (its suffix picks the format: .ome.tif and
        .tif are pyramidal); ``mpp``/``level`` override the model's resolution."""
        src, dst = Path(src), Path(dst)
        check_output_suffix(dst)
        source: SlideSource = open_slide(src)
        try:
            plan = plan_resolution(source, model_mpp=self.model_mpp, mpp=mpp, level=level)
            view = source if plan.scale == 1.0 else ResampledSource(source, plan.scale)
            meta = SlideMeta(mpp=plan.mpp, name=src.stem,
                             icc_profile=getattr(source, "icc_profile", None))
            pieces = self.pieces(view)
            if pyramid_writer(dst) is not None:
                out = write_pyramid(pieces, dst, height=view.height, width=view.width, meta=meta,
                                    compression=self.compression, quality=self.quality)
            elif view.height * view.width > MAX_IN_MEMORY_PIXELS:
                raise DataError(f"{src}: {view.width}x{view.height} px is too large to write as "
                                f"{dst.suffix}; write a .ome.tif or .tif (pyramidal, streamed)")
            else:
                out = write_image(dst, assemble(pieces, height=view.height, width=view.width))
            if self.last_run is not None:
                self.last_run.level, self.last_run.scale = plan.level, plan.scale
                self.last_run.mpp = plan.mpp
            return out
        finally:
            source.close()


# --- files and folders ------------------------------------------------------------------------

def output_name(path: Path) -> str:
    """A folder's file keeps its name; a scanner slide becomes a pyramidal .tif."""
    return path.with_suffix(".tif").name if path.suffix.lower() in SLIDE_EXTENSIONS - {
        ".tif", ".tiff"} else path.name


def translate_path(translator: Translator, src: str | Path, dst: str | Path, *,
                   overwrite: bool = False, mpp: float | None = None,
                   level: int | None = None) -> list[Path]:
    """A file → a file, or a folder of images and slides → a folder (same
    names); all or nothing."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if src.resolve() == dst.resolve():
        raise DataError(f"{dst}: the output would overwrite the input; pick another name")
    if dst.exists() and not overwrite:
        raise DataError(f"{dst}: already exists; pass --overwrite or pick another name")
    if src.is_file():
        if dst.is_dir():
            raise DataError(f"{dst}: is a folder; give an output file name (e.g. out.ome.tif)")
        return [translator.translate_file(src, dst, mpp=mpp, level=level)]
    if dst.exists() or dst.is_symlink():  # a folder is replaced only if it is an earlier output
        check_replaceable(dst, ours=lambda d: (d / OUTPUT_MARKER).is_file(),
                          what="a folder `stain-search translate` wrote")
    files = sorted(p for p in src.iterdir() if is_image_file(p) or (
        p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_EXTENSIONS))
    if not files:
        raise DataError(f"{src}: no images or slides to translate (extensions: "
                        f"{', '.join(sorted(SLIDE_EXTENSIONS | {'.png', '.jpg'}))} ...)")
    with atomic_dir(dst) as tmp:
        (tmp / OUTPUT_MARKER).write_text(f"written by `stain-search translate` from {src}\n")
        for path in files:
            translator.translate_file(path, tmp / output_name(path), mpp=mpp, level=level)
    return [dst / output_name(p) for p in files]


def translate(model: str | Path, src: str | Path, dst: str | Path, *,
              tracking_uri: str | None = None, overwrite: bool = False,
              device: str | None = None, mpp: float | None = None, level: int | None = None,
              normalize: str = "none", reference: str | Path | None = None,
              **options) -> list[Path]:
    """`stain-search translate`: MODEL (an export folder or models:/name@alias)
    applied to a file or a folder. ``options`` go to :class:`Translator`."""
    exported = load_model(model, tracking_uri=tracking_uri)
    normalizer = build_normalizer(normalize, reference=reference,
                                  stored=exported.info.get("stain_reference"))
    dev = pick_device(device)
    translator = Translator(exported.generator(device=dev), depth=exported.model.depth,
                            device=dev, model_mpp=exported.mpp, normalizer=normalizer,
                            **options)
    return translate_path(translator, src, dst, overwrite=overwrite, mpp=mpp, level=level)
