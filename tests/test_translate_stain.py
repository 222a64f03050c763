"""Input stain normalisation: a copy of a phantom slide stained differently
(HED concentrations scaled, as another lab's protocol would), normalised,
translates close to the original's translation; unnormalised it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed
from torch import nn

from stain_search.deploy.stain_norm import METHODS, Normalizer, build_normalizer
from stain_search.deploy.translate import Translator, translate_path
from stain_search.errors import ConfigError
from test_slides import he  # noqa: F401 - the 512² phantom slide fixture

pytest.importorskip("torchstain", reason="the `slides` extra (torchstain) is needed")

# Mean |Δ| of the normalised copy's translation from the original's, as a
# fraction of the unnormalised copy's: Macenko re-estimates the stain vectors
# (the change made here), Reinhard only matches LAB moments.
TOLERANCE = {"macenko": 0.25, "reinhard": 0.5}


def colour_generator() -> nn.Module:
    """A G whose output follows the input's colour (the tiny U-Net's instance
    norms would hide a colour shift): a fixed 1x1 channel mix."""
    g = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Tanh())
    with torch.no_grad():
        g[0].weight.copy_(torch.tensor([[0.2, 0.9, 0.1], [0.8, 0.1, 0.3],
                                        [0.1, 0.3, 0.9]])[..., None, None])
        g[0].bias.zero_()
    return g.eval()


def restained(image: np.ndarray, scale=(1.4, 0.6, 1.0)) -> np.ndarray:
    """More haematoxylin, less eosin (Ruifrok & Johnston's HED space)."""
    return np.clip(hed2rgb(rgb2hed(image) * scale) * 255, 0, 255).round().astype(np.uint8)


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("method", list(METHODS))
def test_normalised_copy_translates_like_the_original(he, tmp_path, method):  # noqa: F811
    g, kw = colour_generator(), dict(depth=3, tile=128, overlap=56, min_tissue=0.05)
    shifted = restained(he)
    original = Translator(g, **kw).translate_array(he)
    unnormalised = mean_diff(Translator(g, **kw).translate_array(shifted), original)
    ref = tmp_path / "reference.png"
    Image.fromarray(he).save(ref)
    normalizer = build_normalizer(method, reference=ref)
    (tmp_path / "in").mkdir()
    Image.fromarray(shifted).save(tmp_path / "in" / "shifted.png")
    tr = Translator(g, normalizer=normalizer, **kw)
    out = translate_path(tr, tmp_path / "in" / "shifted.png", tmp_path / "out.png")[0]
    normalised = mean_diff(np.asarray(Image.open(out)), original)
    print(f"\n{method}: |Δ| from the original's translation {unnormalised:.2f} → "
          f"{normalised:.2f}")
    assert unnormalised > 8  # the shift matters to G
    assert normalised <= TOLERANCE[method] * unnormalised


def test_per_slide_fit_keeps_tiles_seamless(he):  # noqa: F811
    """One fit per slide, a per-pixel map: tiled = whole-image normalisation."""
    n = Normalizer("macenko", METHODS["macenko"].fit(he.reshape(-1, 3)))
    fn = n.for_slide(restained(he).reshape(-1, 3))
    img = restained(he)
    assert np.array_equal(np.concatenate([fn(img[:, :200]), fn(img[:, 200:])], axis=1), fn(img))


def test_normalize_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown; known: none, macenko, reinhard"):
        build_normalizer("vahadane")
    with pytest.raises(ConfigError, match="no reference"):
        build_normalizer("macenko", stored=None)
    with pytest.raises(ConfigError, match="--reference without --normalize"):
        build_normalizer("none", reference=tmp_path / "x.png")
    assert build_normalizer("reinhard", stored={"reinhard": {"means": [1, 2, 3],
                                                             "stds": [1, 1, 1]}}).method == \
        "reinhard"


def test_hed_jitter_augments_only_the_he_crop(tmp_path):
    from stain_search.config import load_config
    from stain_search.data.augment import hed_jitter
    from stain_search.data.datasets import UnpairedDataset
    from stain_search.data.phantom import phantom_pair

    image = phantom_pair("trichrome", 0, size=64)[1]
    rng = np.random.default_rng(0)
    assert hed_jitter(image, 0.0, rng) is image
    jittered = hed_jitter(image, 0.05, np.random.default_rng(1))
    assert jittered.shape == image.shape and 0 < mean_diff(jittered, image) < 30
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(image).save(a)
    Image.fromarray(image).save(b)
    plain = UnpairedDataset([a], [b], crop=64, flip=False, rot90=False)[0, 7]
    aug = UnpairedDataset([a], [b], crop=64, flip=False, rot90=False, hed_jitter=0.05)[0, 7]
    assert torch.equal(plain["B"], aug["B"]) and not torch.equal(plain["A"], aug["A"])
    assert load_config(None, {"data.hed_jitter": 0.05}).data.hed_jitter == 0.05
    with pytest.raises(ConfigError, match="data.hed_jitter"):
        load_config(None, {"data.hed_jitter": 1.5})
