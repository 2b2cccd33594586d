"""Exactly-once in effect: exact values, crashes, a backend outage, shutdown (bad entries: in
process, tests/worker/test_isolation.py)."""

from __future__ import annotations

import math
import random
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import _servers
from pluto.protocol import GROUP, Keys
from tests.conftest import Backend, Stack
from tests.helpers import wait_until
from tests.worker.conftest import create, entry, pending, produce


def bits(value: object) -> object:
    """Floats compared by their bits (NaN included); the API spells NaN/inf as strings."""
    special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    value = special.get(value, value) if isinstance(value, str) else value
    return struct.pack(">d", value) if isinstance(value, float) else value


def at_least(n: int, read: Callable[[], list[Any]]) -> Callable[[], list[Any] | None]:
    def check() -> list[Any] | None:
        got = read()
        return got if len(got) >= n else None
    return check


def all_points(backend: Backend, run: int, name: str, n: int, timeout: float = 60) -> list[Any]:
    return list(wait_until(at_least(n, lambda: backend.points(run, name)), timeout,
                           f"{n} points of {name}"))


def test_values_arrive_bit_identical(stack: Stack, project: str, r: redis.Redis,
                                     keys: Keys) -> None:
    rng = random.Random(7)
    values = [0.1, 1e-300, 5e-324, -0.0, 1.7976931348623157e308, math.nan, math.inf, -math.inf,
              2**53 + 1, -(2**62), 0, True]
    values += [rng.uniform(-1e6, 1e6) for _ in range(200)]
    values += [struct.unpack(">d", rng.randbytes(8))[0] for _ in range(200)]
    run = create(r, keys, project, "exact")
    produce(r, keys, run, (entry(i + 1, {"v": v, "nested/name": i}, time_ms=1000 + i)
                           for i, v in enumerate(values)))
    points = all_points(stack.backend, run, "v", len(values))
    expect = [float(v) if isinstance(v, float) else int(v) for v in values]
    assert [p[0] for p in points] == list(range(1, len(values) + 1))
    assert [bits(p[1]) for p in points] == [bits(v) for v in expect]
    assert [p[2] for p in points] == [1000 + i for i in range(len(values))]
    assert [p[1] for p in stack.backend.points(run, "nested/name")] == list(range(len(values)))
    wait_until(lambda: pending(r, keys.metrics(run)) == 0, 10, "all acked")


def test_killed_worker_loses_and_duplicates_nothing(bare_stack: Stack, project: str,
                                                    r: redis.Redis, keys: Keys) -> None:
    first = bare_stack.start_worker(PLUTO_WORKER_BATCH="300")
    run = create(r, keys, project, "crash")
    n = 30_000
    produce(r, keys, run, (entry(s, {"a": s * 0.5, "b": -s}) for s in range(1, n + 1)))
    wait_until(lambda: pending(r, keys.metrics(run)) > 0 and
               r.xinfo_groups(keys.metrics(run))[0]["entries-read"] > 3000, 30, "mid-drain")
    first.kill()  # SIGKILL: whatever it read and did not ack stays pending on it
    assert pending(r, keys.metrics(run)) > 0
    bare_stack.start_worker(PLUTO_CLAIM_IDLE_MS="500")  # a different consumer claims it
    for name in ("a", "b"):
        points = all_points(bare_stack.backend, run, name, n)
        assert len(points) == n
    assert [p[:2] for p in bare_stack.backend.points(run, "a")] == [
        [s, s * 0.5] for s in range(1, n + 1)]
    wait_until(lambda: pending(r, keys.metrics(run)) == 0, 20, "nothing left pending")
    assert "claimed" in bare_stack.worker_logs()


def test_restarted_worker_rereads_its_own_pending(bare_stack: Stack, project: str,
                                                  r: redis.Redis, keys: Keys) -> None:
    env = dict(PLUTO_WORKER_BATCH="300", PLUTO_WORKER_NAME="box:1")  # pid 1 in a container
    first = bare_stack.start_worker(**env)
    run = create(r, keys, project, "restart")
    n = 20_000
    produce(r, keys, run, (entry(s, {"a": s}) for s in range(1, n + 1)))
    wait_until(lambda: pending(r, keys.metrics(run)) > 0, 30, "mid-drain")
    first.kill()
    held = pending(r, keys.metrics(run))
    bare_stack.start_worker(**env)  # the claim idle default (15 s) is far away: it re-reads
    points = all_points(bare_stack.backend, run, "a", n, timeout=10)
    assert [p[:2] for p in points] == [[s, s] for s in range(1, n + 1)]
    assert held > 0


