"""Bad inputs: every mistake a user can make in a space file, a training
config, a data folder or a tracking URI ends the CLI with one line on stderr
naming the file/key, exit status 2, no traceback — and nothing written to
the results folder or the MLflow store.

Rows run `stain_search.cli.main([...])` in-process (no interpreter start);
a few also run as a real subprocess to prove there is no traceback end to
end. Validation happens before Ray starts: a guard replaces Ray's start (and
the training loop) so a row that wrongly passes validation fails at once
instead of running a search.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from cluster_services import free_port
from conftest import TINY_BASE, stop_local_ray
from stain_search import cli
from stain_search.data import read_image
from stain_search.data.datasets import verify_dataset
from stain_search.search_dir import SearchDir
from stain_search.spaces import load_space

NAME = "bad"


class ValidationPassed(Exception):
    """Raised by the guard: the row's mistake was not caught before Ray."""


# --- tiny inputs -------------------------------------------------------------

def _png(path: Path, size: int = 40, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_data(root: Path) -> Path:
    """CycleGAN layout, 2 images per folder, 40 px (crop is 32)."""
    for i, sub in enumerate(("trainA", "trainB", "testA", "testB")):
        for j in range(2):
            _png(root / sub / f"img{j}.png", seed=10 * i + j)
    return root


def valid_space(data: Path) -> dict:
    return {
        "name": NAME, "description": "bad-input test", "data": str(data),
        "base": dict(TINY_BASE),
        "space": {"loss.lambda_cycle": {"distribution": "loguniform", "low": 1, "high": 50}},
        "objective": {"metric": "frechet", "mode": "min"},
        "search": {"algorithm": "random", "num_samples": 2, "max_concurrent": 1, "seed": 0,
                   "early_stopping": {"pruner": "none"}},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    }


def valid_train_config() -> dict:
    return {"data": {"crop": 32, "batch_size": 2, "eval_crops": 2},
            "model": {"depth": 3, "ngf": 8, "ndf": 8, "d_blocks": 2},
            "train": {"epochs": 1, "steps_per_epoch": 1}}


@dataclass
class Env:
    tmp: Path
    data: Path

    @property
    def space_file(self) -> Path:
        return self.tmp / "space.yaml"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.tmp / 'mlflow.db'}"

    def run(self, space: dict | str | bytes | None = None, *extra: str,
            uri: str | None = None) -> list[str]:
        if isinstance(space, dict):
            self.space_file.write_text(yaml.safe_dump(space, sort_keys=False))
        elif isinstance(space, str):
            self.space_file.write_text(space)
        elif isinstance(space, bytes):
            self.space_file.write_bytes(space)
        return ["run", str(self.space_file), "--storage", str(self.tmp / "runs"),
                "--tracking-uri", uri or self.uri, *extra]

    def train(self, config: dict | str | None = None, *extra: str,
              data: Path | None = None) -> list[str]:
        path = self.tmp / "train.yaml"
        if isinstance(config, dict):
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        elif isinstance(config, str):
            path.write_text(config)
        return ["train", str(path), "--data", str(data or self.data),
                "--out", str(self.tmp / "out"), *extra]


def space_with(**changes) -> Callable[[Env], list[str]]:
    """A row built from the valid space with some top-level sections edited."""
    def build(env: Env) -> list[str]:
        raw = valid_space(env.data)
        for key, edit in changes.items():
            if callable(edit):
                edit(raw)
            elif edit is None:
                raw.pop(key, None)
            else:
                raw[key] = edit
        return env.run(raw)
    return build


