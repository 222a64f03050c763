"""Export a checkpoint, load it back without pickle, register it in MLflow."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from conftest import TINY_BASE
from stain_search.checkpoint import write_checkpoint
from stain_search.cli import main
from stain_search.config import load_config
from stain_search.data import to_image, to_tensor
from stain_search.data.phantom import phantom_pair
from stain_search.deploy.export import (FORMAT, INFO_FILE, WEIGHTS_FILE, ModelError,
                                        export_checkpoint, load_model, register_export)
from stain_search.deploy.translate import Translator
from stain_search.gan import CycleGAN


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A hand-made checkpoint of a tiny CycleGAN (weights perturbed off init)."""
    config = load_config(None, TINY_BASE)
    torch.manual_seed(0)
    gan = CycleGAN(config, device=torch.device("cpu"))
    with torch.no_grad():
        for p in gan.G.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint_epoch_0003"
    write_checkpoint(folder, state=gan.state_dict_full(),
                     meta={"epoch": 3, "metrics": {"fd_random": 12.5, "ssim_structure": 0.8},
                           "config": config.to_dict()})
    return folder, gan.G.eval(), config


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    folder, _, _ = checkpoint
    out = tmp_path_factory.mktemp("exports") / "tiny"
    return export_checkpoint(folder, out, provenance={"search": "tiny", "trial": "trial_x"})


@pytest.fixture(scope="module")
def image():
    return phantom_pair("trichrome", 2, size=64)[1]  # (64, 64, 3) uint8


def test_export_folder_is_self_contained(exported):
    info = json.loads((exported / INFO_FILE).read_text())
    assert info["format"] == FORMAT
    assert info["model"]["depth"] == TINY_BASE["model.depth"]
    assert info["input"]["normalisation"] == "x / 127.5 - 1"
    prov = info["provenance"]
    assert (prov["search"], prov["trial"], prov["epoch"]) == ("tiny", "trial_x", 3)
    assert prov["metrics"]["fd_random"] == 12.5
    assert sorted(p.name for p in exported.iterdir()) == \
        sorted([INFO_FILE, WEIGHTS_FILE, info["portable"]["file"]])


def test_export_load_translate_gives_the_in_memory_pixels(checkpoint, exported, image):
    _, g, _ = checkpoint
    model = load_model(exported)
    loaded = model.generator()
    x = to_tensor(image)[None]
    with torch.no_grad():
        expected = g(x)
        assert torch.equal(loaded(x), expected)  # bit-identical weights
    out = Translator(loaded, depth=model.depth, min_tissue=0).translate_array(image)
    assert np.array_equal(out, to_image(expected[0]))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("portable", ["onnx", "torchscript"])
def test_portable_copy_runs_without_stain_search(checkpoint, tmp_path, portable, image):
    folder, g, _ = checkpoint
    out = export_checkpoint(folder, tmp_path / portable, portable=portable)
    spec = json.loads((out / INFO_FILE).read_text())["portable"]
    assert spec["format"] == portable
    x = to_tensor(np.concatenate([image, image[::-1]], axis=1))[None]  # 64 x 128: a new shape
    if portable == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / spec["file"]), providers=["CPUExecutionProvider"])
        y = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    else:
        y = torch.jit.load(str(out / spec["file"]))(x)
    with torch.no_grad():
        assert (y - g(x)).abs().max() < 1e-4


def test_registry_alias_resolves_and_pyfunc_predicts(exported, tmp_path, image, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = register_export(exported, tracking_uri=uri, model_name="tiny-g", experiment="tiny")
    second = register_export(exported, tracking_uri=uri, model_name="tiny-g", experiment="tiny")
    assert (first.version, second.version) == ("1", "2") and second.uri == "models:/tiny-g@champion"
    # translate resolves the alias in the store it is given (no process-wide URI set)
    model = load_model(exported)
    assert load_model("models:/tiny-g@champion", tracking_uri=uri).info == model.info
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("tiny-g", "champion").version) == "2"
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-g@champion")
    batch = np.stack([image, image[:, ::-1]])
    predicted = pyfunc.predict(batch)
    tr = Translator(model.generator(), depth=model.depth)
    assert predicted.shape == batch.shape and predicted.dtype == np.uint8
    assert np.array_equal(predicted[1], tr.translate_array(np.ascontiguousarray(batch[1])))


