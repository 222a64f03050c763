"""`data prepare` on a folder of whole slides: tiles at a µm/px, where each
came from in the manifest, and a split by slide, never by tile."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from stain_search.cli import main
from stain_search.data.folders import resolve_dataset
from stain_search.data.io import read_image
from stain_search.data.phantom import phantom_pair
from stain_search.data.prepare import manifest_mpp, prepare_dataset
from stain_search.deploy.pyramid import halve
from stain_search.errors import DataError
from test_slides import APERIO, write_pyramid_tiff

pytest.importorskip("openslide", reason="the `slides` extra (OpenSlide) is needed")


def slide_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(H&E, stain) of one 512 x 256 "section" (two phantom fields side by side)."""
    pairs = [phantom_pair("trichrome", 2 * i + k, size=256) for k in range(2)]
    stain = np.concatenate([p[2] for p in pairs], axis=1)
    he = np.concatenate([p[1] for p in pairs], axis=1)
    return np.ascontiguousarray(he), np.ascontiguousarray(stain)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A/ and B/ holding four Aperio-style .svs slides each (0.25 µm/px, 2 levels)."""
    root = tmp_path_factory.mktemp("slides")
    for i in range(4):
        he, stain = slide_pair(i)
        for domain, image in (("A", he), ("B", stain)):
            (root / domain).mkdir(exist_ok=True)
            write_pyramid_tiff(root / domain / f"case{i}.svs", image, description=APERIO,
                               mpp=None)
    return root


def test_cyclegan_listing_points_slides_to_prepare(slides, tmp_path):
    for d in ("trainA", "trainB", "testA", "testB"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "1.svs").write_bytes((slides / "A" / "case0.svs").read_bytes())
    with pytest.raises(DataError, match="whole slides are tiled into a dataset with"):
        resolve_dataset(tmp_path)


def test_prepare_tiles_slides_at_an_mpp_and_splits_by_slide(slides, tmp_path):
    out = prepare_dataset(slides, tmp_path / "out", tile=64, min_tissue=0.3, mpp=0.5,
                          test_fraction=0.25)
    table = pq.read_table(out / "manifest.parquet")
    params = json.loads(table.schema.metadata[b"stain_search.prepare"])
    assert params["split_by"] == "slide" and "no test tile comes from a training slide" \
        in params["split"]
    rows = table.to_pylist()
    assert rows and {r["level"] for r in rows} == {1}  # 0.5 µm/px: level 1 of 0.25
    assert all(r["mpp"] == pytest.approx(0.5) for r in rows) and manifest_mpp(out) == 0.5
    assert {r["downsample"] for r in rows} == {2.0}
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["source"].split("/")[-1], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())  # a slide is in one split only
    assert {next(iter(s)) for s in splits_of.values()} == {"train", "test"}
    # A tile holds level 1's pixels at (x, y) / downsample.
    r = next(r for r in rows if r["domain"] == "A")
    he = halve(slide_pair(int(r["source"].split("case")[1][0]))[0])
    y, x = r["y"] // 2, r["x"] // 2
    assert np.array_equal(read_image(out / r["path"]), he[y:y + 64, x:x + 64])


def test_cli_prepare_by_level_and_bad_level(slides, tmp_path, capsys):
    assert main(["data", "prepare", str(slides), str(tmp_path / "l0"), "--tile", "128",
                 "--level", "0", "--min-tissue", "0.3"]) == 0
    rows = pq.read_table(tmp_path / "l0" / "manifest.parquet").to_pylist()
    assert {r["level"] for r in rows} == {0}
    assert all(r["mpp"] == pytest.approx(0.25) for r in rows)
    assert main(["data", "prepare", str(slides), str(tmp_path / "bad"), "--level", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--level 4 does not exist" in err
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