def train_with(fn: Callable[[dict], None]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        config = copy.deepcopy(valid_train_config())
        fn(config)
        return env.train(config)
    return build


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def broken_image(how: str) -> Callable[[Env], list[str]]:
    """The valid space over a data folder with one file broken."""
    def build(env: Env) -> list[str]:
        target = env.data / "trainB" / "img1.png"
        if how == "corrupt":
            target.write_bytes(np.random.default_rng(0).bytes(500))
        elif how == "truncated":
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        elif how == "zero-byte":
            target.write_bytes(b"")
        elif how == "too-small":
            _png(target, size=16)
        elif how == "five-channel":
            target.unlink()
            tifffile.imwrite(env.data / "trainB" / "img1.tif",
                             np.zeros((40, 40, 5), np.uint8), photometric="minisblack",
                             planarconfig="contig")
        elif how == "float-range":
            target.unlink()
            tifffile.imwrite(env.data / "trainB" / "img1.tif",
                             np.full((40, 40, 3), 7.5, np.float32), photometric="rgb")
        elif how == "bomb":  # a PNG header claiming 20000 x 20000 px (400 Mpx)
            target.write_bytes(_png_header(20000, 20000))
        elif how == "test-truncated":
            target = env.data / "testA" / "img0.png"
            target.write_bytes(target.read_bytes()[:200])
        return env.run(valid_space(env.data))
    return build


def data_folder(how: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        raw = valid_space(env.data)
        if how == "missing":
            raw["data"] = str(env.tmp / "no-such-folder")
        elif how == "empty":
            (env.tmp / "empty").mkdir()
            raw["data"] = str(env.tmp / "empty")
        elif how == "file":
            (env.tmp / "afile").write_text("not a folder")
            raw["data"] = str(env.tmp / "afile")
        elif how == "empty-trainA":
            for p in (env.data / "trainA").iterdir():
                p.unlink()
        return env.run(raw)
    return build


def _seed_existing(env: Env) -> None:
    """The state a started search leaves: its folder with search.json."""
    space = env.tmp / "first.yaml"
    space.write_text(yaml.safe_dump(valid_space(env.data), sort_keys=False))
    SearchDir(env.tmp / "runs" / NAME).create(load_space(space))


def existing(how: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        raw = valid_space(env.data)
        if how == "resume-missing":
            return env.run(raw, "--resume")
        _seed_existing(env)
        if how == "different-space":
            raw["space"]["loss.lambda_cycle"]["high"] = 20
        return env.run(raw)
    return build


def _set(section: str, key: str, value):
    def fn(raw: dict) -> None:
        raw[section][key] = value
    return fn


def _param(key: str, body: dict | None):
    def fn(raw: dict) -> None:
        if body is None:
            raw["space"].pop(key, None)
        else:
            raw["space"][key] = body
    return fn


def _lc(**kw):
    """Edit the loss.lambda_cycle parameter."""
    def fn(raw: dict) -> None:
        body = raw["space"]["loss.lambda_cycle"]
        for k, v in kw.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v
    return fn


def _rename_top(old: str, new: str):
    def fn(raw: dict) -> None:
        raw[new] = raw.pop(old)
    return fn


def _when_without_parent(raw: dict) -> None:
    raw["space"]["model.attention_channels_ratio"] = {
        "distribution": "uniform", "low": 0.25, "high": 1.0,
        "when": {"model.attention": ["gates"]}}


def _when_bad_value(raw: dict) -> None:
    raw["space"]["model.attention"] = {"distribution": "choice", "choices": ["none", "gates"]}
    raw["space"]["model.attention_channels_ratio"] = {
        "distribution": "uniform", "low": 0.25, "high": 1.0,
        "when": {"model.attention": ["gatez"]}}


def duplicate_space_key(env: Env) -> list[str]:
    """`loss.lambda_cycle` listed twice: PyYAML alone would keep the second."""
    raw = valid_space(env.data)
    raw.pop("space")
    return env.run("space:\n"
                   "  loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}\n"
                   "  loss.lambda_cycle: {distribution: uniform, low: 5, high: 20}\n"
                   + yaml.safe_dump(raw, sort_keys=False))


def duplicate_train_key(env: Env) -> list[str]:
    config = valid_train_config()
    train = config.pop("train")
    return env.train("train:\n"
                     f"  epochs: {train['epochs']}\n"
                     f"  steps_per_epoch: {train['steps_per_epoch']}\n"
                     "  epochs: 2\n"
                     + yaml.safe_dump(config, sort_keys=False))


# "Billion laughs": nine levels of nine aliases, about 387 million strings
# once expanded, in a free-text key; a few hundred bytes on disk.
ALIAS_BOMB = "name: bad\ndescription: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


@dataclass
class Row:
    id: str
    build: Callable[[Env], list[str]]
    expect: tuple[str, ...]  # what the one line must name (file, key)


ROWS = [
    # --- the space file itself
    Row("yaml-malformed", lambda e: e.run("name: bad\nspace: {loss.lambda_cycle: [1,\n"),
        ("space.yaml", "not valid YAML", "line")),
    Row("yaml-not-a-mapping", lambda e: e.run("- a\n- b\n"), ("space.yaml", "mapping")),
    Row("yaml-binary", lambda e: e.run(b"\xff\xfe\x00\x81"), ("space.yaml", "text")),
    Row("yaml-duplicate-key", duplicate_space_key,
        ("space.yaml", "`loss.lambda_cycle`", "twice", "lines 2 and 3")),
    Row("space-file-missing", lambda e: ["run", str(e.tmp / "nope.yaml"), "--storage",
                                         str(e.tmp / "runs"), "--tracking-uri", e.uri],
        ("nope.yaml", "no such")),
    Row("top-key-misspelt", space_with(x=_rename_top("search", "serach")), ("serach", "search")),
    Row("name-invalid", space_with(name="bad name!"), ("`name`",)),
    Row("name-flag-escapes", lambda e: e.run(valid_space(e.data), "--name", "../../escaped"),
        ("--name", "'../../escaped'", "letters, digits")),
    Row("name-flag-too-long", lambda e: e.run(valid_space(e.data), "--name", "n" * 101),
        ("--name", "1-100")),
    Row("name-verb-escapes", lambda e: ["best", "../x", "--storage", str(e.tmp / "runs"),
                                        "--tracking-uri", e.uri], ("search name", "'../x'")),
    Row("name-export-escapes", lambda e: ["export", "a/b", "--out", str(e.tmp / "out"),
                                          "--storage", str(e.tmp / "runs")],
        ("search name", "'a/b'")),
    # --- ill-formed spaces that would run, but not as written
    # --- the storage
    Row("storage-under-a-file", lambda e: (e.tmp / "afile").write_text("x") and [
        *e.run(valid_space(e.data))[:2], "--storage", str(e.tmp / "afile" / "runs"),
        "--tracking-uri", e.uri], ("--storage", "afile is a file, not a folder")),
    Row("choice-repeated", space_with(x=_param("model.attention", {
        "distribution": "choice", "choices": ["none", "none", "gates"]})),
        ("space.model.attention.choices", "'none'", "more than once")),
    Row("when-self", space_with(x=_param("model.attention", {
        "distribution": "choice", "choices": ["none", "gates"],
        "when": {"model.attention": ["gates"]}})), ("space.model.attention.when", "itself")),
    Row("when-empty", space_with(x=_param("model.attention_channels_ratio", {
        "distribution": "uniform", "low": 0.25, "high": 1.0, "when": {"model.attention": []}})),
        ("model.attention_channels_ratio.when", "never hold")),
    Row("when-loop", space_with(x=lambda raw: raw["space"].update({
        "model.attention": {"distribution": "choice", "choices": ["none", "gates"],
                            "when": {"optim.name": ["adam"]}},
        "optim.name": {"distribution": "choice", "choices": ["adam", "extra_adam"],
                       "when": {"model.attention": ["gates"]}}})), ("when", "loop")),
    Row("yaml-alias-bomb", lambda e: e.run(ALIAS_BOMB), ("space.yaml", "aliases", "100,000")),
    Row("yaml-recursive-alias", lambda e: e.run("name: bad\ndescription: &a [1, *a]\n"),
        ("space.yaml", "alias", "contains it")),
    Row("yaml-too-large", lambda e: e.run("# padding\n" * 120_000), ("space.yaml", "bytes", "limit")),
    # --- keys and types
    Row("space-key-misspelt", space_with(x=_param("loss.lamda_cycle",
                                                  {"distribution": "uniform", "low": 1, "high": 5})),
        ("space.loss.lamda_cycle", "lambda_cycle")),
    Row("base-key-misspelt", space_with(x=_set("base", "train.epoch", 3)), ("train.epoch",)),
    Row("base-wrong-type", space_with(x=_set("base", "train.epochs", "three")), ("train.epochs",)),
    Row("base-optimizer-unknown", space_with(x=_set("base", "optim.name", "adamw")),
        ("optim.name", "adamw", "extra_adam")),
    Row("base-generator-unknown", space_with(x=_set("base", "model.generator", "resnet")),
        ("model.generator", "resnet", "unet")),
    Row("base-discriminator-unknown", space_with(x=_set("base", "model.discriminator", "patch")),
        ("model.discriminator", "patch", "vgg")),
    Row("search-key-misspelt", space_with(x=_set("search", "num_sample", 4)),
        ("search.num_sample",)),
    Row("search-wrong-type", space_with(x=_set("search", "num_samples", "many")),
        ("search.num_samples",)),
    Row("resources-key-unknown", space_with(x=_set("resources", "gpus", 1)), ("resources.gpus",)),
    Row("distribution-unknown", space_with(x=_lc(distribution="gaussian")),
        ("space.loss.lambda_cycle.distribution",)),
    Row("distribution-key-unknown", space_with(x=_lc(mean=3)), ("space.loss.lambda_cycle.mean",)),
    # --- impossible ranges and choices
    Row("low-above-high", space_with(x=_lc(low=50, high=1)), ("space.loss.lambda_cycle", "above")),
    Row("log-range-from-zero", space_with(x=_lc(low=0)), ("space.loss.lambda_cycle", "log")),
    Row("low-not-a-number", space_with(x=_lc(low="abc")), ("space.loss.lambda_cycle.low",)),
    Row("high-missing", space_with(x=_lc(high=None)), ("space.loss.lambda_cycle.high",)),
    Row("range-infinite", space_with(x=_lc(high=float("inf"))), ("space.loss.lambda_cycle", "finite")),
    Row("choice-empty", space_with(x=_param("model.attention", {"distribution": "choice", "choices": []})),
        ("space.model.attention.choices",)),
    Row("choice-invalid-option", space_with(x=_param(
        "model.attention", {"distribution": "choice", "choices": ["none", "bogus"]})),
        ("model.attention", "bogus")),
    Row("choice-optimizer-unknown", space_with(x=_param(
        "optim.name", {"distribution": "choice", "choices": ["adam", "adamw"]})),
        ("optim.name", "adamw")),
    Row("step-on-log-scale", space_with(x=_lc(step=1)),
        ("space.loss.lambda_cycle.step", "loguniform", "uniform")),
    Row("step-on-logint", space_with(x=_param(
        "train.pool_size", {"distribution": "logint", "low": 10, "high": 50, "step": 2})),
        ("space.train.pool_size.step", "logint")),
    Row("step-zero", space_with(x=_param(
        "train.pool_size", {"distribution": "int", "low": 10, "high": 50, "step": 0})),
        ("space.train.pool_size.step", "positive")),
    Row("step-negative", space_with(x=_lc(distribution="uniform", step=-0.5)),
        ("space.loss.lambda_cycle.step", "positive")),
    Row("step-wider-than-range", space_with(x=_lc(distribution="uniform", step=100)),
        ("space.loss.lambda_cycle.step", "wider", "49")),
    Row("step-does-not-divide", space_with(x=_param(
        "train.pool_size", {"distribution": "int", "low": 10, "high": 50, "step": 15})),
        ("space.train.pool_size.step", "divide", "high: 40")),
    Row("step-fractional-on-int", space_with(x=_param(
        "train.pool_size", {"distribution": "int", "low": 10, "high": 50, "step": 1.5})),
        ("space.train.pool_size.step", "whole")),
    Row("step-not-a-number", space_with(x=_lc(distribution="uniform", step="fine")),
        ("space.loss.lambda_cycle.step", "number")),
    Row("int-key-uniform", space_with(x=_param("model.ngf", {"distribution": "uniform", "low": 4, "high": 16})),
        ("space.model.ngf",)),
    Row("int-range-fractional", space_with(x=_param("model.ngf", {"distribution": "int", "low": 4.5, "high": 16})),
        ("space.model.ngf",)),
    Row("space-empty", space_with(space={}), ("`space`",)),
    Row("param-also-in-base", space_with(x=_set("base", "loss.lambda_cycle", 10)),
        ("space.loss.lambda_cycle", "base")),
    # --- conditional parameters
    Row("when-refers-to-nothing", space_with(x=_when_without_parent),
        ("space.model.attention_channels_ratio.when", "model.attention")),
    Row("when-value-not-a-choice", space_with(x=_when_bad_value),
        ("space.model.attention_channels_ratio.when", "gatez")),
    # --- objectives
    Row("objective-missing", space_with(objective=None), ("`objective`",)),
    Row("objective-unknown-metric", space_with(objective={"metric": "fdi", "mode": "min"}),
        ("objective.metric", "fdi")),
    Row("objective-never-reported", space_with(objective={"metric": "ki67_f1", "mode": "max"}),
        ("objective.metric", "ki67_f1")),
    Row("objective-wrong-mode", space_with(objective={"metric": "frechet", "mode": "max"}),
        ("objective.mode",)),
    Row("objective-twice", space_with(objective=[{"metric": "frechet", "mode": "min"}] * 2),
        ("`objective`", "twice")),
    # --- search settings
    Row("num-samples-zero", space_with(x=_set("search", "num_samples", 0)), ("search.num_samples",)),
    Row("max-concurrent-zero", space_with(x=_set("search", "max_concurrent", 0)),
        ("search.max_concurrent",)),
    Row("algorithm-unknown", space_with(x=_set("search", "algorithm", "bayes")), ("search.algorithm",)),
    Row("pruner-unknown", space_with(x=_set("search", "early_stopping", {"pruner": "hyperband"})),
        ("search.early_stopping.pruner",)),
    Row("enqueue-outside-space", space_with(x=_set("search", "enqueue", [{"loss.lambda_cycle": 500}])),
        ("search.enqueue[0].loss.lambda_cycle",)),
    Row("enqueue-unknown-key", space_with(x=_set("search", "enqueue", [{"loss.lambda_cycl": 5}])),
        ("search.enqueue[0].loss.lambda_cycl",)),
    Row("cpus-per-worker-zero", space_with(x=_set("resources", "cpus_per_worker", 0)),
        ("resources", "cpus_per_worker")),
    Row("executor-unknown", space_with(x=_set("resources", "executor", "inline")),
        ("resources.executor", "in_trial")),
    Row("executor-in-trial-with-ddp",
        space_with(x=lambda raw: raw["resources"].update(executor="in_trial", workers_per_trial=2)),
        ("resources.executor", "ray_train")),
    # --- data folders
    Row("data-missing", data_folder("missing"), ("no-such-folder",)),
    Row("data-empty-folder", data_folder("empty"), ("empty",)),
    Row("data-is-a-file", data_folder("file"), ("afile",)),
    Row("data-trainA-empty", data_folder("empty-trainA"), ("trainA",)),
    # --- images
    Row("image-decompression-bomb", broken_image("bomb"),
        ("img1.png", "400,000,000 pixels", "decompression-bomb", "STAIN_SEARCH_MAX_IMAGE_PIXELS")),
    Row("image-corrupt", broken_image("corrupt"), ("trainB", "img1.png")),
    Row("image-truncated", broken_image("truncated"), ("trainB", "img1.png")),
    Row("image-zero-byte", broken_image("zero-byte"), ("trainB", "img1.png", "0 bytes")),
    Row("image-smaller-than-crop", broken_image("too-small"), ("trainB", "img1.png", "crop")),
    Row("image-five-channels", broken_image("five-channel"), ("img1.tif", "channels")),
    Row("image-float-out-of-range", broken_image("float-range"), ("img1.tif", "floating")),
    Row("test-image-truncated", broken_image("test-truncated"), ("testA", "img0.png")),
    # --- the tracking store
    Row("tracking-unreachable", lambda e: e.run(valid_space(e.data), uri="http://127.0.0.1:9"),
        ("127.0.0.1:9",)),
    # --- the Ray cluster (tests/cluster_services.py: a port nothing listens on)
    Row("address-unreachable", lambda e: e.run(valid_space(e.data), "--address",
                                               f"127.0.0.1:{free_port()}"),
        ("--address 127.0.0.1:", "no Ray cluster", "ray start")),
    Row("address-ray-client", lambda e: e.run(valid_space(e.data), "--address",
                                              "ray://127.0.0.1:10001"),
        ("--address ray://127.0.0.1:10001", "Ray Client", "--address auto", "ray job submit")),
    Row("storage-credentials-in-uri", lambda e: e.run(valid_space(e.data), "--storage",
                                                      "s3://AKIAX:secret@bucket/runs"),
        ("credentials in the URI", "AWS_ACCESS_KEY_ID")),
    Row("resources-never-fit", lambda e: e.run({**valid_space(e.data), "resources": {
        "workers_per_trial": 2, "cpus_per_worker": 4096}}),
        ("resources", "2 workers × 4096 CPU", "this machine", "cpus_per_worker")),
    Row("tracking-sqlite-unwritable", lambda e: (e.tmp / "afile").write_text("x") and e.run(
        valid_space(e.data), uri=f"sqlite:///{e.tmp / 'afile' / 'mlflow.db'}"), ("afile",)),
    # --- an existing search
    Row("existing-name-different-space", existing("different-space"), (NAME, "--name")),
    Row("existing-name-no-resume", existing("same-space"), (NAME, "--resume")),
    Row("resume-nothing", existing("resume-missing"), (NAME, "no search")),
    # --- `stain-search train`
    Row("train-yaml-malformed", lambda e: e.train("data: {crop: [32\n"), ("train.yaml", "YAML")),
    Row("train-unknown-section", train_with(lambda c: c.update(trian=c.pop("train"))),
        ("train.yaml", "trian")),
    Row("train-key-misspelt", train_with(lambda c: c["data"].update(crops=32)), ("crops",)),
    Row("train-wrong-type", train_with(lambda c: c["train"].update(epochs="x")), ("epochs",)),
    Row("train-yaml-duplicate-key", duplicate_train_key,
        ("train.yaml", "`epochs`", "twice", "lines 2 and 4")),
    Row("train-optimizer-unknown", train_with(lambda c: c.update(optim={"name": "adamw"})),
        ("train.yaml", "optim.name", "adamw")),
    Row("train-generator-unknown", train_with(lambda c: c["model"].update(generator="resnet")),
        ("train.yaml", "model.generator", "resnet")),
    Row("train-set-malformed", lambda e: e.train(valid_train_config(), "--set", "loss.lambda_cycle"),
        ("--set", "loss.lambda_cycle")),
    Row("train-set-unknown-key", lambda e: e.train(valid_train_config(), "--set", "loss.lambda_cycl=5"),
        ("loss.lambda_cycl",)),
    Row("train-set-wrong-type", lambda e: e.train(valid_train_config(), "--set",
                                                  "loss.lambda_cycle=abc"),
        ("--set: `loss.lambda_cycle`", "expected float")),
    Row("train-config-missing", lambda e: ["train", str(e.tmp / "nope.yaml"), "--out",
                                           str(e.tmp / "out")], ("nope.yaml",)),
    Row("train-image-truncated", lambda e: (
        (e.data / "trainA" / "img0.png").write_bytes((e.data / "trainA" / "img0.png").read_bytes()[:120])
        and e.train(valid_train_config())), ("trainA", "img0.png")),
    Row("train-data-missing", lambda e: e.train(valid_train_config(), data=e.tmp / "gone"), ("gone",)),
]

SUBPROCESS_ROWS = ("yaml-malformed", "image-truncated", "tracking-unreachable",
                   "address-unreachable")


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp=tmp_path, data=make_data(tmp_path / "data"))


@pytest.fixture
def guard(monkeypatch):
    """Ray never starts and no training runs: a row that gets that far failed.
    No Ray is connected either (the session's, which an earlier module may have
    started in this process): each row sees what a fresh `stain-search` sees."""
    stop_local_ray()

    def passed(*args, **kwargs):
        raise ValidationPassed("validation passed: the mistake was not caught before Ray")

    monkeypatch.setattr("stain_search.search.init_ray", passed)
    monkeypatch.setattr("stain_search.train.run_training", passed)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def check_nothing_written(env: Env, before: set[str]) -> None:
    runs = env.tmp / "runs"
    assert snapshot(runs) == before, "the results folder changed"
    assert not (env.tmp / "mlflow.db").exists(), "an MLflow store was created"
    assert not (env.tmp / "mlartifacts").exists()
    assert not (env.tmp / "out").exists(), "the training --out folder was created"


def check_one_line(stderr: str, expect: tuple[str, ...]) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("stain-search: error: "), lines[0]
    for word in expect:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(row, env, guard, capsys, monkeypatch):
    monkeypatch.chdir(env.tmp)
    argv = [str(a) for a in row.build(env)]
    before = snapshot(env.tmp / "runs")
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except ValidationPassed:
        pytest.fail(f"{row.id}: not caught before Ray started")
    err = capsys.readouterr().err
    assert code == 2, err
    check_one_line(err, row.expect)
    check_nothing_written(env, before)


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in SUBPROCESS_ROWS],
                         ids=list(SUBPROCESS_ROWS))
