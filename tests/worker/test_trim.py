"""Trimming keeps a tail and never removes an entry that is pending or undelivered."""

from __future__ import annotations

import redis

from pluto.protocol import GROUP, Keys
from pluto_worker._streams import ensure_group, parse_id, trim
from tests.conftest import Stack
from tests.helpers import wait_until
from tests.worker.conftest import create, entry, pending, produce


def ids(r: redis.Redis, stream: str) -> list[bytes]:
    return [e[0] for e in r.xrange(stream)]


def test_trim_stops_below_the_oldest_pending_entry(r: redis.Redis, keys: Keys) -> None:
    stream = keys.metrics(1)
    ensure_group(r, stream)
    produce(r, keys, 1, (entry(s, {"a": s}) for s in range(1, 1001)))
    all_ids = ids(r, stream)
    got = r.xreadgroup(GROUP, "c1", {stream: ">"}, count=600)[0][1]
    r.xack(stream, GROUP, *[e[0] for e in got[:300]])  # 300 acked, 300 pending, 400 unread
    assert trim(r, stream, retention=100) > 0
    left = ids(r, stream)
    assert left == all_ids[200:]  # 100 acked kept as tail; every pending/unread entry stays
    assert pending(r, stream) == 300


def test_trim_keeps_everything_undelivered(r: redis.Redis, keys: Keys) -> None:
    stream = keys.metrics(2)
    ensure_group(r, stream)
    produce(r, keys, 2, (entry(s, {"a": s}) for s in range(1, 501)))
    assert trim(r, stream, retention=0) == 0  # nothing delivered: nothing may go
    got = r.xreadgroup(GROUP, "c1", {stream: ">"}, count=200)[0][1]
    r.xack(stream, GROUP, *[e[0] for e in got])
    assert trim(r, stream, retention=0) == 200
    assert parse_id(ids(r, stream)[0]) > parse_id(got[-1][0])
    assert len(ids(r, stream)) == 300


def test_trim_with_another_group_behind(r: redis.Redis, keys: Keys) -> None:
    stream = keys.metrics(3)
    ensure_group(r, stream)
    r.xgroup_create(stream, "viewer", id="0")
    produce(r, keys, 3, (entry(s, {"a": s}) for s in range(1, 301)))
    got = r.xreadgroup(GROUP, "c1", {stream: ">"}, count=300)[0][1]
    r.xack(stream, GROUP, *[e[0] for e in got])
    assert trim(r, stream, retention=0) == 0  # "viewer" has read nothing yet


def test_worker_trims_drained_streams_to_the_tail(bare_stack: Stack, project: str,
                                                  r: redis.Redis, keys: Keys) -> None:
    bare_stack.start_worker(PLUTO_RETENTION="100", PLUTO_TRIM_INTERVAL="0.2")
    run = create(r, keys, project, "trim")
    produce(r, keys, run, (entry(s, {"a": s}) for s in range(1, 5001)))
    wait_until(lambda: len(bare_stack.backend.points(run, "a")) == 5000, 30, "all stored")
    wait_until(lambda: r.xlen(keys.metrics(run)) <= 110, 20, "stream trimmed to its tail")
    assert pending(r, keys.metrics(run)) == 0
    last = r.xrevrange(keys.metrics(run), count=1)[0][1]
    assert last[b"_step"] == b"5000"  # the tail is the newest entries
