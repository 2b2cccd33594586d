"""The worker's small parts: public surface, settings, entry decoding, the backend client's
protocol handling (415 fallback, 422 bad lines) through httpx's transport seam."""

from __future__ import annotations

import json
import math
import random
import threading

import httpx
import msgpack
import pytest

import pluto_worker
from pluto.errors import ConfigError
from pluto.protocol import decode_entry
from pluto_worker import WorkerSettings
from pluto_worker._acks import Acks, head
from pluto_worker._backend import Backend, Interrupted, Rejected
from pluto_worker._entries import flatten, record


def test_public_names_match_all() -> None:
    public = {n for n in vars(pluto_worker) if not n.startswith("_")} - {"annotations"}
    assert set(pluto_worker.__all__) == public


def test_settings_from_env() -> None:
    s = WorkerSettings.from_env({"PLUTO_PREFIX": "x", "PLUTO_WORKER_BATCH": "7",
                                 "PLUTO_CLAIM_IDLE_MS": "100", "PLUTO_HEARTBEAT_TIMEOUT": "2.5",
                                 "PLUTO_REDIS_CLUSTER": "1", "PLUTO_API_URL": "http://h:1/"})
    assert (s.prefix, s.batch, s.claim_idle_ms, s.heartbeat_timeout, s.cluster, s.api_url) == (
        "x", 7, 100, 2.5, True, "http://h:1")
    d = WorkerSettings.from_env({})
    assert (d.redis_url, d.api_url, d.batch, d.block_ms, d.retention) == (
        "redis://127.0.0.1:6379/0", "http://127.0.0.1:8080", 5000, 200, 10_000)
    with pytest.raises(ConfigError, match="PLUTO_WORKER_BATCH"):
        WorkerSettings.from_env({"PLUTO_WORKER_BATCH": "lots"})  # (redact: tests/sdk/test_env.py)


@pytest.mark.parametrize("fields", [
    {b"_rank": b"0", b"_step": b"3", b"_time": b"9", b"a": b"1.5", b"b": b"-7", b"c": b"nan"},
    {b"_rank": b"0", b"_step": b"3", b"_time": b"9", b"_extra": b"x", b"a": b"1e300"},
    {b"_rank": b"0", b"_step": b"3", b"_time": b"9"},
])
def test_fast_decoding_matches_decode_entry(fields: dict[bytes, bytes]) -> None:
    for _ in range(2):  # the second time through, names come from the cache
        rec = record(b"5-1", flatten(fields))
        _, step, time_ms, data = decode_entry(fields)
        assert (rec["step"], rec["time"], rec["seq"]) == (step, time_ms, "5-1")
        assert [(k, type(v), repr(v)) for k, v in rec["data"].items()] == [
            (k, type(v), repr(v)) for k, v in data.items()]


@pytest.mark.parametrize("fields", [
    {b"_rank": b"0", b"_step": b"3", b"_time": b"9", b"a": b"abc"},
    {b"_rank": b"0", b"_time": b"9", b"a": b"1"},
    {b"_step": b"3", b"_time": b"9", b"a": b"1"},
    {b"_rank": b"0", b"_step": b"3", b"_time": b"9", b"bad\x01name": b"1"},
])
def test_fast_decoding_rejects_what_decode_entry_rejects(fields: dict[bytes, bytes]) -> None:
    record(b"1-0", flatten({b"_rank": b"0", b"_step": b"1", b"_time": b"1", b"a": b"2"}))
    with pytest.raises(ValueError) as fast:
        record(b"1-1", flatten(fields))
    with pytest.raises(ValueError) as slow:
        decode_entry(fields)
    assert str(fast.value) == str(slow.value)


def client(handler: object) -> Backend:
    settings = WorkerSettings.from_env({}, api_url="http://backend", api_key="k", retry_max=0.01)
    return Backend(settings, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


def test_ingest_falls_back_to_ndjson_on_415() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["content-type"])
        assert request.headers["authorization"] == "Bearer k"
        if request.headers["content-type"] == "application/msgpack":
            return httpx.Response(415, json={"error": "no msgpack"})
        lines = [json.loads(x) for x in request.content.decode().splitlines()]
        assert lines[0]["data"] == {"a": "NaN", "b": "-Infinity", "c": 1.5}
        return httpx.Response(200, json={"stored": len(lines)})

    b = client(handler)
    rec = {"time": 1, "step": 1, "data": {"a": math.nan, "b": -math.inf, "c": 1.5}, "seq": "1-0"}
    assert b.ingest(1, "p", [rec]).stored == 1
    assert b.ingest(1, "p", [rec]).stored == 1
    assert seen == ["application/msgpack", "application/x-ndjson", "application/x-ndjson"]