def test_bad_input_end_to_end_has_no_traceback(row, env):
    argv = [str(a) for a in row.build(env)]
    before = snapshot(env.tmp / "runs")
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "stain_search.cli", *argv],
                          cwd=env.tmp, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr[-3000:]
    # A real process may also print notices logged on the way (e.g. "FID
    # unavailable ... logging fd_random" while the objective is resolved);
    # the error itself is one line, and the last.
    lines = done.stderr.strip().splitlines()
    assert [l for l in lines if l.startswith("stain-search: error: ")] == lines[-1:], done.stderr
    check_one_line(lines[-1], row.expect)
    check_nothing_written(env, before)


# Root reads and writes a file whatever its mode (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH),
# and CI runs as root: the CLI then runs without those two capabilities, as any user would.
WITHOUT_READ_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                         "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_image_is_one_line(env):
    target = env.data / "trainA" / "img0.png"
    argv = [str(a) for a in env.run(valid_space(env.data))]
    before = snapshot(env.tmp / "runs")
    target.chmod(0)
    try:
        as_user = WITHOUT_READ_OVERRIDE if os.geteuid() == 0 else []
        done = subprocess.run([*as_user, sys.executable, "-W", "ignore", "-m", "stain_search.cli",
                               *argv],
                              cwd=env.tmp, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        target.chmod(0o644)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert [l for l in lines if l.startswith("stain-search: error: ")] == lines[-1:], done.stderr
    check_one_line(lines[-1], ("img0.png",))
    check_nothing_written(env, before)


@pytest.mark.parametrize("mode", ["I;16", "L", "LA", "RGBA"])
def test_convertible_images_are_accepted(mode, tmp_path):
    """16-bit, grayscale and RGBA tiles are not mistakes: they are read as
    RGB (alpha composited on white) and pass the pre-flight check."""
    data = make_data(tmp_path / "data")
    target = data / "trainB" / "img1.png"
    rng = np.random.default_rng(1)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)).save(target)
    else:
        bands = len(mode)
        Image.fromarray(rng.integers(0, 256, (40, 40, bands), dtype=np.uint8).squeeze(),
                        mode=mode).save(target)
    assert Image.open(target).mode.startswith(mode[0])
    image = read_image(target)
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    verify_dataset(str(data), "auto", 32)


