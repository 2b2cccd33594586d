"""The first five minutes: init says at once when no worker is there, fails fast when none ever
served this Redis, and warnings point at the user's own line."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis

import pluto
from pluto import Settings, _preflight
from pluto._keys import GROUP, Keys


def _settings(redis_url: str, prefix: str, timeout: str) -> Settings:
    return Settings.from_env({"PLUTO_REDIS_URL": redis_url, "PLUTO_PREFIX": prefix,
                              "PLUTO_INIT_TIMEOUT": timeout})


def test_no_worker_ever_fails_fast_naming_the_command(redis_url: str, prefix: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_preflight, "GRACE", 0.5)  # instead of 15 s; PLUTO_INIT_TIMEOUT is 60
    with pytest.raises(pluto.InitTimeout, match="no `pluto worker` has ever served") as err:
        pluto.init(project="p", run_id="first", settings=_settings(redis_url, prefix, "60"))
    assert f"PLUTO_PREFIX={prefix}" in str(err.value) and "pluto up" in str(err.value)


def test_a_worker_that_starts_within_the_grace_is_waited_for(
        r: redis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = Keys(prefix)
    monkeypatch.setattr(_preflight, "GRACE", 30)
    calls = []
    real = _preflight._heartbeats

    def later(client: redis.Redis, k: Keys) -> list[int]:
        calls.append(1)
        if len(calls) == 3:  # a worker registers while init waits
            r.hset(keys.workers, "w1", int(time.time() * 1000))
        return real(client, k)

    monkeypatch.setattr(_preflight, "_heartbeats", later)
    r.set(keys.run("p", "soon"), "7")
    _preflight.check_workers(r, keys, keys.run("p", "other"), _settings(redis_url, prefix, "60"))
    assert len(calls) == 3


@pytest.mark.parametrize("worker", ["gone", "stale"])
def test_no_live_worker_is_said_at_once(r: redis.Redis, redis_url: str, prefix: str,
                                        caplog: pytest.LogCaptureFixture, worker: str) -> None:
    keys = Keys(prefix)
    if worker == "gone":  # a worker served once, then stopped cleanly (deregistered)
        r.xgroup_create(keys.control, GROUP, id="0", mkstream=True)
        said = "no `pluto worker` is registered"
    else:  # a worker that died: its heartbeat is two minutes old
        r.hset(keys.workers, "w-dead", int(time.time() * 1000) - 120_000)
        said = "the last heartbeat is 120 s old"
    with (caplog.at_level(logging.WARNING, logger="pluto"),
          pytest.raises(pluto.InitTimeout, match="pluto worker")):
        pluto.init(project="p", run_id=f"w-{uuid.uuid4().hex[:6]}",
                   settings=_settings(redis_url, prefix, "1"))
    warned = [rec.getMessage() for rec in caplog.records if said in rec.getMessage()]
    assert len(warned) == 1 and "PLUTO_INIT_TIMEOUT=1" in warned[0], caplog.text


def test_an_existing_run_needs_no_worker(r: redis.Redis, redis_url: str, prefix: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(prefix)
    r.set(keys.run("p", "known"), "41")
    with caplog.at_level(logging.WARNING, logger="pluto"):
        _preflight.check_workers(r, keys, keys.run("p", "known"),
                                 _settings(redis_url, prefix, "60"))
    assert "worker" not in caplog.text


def test_warnings_point_at_the_users_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUTO_MODE", "disabled")
    run = pluto.init(project="p", run_id="where")
    with pytest.warns(pluto.PlutoWarning) as caught:
        run.log({"deep": {"er": {"name": "not a number"}}, "flat": [1, 2]})
    assert len(caught) == 2
    assert {w.filename for w in caught} == {__file__}
    run.finish()
