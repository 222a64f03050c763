"""Profiles (stain_search.profiles): what a profile may set, which one runs by
default, the errors for one that cannot run, and `run --dry-run`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from stain_search import plan, profiles
from stain_search.cli import main
from stain_search.errors import ConfigError
from stain_search.spaces import load_space

SPACE = """\
name: tiny
data: builtin:phantom-trichrome
base: {data.crop: 32, data.batch_size: 2, model.depth: 3, model.ngf: 8, model.ndf: 8,
       model.d_blocks: 2, train.epochs: 2, train.steps_per_epoch: 2}
space:
  loss.lambda_cycle: {distribution: loguniform, low: 1, high: 50}
objective: {metric: frechet, mode: min}
search: {algorithm: tpe, num_samples: 3, max_concurrent: 2, seed: 3,
         early_stopping: {pruner: median, grace_period: 1}}
resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0}
"""
PROFILES = """\
profiles:
  demo: {description: as written}
  gpu:
    data: builtin:phantom-ki67
    base: {data.crop: 64, model: {ngf: 16}, train.epochs: 20, train.decay_epochs: 10}
    resources: {gpus_per_worker: 1, cpus_per_worker: 4}
    search: {num_samples: 5, early_stopping: {grace_period: 5}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def space(tmp_path) -> Path:
    return write(tmp_path, SPACE + PROFILES)


def load(path: Path, **kw):
    return load_space(path, check_objective=False, **kw)


def test_default_follows_the_gpus():
    assert profiles.default_profile(0) == "demo"
    assert profiles.default_profile(1) == profiles.default_profile(8) == "gpu"


def test_default_choice_and_its_reason(space):
    cpu, gpu = load(space, gpus=0), load(space, gpus=2)
    assert (cpu.profile, gpu.profile) == ("demo", "gpu")
    assert cpu.profile_reason == "default: no GPU visible"
    assert gpu.profile_reason == "default: 2 GPUs visible"
    assert load(space, profile="gpu", gpus=0).profile_reason == "chosen with --profile"
    assert cpu.profiles == ("demo", "gpu")


def test_a_space_without_the_preferred_profile_falls_back(tmp_path):
    only_demo = load(write(tmp_path, SPACE + "profiles:\n  demo: {}\n"), gpus=1)
    assert only_demo.profile == "demo" and "no `gpu` profile" in only_demo.profile_reason
    big = load(write(tmp_path, SPACE + "profiles:\n  big: {}\n  small: {}\n"), gpus=0)
    assert big.profile == "big"  # neither default exists: the first listed


def test_a_space_without_profiles_runs_as_written(tmp_path):
    spec = load(write(tmp_path, SPACE), gpus=1)
    assert spec.profile is None and spec.profiles == ()
    assert spec.base_config().data.crop == 32
    with pytest.raises(ConfigError, match=r"defines no `profiles:`; drop --profile"):
        load(write(tmp_path, SPACE), profile="gpu")


def test_profile_overrides_base_data_resources_and_budget(space):
    demo, gpu = load(space, profile="demo"), load(space, profile="gpu")
    assert demo.base_config().data.crop == 32 and demo.search.num_samples == 3
    c = gpu.base_config()
    assert (c.data.crop, c.model.ngf, c.model.ndf, c.model.depth) == (64, 16, 8, 3)
    assert (c.train.epochs, c.train.decay_epochs, c.train.steps_per_epoch) == (20, 10, 2)
    assert c.data.path == "builtin:phantom-ki67"
    assert (gpu.resources.gpus_per_worker, gpu.resources.cpus_per_worker) == (1, 4)
    assert gpu.resources.workers_per_trial == 1  # kept from the space
    es = gpu.search.early_stopping
    assert (gpu.search.num_samples, es.grace_period, es.pruner) == (5, 5, "median")
    assert (gpu.search.seed, gpu.search.max_concurrent) == (3, 2)  # not the profile's to change


def test_data_flag_beats_the_profiles_data(space, tmp_path):
    spec = load(space, profile="gpu", data="builtin:phantom-trichrome")
    assert spec.base_config().data.path == "builtin:phantom-trichrome"


def test_unknown_profile_lists_the_known_ones(space):
    with pytest.raises(ConfigError, match=r"--profile gpus: no such profile — did you mean "
                                          r"`gpu`\? \(this space's profiles: demo, gpu\)"):
        load(space, profile="gpus")


@pytest.mark.parametrize("body,match", [
    ("  gpu: {resolution: 256}", (r"`profiles.gpu.resolution`: a profile cannot set this "
                                  r".*allowed: description, data, base, resources, search")),
    ("  gpu: {search: {algorithm: random}}", (r"`profiles.gpu.search.algorithm`: a profile "
                                              r"cannot set this \(the algorithm")),
    ("  gpu: {search: {early_stopping: {pruner: none}}}",
     r"`profiles.gpu.search.early_stopping.pruner`: .*allowed: grace_period, min_trials"),
    ("  gpu: {resources: {gpu_per_worker: 1}}",
     r"`profiles.gpu.resources.gpu_per_worker`: .*did you mean `gpus_per_worker`"),
    ("  gpu: {base: {loss.lambda_cycle: 5}}",
     r"`profiles.gpu.base.loss.lambda_cycle`: explored in `space`"),
    ("  gpu: [256]", r"`profiles.gpu`: expected a mapping"),
    ("  gpu: {data: 7}", r"`profiles.gpu.data`: expected a folder or builtin:NAME"),
    ("  'g p u': {}", r"a profile name uses letters"),
])
def test_what_a_profile_may_hold(tmp_path, body, match):
    path = write(tmp_path, SPACE + "profiles:\n" + body + "\n")
    with pytest.raises(ConfigError, match=match):
        load(path, profile="demo" if "demo" in body else None, gpus=0)


def test_empty_profiles_section(tmp_path):
    with pytest.raises(ConfigError, match=r"`profiles`: empty"):
        load(write(tmp_path, SPACE + "profiles: {}\n"))


def test_a_profile_that_cannot_train_names_the_profile(tmp_path):
    bad = SPACE + "profiles:\n  demo: {}\n  odd: {base: {data.crop: 100}}\n"
    with pytest.raises(ConfigError, match=r"not divisible by 2\*\*model.depth = 8.*"
                                          r"\[under profile `odd`; other profiles: demo"):
        load(write(tmp_path, bad), profile="odd")
    load(write(tmp_path, bad), profile="demo")  # the other profile still loads


def test_a_profile_that_breaks_a_corner_of_the_space_names_it(tmp_path):
    space = SPACE.replace("  loss.lambda_cycle:",
                          "  model.attention: {distribution: choice, choices: [none, self]}\n"
                          "  loss.lambda_cycle:")
    path = write(tmp_path, space + "profiles:\n  demo: {}\n  deep: {base: {model.depth: 5}}\n")
    with pytest.raises(ConfigError, match=r"space.model.attention = 'self'.*"
                                          r"under profile `deep`"):
        load(path, profile="deep")


def test_gpu_profile_without_a_gpu_is_refused(space):
    spec = load(space, profile="gpu")
    with pytest.raises(ConfigError, match=r"profile `gpu` asks for 1 GPU per trial worker, "
                                          r"but no GPU is visible here.*--profile demo.*--address"):
        plan.check_hardware(spec, gpus=0)
    plan.check_hardware(spec, gpus=1)
    plan.check_hardware(load(space, profile="demo"), gpus=0)


def test_describe_is_one_line_with_profile_and_scale(space):
    line = plan.describe(load(space, profile="gpu"))
    assert "\n" not in line
    assert line.startswith("tiny: profile gpu (chosen with --profile) — 64 px, U-Net depth 3 "
                           "ngf 16, D ndf 8, batch 2, 20 epochs × 2 steps (10 decaying), "
                           "1 GPU + 4 CPU per worker; others: demo")


# --- the command line --------------------------------------------------------------------

def test_dry_run_prints_the_reference_scale_and_starts_nothing(tmp_path, monkeypatch, capsys):
    """The acceptance command of issue 13. Exit 0 even without a GPU: a dry run
    only shows, and says that a real run here would be refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(profiles, "local_gpus", lambda: 0)
    assert main(["run", "spaces/lambda.yaml", "--profile", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("lambda: profile gpu (chosen with --profile) — 256 px, U-Net "
                            "depth 8 ngf 64")
    body = yaml.safe_load("\n".join(line for line in rest.splitlines()
                                    if not line.startswith(("note:", "dry run:"))))
    config = body["base_config"]
    assert (config["data"]["crop"], config["model"]["depth"], config["model"]["ngf"],
            config["model"]["ndf"]) == (256, 8, 64, 64)
    assert (config["train"]["epochs"], config["train"]["decay_epochs"]) == (200, 100)
    assert body["resources"]["gpus_per_worker"] == 1
    assert body["profile"] == {"name": "gpu", "why": "chosen with --profile",
                               "defined": ["demo", "gpu"]}
    assert body["objective"][0]["mode"] == "min" and set(body["space"]) == {
        "loss.lambda_cycle", "loss.lambda_identity"}
    assert "note: a run here would stop before Ray starts" in out
    assert list(tmp_path.iterdir()) == []  # no search folder, no mlflow.db


def test_dry_run_applies_the_budget_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "spaces/lambda.yaml", "--profile", "demo", "--dry-run",
                 "--num-samples", "11", "--name", "other"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("other: profile demo (chosen with --profile) — 64 px")
    assert "num_samples: 11" in out and "note:" not in out


@pytest.mark.parametrize("argv,match", [
    (["--profile", "gpu"], "asks for 1 GPU per trial worker, but no GPU is visible"),
    (["--profile", "huge"], "no such profile"),
])
def test_a_profile_that_cannot_run_is_one_line_exit_2_before_ray(tmp_path, monkeypatch,
                                                                 capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(profiles, "local_gpus", lambda: 0)
    assert main(["run", "spaces/lambda.yaml", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# --- `run --set`: a training key fixed for one search (issue 24, item 2) ---------------------

def test_run_set_fixes_a_key_over_the_profile_and_is_in_the_identity(tmp_path, monkeypatch,
                                                                     capsys):
    from stain_search.search_dir import SearchRecord, identity_of

    monkeypatch.chdir(tmp_path)
    assert main(["run", "spaces/lambda.yaml", "--profile", "gpu", "--dry-run",
                 "--set", "train.epochs=7", "--set", "train.decay_epochs=3",
                 "--set", "eval.stain=trichrome"]) == 0
    body = yaml.safe_load("\n".join(line for line in capsys.readouterr().out.splitlines()[1:]
                                    if not line.startswith(("note:", "dry run:"))))
    assert body["base_config"]["train"]["epochs"] == 7  # over the gpu profile's 200
    assert body["base_config"]["eval"]["stain"] == "trichrome"
    plain = load_space("spaces/lambda.yaml", profile="demo", check_objective=False)
    fixed = load_space("spaces/lambda.yaml", profile="demo", check_objective=False,
                       overrides={"train.epochs": 7})
    assert identity_of(fixed) != identity_of(plain)  # another search, not a resume of it
    record = SearchRecord.new(fixed)
    again = SearchRecord.from_json(record.to_json(), where=tmp_path)
    assert again.overrides == {"train.epochs": 7} and again.identity == record.identity
    assert SearchRecord.new(plain).to_json().get("overrides") is None  # old records unchanged


@pytest.mark.parametrize("pair, said", [
    ("loss.lambda_cycle=5", "--set loss.lambda_cycle: lambda.yaml explores it (space:)"),
    ("train.epoch=3", "--set"),
    ("train.epochs", "expected KEY=VALUE"),
])
def test_run_set_refuses_in_one_line(tmp_path, monkeypatch, capsys, pair, said):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "spaces/lambda.yaml", "--dry-run", "--set", pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stain-search: error: ") and said in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_resume_applies_the_searchs_own_set(tmp_path, monkeypatch):
    """`resume NAME` runs the search as it was started: with its --set pairs."""
    from stain_search import cli
    from stain_search.search_dir import SearchDir

    spec = load_space("spaces/lambda.yaml", profile="demo", check_objective=False,
                      overrides={"train.epochs": 2})
    SearchDir.of(tmp_path / "runs", "lambda").create(spec)
    seen = {}
    monkeypatch.setattr(cli, "cmd_run", lambda args: seen.update(vars(args)) or 0)
    assert main(["resume", "lambda", "--storage", str(tmp_path / "runs")]) == 0
    assert seen["overrides"] == {"train.epochs": 2} and seen["resume"] is True
    # its profile comes from its record, and the plan line says so (not "--profile")
    assert (seen["profile"], seen["profile_by"]) == ("demo", "the search's record")
    assert load_space("spaces/lambda.yaml", profile="demo", check_objective=False,
                      profile_by=seen["profile_by"]).profile_reason == \
        "chosen with the search's record"
