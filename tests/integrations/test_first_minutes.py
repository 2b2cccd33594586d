"""The first five minutes: init says at once when no worker is there, fails fast when none ever
served this Redis, warnings point at the user's own line, two inits in a process are two members."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest
import redis

import pluto
from pluto import Settings, _preflight
from pluto.protocol import GROUP, Keys
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script


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


def test_two_inits_in_one_process_are_two_members(stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, """
        import json, os, pluto
        first = pluto.init(project="two", run_id=os.environ["TEST_RUN_ID"])
        second = pluto.init(project="two", run_id=os.environ["TEST_RUN_ID"])
        first.log({"a": 1}); second.log({"b": 2})
        print("RESULT " + json.dumps([first.member, second.member, first.id == second.id]))
        second.finish(); first.finish()
    """)
    code, out, err = finish_rank(start_rank(script, stack.env(TEST_RUN_ID=uuid.uuid4().hex)))
    assert code == 0, err
    (first, second, same), = json_lines(out)
    assert same and first != second and second == first + "/2"
    run_id = stack.backend.runs("two")[0]["id"]
    run = wait_until(lambda: (x := stack.backend.run(run_id))["status"] == "COMPLETED" and x, 30,
                     "COMPLETED")
    members = {m["member"]: m for m in run["members"]}
    assert set(members) == {first, second}
    assert {m["state"] for m in members.values()} == {"finished"}
    assert members[first]["pid"] == members[second]["pid"]
