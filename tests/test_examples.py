"""The cluster guide's example files are real (issue 16, item 5).

``examples/ray-cluster.yaml`` (Ray's cluster launcher), ``examples/rayjob.yaml``
(a KubeRay RayJob), ``examples/mlflow-server.yaml`` (its MLflow server) and
``examples/Dockerfile`` (their image) are only worth something if a user can
run them as written. Nothing here starts a cluster; each file is checked
against what does the checking in real life:

- the launcher config against Ray's own cluster-config schema and the
  defaults-filling ``ray up`` runs before it calls a cloud;
- the RayJob against KubeRay's field names (``ray.io/v1``), with a GPU worker
  group big enough for one trial of the space it runs;
- every ``stain-search …`` command line in them, and in ``docs/cluster.md``'s
  code, with the CLI's own parser: an unknown verb or flag fails here, a space
  file that does not exist, a profile the space lacks, a search name that no
  command of the file creates;
- one Ray version for the image, the launcher's container and the RayJob, the
  version pyproject.toml accepts.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from stain_search.cli_parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LAUNCHER = EXAMPLES / "ray-cluster.yaml"
RAYJOB = EXAMPLES / "rayjob.yaml"
MLFLOW = EXAMPLES / "mlflow-server.yaml"
DOCKERFILE = EXAMPLES / "Dockerfile"
GUIDE = ROOT / "docs" / "cluster.md"

# KubeRay's JSON field names (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go): a misspelt field is dropped by the API server without a
# word, so the manifest would run with the default instead.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "upgradeStrategy"}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                       "rayStartParams", "template", "scaleStrategy", "idleTimeoutSeconds",
                       "suspend"}

# Flags of other tools the guide names in prose (`--tmux`); any other `--flag`
# in its inline code must be one of stain-search's.
FOREIGN_FLAGS = {"--tmux", "--head", "--port", "--dashboard-host", "--object-manager-port",
                 "--node-manager-port", "--min-worker-port", "--max-worker-port",
                 "--ray-client-server-port", "--backend-store-uri", "--artifacts-destination",
                 "--allowed-hosts", "--host", "--workers", "--working-dir"}


# --- finding the command lines ---------------------------------------------------

_MENTION = re.compile(r"(?<![\w./~-])stain-search(?=\s+[a-z])")
_PUNCTUATION = set("();<>|&")


def _starts_command(before: str) -> bool:
    """Is `stain-search` at this point a command (not the project's name in prose)?
    At a line's start, after a quote, `$`, `:`, a shell operator, `--` or `RUN`."""
    before = before.rstrip()
    if not before:
        return True
    if before[-1] in "\"'`(:;|&$":
        return True
    return before.split()[-1] in ("RUN", "--", "-", "#")


def commands_in_line(line: str) -> list[str]:
    """Each `stain-search …` command in one line of shell, as its words."""
    found = []
    for m in _MENTION.finditer(line):
        before = line[:m.start()]
        if not _starts_command(before):
            continue
        rest = line[m.start():]
        opening = before[-1:] if before[-1:] in "\"'`" else ""
        if opening and opening in rest:
            rest = rest[:rest.index(opening)]
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for word in lexer:
            if set(word) <= _PUNCTUATION:
                break  # `a && b`, `a | b`, `$(...)`: the command ends here
            words.append(word)
        found.append(words)
    return found


def _joined(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, text) with `\\` continuations joined."""
    out, pending, start = [], "", 0
    for number, line in enumerate(lines, 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def yaml_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Commands in a YAML file's comments and in its string values (a folded
    `entrypoint: >-` is whole only once loaded)."""
    text = path.read_text(encoding="utf-8")
    comments = [line.strip()[1:] if line.strip().startswith("#") else "" for line in text.splitlines()]
    found = [(f"{path.name}:{n}", words) for n, line in _joined(comments)
             for words in commands_in_line(line)]
    for doc in yaml.safe_load_all(text):
        for value in _strings(doc):
            found += [(f"{path.name}: {value[:60]!r}", words)
                      for _, line in _joined(value.splitlines()) for words in commands_in_line(line)]
    return found


def dockerfile_commands(path: Path) -> list[tuple[str, list[str]]]:
    lines = [line.lstrip("# ") if line.startswith("#") else line
             for line in path.read_text(encoding="utf-8").splitlines()]
    return [(f"{path.name}:{n}", words) for n, line in _joined(lines)
            for words in commands_in_line(line)]


def guide_commands(text: str) -> list[tuple[str, list[str]]]:
    """Commands in the guide's fenced code blocks and its inline code."""
    found = []
    fences = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", flags=re.S | re.M)  # list items indent theirs
    for block in fences.finditer(text):
        first = text[:block.start()].count("\n") + 2
        for n, line in _joined(block.group(1).splitlines()):
            found += [(f"cluster.md:{first + n - 1}", w) for w in commands_in_line(line)]
    prose = fences.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`]+)`", prose):  # inline code may wrap a line
        line = prose[:m.start()].count("\n") + 1
        found += [(f"cluster.md:{line}", w) for w in commands_in_line(" ".join(m.group(1).split()))]
    return found


# --- what a command line must be -------------------------------------------------

@functools.lru_cache(maxsize=1)
def _stain_search_flags() -> frozenset[str]:
    import argparse

    flags: set[str] = set()
    pending = [build_parser()]
    while pending:
        parser = pending.pop()
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
    return frozenset(flags)


def parse(where: str, words: list[str]):
    """The CLI's own parser on the words after `stain-search`; its error fails the test."""
    assert words and words[0] == "stain-search", (where, words)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(words)}` is not a stain-search command line: "
                    f"{err.getvalue().strip().splitlines()[-1]}")
    # argparse also takes a flag's prefix (--storag); the guide names flags whole.
    for word in words[1:]:
        flag = word.split("=")[0]
        if flag.startswith("--") and flag not in _stain_search_flags():
            pytest.fail(f"{where}: `{flag}` abbreviates a flag; write it whole")
    return args


@dataclass(frozen=True)
class RunSpace:
    name: str  # the search it creates
    resources: object  # stain_search.spaces.Resources under the profile asked for


def run_spec(args) -> RunSpace:
    """The space a `run` names, resolved as the driver resolves it, under the
    profile it asks for (the project's own profile logic, as spaces.parse_space
    applies it; the full load imports torch, seconds this test does not need)."""
    import dataclasses

    from stain_search import profiles
    from stain_search.config import read_yaml
    from stain_search.spaces import Resources, resolve_space_path

    path = resolve_space_path(args.space)  # a missing space file fails here
    raw = read_yaml(path)
    explored = set(map(str, raw.get("space") or {}))
    known = profiles.parse_profiles(raw.get("profiles"), path=path, explored=explored,
                                    resource_keys=tuple(f.name for f in dataclasses.fields(Resources)))
    choice = profiles.choose(known, args.profile, path=path, gpus=0)  # an unknown profile fails here
    if choice.profile is not None:
        raw = profiles.merge(raw, choice.profile, path=path)
    return RunSpace(name=args.name or str(raw.get("name") or path.stem),
                    resources=Resources(**(raw.get("resources") or {})))


def check_commands(found: list[tuple[str, list[str]]]) -> list[tuple[str, object, object]]:
    """Parse every command; a run's space must load; every search a later verb
    names must be one a run in the same file creates. Returns (where, args, spec)
    of the runs."""
    assert found, "no stain-search command found"
    parsed = [(where, parse(where, words)) for where, words in found]
    runs = [(where, args, run_spec(args)) for where, args in parsed if args.verb == "run"]
    created = {space.name for _, _, space in runs}
    for where, args in parsed:
        name = getattr(args, "name", None)
        if args.verb != "run" and name and created:
            assert name in created, f"{where}: search {name!r} is not one this file runs {created}"
    return runs


def cluster_options(found):
    """In an example, every search command works against the bucket and the
    cluster, never a local folder or a local MLflow store."""
    for where, words in found:
        args = parse(where, words)
        if hasattr(args, "storage"):
            assert args.storage and urlparse(args.storage).scheme == "s3", \
                f"{where}: an example's --storage must be the bucket, got {args.storage!r}"
        if args.verb in ("run", "resume"):
            assert args.address, f"{where}: {args.verb} on a cluster names it with --address"
            assert (args.tracking_uri or "").startswith("http://"), \
                f"{where}: trials on other nodes need an MLflow server (--tracking-uri http://…)"
            if args.verb == "run":
                assert args.profile, (f"{where}: the driver runs on a head node without a GPU, "
                                      f"so the run must name its --profile")


def test_finding_commands_tells_a_command_from_prose():
    assert commands_in_line("  stain-search run spaces/lambda.yaml --address auto") == [
        ["stain-search", "run", "spaces/lambda.yaml", "--address", "auto"]]
    assert commands_in_line('ray exec c.yaml --tmux "stain-search status x --storage s3://b/r" x') == [
        ["stain-search", "status", "x", "--storage", "s3://b/r"]]
    assert commands_in_line("pip install ~/stain-search && stain-search weights fetch  # w") == [
        ["stain-search", "weights", "fetch"]]
    assert commands_in_line("the stain-search image holds Ray") == []
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --sotrage"):
        parse("here", ["stain-search", "best", "x", "--sotrage", "s3://b/r"])
    with pytest.raises(pytest.fail.Exception, match="`--storag` abbreviates"):
        parse("here", ["stain-search", "best", "x", "--storag", "s3://b/r"])
    with pytest.raises(pytest.fail.Exception, match="invalid choice"):
        parse("here", ["stain-search", "serve", "x"])


# --- the versions ------------------------------------------------------------------

def dockerfile_base() -> str:
    """The image examples/Dockerfile builds on (its FROM)."""
    return next(line.split()[1] for line in DOCKERFILE.read_text().splitlines()
                if line.startswith("FROM "))


def ray_versions() -> dict[str, str]:
    launcher = yaml.safe_load(LAUNCHER.read_text())
    rayjob = next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d.get("kind") == "RayJob")
    return {
        "examples/Dockerfile FROM": dockerfile_base().split(":")[1].split("-")[0],
        "ray-cluster.yaml docker.image": launcher["docker"]["image"].split(":")[1].split("-")[0],
        "rayjob.yaml rayVersion": str(rayjob["spec"]["rayClusterSpec"]["rayVersion"]),
    }


def test_one_ray_version_everywhere_and_pyproject_accepts_it():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    versions = ray_versions()
    assert len(set(versions.values())) == 1, f"the examples' Ray versions differ: {versions}"
    ray_req = next(r for r in map(Requirement, requires("stain-search")) if r.name == "ray")
    version = next(iter(versions.values()))
    assert ray_req.specifier.contains(version), f"Ray {version} is outside pyproject's {ray_req}"
    assert dockerfile_base().startswith("rayproject/ray:")
    assert dockerfile_base().endswith("-gpu"), "the trials need Ray's CUDA image"


# --- the cluster launcher --------------------------------------------------------

def test_launcher_config_is_one_ray_up_accepts():
    import json

    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(LAUNCHER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema: no unknown or misspelt key
    for key in ("cluster_name", "max_workers", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    # What `ray up` does before it calls AWS: fill the provider's defaults, validate.
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(config))

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items()
                 if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    assert all(t["max_workers"] >= 1 for t in gpu_types.values())
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0

    # The checkout goes to every node, and setup installs it from there.
    mounts = config["file_mounts"]
    checkout = next(remote for remote, local in mounts.items() if local == ".")
    assert any("pip install" in c and checkout in c for c in config["setup_commands"]), \
        "setup_commands must pip install the mounted checkout"

    found = yaml_commands(LAUNCHER)
    runs = check_commands(found)
    assert runs, "the launcher's comments show no `stain-search run`"
    cluster_options(found)
    for where, _, spec in runs:  # one trial worker fits one GPU node
        r = spec.resources
        assert any(r.cpus_per_worker <= t["resources"].get("CPU", 0)
                   and r.gpus_per_worker <= t["resources"]["GPU"] for t in gpu_types.values()), \
            f"{where}: a worker of {r.cpus_per_worker} CPU + {r.gpus_per_worker} GPU fits no node type"


# --- the RayJob and its MLflow server ---------------------------------------------

def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_is_a_kuberay_rayjob_that_runs_a_search():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    assert _containers(head), "the head group has no container"
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["groupName"] and _containers(group)
    for name, value in [*head["rayStartParams"].items(),
                        *(i for g in groups for i in g.get("rayStartParams", {}).items())]:
        assert isinstance(value, str), f"rayStartParams {name}: KubeRay takes strings"

    # The entrypoint is one stain-search command line, whole.
    entry = spec["entrypoint"]
    assert entry.startswith("stain-search run "), entry
    assert commands_in_line(entry) == [shlex.split(entry)]
    found = yaml_commands(RAYJOB)
    runs = check_commands(found)
    cluster_options(found)

    gpu_groups = [g for g in groups for c in _containers(g)
                  if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in _containers(head))
    for where, _, spec_ in runs:
        r = spec_.resources
        assert any(_cpus(c["resources"]["limits"]["cpu"]) >= r.cpus_per_worker
                   and int(c["resources"]["limits"]["nvidia.com/gpu"]) >= r.gpus_per_worker
                   for g in gpu_groups for c in _containers(g)), \
            f"{where}: a trial worker ({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU) fits no pod"

    # Head and workers run one image, and that is the image the guide builds.
    images = {c["image"] for g in [head, *groups] for c in _containers(g)}
    assert len(images) == 1, images


def test_the_rayjob_reaches_the_mlflow_server_of_its_manifest():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MLFLOW.read_text()) if d}
    assert {"Deployment", "Service", "PersistentVolumeClaim"} <= set(docs)
    job = next(d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d.get("kind") == "RayJob")
    args = parse("rayjob.yaml entrypoint", shlex.split(job["spec"]["entrypoint"]))
    uri = urlparse(args.tracking_uri)
    service = docs["Service"]
    assert uri.hostname == service["metadata"]["name"]
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]

    pod = docs["Deployment"]["spec"]["template"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["mlflow", "server"]
    flag = {k: v for k, v in zip(command, command[1:]) if k.startswith("--")}
    assert flag["--host"] == "0.0.0.0"
    assert int(flag["--port"]) == uri.port
    assert flag["--artifacts-destination"].startswith("s3://"), "artifacts go to the bucket"
    # MLflow refuses Host headers it was not told about; the trials send this
    # one. Its rule (mlflow.server.security_utils.is_allowed_host_header, not
    # imported: importing the server costs seconds): fnmatch for a pattern
    # with `*`, else equality.
    allowed = flag["--allowed-hosts"].split(",")

    def allows(host: str) -> bool:
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    assert allows(uri.netloc), (uri.netloc, allowed)
    assert allows("localhost:5000"), "the port-forward's Host"
    assert not allows("evil.example.com:5000")


# --- the image and the guide -----------------------------------------------------

def test_dockerfile_installs_the_checkout_and_its_commands_are_real():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\. /home/ray/stain-search$", text, flags=re.M)
    assert "pip install --no-cache-dir /home/ray/stain-search" in text
    check_commands(dockerfile_commands(DOCKERFILE))
    ignore = (EXAMPLES / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_the_guide_exists_links_its_examples_and_its_commands_are_real():
    text = GUIDE.read_text(encoding="utf-8")
    for path in (LAUNCHER, RAYJOB, MLFLOW, DOCKERFILE):
        assert f"examples/{path.name}" in text, f"docs/cluster.md does not name examples/{path.name}"
    found = guide_commands(text)
    check_commands(found)
    verbs = {parse(w, words).verb for w, words in found}
    assert {"run", "resume", "status", "best", "export"} <= verbs, verbs
    known = _stain_search_flags() | FOREIGN_FLAGS
    prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    for flag in re.findall(r"`(--[a-z][a-z-]*)`", prose):
        assert flag in known, f"docs/cluster.md names {flag}, which stain-search does not have"
    assert "docs/cluster.md" in (ROOT / "README.md").read_text(encoding="utf-8")
