"""The producer thread and its RESP packing, against a real Redis: what lands is what was logged."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import redis

from pluto import _io, _producer
from pluto._producer import Producer, Target
from pluto._resp import TRANSIENT, bulk, count_entries, whole_entries
from pluto.protocol import Keys, decode_entry
from tests.helpers import wait_until

NAMES = [("a",), ("loss", "acc", "lr"), ("wéird name %s %d\"", "x/y"), ("n",)]


def _entries(n: int, seed: int = 1) -> list[tuple[int, float, dict[str, int | float]]]:
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        names = NAMES[rng.randrange(len(NAMES))] if rng.random() < 0.3 else NAMES[1]
        values = [rng.choice([rng.random(), -0.0, math.inf, -math.inf, 2**70, -3, 1e-310,
                              rng.getrandbits(40)]) for _ in names]
        out.append((step, 1_700_000_000 + step / 1000, dict(zip(names, values))))
    return out


def _flat(entries: list[tuple[int, float, dict[str, int | float]]]) -> list[object]:
    items: list[object] = []
    for step, ts, data in entries:
        items += [step, ts, tuple(data), *data.values()]
    return items


def _target(keys: Keys, run: int) -> Target:
    return Target(keys.metrics(run), keys.heartbeats(run), keys.members(run), "h:1")


def _nobody_listens() -> redis.Redis:
    """A client of a port nothing listens on, retrying as ``pluto.init``'s client does."""
    from pluto._init import quick_retry
    from pluto._servers import free_port

    return redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=quick_retry())


def test_whole_entries_finds_the_last_boundary() -> None:
    items = _flat(_entries(50))
    assert whole_entries(items) == len(items) and count_entries(items) == 50
    width = 3 + len(_entries(50)[-1][2])
    for cut in range(1, width + 1):  # any broken last entry is left out, the 49 before kept
        assert whole_entries(items[:-cut]) == len(items) - width
        assert count_entries(items[:len(items) - width]) == 49



@pytest.mark.parametrize(("chunk", "libc"), [(3, True), (4000, True), (4000, False)])
def test_mixed_entries_land_in_order_exactly(r: redis.Redis, keys: Keys, chunk: int, libc: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_producer, "CHUNK", chunk)
    if not libc:  # the portable path: plain socket calls
        monkeypatch.setattr(_io, "_LIBC", None)
    stream = keys.metrics(7)
    producer = Producer(r, _target(keys, 7), 3, 0.01, 1.0, 100_000)
    producer.start()
    entries = _entries(3000)
    for entry in entries:  # as Run.log does: one atomic extend per entry
        producer.queue.extend(_flat([entry]))
    assert producer.flush(30)
    producer.stop()
    got = [decode_entry(fields) for _, fields in r.xrange(stream)]
    assert len(got) == len(entries) and producer.dropped == producer.failed == 0
    for (rank, step, time_ms, data), (want_step, ts, want) in zip(got, entries):
        assert (rank, step, time_ms) == (3, want_step, int(ts * 1000))
        assert list(data) == list(want)
        assert [repr(v) for v in data.values()] == [repr(v) for v in want.values()]


def test_overflow_drops_the_oldest_whole_entries(r: redis.Redis, keys: Keys) -> None:
    producer = Producer(r, _target(keys, 8), 0, 0.01, 1.0, 100)
    for step in range(1, 1001):
        producer.queue.extend((step, 1.0, ("a", "b"), step, float(step)))
    producer._drop_overflow()
    assert producer.dropped == 900 and producer.pending() == 100
    assert producer.queue[0] == 901


def test_replies_are_counted_and_errors_placed_at_every_split_point() -> None:
    from pluto._resp import Replies

    replies = [b"$15\r\n1764000000123-0\r\n", b"-OOM command not allowed\r\n",
               b"$15\r\n1764000000123-1\r\n", b"-ERR x\r\n", b"!7\r\nERR y z\r\n",
               b"$3\r\n1-0\r\n"]
    stream = b"".join(replies)
    want = [(1, b"OOM command not allowed"), (3, b"ERR x"), (4, b"ERR y z")]
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1, 7):
            got = Replies()
            errors = sum(got.feed(part) for part in
                         (stream[:cut], stream[cut:cut2], stream[cut2:]) if part)
            assert (got.count, errors, got.errors) == (len(replies), 3, want), (cut, cut2)
    only_ok = Replies()
    only_ok.feed(replies[0][:7])
    assert only_ok.count == 0
    only_ok.feed(replies[0][7:] + replies[2])
    assert (only_ok.count, only_ok.errors) == (2, [])