def test_a_bad_study_port_is_one_line_before_anything_is_written(env, guard, monkeypatch, capsys):
    monkeypatch.setenv("STAIN_SEARCH_STUDY_PORT", "99999")
    argv = [str(a) for a in env.run(valid_space(env.data))]
    before = snapshot(env.tmp / "runs")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "STAIN_SEARCH_STUDY_PORT='99999'" in err[-1] and "1-65535" in err[-1], err
    assert snapshot(env.tmp / "runs") == before


# --- issue 23: nothing the user owns is lost --------------------------------------

def _journal_with_trials(tmp_path: Path) -> tuple[Path, object]:
    from conftest import tiny_space_yaml
    from stain_search.study import create_study

    space = tmp_path / "j.yaml"
    space.write_text(tiny_space_yaml(name="j"))
    spec = load_space(space)
    journal = tmp_path / "study.journal"
    study = create_study(spec, journal)
    for value in (0.3, 0.2):
        t = study.ask()
        t.report(value, 1)
        study.tell(t, value)
    return journal, spec


def test_a_torn_journal_tail_is_set_aside_at_every_offset(tmp_path):
    """A crash mid-append leaves part of the last record: at every byte it can be
    cut at, the whole records are kept, the partial one is moved to
    ``study.journal.torn``, and the study takes new records again."""
    import optuna

    from stain_search.study import create_study, set_aside_torn_tail, storage

    journal, spec = _journal_with_trials(tmp_path)
    whole = journal.read_bytes()
    last = whole.rstrip(b"\n").rfind(b"\n") + 1  # where the last record starts
    torn = journal.with_name("study.journal.torn")
    for cut in range(last + 1, len(whole)):
        journal.write_bytes(whole[:cut])
        torn.unlink(missing_ok=True)
        said = set_aside_torn_tail(journal)
        if cut == len(whole) - 1:  # only the newline lost: the record is whole
            assert said is None and journal.read_bytes() == whole, cut
        else:
            assert said and "study.journal.torn" in said, cut
            assert journal.read_bytes() == whole[:last], cut
            assert torn.read_bytes() == whole[last:cut] + b"\n", cut
        kept = len(optuna.load_study(study_name="j", storage=storage(journal)).trials)
        study = create_study(spec, journal)  # a resume appends a new trial cleanly
        study.tell(study.ask(), 0.1)
        after = optuna.load_study(study_name="j", storage=storage(journal)).trials
        assert len(after) == kept + 1 and after[-1].value == 0.1, cut
        assert set_aside_torn_tail(journal) is None, cut  # whole again