@pytest.mark.slow
def test_backend_outage_is_retried_without_loss(private_backend: Backend, redis_url: str,
                                                prefix: str, project: str, r: redis.Redis,
                                                keys: Keys, tmp_path: Path) -> None:
    stack = Stack(redis_url, prefix, private_backend, tmp_path / "logs")
    stack.start_worker()
    try:
        run = create(r, keys, project, "outage")
        produce(r, keys, run, (entry(s, {"a": s}) for s in range(1, 1001)))
        all_points(private_backend, run, "a", 1000)
        assert private_backend.child is not None
        private_backend.child.stop()
        produce(r, keys, run, (entry(s, {"a": s}) for s in range(1001, 3001)))
        time.sleep(5)
        assert pending(r, keys.metrics(run)) > 0  # held, not acked, while the backend is down
        db = tmp_path / "private-backend" / "pluto.db"
        private_backend.child = _servers.start_backend(
            private_backend.url, f"sqlite:///{db}", private_backend.key,
            tmp_path / "private-backend", name="backend-again")
        points = all_points(private_backend, run, "a", 3000, timeout=30)
        assert [p[:2] for p in points] == [[s, s] for s in range(1, 3001)]
        retries = [line for line in stack.worker_logs().splitlines() if "retry" in line]
        assert retries and all("WARNING" in line for line in retries)
        wait_until(lambda: pending(r, keys.metrics(run)) == 0, 10, "acked after the outage")
    finally:
        stack.stop_workers()


def test_sigterm_finishes_the_batch_and_exits_zero(bare_stack: Stack, project: str,
                                                   r: redis.Redis, keys: Keys) -> None:
    w = bare_stack.start_worker(PLUTO_WORKER_BATCH="2000")
    run = create(r, keys, project, "term")
    produce(r, keys, run, (entry(s, {"a": s, "b": s, "c": s}) for s in range(1, 50_001)))
    wait_until(lambda: r.xinfo_groups(keys.metrics(run))[0]["entries-read"] > 2000, 30,
               "draining")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0
    assert pending(r, keys.metrics(run)) == 0  # the batch in hand was stored and acked
    read = r.xinfo_groups(keys.metrics(run))[0]["entries-read"]
    assert len(bare_stack.backend.points(run, "a")) == read
    assert not r.hexists(keys.workers, w.log().split("pluto worker ")[1].split()[0])
    consumers = r.xinfo_consumers(keys.metrics(run), GROUP)
    assert consumers == []  # left the group: it held nothing pending


def test_second_signal_exits_at_once(bare_stack: Stack, project: str, r: redis.Redis,
                                     keys: Keys) -> None:
    w = bare_stack.start_worker()
    wait_until(lambda: "ready" in w.log(), 20, "worker ready")
    bare_stack.backend  # noqa: B018 - the worker talks to the shared backend
    w.signal(signal.SIGTERM)
    w.signal(signal.SIGINT)  # microseconds later: the warm stop cannot have finished
    assert w.proc.wait(10) == 1
    assert "second signal: exiting immediately" in w.log()


@pytest.mark.slow
def test_control_is_served_while_a_backlog_drains(bare_stack: Stack, project: str,
                                                  r: redis.Redis, keys: Keys) -> None:
    bare_stack.start_worker()
    busy = create(r, keys, project, "busy")
    bare_stack.stop_workers()  # queue the backlog while no worker reads
    n = 200_000
    t0 = time.monotonic()
    produce(r, keys, busy, (entry(s, {"loss": s * 0.1, "acc": 0.5, "lr": 1e-3})
                            for s in range(1, n + 1)), chunk=20_000)
    produced = time.monotonic() - t0
    start = time.monotonic()
    bare_stack.start_worker()
    fresh = create(r, keys, project, "fresh", timeout=10)
    served = time.monotonic() - start
    left = r.xinfo_groups(keys.metrics(busy))[0]["lag"]
    wait_until(lambda: r.xinfo_groups(keys.metrics(busy))[0]["lag"] == 0 and
               pending(r, keys.metrics(busy)) == 0, 120, "backlog drained")
    elapsed = time.monotonic() - start
    print(f"\nproduced {n} entries in {produced:.1f} s; create served after {served:.2f} s "
          f"with {left} entries still queued; drained {3 * n} points in {elapsed:.1f} s "
          f"(incl. worker start): {3 * n / elapsed:,.0f} points/s")
    assert fresh != busy
    assert served < 3, f"create took {served:.1f} s behind the backlog"
    assert len(bare_stack.backend.points(busy, "loss")) == n


def test_lost_group_is_recreated(stack: Stack, project: str, r: redis.Redis, keys: Keys) -> None:
    run = create(r, keys, project, "nogroup")
    produce(r, keys, run, [entry(1, {"a": 1})])
    all_points(stack.backend, run, "a", 1)
    r.xgroup_destroy(keys.metrics(run), GROUP)  # as after a Redis restart without persistence
    produce(r, keys, run, [entry(2, {"a": 2})])
    points = all_points(stack.backend, run, "a", 2)
    assert [p[:2] for p in points] == [[1, 1], [2, 2]]
    assert "consumer group missing" in stack.worker_logs()