def test_refused_entries_are_counted_not_retried(r: redis.Redis, keys: Keys) -> None:
    stream = keys.metrics(9)
    r.set(stream, "not a stream")  # every XADD to it fails with WRONGTYPE
    producer = Producer(r, _target(keys, 9), 0, 0.01, 1.0, 100_000)
    for step in range(1, 5001):
        producer.queue.extend((step, 1.0, ("a",), 1.0))
    assert producer._send_all() and producer.failed == 5000 and not producer.queue
    assert producer.ledger.sent == 0 and producer.ledger.drops == {"refused": 5000}
    r.delete(stream)
    for step in range(1, 11):
        producer.queue.extend((step, 1.0, ("a",), 1.0))
    assert producer._send_all() and producer.failed == 5000 and r.xlen(stream) == 10
    assert producer.ledger.sent == 10


def test_repeated_values_keep_their_exact_text() -> None:
    from pluto._resp import _texts

    nan = float("nan")
    for column in ([0.0, -0.0] * 20, [1, 1.0] * 20, [nan, nan, 0.25, 0.25] * 20,
                   [0.001] * 50, [3] * 50 + [3.5], [float("inf")] * 9 + [-float("inf")]):
        assert _texts(column) == [repr(v) for v in column]


def test_entries_survive_a_redis_that_refuses_connections(keys: Keys) -> None:
    """Nothing listens: every write fails, and every entry stays queued, in order."""
    client = _nobody_listens()
    producer = Producer(client, _target(keys, 10), 0, 0.01, 1.0, 100_000)
    for step in range(1, 10_001):
        producer.queue.extend((step, 1.0, ("a", "b"), step, 0.5))
    assert not producer._send_all()
    assert producer.pending() == 10_000 and producer.queue[0] == 1 and producer.queue[-5] == 10_000


def test_entries_redis_may_hold_are_not_dropped_after_a_failed_reconnect(keys: Keys) -> None:
    """Entries in flight when the connection broke may be in Redis already (it answers for
    them after a restart from its dump): the buffer keeps them at its head, uncounted, however
    many retries fail to connect before Redis is back, and drops the oldest behind them."""
    producer = Producer(_nobody_listens(), _target(keys, 11), 0, 0.01, 1.0, 100)
    width = 5
    for step in range(1, 1001):
        producer.queue.extend((step, 1.0, ("a", "b"), step, 0.5))
    sent = _producer.Chunk([producer.queue.popleft() for _ in range(50 * width)], 50,
                           written=True)  # written on a connection that had answered
    producer._requeue(producer._inflight.__class__([sent]))
    for retry in range(3):  # Redis still away, the rank logs on; each retry fails to connect
        for step in range(1001 + 100 * retry, 1101 + 100 * retry):
            producer.queue.extend((step, 1.0, ("a", "b"), step, 0.5))
        assert not producer._send_all()
    assert producer.queue[0] == 1 and producer.queue[49 * width] == 50  # kept, in order
    assert producer.queue[50 * width] == 1300 - 50 + 1  # then the newest 50 of the rest
    assert producer.dropped == 1300 - 100 and producer.pending() == 100


@pytest.mark.parametrize("raw", [True, False])
def test_wire_sends_past_a_full_socket_buffer_and_reports_a_closed_peer(raw: bool) -> None:
    import socket
    import threading

    ours, theirs = socket.socketpair()
    ours.settimeout(5.0)
    wire = _io.Wire(ours, raw=raw)
    assert wire.raw == (raw and _io._LIBC is not None)
    data = bytes(range(256)) * 40_000  # 10 MB: far more than the socket buffer holds
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(theirs.recv(65536))
                                              for _ in iter(lambda: len(got) < len(data), False)])
    reader.start()
    wire.send(data)
    reader.join(10)
    assert bytes(got) == data
    theirs.sendall(b"+OK\r\n")
    assert wire.recv() == b"+OK\r\n"
    theirs.close()
    with pytest.raises(ConnectionError):
        wire.recv()
    ours.close()