def test_the_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path):
    """Reading it in a fresh interpreter capped at 1 GiB of address space and
    bounded by the subprocess timeout: an expansion would blow either."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30)); "
            "from stain_search.config import read_yaml\n"
            "try: read_yaml(sys.argv[1])\n"
            "except Exception as e: print(type(e).__name__, e); sys.exit(2)")
    done = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.startswith("ConfigError") and "aliases" in done.stdout, done.stdout


def _bench(name: str):
    """A module of bench/ (its helpers serve tests too)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_an_experiment_made_by_another_driver_meanwhile_is_used_not_an_error(tmp_path):
    """Two drivers of one new search: both look for the experiment, find none, and
    both make it. The second make is refused by the store; that driver then uses
    the experiment the first one made (CI once saw it exit 1 instead)."""
    from stain_search import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    made = tracking.get_or_create_experiment(c, "e", uri=uri)

    class LooksBeforeTheOtherMakes:  # its look came before the other driver's make
        def __init__(self, c):
            self._c, self._looked = c, False

        def get_experiment_by_name(self, name):
            if not self._looked:
                self._looked = True
                return None
            return self._c.get_experiment_by_name(name)

        def __getattr__(self, attr):
            return getattr(self._c, attr)

    assert tracking.get_or_create_experiment(LooksBeforeTheOtherMakes(c), "e", uri=uri) == made
    assert len(c.search_experiments(filter_string="name = 'e'")) == 1


