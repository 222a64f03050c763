"""The study served over gRPC (stain_search.study_proxy), without Ray: a trial
prunes through it, it listens only on the address it was given, a port setting
that cannot be used is one line, and a trial whose driver is gone fails within
a bounded time instead of hanging."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import psutil
import pytest

from conftest import tiny_space_yaml
from stain_search.context import Pruning, StudyAccess
from stain_search.errors import ConfigError
from stain_search.spaces import load_space
from stain_search.study import TrialPruning, create_study, serve_study
from stain_search.study_proxy import (PORT_ENV, SERVICE_CONFIG, StudyUnreachable, connect,
                                      driver_host)

HOST = "127.0.0.1"


def _study(tmp_path, *, complete: tuple[float, ...] = (0.2, 0.3)):
    """A median-pruned study (min_trials 2) with finished trials whose curve is
    ``value`` at every epoch, and one trial RUNNING to prune."""
    space = tmp_path / "p.yaml"
    space.write_text(tiny_space_yaml(name="p"))
    spec = load_space(space)
    pruning = Pruning.of(spec.search.early_stopping, spec.objectives)
    journal = tmp_path / "study.journal"
    study = create_study(spec, journal)
    for value in complete:
        t = study.ask()
        for epoch in (1, 2, 3):
            t.report(value, epoch)
        study.tell(t, value)
    return spec, pruning, journal, study, study.ask()


def _listening(port: int) -> list[str]:
    conns = psutil.Process().net_connections(kind="tcp")
    return [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def test_a_trial_prunes_through_the_proxy_and_the_journal_has_its_curve(tmp_path):
    spec, pruning, journal, study, running = _study(tmp_path)
    with serve_study(journal, name=spec.name, host=HOST) as access:
        assert access == StudyAccess(name="p", host=HOST, port=access.port) and access.port > 0
        # Only the address it was given, never every interface.
        assert _listening(access.port) and all(ip in (HOST, f"::ffff:{HOST}")
                                               for ip in _listening(access.port))
        trial = TrialPruning(access, running._trial_id, pruning)
        trial.record({pruning.metric: 0.9}, epoch=1)  # a restarted trial's missed epoch
        assert trial.should_prune({pruning.metric: 0.9}, epoch=2)  # worse than the median 0.25
        good = TrialPruning(access, study.ask()._trial_id, pruning)
        assert not good.should_prune({pruning.metric: 0.1}, epoch=2)
    assert _listening(access.port) == []  # stopped with the block
    # Written by the driver's journal (the proxy's storage), read back from the file.
    assert study._storage.get_trial(running._trial_id).intermediate_values == {1: 0.9, 2: 0.9}


def test_the_port_setting_is_used_and_a_taken_or_bad_one_is_one_line(tmp_path, monkeypatch):
    spec, _, journal, _, _ = _study(tmp_path, complete=())
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        taken = s.getsockname()[1]
        monkeypatch.setenv(PORT_ENV, str(taken))
        with pytest.raises(ConfigError, match=rf"{PORT_ENV}.*{HOST}:{taken}"):
            serve_study(journal, name=spec.name, host=HOST)
    with socket.socket() as s:
        s.bind((HOST, 0))
        free = s.getsockname()[1]
    monkeypatch.setenv(PORT_ENV, str(free))
    with serve_study(journal, name=spec.name, host=HOST) as access:
        assert access.port == free
    monkeypatch.setenv(PORT_ENV, "thirteen")
    with pytest.raises(ConfigError, match=rf"{PORT_ENV}='thirteen': not a TCP port"):
        serve_study(journal, name=spec.name, host=HOST)


def within(seconds: float, call, *args, **kwargs):
    """``call(*args, **kwargs)``, failing the test if it has not returned (or
    raised) after ``seconds``: a deadline on the call finishing, not a timing."""
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call, *args, **kwargs).result(timeout=seconds)
    except FutureTimeout:
        pytest.fail(f"{getattr(call, '__name__', call)} still waiting after {seconds} s")
    finally:
        pool.shutdown(wait=False)


def test_a_trial_whose_driver_is_gone_fails_within_a_bounded_time(tmp_path):
    spec, pruning, journal, _, running = _study(tmp_path)
    with serve_study(journal, name=spec.name, host=HOST) as access:
        trial = TrialPruning(access, running._trial_id, pruning)
        assert not trial.should_prune({pruning.metric: 0.1}, epoch=1)
    # What keeps it quick: the retries' backoffs add up to a few seconds.
    policy = json.loads(SERVICE_CONFIG)["methodConfig"][0]["retryPolicy"]
    backoffs = [min(float(policy["initialBackoff"][:-1]) * policy["backoffMultiplier"] ** i,
                    float(policy["maxBackoff"][:-1])) for i in range(policy["maxAttempts"] - 1)]
    assert sum(backoffs) < 15, backoffs
    # The driver died: nothing listens any more. A few quick retries, then the
    # error; a trial that hung on the dead address would hit the deadline instead.
    with pytest.raises(StudyUnreachable, match=rf"'p' at {access.address}.*{PORT_ENV}"):
        within(120, trial.should_prune, {pruning.metric: 0.1}, epoch=2)
    # A trial that starts after it: its first connection waits ready_timeout_s.
    with pytest.raises(StudyUnreachable, match="no answer within 2 s"):
        within(120, connect, access, ready_timeout_s=2)


def test_a_private_local_cluster_serves_on_the_loopback_address():
    assert driver_host(private=True) == HOST
