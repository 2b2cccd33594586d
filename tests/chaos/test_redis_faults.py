"""Redis goes away under four logging ranks: stopped, paused, SIGKILLed, or down for longer
than the ranks' buffers last. ``log()`` stays cheap, the producers reconnect on their own, and
the backend ends up with every point ``log()`` accepted exactly once — except, when a buffer
overflowed, exactly the oldest entries ``finish()`` reported lost.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto.protocol import GROUP
from tests.chaos import ranks
from tests.chaos.conftest import OwnRedis
from tests.conftest import Stack
from tests.helpers import wait_until

RANKS = 4


def _start_logging(stack: Stack, own_redis: OwnRedis, tmp: Path, name: str, pace: float,
                   n: int = RANKS, env: dict[str, str] | None = None
                   ) -> tuple[list[subprocess.Popen[str]], Path, redis.Redis, int]:
    """``n`` ranks logging one run, returned once the backend holds points of every one:
    (processes, their stop file, a client of our Redis, the run's id)."""
    run_id, stop = f"{name}-{uuid.uuid4().hex[:6]}", tmp / "stop"
    procs = [ranks.start(stack, tmp, k, env, run_id=run_id, stop_file=str(stop), pace=pace)
             for k in range(n)]
    r = own_redis.client()
    raw = wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id))) and v.isdigit() and v,
                     30, "run id")
    run = int(raw)
    wait_until(lambda: all(ranks.points(stack.backend, run, k) for k in range(n)), 30,
               "every rank logging")
    return procs, stop, r, run


def _status(stack: Stack, run: int, want: str) -> dict[str, Any]:
    return dict(wait_until(lambda: (x := stack.backend.run(run))["status"] == want and x, 30,
                           f"run {want}"))


@pytest.mark.parametrize("how", ["stopped", "paused"])
def test_redis_unreachable_for_10s(how: str, chaos_stack: Stack, own_redis: OwnRedis,
                                   tmp_path: Path, report: list[dict[str, Any]]) -> None:
    stack = chaos_stack
    # A heartbeat timeout far shorter than the outage: healthy ranks must not be declared dead
    # because Redis itself was away.
    stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="4", PLUTO_CLAIM_IDLE_MS="2000")
    procs, stop, r, run = _start_logging(stack, own_redis, tmp_path, f"out-{how}", 0.01)
    if how == "stopped":
        own_redis.stop()
        time.sleep(10)
        own_redis.start()
    else:
        r.execute_command("CLIENT", "PAUSE", "10000", "ALL")
        time.sleep(10)
    back = time.monotonic()
    time.sleep(1)  # the ranks keep logging; their producers reconnect by themselves
    got = ranks.stop_ranks(stack.backend, run, procs, stop)
    recover = time.monotonic() - back
    for x in got:
        assert x["lost"] == 0, x
        assert x["max_log_ms"] < 2000, x  # a safety net: log() never waits for Redis (bench/ times it)
        assert x["max_queue"] > 100, x  # the buffer held the entries during the outage
    stored, dups = ranks.check_ranks(stack.backend, run, got)
    final = _status(stack, run, "COMPLETED")  # nobody was marked dead for Redis's outage
    assert {m["state"] for m in final["members"]} == {"finished"}
    assert "heartbeat lost" not in stack.worker_logs()
    logged = sum(x["logged"] for x in got)
    report.append(ranks.row(f"1 redis {how} 10 s", logged, stored, dups, recover,
                            stream_dups=ranks.stream_dups(r, stack.keys.metrics(run), logged),
                            max_log_ms=round(max(x["max_log_ms"] for x in got), 2),
                            max_buffered=max(x["max_queue"] for x in got)))


def test_redis_sigkilled_and_restarted_from_its_aof(chaos_stack: Stack, own_redis: OwnRedis,
                                                    tmp_path: Path,
                                                    report: list[dict[str, Any]]) -> None:
    stack = chaos_stack
    for _ in range(2):
        stack.start_worker(PLUTO_CLAIM_IDLE_MS="1000", PLUTO_HEARTBEAT_TIMEOUT="6")
    procs, stop, r, run = _start_logging(stack, own_redis, tmp_path, "aof", 0.005)
    time.sleep(1)
    own_redis.kill()  # SIGKILL: only what the AOF holds survives (appendfsync always)
    time.sleep(2)
    own_redis.start()
    back = time.monotonic()
    time.sleep(1)
    # The group survived in the AOF; drop it anyway, as a Redis without persistence would:
    # the workers re-create it and carry on (re-reading from the start is absorbed).
    r = own_redis.client()
    r.xgroup_destroy(stack.keys.metrics(run), GROUP)
    time.sleep(1)
    got = ranks.stop_ranks(stack.backend, run, procs, stop)
    recover = time.monotonic() - back
    assert all(x["lost"] == 0 for x in got), got
    stored, dups = ranks.check_ranks(stack.backend, run, got)
    _status(stack, run, "COMPLETED")
    assert "consumer group missing" in stack.worker_logs()
    logged = sum(x["logged"] for x in got)
    report.append(ranks.row("2 redis SIGKILL + AOF restart", logged, stored, dups, recover,
                            stream_dups=ranks.stream_dups(r, stack.keys.metrics(run), logged)))


def test_buffer_overflow_drops_the_oldest_and_says_how_many(
        chaos_stack: Stack, own_redis: OwnRedis, tmp_path: Path,
        report: list[dict[str, Any]]) -> None:
    stack, size = chaos_stack, 500
    stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="30")
    procs, stop, _, run = _start_logging(stack, own_redis, tmp_path, "overflow", 0.005, n=2,
                                         env={"PLUTO_BUFFER_SIZE": str(size)})
    own_redis.stop()
    time.sleep(4)  # ~1,500 entries/s per rank: far more than 500 fit
    own_redis.start()
    back = time.monotonic()
    time.sleep(1)
    got = ranks.stop_ranks(stack.backend, run, procs, stop)
    recover = time.monotonic() - back
    stored = 0
    for x in got:
        lost = x["lost"]
        assert lost > size, x  # finish() returns the count
        # Memory stayed bounded: the producer drops the oldest every flush interval (20 ms) or
        # retry, so the buffer exceeds PLUTO_BUFFER_SIZE by little (< 500 entries here).
        assert x["max_queue"] <= size + 500, x
        assert f"dropped the {lost} oldest" in x["stderr"] or any(
            str(lost) in w for w in x["warnings"]), x["stderr"][-2000:]
        assert any(f"{lost} logged entries" in w for w in x["warnings"]), x["warnings"]
        have = {p[0] for p in ranks.points(stack.backend, run, x["rank"])}
        missing = sorted(set(range(1, x["last"] + 1)) - have)
        # Exactly the oldest of what was buffered during the outage is gone: one contiguous
        # block; everything before it (sent before the outage) and after it arrived.
        assert len(missing) == lost and missing == list(range(missing[0], missing[0] + lost)), (
            missing[:5], missing[-5:], lost)
        c = ranks.check_rank(stack.backend, run, x["rank"], sorted(have))
        assert c["duplicates"] == 0
        stored += c["stored"]
    logged = sum(x["logged"] for x in got)
    report.append(ranks.row("3 buffer overflow (500)", logged, stored, 0, recover,
                            dropped_reported=sum(x["lost"] for x in got)))