def test_ingest_answers() -> None:
    answers = [httpx.Response(503), httpx.Response(422, json={
        "stored": 1, "bad_lines": [{"index": 1, "error": "bad"}]}), httpx.Response(404)]

    def handler(request: httpx.Request) -> httpx.Response:
        body = msgpack.unpackb(request.content)
        assert body[0]["data"]["x"] == 1 and request.headers["x-run-id"] == "9"
        return answers.pop(0)

    b = client(handler)
    recs = [{"time": 1, "step": i, "data": {"x": 1}, "seq": f"1-{i}"} for i in range(2)]
    result = b.ingest(9, None, recs)  # the 503 is retried
    assert (result.stored, result.bad) == (1, {1: "bad"})
    with pytest.raises(Rejected) as exc:
        b.ingest(9, None, recs)
    assert exc.value.status == 404


def test_retries_stop_when_the_worker_stops() -> None:
    stop = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        stop.set()
        raise httpx.ConnectError("refused")

    settings = WorkerSettings.from_env({}, api_url="http://backend")
    b = Backend(settings, stop, transport=httpx.MockTransport(handler))
    with pytest.raises(Interrupted):
        b.update_status(1, "RUNNING")


def test_transient_failures_end_in_unavailable_after_the_attempts() -> None:
    from pluto_worker._backend import Unavailable

    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(503, text="busy")

    settings = WorkerSettings.from_env({}, api_url="http://backend", retry_max=0.01)
    b = Backend(settings, transport=httpx.MockTransport(handler), attempts=3)
    with pytest.raises(Unavailable, match="HTTP 503") as exc:
        b.update_status(1, "RUNNING")
    assert len(seen) == 3 and "after 3 attempts" in str(exc.value)


@pytest.mark.parametrize("reply, weather", [
    ("OOM command not allowed when used memory > 'maxmemory'.", True),
    ("BUSY Redis is busy running a script.", True),
    ("READONLY You can't write against a read only replica.", True),
    ("LOADING Redis is loading the dataset in memory", True),
    ("TRYAGAIN Multiple keys request during rehashing of slot", True),
    ("MASTERDOWN Link with MASTER is down", True),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ("ERR unknown command", False),
])
def test_redis_error_replies_are_classified_by_their_code(reply: str, weather: bool) -> None:
    """Through redis-py's own parser: the mapped classes lose the code from their message."""
    from redis._parsers.base import BaseParser

    from pluto_worker._streams import is_weather

    assert is_weather(BaseParser.parse_error(reply)) is weather


def test_isolation_settings_from_env() -> None:
    s = WorkerSettings.from_env({"PLUTO_WORKER_BATCH_BYTES": "300000",
                                 "PLUTO_WORKER_POSTERS": "2", "PLUTO_WORKER_HTTP_ATTEMPTS": "5"})
    assert (s.batch_bytes, s.posters, s.http_attempts) == (300000, 2, 5)
    d = WorkerSettings.from_env({})
    assert (d.batch_bytes, d.posters, d.http_attempts) == (8 << 20, 4, 3)
    with pytest.raises(ConfigError, match="PLUTO_WORKER_BATCH_BYTES"):
        WorkerSettings.from_env({"PLUTO_WORKER_BATCH_BYTES": "12"})  # below 1 KiB


def test_a_read_is_posted_in_parts_of_at_most_batch_bytes() -> None:
    from pluto_worker._persist import Post, decode, size

    flat = flatten({b"_rank": b"0", b"_step": b"1", b"_time": b"1", b"a": b"0." + b"5" * 300})
    entries = [(b"%d-0" % i, flat) for i in range(1, 101)]
    post = Post(1, "s")
    decode(post, entries, columns=False, batch_bytes=10 * size(flat), bury=lambda e, why: None)
    assert [len(p.entries) for p in post.parts] == [10] * 10
    assert [len(p.records) for p in post.parts] == [10] * 10


def _entries(rank: int, steps: range) -> list[tuple[bytes, list[bytes] | None]]:
    return [(b"%d-%d" % (step, rank), flatten({b"_rank": b"%d" % rank, b"_step": b"%d" % step,
                                               b"_time": b"5", b"r%d/a" % rank: b"0.5",
                                               b"r%d/b" % rank: b"%d" % step}))
            for step in steps]