@pytest.mark.parametrize("raw", [True, False])
def test_wire_gives_up_after_the_socket_timeout(raw: bool) -> None:
    import socket

    ours, theirs = socket.socketpair()
    ours.settimeout(0.2)
    with pytest.raises((TimeoutError, socket.timeout)):
        _io.Wire(ours, raw=raw).recv()
    ours.close()
    theirs.close()


def test_registration_is_retried_before_any_entry_is_sent(r: redis.Redis, keys: Keys) -> None:
    """init leaves the member registration to the producer: while it fails, nothing is sent;
    once it succeeds, the entries follow, in order."""
    calls: list[int] = []
    stream = keys.metrics(11)

    def register() -> None:
        calls.append(r.xlen(stream))  # what was in the stream when registration ran
        if len(calls) < 3:
            raise redis.ConnectionError("Redis went away")

    producer = Producer(r, _target(keys, 11), 0, 0.01, 1.0, 100_000,
                        register=register)
    for step in range(1, 101):
        producer.queue.extend((step, 1.0, ("a",), step))
    producer.start()
    assert producer.flush(30)
    producer.stop()
    assert calls == [0, 0, 0]
    assert [decode_entry(f)[1] for _, f in r.xrange(stream)] == list(range(1, 101))


def test_a_long_overflow_warns_once_not_every_tick(keys: Keys,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Redis unreachable, entries keep coming: the oldest are dropped all along, and the log
    gets one "buffer full" line per DROP_REPORT_EVERY, not one per 20 ms tick."""
    import time

    client = _nobody_listens()
    producer = Producer(client, _target(keys, 12), 0, 0.02, 1.0, 100)
    producer.start()
    deadline, step = time.monotonic() + 1.5, 0
    with caplog.at_level("WARNING", logger="pluto"):
        while time.monotonic() < deadline:
            for _ in range(100):
                step += 1
                producer.queue.extend((step, 1.0, ("a",), step))
            time.sleep(0.005)
        producer.stop(timeout=1)
    assert producer.dropped > 1000
    full = [r for r in caplog.records if "buffer full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in full]


def test_busy_replies_keep_the_entries_until_redis_takes_them(tmp_path: object) -> None:
    """OOM (maxmemory) is weather: nothing is dropped, everything lands once memory frees."""
    from pathlib import Path

    from pluto import _servers

    port = _servers.free_port()
    child = _servers.start_redis(port, Path(str(tmp_path)) / "oom")
    try:
        r = redis.Redis(port=port)
        keys = Keys("oom")
        r.config_set("maxmemory-policy", "noeviction")
        used = int(r.info("memory")["used_memory"])
        r.set("ballast", b"x" * 3_000_000)
        r.config_set("maxmemory", str(used + 1_000_000))  # below what is already used: OOM
        producer = Producer(r, _target(keys, 1), 0, 0.01, 1.0, 100_000)
        producer.start()
        for step in range(1, 3001):
            producer.queue.extend((step, 1.0, ("a",), float(step)))
        assert not producer.flush(1.5)  # Redis answers -OOM: the entries wait in memory
        assert producer.ledger.drops == {} and producer.pending() == 3000
        r.delete("ballast")
        r.config_set("maxmemory", "0")
        assert producer.flush(20)
        producer.stop()
        steps = [int(f[b"_step"]) for _, f in r.xrange(keys.metrics(1))]
        assert sorted(set(steps)) == list(range(1, 3001)) and producer.ledger.sent == 3000
        assert producer.ledger.drops == {}
    finally:
        child.stop()


def test_an_entry_repr_cannot_write_is_dropped_alone(r: redis.Redis, keys: Keys) -> None:
    producer = Producer(r, _target(keys, 13), 0, 0.01, 1.0, 100_000)
    for step in range(1, 11):
        value = 10**5000 if step == 5 else step  # repr() refuses ints over 4,300 digits
        producer.queue.extend((step, 1.0, ("a",), value))
    assert producer._send_all()
    steps = [int(f[b"_step"]) for _, f in r.xrange(keys.metrics(13))]
    assert steps == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert producer.ledger.sent == 9 and producer.ledger.drops == {"bad_entry": 1}


class BusyProxy:
    """A real TCP proxy in front of a real Redis. While ``code`` is set it rewrites every
    ``XADD`` into an ``EVAL`` that makes Redis itself answer ``-<code> ...``, so the error
    replies arrive in order, from a real server, among real replies to everything else (the
    heartbeat's ``HSET`` goes through untouched). Replies flow back byte for byte."""

    SCRIPT = b"return redis.error_reply(ARGV[1])"

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream = upstream_port
        self.code: str | None = None
        self.rewritten = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._threads = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                near, _ = self.server.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.upstream))
            self._threads.Thread(target=self._up, args=(near, far), daemon=True).start()
            self._threads.Thread(target=self._down, args=(far, near), daemon=True).start()

    @staticmethod
    def _down(far: Any, near: Any) -> None:
        try:
            while data := far.recv(65536):
                near.sendall(data)
        except OSError:
            pass
        near.close()

    def _up(self, near: Any, far: Any) -> None:
        pending = b""
        try:
            while data := near.recv(65536):
                out, pending = self._rewrite(pending + data)
                far.sendall(out)
        except OSError:
            pass
        far.close()

    def _rewrite(self, data: bytes) -> tuple[bytes, bytes]:
        """Whole commands of ``data`` (rewritten while ``code`` is set), and the cut tail."""
        out, at = [], 0
        while at < len(data):
            end, args = _command(data, at)
            if end < 0:
                break
            code = self.code
            if code is not None and args and args[0].upper() == b"XADD":
                reply = f"{code} injected by the test proxy".encode()
                if code in ("MOVED", "ASK"):
                    reply = f"{code} 1234 127.0.0.1:{self.upstream}".encode()
                out.append(b"*4\r\n" + b"".join(bulk(a) for a in (b"EVAL", self.SCRIPT, b"0",
                                                                   reply)))
                self.rewritten += 1
            else:
                out.append(data[at:end])
            at = end
        return b"".join(out), data[at:]

    def close(self) -> None:
        self.server.close()


