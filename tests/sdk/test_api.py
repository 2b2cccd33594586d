"""The public surface and the paths of init that need no worker."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

import pluto
from pluto import protocol
from pluto._settings import Settings
from tests.conftest import ROOT


def test_all_matches_public_names() -> None:
    # pluto.query loads lazily (it needs httpx, from the worker extra): not in __all__
    public = {n for n in dir(pluto) if not n.startswith("_")} - {"annotations", "query"}
    assert set(pluto.__all__) == public


def test_import_is_cheap_and_pulls_no_server_code() -> None:
    code = ("import sys, pluto; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('worker', 'backend', 'starlette', 'uvicorn', 'torch', 'numpy')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_errors_share_one_base() -> None:
    for exc in (pluto.ConfigError, pluto.ConnectionFailed, pluto.InitTimeout, pluto.RunFinished):
        assert issubclass(exc, pluto.PlutoError)


def test_disabled_mode_touches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUTO_MODE", "disabled")
    monkeypatch.setenv("PLUTO_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    run = pluto.init(project="p", name="n", config={"a": 1}, run_id="r")
    run.log({"x": 1.0})
    assert run.finish() == 0 and run.id == 0 and not run.resumed


def test_unreachable_redis_fails_fast_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pluto._servers import free_port

    monkeypatch.setenv("PLUTO_REDIS_URL", f"redis://user:secret@127.0.0.1:{free_port()}/0")
    start = time.monotonic()
    with pytest.raises(pluto.ConnectionFailed) as info:
        pluto.init(project="p", run_id="r")
    assert time.monotonic() - start < 60  # a safety net against a hang; speed is in bench/
    assert "PLUTO_REDIS_URL" in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize("url", ["not a url", "http://127.0.0.1:6379", "redis://127.0.0.1:abc/0"])
def test_bad_redis_url_is_a_config_error(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("PLUTO_REDIS_URL", url)
    with pytest.raises(pluto.PlutoError, match="PLUTO_REDIS_URL"):
        pluto.init(project="p", run_id="r")


@pytest.mark.parametrize("bad", ["", "x" * 10_240, "a\x00b", "line\nbreak", 3.5, ["a"], b"bytes"])
def test_bad_run_id_is_rejected_before_anything_is_written(
        redis_url: str, prefix: str, r: redis.Redis, bad: object) -> None:
    settings = Settings.from_env({"PLUTO_REDIS_URL": redis_url, "PLUTO_PREFIX": prefix})
    with pytest.raises(pluto.ConfigError, match="run_id") as exc:
        pluto.init(project="p", run_id=bad, settings=settings)  # type: ignore[arg-type]
    if isinstance(bad, str) and len(bad) > 1000:  # a 10 kB id: the message says how long
        assert "10240 chars" in str(exc.value), exc.value
    assert list(r.scan_iter(match=f"{prefix}:*")) == []


def test_bad_env_numbers_name_the_variable() -> None:
    with pytest.raises(pluto.ConfigError, match="PLUTO_INIT_TIMEOUT"):
        Settings.from_env({"PLUTO_INIT_TIMEOUT": "soon"})
    with pytest.raises(pluto.ConfigError, match="PLUTO_INIT_TIMEOUT"):
        Settings.from_env({"PLUTO_INIT_TIMEOUT": "nan"})
    with pytest.raises(pluto.ConfigError, match="PLUTO_MODE"):
        Settings.from_env({"PLUTO_MODE": "offline-ish"})


def test_config_that_is_not_serialisable_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUTO_MODE", "disabled")
    with pytest.raises(TypeError, match=r"optim\.fn"):
        pluto.init(project="p", run_id="r", config={"optim": {"fn": object()}})


def test_no_worker_gives_init_timeout_naming_the_command(redis_url: str, prefix: str) -> None:
    settings = Settings.from_env({"PLUTO_REDIS_URL": redis_url, "PLUTO_PREFIX": prefix,
                                  "PLUTO_INIT_TIMEOUT": "1"})
    start = time.monotonic()
    with pytest.raises(pluto.InitTimeout, match="pluto worker"):
        pluto.init(project="p", run_id="lonely", settings=settings)
    assert time.monotonic() - start < 60  # a safety net against a hang, not a speed test


def test_init_returns_at_once_and_the_producer_records_the_member_first(
        r: redis.Redis, redis_url: str, prefix: str) -> None:
    """Registration (members, heartbeat, attach op) is the producer's first job, before any
    entry: it is in Redis once finish() returns, attach before finish on the control stream."""
    from pluto import protocol as proto

    keys = protocol.Keys(prefix)
    r.set(keys.run("p", "known"), "41")  # as a worker leaves it: no worker needed to attach
    settings = Settings.from_env({"PLUTO_REDIS_URL": redis_url, "PLUTO_PREFIX": prefix,
                                  "RANK": "3"})
    run = pluto.init(project="p", run_id="known", settings=settings)
    assert run.id == 41 and run.resumed
    for i in range(3):
        run.log({"x": i})
    assert run.finish() == 0
    info = proto.unpack(r.hget(keys.members(41), run.member))
    assert (info["rank"], info["state"]) == (3, "finished")
    assert int(r.hget(keys.heartbeats(41), run.member)) > 0
    ops = [proto.decode_control(f) for _, f in r.xrange(keys.control)]
    assert [(m["op"], m.get("member")) for m in ops if m["op"] != "config"] == [
        ("attach", run.member), ("finish", run.member)]
    assert r.xlen(keys.metrics(41)) == 3


def test_key_quoting_keeps_odd_ids_apart() -> None:
    keys = protocol.Keys("p")
    odd = ["a:b", "a{b}", "a b", "100%", "a%3Ab", "ünï"]
    assert len({keys.run("proj", x) for x in odd}) == len(odd)
    assert keys.run("my proj", "a:b") == "p:run:my%20proj:a%3Ab"
    assert keys.run_of_stream(keys.metrics(42)) == 42
    assert keys.run_of_stream(keys.dead(42)) is None


def test_a_unix_socket_url_carries_everything(tmp_path: object) -> None:
    """redis+unix: the producer's raw, GIL-keeping I/O works on an AF_UNIX socket too."""
    from pathlib import Path

    from pluto import _servers

    tmp = Path(str(tmp_path))
    sock = tmp / "redis.sock"
    child = _servers.spawn("redis-unix", [
        _servers.redis_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
        "--appendonly", "no", "--dir", str(tmp)], tmp)
    try:
        _servers.wait_for(sock.exists, 15, "redis on a unix socket", child)
        url = f"unix://{sock}?db=0"
        r = redis.Redis.from_url(url)
        _servers.wait_for(lambda: r.ping(), 15, "redis answering", child)
        keys = protocol.Keys("unix")
        r.set(keys.run("p", "u"), "7")
        run = pluto.init(project="p", run_id="u",
                         settings=Settings.from_env({"PLUTO_REDIS_URL": url, "PLUTO_PREFIX": "unix"}))
        assert run._producer is not None
        for i in range(20_000):
            run.log({"loss": i / 7, "step_int": i})
        assert run.finish() == 0
        assert r.xlen(keys.metrics(7)) == 20_000
        last = r.xrevrange(keys.metrics(7), count=1)[0][1]
        assert last[b"loss"] == repr(19_999 / 7).encode() and last[b"step_int"] == b"19999"
    finally:
        child.stop()