def test_a_later_read_joins_the_queued_post_while_it_fits() -> None:
    """Reads decoded while the run's previous post is in flight join the one queued behind it
    (one body, not one per read), with the values one decode of all of them gives."""
    from pluto_worker._entries import Columns
    from pluto_worker._persist import Post, decode, size

    first = _entries(0, range(1, 41)) + _entries(1, range(1, 41))
    second = _entries(1, range(41, 81)) + _entries(2, range(1, 41))
    post = Post(1, "s")
    for read in (first, second):
        decode(post, read, columns=True, batch_bytes=8 << 20, bury=lambda e, why: None)
    assert len(post.parts) == 1 and post.parts[0].entries == first + second
    cols, whole = post.parts[0].columns, Columns()
    assert cols is not None
    whole.add_many(first + second)  # type: ignore[arg-type]
    by_point = lambda c: sorted(zip(map(c.names.__getitem__, c.name), c.value))  # noqa: E731
    assert by_point(cols) == by_point(whole) and sorted(cols.step) == sorted(whole.step)
    assert cols.names == ["r0/a", "r0/b", "r1/a", "r1/b", "r2/a", "r2/b"]
    full = max(sum(size(f) for _, f in read) for read in (first, second))
    small = Post(1, "s")
    for read in (first, second):
        decode(small, read, columns=True, batch_bytes=full, bury=lambda e, why: None)
    assert [p.entries for p in small.parts] == [first, second]  # together they do not fit


def test_a_run_is_read_on_while_its_queued_post_is_below_the_cap() -> None:
    from pluto_worker._flow import Flow
    from pluto_worker._persist import Part, Post

    flow = Flow(queue_cap=3)
    assert flow.reads([1, 2]) == ([1, 2], [])
    flow.queued[1] = Post(1, "s", parts=[Part(_entries(0, range(2)))])  # type: ignore[arg-type]
    assert flow.reads([1, 2]) == ([1, 2], [])
    flow.queued[1].parts.append(Part(_entries(0, range(2, 3))))  # type: ignore[arg-type]
    assert flow.reads([1, 2]) == ([2], [])  # at the cap: wait for the post in flight
    flow.recovering.add(2)
    flow.queued[2] = Post(2, "s")
    assert flow.reads([1, 2]) == ([], [])  # a pending read would start from the oldest again
    del flow.queued[2]
    assert flow.reads([1, 2]) == ([], [2])


@pytest.mark.parametrize("sizes, first", [
    ([1] * 10, 5), ([1, 1, 1, 1000, 1, 1], 3), ([1000, 1, 1], 1), ([1, 1, 1000], 2), ([5, 5], 1),
])
def test_a_413_split_halves_by_bytes(sizes: list[int], first: int) -> None:
    from pluto_worker._persist import halves

    entries = [(b"%d-0" % i, [b"x" * n]) for i, n in enumerate(sizes)]
    a, b = halves(entries)  # type: ignore[arg-type]
    assert (len(a), a + b) == (first, entries)


def _by_entry(entries: list[tuple[bytes, list[bytes] | None]]) -> Acks:
    """The rule, entry by entry through ``head`` (``Acks.stored_all`` has a short path for the
    SDK's layout): each id counted for its rank, the first of the largest steps kept."""
    acks = Acks()
    for entry_id, flat in entries:
        rank, step, time_ms = head(flat)
        acks.ids["s"][f"stored:{rank}"].append(entry_id)
        best = acks.newest["s"].get(rank)
        if step is not None and time_ms is not None and (best is None or step > best[0]):
            acks.newest["s"][rank] = (step, time_ms)
    return acks


@pytest.mark.parametrize("seed", range(90))
def test_stored_all_equals_the_rule_entry_by_entry(seed: int) -> None:
    """Ranks interleaved (few or many changes of rank: both ways of grouping) or each rank's
    entries together (as a post holds them)."""
    rng = random.Random(seed)
    ranks = [b"0", b"1", b"07", b"12"][: rng.randint(1, 4)]
    entries: list[tuple[bytes, list[bytes] | None]] = []
    for i in range(rng.randint(1, 40 if seed % 2 else 300)):
        step = str(rng.choice([rng.randint(0, 50), 7])).encode()  # ties on purpose
        flat = [b"_rank", rng.choice(ranks), b"_step", step, b"_time", str(1000 + i).encode(),
                b"a", b"1.5"]
        odd = rng.random()
        if seed % 3 == 0 and odd < 0.1:  # now and then an entry off the SDK's layout
            flat = rng.choice([[b"_step", step, b"_rank", b"1", b"_time", b"5", b"a", b"1"],
                               [b"_rank", b"x", b"_step", step, b"_time", b"5"],
                               [b"_rank", b"1", b"_step", b"-3", b"_time", b"5"], [b"a"]])
        entries.append((f"{1000 + i}-0".encode(), flat))
    if seed % 5 == 1:
        entries.sort(key=lambda e: e[1][1] if e[1] and len(e[1]) > 1 else b"")
    got = Acks()
    got.stored_all("s", entries)
    want = _by_entry(entries)
    assert {f: sorted(ids) for f, ids in got.ids["s"].items()} == \
        {f: sorted(ids) for f, ids in want.ids["s"].items()}
    assert got.newest == want.newest
    assert got.count() == len(entries)