def _command(data: bytes, at: int) -> tuple[int, list[bytes]]:
    """One RESP command (an array of bulk strings) at ``at``: (its end, its args); -1 if cut."""
    line = data.find(b"\r\n", at)
    if line < 0:
        return -1, []
    count, at, args = int(data[at + 1:line]), line + 2, []
    for _ in range(count):
        line = data.find(b"\r\n", at)
        if line < 0:
            return -1, []
        size = int(data[at + 1:line])
        if line + 2 + size + 2 > len(data):
            return -1, []
        args.append(data[line + 2:line + 2 + size])
        at = line + 2 + size + 2
    return at, args


@pytest.mark.parametrize("code", [c.decode() for c in TRANSIENT])
def test_each_busy_reply_keeps_the_entries_and_the_heartbeat_goes_on(r: redis.Redis, keys: Keys,
                                                                     code: str) -> None:
    """DESIGN §5, one case per busy reply: Redis answers ``-<code>`` to every XADD for a while.
    Nothing is dropped or counted, the heartbeat keeps being written (a healthy rank is never
    reported failed), and once Redis takes writes again every entry lands, once, in order."""
    import time

    assert set(TRANSIENT) == {b"LOADING", b"BUSY", b"TRYAGAIN", b"MOVED", b"ASK", b"READONLY",
                              b"MASTERDOWN", b"CLUSTERDOWN", b"OOM"}
    proxy = BusyProxy(int(r.connection_pool.connection_kwargs["port"]))
    client = redis.Redis(port=proxy.port, socket_timeout=5)
    target = _target(keys, 20)
    try:
        proxy.code = code
        producer = Producer(client, target, 0, 0.01, 0.1, 100_000)
        producer.start()
        for step in range(1, 2001):
            producer.queue.extend((step, 1.0, ("a",), float(step)))
        assert not producer.flush(1.0)  # every XADD answered -<code>: nothing leaves memory
        assert proxy.rewritten > 0 and r.xlen(target.stream) == 0
        assert producer.ledger.drops == {} and producer.pending() == 2000
        beat = int(r.hget(target.heartbeats, target.member) or 0)
        assert beat > 0, "no heartbeat while Redis answered busy"
        wait_until(lambda: int(r.hget(target.heartbeats, target.member) or 0) > beat, 5,
                   f"the heartbeat going on while Redis answers {code}")
        stuck = proxy.rewritten  # still retrying (with back-off, at most 1 s), not given up
        wait_until(lambda: proxy.rewritten > stuck, 5, f"a retry after {code}")
        healed = time.monotonic()
        proxy.code = None
        assert producer.flush(20)
        print(f"{code}: all 2000 entries in Redis {time.monotonic() - healed:.2f} s after it "
              "took writes again")
        producer.stop()
        steps = [int(f[b"_step"]) for _, f in r.xrange(target.stream)]
        # A write cut by the switch back lands its tail and is re-sent whole from its first
        # busy reply (order kept; the backend's upsert absorbs the repeats): the last 2000
        # entries are every step, in order.
        assert steps[-2000:] == list(range(1, 2001)), (len(steps), steps[:3])
        assert producer.ledger.sent == 2000 and producer.ledger.drops == {}
    finally:
        client.close()
        proxy.close()


