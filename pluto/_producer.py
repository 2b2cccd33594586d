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
import socket
import threading
import time
from collections import deque
from typing import Any

import hiredis
import redis

from ._keys import F_RANK, F_STEP, F_TIME

log = logging.getLogger("pluto")

Entry = tuple[int, float, dict[str, Any]]
CHUNK = 2000
"""Entries per pipelined write: large enough to amortise the round trip, small enough to bound memory."""


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Producer(threading.Thread):
    """Owns the send side of one process's run: buffer → stream, plus the member heartbeat."""

    def __init__(self, client: redis.Redis, stream: str, rank: int, heartbeat_key: str,
                 member: str, flush_interval: float, heartbeat_interval: float,
                 max_buffer: int) -> None:
        super().__init__(name="pluto-producer", daemon=True)
        self.queue: deque[Entry] = deque()
        self.max_buffer = max_buffer
        self.dropped = 0
        self.failed = 0
        self._client = client
        self._heartbeat_key = heartbeat_key
        self._member = member
        self._interval = flush_interval
        self._heartbeat_interval = heartbeat_interval
        self._wake = threading.Event()
        self._drained = threading.Event()
        self._stopping = False
        self._busy = False
        self._templates: dict[tuple[str, ...], str] = {}
        self._head = (_bulk(b"XADD") + _bulk(stream.encode()) + _bulk(b"*") + _bulk(F_RANK.encode())
                      + _bulk(b"%d" % rank)).decode().replace("%", "%%")
        self._conn: Any = None
        self._reader = hiredis.Reader()
        self._down_since: float | None = None
        self._next_heartbeat = 0.0
        self._reported_drops = 0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(max(self._interval, backoff))
            self._wake.clear()
            stopping = self._stopping
            backoff = 0.0 if self._send_all() else min(max(backoff * 2, 0.05), 1.0)
            self._drained.set()
            if stopping:
                return
            self._heartbeat()
            self._report_drops()

    def _send_all(self) -> bool:
        """Send until the deque is empty; False if Redis failed (entries stay queued)."""
        while self.queue:
            self._busy = True
            batch = [self.queue.popleft() for _ in range(min(CHUNK, len(self.queue)))]
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything, keep the entries
                self.queue.extendleft(reversed(batch))
                self._busy = False
                self._disconnect()
                if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                    log.exception("pluto: unexpected error sending entries; will retry")
                self._note_down(exc)
                return False
            self._busy = False
        if self._down_since is not None:
            log.warning("pluto: Redis answers again after %.1f s; buffered entries sent",
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _send(self, batch: list[Entry]) -> None:
        """Write the batch down the socket, then count its replies (hiredis parses them)."""
        sock = self._socket()
        sock.sendall(b"".join([self._pack(*e) for e in batch]))
        reader, expected = self._reader, len(batch)
        while expected:
            reply = reader.gets()
            if reply is False:
                chunk = sock.recv(262_144)
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection")
                reader.feed(chunk)
                continue
            expected -= 1
            if isinstance(reply, hiredis.ReplyError):  # the server refused this entry (e.g. OOM)
                self.failed += 1
                if self.failed == 1:
                    log.warning("pluto: Redis refused a metrics entry: %s", reply)

    def _pack(self, step: int, ts: float, data: dict[str, Any]) -> bytes:
        """One ``XADD`` in RESP from a template cached per set of names: one ``%`` per entry.

        ``repr`` of an int or float is exactly the text DESIGN §4 asks for (``nan``, ``inf``...).
        """
        template = self._templates.get(tuple(data))
        if template is None:
            template = self._template(tuple(data))
        values = list(map(repr, data.values()))
        pairs: list[Any] = values + values
        pairs[0::2] = map(len, values)
        pairs[1::2] = values
        step_text, time_text = str(step), str(int(ts * 1000))
        return (template % (len(step_text), step_text, len(time_text), time_text, *pairs)).encode()

    def _template(self, names: tuple[str, ...]) -> str:
        if len(self._templates) > 10_000:  # names that change every call: don't grow forever
            self._templates.clear()
        fields = "".join(_bulk(n.encode()).decode().replace("%", "%%") + "$%d\r\n%s\r\n"
                         for n in names)
        template = self._templates[names] = (
            f"*{9 + 2 * len(names)}\r\n" + self._head + _bulk(F_STEP.encode()).decode()
            + "$%d\r\n%s\r\n" + _bulk(F_TIME.encode()).decode() + "$%d\r\n%s\r\n" + fields)
        return template

    # -- connection ---------------------------------------------------------------------------
    def _socket(self) -> socket.socket:
        """The raw socket of a pooled redis-py connection: it has done AUTH, SELECT and TLS."""
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
            self._reader = hiredis.Reader()
        self._conn.connect()
        return self._conn._sock  # type: ignore[no-any-return]

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
                self._client.connection_pool.release(self._conn)
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; drop it
                pass
            self._conn = None

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
        dropped = self.dropped
        if dropped != self._reported_drops:
            self._reported_drops = dropped
            log.warning("pluto: buffer full (PLUTO_BUFFER_SIZE=%d) while Redis is unreachable: "
                        "dropped the %d oldest entries so far", self.max_buffer, dropped)

    # -- called from the user's thread ----------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Wait until everything logged so far is in Redis; False if ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        while self.queue or self._busy:  # queue first: an entry is popped only while busy is set
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