def test_loading_refuses_what_is_not_ours(exported, checkpoint, tmp_path):
    with pytest.raises(ModelError, match="not a stain-search model"):
        load_model(tmp_path)  # an empty folder
    pt = tmp_path / "model.pt"
    torch.save({"G": {}}, pt)
    with pytest.raises(ModelError, match="not a stain-search model"):
        load_model(pt)
    # A model.json from elsewhere.
    other = tmp_path / "other"
    other.mkdir()
    (other / INFO_FILE).write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(ModelError, match="format"):
        load_model(other)
    # Weights changed after export: the hash in model.json no longer matches.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for p in exported.iterdir():
        (tampered / p.name).write_bytes(p.read_bytes())
    data = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tampered / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="hash"):
        load_model(tampered)


def test_pickled_code_never_runs(tmp_path):
    """A checkpoint whose state.pt would run code when unpickled is refused."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "checkpoint_epoch_0001"
    folder.mkdir()
    (folder / "state.pt").write_bytes(pickle.dumps({"G": Payload()}, protocol=2))
    (folder / "meta.json").write_text(json.dumps({"format": "stain-search-checkpoint/1",
                                                  "epoch": 1, "config": {}}))
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_model(folder)
    with pytest.raises(Exception, match="cannot be loaded safely"):
        export_checkpoint(folder, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_is_atomic_and_does_not_overwrite(checkpoint, exported, tmp_path, monkeypatch):
    folder, _, _ = checkpoint
    with pytest.raises(ModelError, match="already exists"):
        export_checkpoint(folder, exported)
    import stain_search.deploy.export as export_module

    def broken(net, path, probe):
        path.write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setitem(export_module.PORTABLE, "onnx", ("generator.onnx", broken,
                                                         export_module.run_onnx))
    with pytest.raises(ModelError, match="disk full"):
        export_checkpoint(folder, tmp_path / "new", portable="onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_translate(exported, tmp_path, image, capsys):
    from PIL import Image

    src = tmp_path / "he.png"
    Image.fromarray(image).save(src)
    out = tmp_path / "stained.tif"
    capsys.readouterr()
    assert main(["translate", str(exported), str(src), str(out), "--min-tissue", "0",
                 "--compression", "zlib", "--no-progress"]) == 0
    # The unknown µm/px is one line of ours, not Python's warning with its source.
    said = capsys.readouterr().err
    assert "stain-search: warning: neither the model nor --mpp says" in said, said
    assert "UserWarning" not in said and ".py:" not in said, said
    model = load_model(exported)
    expected = Translator(model.generator(), depth=model.depth, min_tissue=0).translate_array(image)
    import tifffile

    assert np.array_equal(tifffile.imread(out), expected)
    assert main(["translate", str(tmp_path), str(src), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a stain-search model folder" in err
    assert not (tmp_path / "x.png").exists()


def test_export_records_training_mpp_and_translate_reads_the_matching_level(tmp_path, image):
    """data.mpp at training → model.json → translate picks the slide level at
    that µm/px (level 1 of a 0.25 µm/px pyramid for a 0.5 µm/px model)."""
    import tifffile

    from stain_search.deploy.pyramid import halve
    from stain_search.deploy.translate import translate

    config = load_config(None, {**TINY_BASE, "data.mpp": 0.5})
    torch.manual_seed(0)
    gan = CycleGAN(config, device=torch.device("cpu"))
    folder = tmp_path / "checkpoint_epoch_0001"
    write_checkpoint(folder, state=gan.state_dict_full(),
                     meta={"epoch": 1, "metrics": {}, "config": config.to_dict()})
    out = export_checkpoint(folder, tmp_path / "export", portable="none")
    info = json.loads((out / INFO_FILE).read_text())
    assert info["data"]["mpp"] == 0.5 and info["data"]["mpp_from"] == "data.mpp"
    assert set(info["stain_reference"]) == {"macenko", "reinhard"}  # the training H&E's
    model = load_model(out)
    assert model.mpp == 0.5
    slide = tmp_path / "slide.tif"
    he = np.ascontiguousarray(np.tile(image, (2, 2, 1)))  # 128², at 0.25 µm/px
    with tifffile.TiffWriter(slide) as tif:
        for i, level in enumerate([he, halve(he)]):
            tif.write(level, tile=(32, 32), photometric="rgb", subfiletype=1 if i else 0,
                      resolution=(1e4 / (0.25 * 2 ** i),) * 2, resolutionunit="CENTIMETER")
    result = translate(out, slide, tmp_path / "stained.tif", min_tissue=0, compression="zlib")
    stained = tifffile.imread(result[0])
    assert stained.shape == (64, 64, 3)  # level 1: 0.5 µm/px
    expected = Translator(model.generator(), depth=model.depth, min_tissue=0).translate_array(
        halve(he))
    assert np.array_equal(stained, expected)
    with tifffile.TiffFile(result[0]) as tif:
        assert tif.pages[0].resolution == pytest.approx((1e4 / 0.5, 1e4 / 0.5))