def test_stores_created_by_two_processes_at_once_are_whole(tmp_path):
    """Three fresh folders, two processes each opening the same new SQLite store
    in the same instant (as two drivers started together do): every process
    succeeds, and every store is whole and usable afterwards. Before the store
    was made under a lock, one of each pair failed, and the file was left
    half-migrated ("table _alembic_tmp_experiments already exists")."""
    from stain_search import tracking
    from stain_search.mlflow_store import _tables

    stores = [tmp_path / f"pair{i}" / "mlflow.db" for i in range(3)]
    for db in stores:
        db.parent.mkdir()
    procs = _bench("driver_race").start_together(
        "from stain_search import tracking",
        "uri = sys.argv[2]\ntracking.get_or_create_experiment(tracking.client(uri), 'e', uri=uri)",
        [[f"sqlite:///{db}"] for db in stores for _ in range(2)])
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [e[-2000:] for e in errors]
    for db in stores:
        assert not any(t.startswith("_alembic_tmp_") for t in _tables(db)), db
        assert tracking.client(f"sqlite:///{db}").get_experiment_by_name("e") is not None
        assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # nothing left beside it


def test_a_half_migrated_store_is_set_aside_or_named(tmp_path):
    """A store a crash left mid-migration: holding nothing, it is set aside and
    made again; holding experiments, the one line names it and the fix."""
    import sqlite3

    from stain_search import tracking

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_experiments (x INTEGER)")
    con.close()
    c = tracking.client(f"sqlite:///{db}")
    assert c.search_experiments()[0].name == "Default"
    assert [p.name for p in tmp_path.glob("mlflow.db.broken-*")]
    # Holding an experiment of the user's: never set aside, one line with the fix.
    tracking.get_or_create_experiment(c, "kept", uri=f"sqlite:///{db}")
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_runs (x INTEGER)")
    con.close()
    with pytest.raises(tracking.TrackingError, match=r"half-upgraded.*1 experiment.*mlflow db upgrade"):
        tracking.client(f"sqlite:///{db}")
    assert db.exists()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _export(finished_search, *args: str) -> list[str]:
    return ["export", finished_search.name, "--storage", str(finished_search.search_dir.parent),
            "--tracking-uri", finished_search.tracking_uri, "--no-register", *args]


