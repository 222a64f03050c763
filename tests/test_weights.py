"""`stain-search weights`: fetch against a local HTTP server, status, resolve once."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from functools import partial
from pathlib import Path

import pytest

from stain_search import cli
from stain_search.config import load_config
from stain_search.metrics import frechet
from stain_search.weights import (INCEPTION_SHA256, WeightsError, fetch_weights, resolve_eval,
                                  weights_status)


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for env in (frechet.WEIGHTS_ENV, "STAIN_SEARCH_WEIGHTS_URL", "STAIN_SEARCH_WEIGHTS_SHA256"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 (a free port) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def served_file(www: Path) -> tuple[str, str]:
    data = bytes(range(256)) * 5000  # 1.28 MB: several chunks
    (www / "weights.pth").write_bytes(data)
    return "weights.pth", hashlib.sha256(data).hexdigest()


def test_the_published_digest_matches_the_file_name():
    # torch.hub names a checked file <name>-<first 8 hex digits of its sha256>.pth.
    assert frechet.INCEPTION_URL.endswith(f"-{INCEPTION_SHA256[:8]}.pth")


def test_good_file_is_written_whole(server, tmp_path):
    www, base = server
    name, digest = served_file(www)
    dest = tmp_path / "out" / "inception.pth"
    assert fetch_weights(dest, url=f"{base}/{name}", sha256=digest, log=lambda m: None) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
    assert [p.name for p in dest.parent.iterdir()] == ["inception.pth"]  # no temporary left


def test_wrong_checksum_is_refused_and_leaves_nothing(server, tmp_path):
    www, base = server
    name, _ = served_file(www)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="SHA-256.*refused"):
        fetch_weights(out / "inception.pth", url=f"{base}/{name}", sha256="0" * 64)
    assert not out.exists() or not any(out.iterdir())


def test_no_server_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["weights", "fetch", "--to", str(tmp_path / "w.pth"),
                     "--url", f"http://127.0.0.1:{port}/w.pth"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not download" in err and "eval.feature_extractor: random" in err
    assert not (tmp_path / "w.pth").exists()


def test_cli_fetch_to_the_hub_cache_makes_auto_find_fid(server, monkeypatch, capsys):
    www, base = server
    name, digest = served_file(www)
    monkeypatch.setenv("STAIN_SEARCH_WEIGHTS_URL", f"{base}/{name}")
    monkeypatch.setenv("STAIN_SEARCH_WEIGHTS_SHA256", digest)
    assert cli.main(["weights", "fetch"]) == 0
    assert frechet.hub_cache_weights().is_file()
    found, where = frechet.find_inception_weights(load_config().eval)
    assert found == frechet.hub_cache_weights() and where == "torch hub cache"
    assert cli.main(["weights", "fetch"]) == 0  # a second fetch keeps the good file
    assert "already there" in capsys.readouterr().out


def test_status_says_which_features_and_why(tmp_path):
    lines = weights_status(load_config())
    assert "random CNN" in lines[0] and "weights fetch" in lines[-1]
    assert "random" in weights_status(load_config(None, {"eval.feature_extractor": "random"}))[0]
    assert "error" in " ".join(weights_status(load_config(None, {"eval.feature_extractor": "inception"})))
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"not the standard file")
    lines = weights_status(load_config(None, {"eval.fid_weights": str(fake)}))
    assert "Inception" in lines[0] and "differs from the standard" in lines[1]


def test_resolve_eval_decides_once(tmp_path, monkeypatch):
    resolved = resolve_eval(load_config())
    assert resolved.eval.feature_extractor == "random" and resolved.eval.fid_weights is None
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(frechet.WEIGHTS_ENV, str(weights))
    resolved = resolve_eval(load_config())
    assert resolved.eval.feature_extractor == "inception"
    assert resolved.eval.fid_weights == str(weights.resolve())
    # A worker without the environment variable still uses the driver's choice.
    monkeypatch.delenv(frechet.WEIGHTS_ENV)
    assert frechet.resolve_feature_extractor(resolved.eval).weights_path == str(weights.resolve())