def test_a_resp3_connection_sends_and_counts_like_resp2(redis_url: str, keys: Keys) -> None:
    """``PLUTO_REDIS_URL=...?protocol=3`` makes redis-py speak RESP3 on the socket the producer
    writes raw XADDs to: its replies (and RESP3 errors) are read just the same."""
    client = redis.Redis.from_url(redis_url + "?protocol=3")
    try:
        assert client.connection_pool.connection_kwargs.get("protocol") in (3, "3")
        stream = keys.metrics(21)
        producer = Producer(client, _target(keys, 21), 1, 0.01, 1.0, 100_000)
        entries = _entries(2000)
        for entry in entries:
            producer.queue.extend(_flat([entry]))
        assert producer._send_all()
        got = [decode_entry(fields) for _, fields in client.xrange(stream)]
        assert [(g[1], list(g[3])) for g in got] == [(e[0], list(e[2])) for e in entries]
        assert producer.ledger.sent == 2000 and producer.ledger.drops == {}
        client.delete(stream)
        client.set(stream, "not a stream")  # refused for good: counted, on RESP3 too
        for step in range(1, 101):
            producer.queue.extend((step, 1.0, ("a",), 1.0))
        assert producer._send_all() and producer.ledger.drops == {"refused": 100}
        producer._disconnect()
    finally:
        client.close()


def test_the_heartbeat_writes_the_ledger_while_the_run_goes_on(r: redis.Redis,
                                                               keys: Keys) -> None:
    """Before any finish(), the members hash holds what this process logged and sent (and
    dropped, why), rewritten with the heartbeat as entries go out."""
    from pluto.protocol import unpack

    target = _target(keys, 22)
    producer = Producer(r, target, 0, 0.01, 0.1, 100_000,
                        register=lambda: {"rank": 0, "state": "running"})
    producer.start()
    try:
        for step in range(1, 1001):
            producer.queue.extend((step, 1.0, ("a",), step))
        producer.queue.extend((1001, 1.0, ("a",), 10**5000))  # one bad entry: counted
        assert producer.flush(20)

        def ledger() -> Any:
            raw = r.hget(target.members, target.member)
            got = unpack(raw) if raw else {}
            return got if got.get("logged") == 1001 else None

        got = wait_until(ledger, 5, "the ledger in the members hash")
        assert (got["sent"], got["dropped"], got["drops"]) == (1000, 1, {"bad_entry": 1})
        assert got["state"] == "running"
    finally:
        producer.stop()


def test_an_idle_producer_sleeps_longer_and_still_sends_what_comes(r: redis.Redis,
                                                                 keys: Keys) -> None:
    """Idle, the wait doubles up to ``IDLE_WAIT`` (each wake costs CPU: 64 idle ranks waking
    50 times a second took most of a core); an entry logged after the pause still lands, and
    heartbeats go on."""
    import threading
    import time

    class Counting(threading.Event):
        wakes = 0

        def set(self) -> None:
            Counting.wakes += 1
            super().set()

    target = _target(keys, 23)
    producer = Producer(r, target, 0, 0.02, 0.1, 100_000)
    producer._drained = Counting()  # set once per loop round
    producer.start()
    try:
        time.sleep(1.0)
        assert Counting.wakes < 20, f"{Counting.wakes} wakes in 1 s idle (every 20 ms is 50)"
        before = r.hget(target.heartbeats, target.member)
        producer.queue.extend((1, 1.0, ("a",), 1.5))
        wait_until(lambda: r.xlen(keys.metrics(23)) == 1, 5, "the entry after the pause")
        wait_until(lambda: r.hget(target.heartbeats, target.member) != before, 5, "a heartbeat")
    finally:
        producer.stop()