def test_export_overwrite_never_deletes_what_the_user_owns(finished_search, tmp_path,
                                                           monkeypatch, capsys):
    """`--overwrite` onto a folder that is not an export, onto the working folder,
    onto the storage folder: refused in one line, every file untouched. Onto an
    earlier export it replaces it, and every file of an export has one mode."""
    monkeypatch.chdir(tmp_path)
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "notes.txt").write_text("hi")
    (tmp_path / "mine.txt").write_text("my own file")
    before = _files(tmp_path)
    for out, says in ((keep, "is not an export folder"), (tmp_path, "the working folder"),
                      (Path("."), "the working folder"),
                      (finished_search.search_dir.parent, "the storage folder"),
                      (finished_search.root, "a folder above the storage folder")):
        assert cli.main(_export(finished_search, "--out", str(out), "--overwrite")) == 2, out
        check_one_line(capsys.readouterr().err, ("--overwrite", says.split()[-1]))
        assert _files(tmp_path) == before, out
    assert (finished_search.search_dir / "search.json").is_file()

    first = tmp_path / "exported"
    assert cli.main(_export(finished_search, "--out", str(first))) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in first.iterdir()}
    assert len(set(modes.values())) == 1, modes  # generator.safetensors is not 0600
    assert cli.main(_export(finished_search, "--out", str(first), "--overwrite")) == 0
    assert (first / "model.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_translate_and_report_replace_only_their_own_output(finished_search, tmp_path,
                                                            monkeypatch, capsys):
    """`translate --overwrite` onto a folder it did not write, and `report --out`
    onto a page it did not write: one line, nothing changed."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "he"
    _png(src / "a.png", size=64)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    page = tmp_path / "page.html"
    page.write_text("<html>my notes</html>")
    before = _files(tmp_path)
    exported = tmp_path / "model"
    assert cli.main(_export(finished_search, "--out", str(exported))) == 0
    capsys.readouterr()
    assert cli.main(["translate", str(exported), str(src), str(theirs), "--overwrite",
                     "--no-progress"]) == 2
    check_one_line(capsys.readouterr().err, ("theirs", "is not a folder `stain-search translate`"))
    assert cli.main(["report", finished_search.name, "--storage",
                     str(finished_search.search_dir.parent), "--tracking-uri",
                     finished_search.tracking_uri, "--out", str(page)]) == 2
    check_one_line(capsys.readouterr().err, ("page.html", "not a report page"))
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("model/")} == before
    # Its own earlier output is replaced.
    out = tmp_path / "stained"
    for _ in range(2):
        assert cli.main(["translate", str(exported), str(src), str(out), "--overwrite",
                         "--no-progress", "--min-tissue", "0"]) == 0
    assert (out / "a.png").is_file()


def test_a_negative_count_is_refused(capsys):
    for argv in (["best", "x", "--top", "-3"], ["run", "x.yaml", "--num-samples", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert "or more, got" in capsys.readouterr().err.strip().splitlines()[-1], argv


def test_best_before_any_checkpoint_says_why(env, capsys):
    """A search folder whose trials have not finished an epoch: the table is
    empty, and a line says why."""
    _seed_existing(env)
    assert cli.main(["best", NAME, "--storage", str(env.tmp / "runs"),
                     "--tracking-uri", env.uri]) == 1
    out = capsys.readouterr().out
    assert "0 of 0 checkpoint(s) shown" in out and "nothing to rank yet" in out, out


def test_run_of_a_running_search_says_it_is_running(env, capsys):
    """Not "pass --resume to continue it": the search is running right now."""
    import fcntl

    _seed_existing(env)
    sdir = SearchDir(env.tmp / "runs" / NAME)
    with open(sdir.lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ((), ("--resume",)):
            assert cli.main(env.run(valid_space(env.data), *extra)) == 2
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert "is running" in line and "pass --resume" not in line, line


def test_entries_left_out_of_a_data_folder_are_counted_and_named(env):
    """Every file the user gave is either used or named: a note, a subfolder and
    a format it does not read, beside the images."""
    (env.data / "trainA" / "notes.txt").write_text("scanned 2024")
    (env.data / "trainB" / "old").mkdir()
    (env.data / "testA" / "scan.jp2").write_bytes(b"\0" * 16)
    (env.data / "testA" / ".DS_Store").write_bytes(b"\0")
    line = verify_dataset(str(env.data), "auto", 32)
    assert line.startswith(f"3 entries of {env.data} skipped"), line
    for name in ("trainA/notes.txt", "trainB/old", "testA/scan.jp2"):
        assert name in line, line
    assert ".DS_Store" not in line
    clean = make_data(env.tmp / "clean")
    assert verify_dataset(str(clean), "auto", 32) is None


def test_storage_from_the_environment_is_named_as_such(env, guard, monkeypatch, capsys):
    (env.tmp / "afile").write_text("x")
    monkeypatch.setenv("STAIN_SEARCH_STORAGE", str(env.tmp / "afile" / "runs"))
    space = env.tmp / "space.yaml"
    space.write_text(yaml.safe_dump(valid_space(env.data)))
    assert cli.main(["run", str(space), "--tracking-uri", env.uri]) == 2
    check_one_line(capsys.readouterr().err, ("$STAIN_SEARCH_STORAGE", "is a file"))
    assert not (env.tmp / "mlflow.db").exists()


def test_unwritable_storage_is_one_line_and_leaves_no_store(env):
    """No resume hint for a search that never existed, and no empty mlflow.db."""
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    argv = [*env.run(valid_space(env.data))[:2], "--storage", str(locked / "runs"),
            "--tracking-uri", env.uri]
    as_user = WITHOUT_READ_OVERRIDE if os.geteuid() == 0 else []  # root writes anywhere
    done = subprocess.run([*as_user, sys.executable, "-W", "ignore", "-m", "stain_search.cli",
                           *map(str, argv)], cwd=env.tmp, capture_output=True, text=True,
                          timeout=120)
    locked.chmod(0o755)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    check_one_line(line, ("--storage", "cannot write in", "locked"))
    assert "resume" not in line
    assert not (env.tmp / "mlflow.db").exists() and list(locked.iterdir()) == []


def test_a_damaged_checkpoint_is_never_ranked_or_exported(finished_search, tmp_path, capsys):
    """Truncate the best checkpoint's weights: `best` leaves it out and says so,
    ranks the next one first, and `export` exports that one; loading the damaged
    one directly is one line naming the file."""
    import shutil

    from stain_search.checkpoint import CheckpointError, read_checkpoint
    from stain_search.deploy.select import DAMAGED, select_dir

    shutil.copytree(finished_search.search_dir, tmp_path / "runs" / finished_search.name)
    sdir = SearchDir(tmp_path / "runs" / finished_search.name)
    before = select_dir(sdir, tracking_uri=finished_search.tracking_uri)
    first, second = before.candidates[:2]
    state = first.checkpoint / "state.pt"  # in the copy
    state.write_bytes(state.read_bytes()[:-60])
    after = select_dir(sdir, tracking_uri=finished_search.tracking_uri)
    assert after.dropped == {DAMAGED: 1}
    assert (after.candidates[0].trial, after.candidates[0].epoch) == (second.trial, second.epoch)
    argv = ["--storage", str(tmp_path / "runs"), "--tracking-uri", finished_search.tracking_uri]
    assert cli.main(["best", finished_search.name, *argv]) == 0
    assert f"left out: 1 ({DAMAGED})" in capsys.readouterr().out
    out = tmp_path / "export"
    assert cli.main(["export", finished_search.name, *argv, "--out", str(out), "--no-register"]) == 0
    provenance = __import__("json").loads((out / "model.json").read_text())["provenance"]
    assert (provenance["trial"], provenance["epoch"]) == (second.trial, second.epoch)
    with pytest.raises(CheckpointError, match=r"state.pt: .* bytes, but .* were written"):
        read_checkpoint(state.parent)


@pytest.mark.slow
def test_two_drivers_started_together_end_with_one_search_and_a_usable_store(tmp_path):
    """`stain-search run tiny.yaml` twice in the same instant in a fresh folder
    (bench/driver_race.py repeats this 50 times by hand): one runs the search,
    the other is refused in one line, and the store is usable afterwards."""
    one_pair = _bench("driver_race").one_pair
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    row = one_pair(tmp_path, env, timeout=540)
    assert row["ok"], row
    assert "is running" in row["refusal"] or "started by another driver" in row["refusal"], row
