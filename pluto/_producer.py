"""The background thread that moves logged entries from memory into the run's Redis stream.

``Run.log`` only appends ``(step, time, data)`` to a deque. This thread wakes at least every
``flush_interval``, packs the entries as RESP ``XADD`` commands itself (redis-py's per-command
packing would cap us far below the stream's speed) and writes them down one connection as a
pipeline. While Redis is unreachable the entries stay in the deque and are re-sent, in order,
once it answers again; a resend after a half-written pipeline can repeat an entry in the stream,
which the backend's upsert on (run, name, step) absorbs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat, starmap
from typing import Any

import redis

from ._io import Wire
from ._resp import ReplyCounter, XaddPacker, count_entries, whole_entries

log = logging.getLogger("pluto")

CHUNK = 4000
"""Entries per pipelined write: large enough to amortise the round trip, small enough to bound memory."""

DROP_REPORT_EVERY = 10.0
"""Seconds between two "buffer full, dropped N" warnings during one long outage."""


class Producer(threading.Thread):
    """Owns the send side of one process's run: buffer → stream, plus the member heartbeat."""

    def __init__(self, client: redis.Redis, stream: str, rank: int, heartbeat_key: str,
                 member: str, flush_interval: float, heartbeat_interval: float,
                 max_buffer: int, register: Callable[[], None] | None = None) -> None:
        super().__init__(name="pluto-producer", daemon=True)
        self.queue: deque[Any] = deque()
        """Flat: ``step, time, names, value...`` per entry (no per-entry tuple or dict)."""
        self.max_buffer = max_buffer
        self.dropped = 0
        self.failed = 0
        self._client = client
        self._heartbeat_key = heartbeat_key
        self._member = member
        self._interval = flush_interval
        self._heartbeat_interval = heartbeat_interval
        self._wake = threading.Event()
        self._register = register
        """Records this process in the run before any entry is sent; here, not in ``init``,
        so that 64 ranks woken together by their run id return from ``init`` at once."""
        if register is not None:
            self._wake.set()  # the first cycle runs at once
        self._drained = threading.Event()
        self._stopping = False
        self._busy = False
        self._packer = XaddPacker(stream, rank)
        self._conn: Any = None
        self._wire: Wire | None = None
        self._target, self._replies = 0, ReplyCounter()  # reply accounting of the connection
        self._down_since: float | None = None
        self._next_heartbeat = 0.0
        self._reported_drops = 0
        self._next_drop_report = 0.0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        backoff, retry_at = 0.0, 0.0
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping
            if stopping or time.monotonic() >= retry_at:
                backoff = 0.0 if self._send_all() else min(max(backoff * 2, 0.05), 1.0)
                retry_at = time.monotonic() + backoff
            else:  # Redis is down: between retries, keep the buffer within PLUTO_BUFFER_SIZE
                self._drop_overflow()
            self._drained.set()
            if stopping:
                return
            self._heartbeat()
            self._report_drops()

    def _send_all(self) -> bool:
        """Send until the deque is empty; False if Redis failed (entries stay queued).

        Two chunks are kept in flight, so Redis works through one while this thread packs the
        next; an entry leaves memory for good only once Redis answered for it.
        """
        inflight: deque[list[Any]] = deque()  # [entries, reply target], oldest first
        try:
            if self._register is not None:  # retried like any send until Redis takes it
                self._busy = True
                self._register()
                self._register = None
            while self.queue or inflight:
                self._busy = True
                if self.queue and len(inflight) < 2:
                    self._drop_overflow()
                    chunk = [self._take(), 0]
                    inflight.append(chunk)  # before writing: a failed write must give it back
                    chunk[1] = self._write(chunk[0])
                else:
                    self._await_replies(inflight[0][1])
                    inflight.popleft()  # only once Redis answered for every entry of the chunk
        except Exception as exc:  # noqa: BLE001 - the thread must survive anything, keep the entries
            for items, _ in reversed(inflight):
                self.queue.extendleft(reversed(items))
            self._disconnect()
            if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                log.exception("pluto: unexpected error sending entries; will retry")
            self._note_down(exc)
            self._drop_overflow()
            return False
        finally:
            self._busy = False
        if self._down_since is not None:
            log.warning("pluto: Redis answers again after %.1f s; buffered entries sent",
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _take(self) -> list[Any]:
        """Pop up to CHUNK whole entries off the left of the deque.

        ``Run.log`` extends the deque with a whole entry at once (atomic under the GIL), and only
        this thread pops, so the deque always starts on an entry boundary.
        """
        queue = self.queue
        width = 3 + len(queue[2])
        count = min(len(queue), CHUNK * width)
        count -= count % width
        items = list(starmap(queue.popleft, repeat((), count)))  # a C-level loop of pops
        cut = whole_entries(items)
        if cut < len(items):  # entries of other widths: give back the broken tail
            queue.extendleft(reversed(items[cut:]))
            del items[cut:]
        return items

    def _drop_overflow(self) -> None:
        """Keep at most ``max_buffer`` entries (of the current width): drop the oldest, count them."""
        queue = self.queue
        if not queue:
            return
        limit = self.max_buffer * (3 + len(queue[2]))
        while len(queue) > limit:
            for _ in range(3 + len(queue[2])):
                queue.popleft()
            self.dropped += 1

    def _write(self, items: list[Any]) -> int:
        """Send the entries as XADDs; returns the reply count that marks them all answered."""
        payload, count = self._packer.pack(items)
        self._connected().send(payload)
        self._target += 2 * count
        return self._target

    def _await_replies(self, target: int) -> None:
        """Read replies until the connection's count reaches ``target``."""
        wire, counter = self._connected(), self._replies
        while counter.count < target:
            errors = counter.feed(wire.recv())
            if errors:
                self.failed += errors
                log.warning("pluto: Redis refused %d metrics entries (see its log; e.g. OOM)",
                            errors)

    def pending(self) -> int:
        """Entries still in memory (after the thread stopped: never sent)."""
        return count_entries(list(self.queue))

    # -- connection ---------------------------------------------------------------------------
    def _connected(self) -> Wire:
        """The raw socket of a pooled redis-py connection: it has done AUTH, SELECT and TLS."""
        if self._wire is None:
            self._conn = self._client.connection_pool.get_connection()
            self._target, self._replies = 0, ReplyCounter()
            self._conn.connect()
            self._wire = Wire(self._conn._sock)
        return self._wire

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
                self._client.connection_pool.release(self._conn)
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; drop it
                pass
            self._conn = self._wire = None

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("pluto: Redis unreachable (%s); buffering entries in memory (up to %d) "
                        "and retrying", exc, self.max_buffer)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat or self._down_since is not None:
            return
        self._next_heartbeat = now + self._heartbeat_interval
        try:
            self._client.hset(self._heartbeat_key, self._member, int(time.time() * 1000))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._note_down(exc)

    def _report_drops(self) -> None:
        """At most one warning per DROP_REPORT_EVERY while dropping (finish() tells the total)."""
        dropped, now = self.dropped, time.monotonic()
        if dropped != self._reported_drops and now >= self._next_drop_report:
            self._reported_drops, self._next_drop_report = dropped, now + DROP_REPORT_EVERY
            log.warning("pluto: buffer full (PLUTO_BUFFER_SIZE=%d) while Redis is unreachable: "
                        "dropped the %d oldest entries so far", self.max_buffer, dropped)

    # -- called from the user's thread ----------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Wait until everything logged so far is in Redis; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        # queue first: an entry is popped only while busy is set
        while self.queue or self._busy or self._register is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.is_alive():
                return False
            self._drained.clear()
            self._wake.set()
            self._drained.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self.join(timeout)
        self._disconnect()
