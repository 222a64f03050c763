"""Positive-nucleus F1 on synthetic DAB images with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.color import hed2rgb
from skimage.draw import disk

from stain_search.metrics.nuclei import (DAB_OD_THRESHOLD, PositiveNucleiF1, dab_density,
                                         match_count, positive_nuclei, positive_nuclei_f1)

SIZE = 64
# Nine well-separated nucleus centres on a 3x3 grid.
CENTRES = [(r, c) for r in (12, 32, 52) for c in (12, 32, 52)]


def tile(positive: list[tuple[int, int]], negative: list[tuple[int, int]] = (), *,
         radius: int = 4, seed: int = 0) -> np.ndarray:
    """(H, W, 3) [0, 1]: light haematoxylin background, blue negative and brown positive discs."""
    rng = np.random.default_rng(seed)
    hed = np.zeros((SIZE, SIZE, 3))
    hed[..., 0] = 0.01  # pale blue counterstain
    for centre in negative:
        hed[disk(centre, radius, shape=(SIZE, SIZE)) + (0,)] = 0.08
    for centre in positive:
        rr, cc = disk(centre, radius, shape=(SIZE, SIZE))
        hed[rr, cc, 0], hed[rr, cc, 2] = 0.03, 0.08  # DAB over a little haematoxylin
    rgb = hed2rgb(hed) + rng.normal(0, 0.01, (SIZE, SIZE, 3))
    return np.clip(rgb, 0, 1)


def test_detector_finds_brown_not_blue_nuclei():
    img = tile(CENTRES[:4], CENTRES[4:])
    found = positive_nuclei(img)
    assert len(found) == 4
    np.testing.assert_allclose(sorted(map(tuple, found)), sorted(CENTRES[:4]), atol=0.5)
    assert dab_density(img)[CENTRES[0]] > DAB_OD_THRESHOLD > dab_density(img)[CENTRES[5]]


def test_identical_images_score_one():
    img = tile(CENTRES[:6], CENTRES[6:])
    r = positive_nuclei_f1(img, img)
    assert r == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "n_pred": 6.0, "n_true": 6.0}


def test_half_the_positives_removed_halves_recall():
    target = tile(CENTRES[:8], CENTRES[8:])
    output = tile(CENTRES[:4], CENTRES[4:], seed=1)  # the other four now negative (blue)
    r = positive_nuclei_f1(output, target)
    assert (r["recall"], r["precision"], r["n_pred"], r["n_true"]) == (0.5, 1.0, 4.0, 8.0)
    assert r["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_extra_blobs_lower_precision_only():
    target = tile(CENTRES[:3])
    output = tile(CENTRES[:9], seed=2)
    r = positive_nuclei_f1(output, target)
    assert (r["recall"], r["precision"]) == (1.0, pytest.approx(1 / 3))


def test_small_shift_still_matches_but_far_shift_does_not():
    target = tile(CENTRES[:4])
    near = tile([(r + 2, c + 2) for r, c in CENTRES[:4]])
    far = tile([(r + 8, c) for r, c in CENTRES[:4]])
    assert positive_nuclei_f1(near, target, match_radius=5)["f1"] == 1.0
    assert positive_nuclei_f1(far, target, match_radius=5)["f1"] == 0.0


def test_empty_images_are_defined_not_nan():
    blank = tile([], CENTRES)
    assert positive_nuclei_f1(blank, blank) == {"f1": 1.0, "precision": 1.0, "recall": 1.0,
                                                "n_pred": 0.0, "n_true": 0.0}
    missed = positive_nuclei_f1(blank, tile(CENTRES[:2]))
    assert (missed["f1"], missed["precision"], missed["recall"]) == (0.0, 1.0, 0.0)
    invented = positive_nuclei_f1(tile(CENTRES[:2]), blank)
    assert (invented["f1"], invented["precision"], invented["recall"]) == (0.0, 0.0, 1.0)


def test_specks_below_min_area_are_ignored():
    img = tile(CENTRES[:2], radius=1)  # 5-pixel discs
    assert len(positive_nuclei(img, min_area=6)) == 0
    assert len(positive_nuclei(img, min_area=1)) == 2


def test_matching_is_one_to_one_and_maximal():
    # Greedy nearest-first would pair p0 with t1 (distance 1) and strand t0; optimal finds 2.
    pred = np.array([[0.0, 3.0], [0.0, 7.5]])
    true = np.array([[0.0, 0.0], [0.0, 4.0]])
    assert match_count(pred, true, radius=4.0) == 2
    assert match_count(pred[:1], np.repeat(true[1:], 3, axis=0), radius=4.0) == 1


def test_batches_sum_counts_and_tensor_wrapper_agrees():
    targets = [tile(CENTRES[:6]), tile(CENTRES[:2])]
    outputs = [tile(CENTRES[:3], seed=3), tile(CENTRES[:2] + CENTRES[7:], seed=4)]
    r = positive_nuclei_f1(np.stack(outputs), np.stack(targets))
    assert (r["n_true"], r["n_pred"], r["recall"], r["precision"]) == (8.0, 7.0, 5 / 8, 5 / 7)
    metric = PositiveNucleiF1()
    for out, tgt in zip(outputs, targets):  # one image per batch, tensors (1, 3, H, W)
        metric.update(*(torch.from_numpy(a).permute(2, 0, 1)[None].float() for a in (out, tgt)))
    assert metric.compute() == pytest.approx(r)


def test_real_ihc_image_self_consistent_and_blank_output_misses_everything():
    # A real colon section (membranous DAB, blue nuclei): the detector needs no tuning to
    # agree with itself, and an output without DAB finds nothing.
    ihc = skdata.immunohistochemistry()[:128, :128].astype(np.float64) / 255
    assert len(positive_nuclei(ihc)) >= 1
    assert positive_nuclei_f1(ihc, ihc)["f1"] == 1.0
    assert positive_nuclei_f1(np.full_like(ihc, 0.95), ihc)["recall"] == 0.0


def test_detector_recovers_phantom_ground_truth_masks():
    from skimage.measure import label, regionprops

    from stain_search.data.phantom import phantom_pair

    tp = n_pred = n_true = 0
    for index in range(3):
        tissue, _, target = phantom_pair("ki67", index, size=128)
        found = positive_nuclei(target / 255.0)
        truth = np.array([r.centroid for r in regionprops(label(tissue.positive))]).reshape(-1, 2)
        tp += match_count(found, truth, radius=5.0)
        n_pred, n_true = n_pred + len(found), n_true + len(truth)
    assert n_true > 0 and 2 * tp / (n_pred + n_true) >= 0.9
