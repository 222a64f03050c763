"""`data prepare`: keeps tissue, drops glass, writes a true manifest, never half a dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from stain_search.data import prepare
from stain_search.data.folders import resolve_dataset
from stain_search.data.io import read_image, write_image
from stain_search.data.prepare import prepare_dataset, tissue_mask
from stain_search.errors import ConfigError, DataError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-samples"
COLUMNS = ["source", "domain", "x", "y", "tile", "tissue_fraction", "split", "path"]


def slide(h: int, w: int, *, colour: tuple[int, int, int], tissue_until: int | None = None,
          seed: int = 0) -> np.ndarray:
    """Stained texture on the left, glass (near-white, noisy) right of ``tissue_until``."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(colour) + rng.normal(0, 12, (h, w, 3)), 0, 255)
    glass = np.clip(243 + rng.normal(0, 2, (h, w, 3)), 0, 255)
    if tissue_until is not None:
        img[:, tissue_until:] = glass[:, tissue_until:]
    return img.astype(np.uint8)


def pair_source(root: Path) -> Path:
    write_image(root / "A" / "slide.png", slide(512, 512, colour=(215, 140, 200), tissue_until=256))
    # The IHC of the same section: pale, easily mistaken for glass on its own.
    write_image(root / "B" / "slide.png", slide(512, 512, colour=(232, 228, 238), seed=1))
    return root


def test_tissue_mask():
    assert not tissue_mask(np.full((32, 32, 3), 250, np.uint8)).any()
    assert tissue_mask(slide(32, 32, colour=(215, 140, 200))).mean() > 0.95
    half = tissue_mask(slide(64, 64, colour=(215, 140, 200), tissue_until=32))
    assert half[:, :28].all() and not half[:, 36:].any()
    assert not tissue_mask(np.full((16, 16, 3), (5, 0, 2), np.uint8)).any()  # black, not tissue


def test_pair_source_drops_glass_and_writes_manifest(tmp_path):
    out = prepare_dataset(pair_source(tmp_path / "src"), tmp_path / "out", tile=128)
    table = pq.read_table(out / "manifest.parquet")
    assert table.column_names[:len(COLUMNS)] == COLUMNS  # slide columns follow
    rows = table.to_pylist()
    assert len(rows) == 2 * 8  # the 8 tissue tiles (left half of 4x4), in both domains
    assert all(r["x"] < 256 and r["tile"] == 128 for r in rows)
    a = {(r["x"], r["y"]): r for r in rows if r["domain"] == "A"}
    b = {(r["x"], r["y"]): r for r in rows if r["domain"] == "B"}
    assert a.keys() == b.keys()  # registered pair: cut and kept together
    assert all(r["tissue_fraction"] >= 0.5 and r["source"].endswith("A/slide.png")
               for r in a.values())
    for r in rows:
        tile = read_image(out / r["path"])
        assert tile.shape == (128, 128, 3)
        assert r["path"] == f"{r['split']}{r['domain']}/{Path(r['path']).name}"
    for domain in "AB":
        splits = {r["split"] for r in rows if r["domain"] == domain}
        assert splits == {"train", "test"}
    files = resolve_dataset(out)
    # A prepared folder is read through its manifest (its splits come from there).
    assert files.layout == "manifest" and len(files.pairs) == len(files.test_a) >= 1
    # The tile holds the source's pixels at (x, y).
    r = next(iter(a.values()))
    src = read_image(tmp_path / "src" / "A" / "slide.png")
    np.testing.assert_array_equal(read_image(out / r["path"]),
                                  src[r["y"]:r["y"] + 128, r["x"]:r["x"] + 128])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overlap_and_edge_strips(tmp_path):
    write_image(tmp_path / "src" / "A" / "s.png", slide(300, 200, colour=(215, 140, 200)))
    write_image(tmp_path / "src" / "B" / "t.png", slide(300, 200, colour=(140, 140, 215)))
    out = prepare_dataset(tmp_path / "src", tmp_path / "out", tile=128, overlap=64)
    rows = [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["domain"] == "A"]
    # Steps of 64: x ∈ {0, 64}, y ∈ {0, 64, 128}; the last partial strip is left out.
    assert sorted((r["x"], r["y"]) for r in rows) == [(x, y) for x in (0, 64)
                                                      for y in (0, 64, 128)]


def test_split_source_keeps_its_splits(tmp_path):
    src = tmp_path / "src"
    for folder, colour in [("trainA", (215, 140, 200)), ("trainB", (140, 140, 215)),
                           ("testA", (210, 150, 205)), ("testB", (150, 130, 210))]:
        write_image(src / folder / "s.png", slide(256, 256, colour=colour))
    tifffile.imwrite(src / "trainA" / "big.tif", slide(256, 384, colour=(215, 140, 200)),
                     photometric="rgb")
    out = prepare_dataset(src, tmp_path / "out", tile=128, test_fraction=0.5)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    for r in rows:
        assert f"/{r['split']}{r['domain']}/" in r["source"].replace("\\", "/")
    assert sum(r["source"].endswith("big.tif") for r in rows) == 6


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(DataError, match="choose a new folder or delete it"):
        prepare_dataset(pair_source(tmp_path / "src"), tmp_path / "out", tile=128)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_nothing_is_written_when_no_tissue(tmp_path):
    write_image(tmp_path / "src" / "A" / "s.png", np.full((256, 256, 3), 245, np.uint8))
    write_image(tmp_path / "src" / "B" / "s.png", np.full((256, 256, 3), 245, np.uint8))
    with pytest.raises(DataError, match="no tiles for trainA.*min_tissue"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", tile=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    src = pair_source(tmp_path / "src")
    calls = {"n": 0}
    real = prepare.write_image

    def failing(path, array, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(path, array, **kwargs)

    monkeypatch.setattr(prepare, "write_image", failing)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(src, tmp_path / "out", tile=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_arguments(tmp_path):
    src = pair_source(tmp_path / "src")
    with pytest.raises(ConfigError, match="overlap"):
        prepare_dataset(src, tmp_path / "o", tile=64, overlap=64)
    with pytest.raises(ConfigError, match="min_tissue"):
        prepare_dataset(src, tmp_path / "o", min_tissue=1.5)
    with pytest.raises(DataError, match="no such folder"):
        prepare_dataset(tmp_path / "missing", tmp_path / "o")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples (../shared) not available")
def test_real_he_is_mostly_tissue():
    img = read_image(SAMPLES / "mist" / "HE" / "100M2004069_21_29.jpg")
    assert tissue_mask(img).mean() > 0.8
