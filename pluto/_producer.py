"""The background thread that moves logged entries from memory into the run's Redis stream.

``Run.log`` only appends ``(step, time, names, values...)`` to a deque. This thread wakes
every ``flush_interval`` while there is something to send (up to ``IDLE_WAIT`` apart when
idle), packs the entries as RESP ``XADD`` commands itself (redis-py's
per-command packing would cap us far below the stream's speed) and writes them down one
connection as a pipeline, two chunks in flight. Every failure is classified where it arises:

* the connection fails (refused, reset, timeout): the entries stay in memory and are re-sent,
  in order, with back-off; a resend after a half-written pipeline can repeat an entry in the
  stream, which the backend's upsert on (run, name, step) absorbs;
* Redis answers "busy" (``LOADING``, ``OOM``, ``MOVED``... see ``_resp.TRANSIENT``): the same,
  from the first entry it refused;
* on a cluster, ``MOVED`` or a connection error also re-resolves the slot's node before the
  retry: the slot migrated, or its master crashed and the cluster promotes a replica;
* Redis refuses one entry for good, or one entry cannot be encoded: that entry alone is
  dropped, counted by reason and warned about; its neighbours still go.

Everything this process logged is accounted for in its ledger (``sent`` + ``drops``), which the
heartbeat writes into the members hash so the worker and the backend can show it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat, starmap
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from ._io import Wire
from ._resp import Replies, XaddPacker, count_entries, transient, whole_entries
from .protocol import DROPS_CONSOLE, ENTRY_HEAD, pack

log = logging.getLogger("pluto")

CHUNK = 4000
"""Entries per pipelined write: large enough to amortise the round trip, small enough to bound memory."""

REPORT_EVERY = 10.0
"""Seconds between two warnings of one kind ("buffer full", "Redis busy") during one episode."""

ENTRY_REASONS = ("overflow", "refused", "bad_entry", "error", "finish_timeout")
"""Why whole entries were dropped; ``bad_value`` (a value ``log`` refused) is counted apart."""

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class Target:
    """Where one process's entries and liveness go (keys of ``protocol.Keys``)."""

    stream: str
    heartbeats: str
    members: str
    member: str


@dataclass
class Chunk:
    """Entries written and awaiting their replies: they leave memory only once Redis answered."""

    items: list[Any]
    count: int
    payload: bytes = b""
    end: int = 0
    written: bool = False
    """Its write began on a connection that had answered before: Redis may hold it already."""
    """Reply count of the connection at which every entry of this chunk has been answered."""


@dataclass
class Ledger:
    """This process's entries by fate. Shared with the user's thread (only ``+=`` under the GIL)."""

    sent: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    console: Callable[[], int] | None = None
    """Console lines this process lost (``_console``), read whenever the ledger is written: it
    goes in ``drops`` as ``DROPS_CONSOLE``, in the same ledger as the entries but not among them."""

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    @property
    def dropped(self) -> int:
        return sum(self.drops.get(r, 0) for r in ENTRY_REASONS)

    def as_fields(self, in_memory: int) -> dict[str, Any]:
        """The members-hash fields of DESIGN §3: logged, sent, dropped, drops."""
        dropped, drops = self.dropped, dict(self.drops)
        console = self.console() if self.console is not None else 0
        if console:
            drops[DROPS_CONSOLE] = console
        return {"logged": self.sent + dropped + in_memory, "sent": self.sent,
                "dropped": dropped, "drops": drops}


IDLE_WAIT = 0.2
"""Longest sleep of an idle producer: each empty wake costs ~0.1 ms of CPU on a small VM, so
waking every ``flush_interval`` (50 times a second) in 64 idle ranks took most of a core; after
idle wakes the wait doubles up to this, and the first entry after a pause waits at most this
long (``flush``/``finish`` wake the thread at once)."""


class _Busy(Exception):
    """Redis answered with a transient error reply: keep the entries, back off, retry."""


class Producer(threading.Thread):
    """Owns the send side of one process's run: buffer → stream, plus heartbeat and ledger."""

    def __init__(self, client: redis.Redis, target: Target, rank: int, flush_interval: float,
                 heartbeat_interval: float, max_buffer: int,
                 register: Callable[[], dict[str, Any]] | None = None,
                 resolve: Callable[[], redis.Redis] | None = None) -> None:
        super().__init__(name="pluto-producer", daemon=True)
        self.queue: deque[Any] = deque()
        """Flat: ``step, time, names, value...`` per entry (no per-entry tuple or dict)."""
        self.max_buffer = max_buffer
        self.ledger = Ledger()
        self.info: dict[str, Any] | None = None
        """This member's value in the members hash, once registered."""
        self._client = client
        self._target = target
        self._interval = flush_interval
        self._heartbeat_interval = heartbeat_interval
        self._register = register
        """Records this process in the run before any entry is sent; here, not in ``init``,
        so that 64 ranks woken together by their run id return from ``init`` at once."""
        self._resolve = resolve
        """On a cluster: the client of the node that owns the stream's slot now."""
        self.on_start: list[Callable[[], None]] = []
        """Started by this thread before anything else (the system-metrics sampler, the console
        sender): a thread started by ``init`` itself waits to be scheduled, and with 64 ranks
        woken at once on two cores each wait costs ``init`` tens of milliseconds."""
        self._stale = False
        """The slot's owner must be resolved again before the next write (see ``_follow_slot``)."""
        self._wake = threading.Event()
        if register is not None:
            self._wake.set()  # the first cycle runs at once
        self._drained = threading.Event()
        self._stopping = False
        self._busy = False
        self._inflight: deque[Chunk] = deque()
        self._packer = XaddPacker(target.stream, rank)
        self._conn: Any = None
        self._wire: Wire | None = None
        self._written, self._replies = 0, Replies()  # reply accounting of the connection
        self._down_since: float | None = None
        self._next_heartbeat = 0.0
        self._written_ledger: dict[str, Any] | None = None
        self._deadline = 0.0
        self._reported: dict[str, tuple[int, float]] = {}
        self._busy_replies = 0
        self._uncertain = 0
        """Flat items at the head of the queue that were in flight when the connection failed."""

    @property
    def dropped(self) -> int:
        """Entries dropped because the buffer was full."""
        return self.ledger.drops.get("overflow", 0)

    @property
    def failed(self) -> int:
        """Entries Redis refused for good."""
        return self.ledger.drops.get("refused", 0)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        for start in self.on_start:
            try:
                start()
            except Exception:  # a helper thread must not stop the producer
                log.exception("pluto: could not start %r; metrics are still sent", start)
        backoff, retry_at, wait = 0.0, 0.0, self._interval
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            stopping = self._stopping
            busy = self.queue or self._inflight or self._register is not None
            wait = self._interval if busy else min(wait * 2, IDLE_WAIT)
            if stopping or time.monotonic() >= retry_at:
                backoff = 0.0 if self._send_all() else min(max(backoff * 2, 0.05), 1.0)
                retry_at = time.monotonic() + backoff
            else:  # Redis is down: between retries, keep the buffer within PLUTO_BUFFER_SIZE
                self._drop_overflow()
            self._drained.set()
            if stopping:
                return
            self._heartbeat()
            self._report("overflow", self.dropped, f"buffer full (PLUTO_BUFFER_SIZE="
                         f"{self.max_buffer}) while Redis is unreachable: dropped the %d "
                         "oldest entries so far")

    def _send_all(self) -> bool:
        """Send until the deque is empty; False if Redis failed or is busy (entries stay queued).

        Two chunks are kept in flight, so Redis works through one while this thread packs the
        next; an entry leaves memory for good only once Redis answered for it.
        """
        inflight = self._inflight
        try:
            self._follow_slot()
            self._register_first()
            while self.queue or inflight:
                self._busy = True
                if self.queue and len(inflight) < 2:
                    self._drop_overflow()
                    chunk = self._pack(self._take())
                    if chunk.count:
                        inflight.append(chunk)  # before writing: a failed write must give it back
                        self._write(chunk)
                else:
                    self._settle(inflight)
                    self._heartbeat()  # a long backlog does not silence this member
        except (_Busy, *CONNECTION_ERRORS) as exc:
            self._requeue(inflight)
            if self._resolve is not None and (not isinstance(exc, _Busy) or "MOVED" in str(exc)):
                self._stale = True  # the slot moved, or its node died: ask again after back-off
            if isinstance(exc, _Busy):
                self._busy_replies += 1
                self._report("busy", self._busy_replies, f"Redis is busy ({exc}); keeping the "
                             "entries in memory and retrying")
            else:
                self._note_down(exc)
            self._drop_overflow()
            return False
        except Exception:  # a bug, not weather: count what it cost instead of looping on it
            lost = sum(c.count for c in inflight)
            log.exception("pluto: unexpected error sending entries; dropped %d (counted)", lost)
            self.ledger.drop("error", lost)
            inflight.clear()
            self._disconnect()
            return False
        finally:
            self._busy = False
        self._uncertain = 0
        if self._down_since is not None:
            log.warning("pluto: Redis answers again after %.1f s; buffered entries sent",
                        time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _follow_slot(self) -> None:
        """On a cluster, after ``MOVED`` or a connection error: the node that owns the stream's
        slot now, from a fresh slot map. A crashed master keeps its slots until the cluster
        promotes a replica (cluster-node-timeout), so this repeats, with the loop's back-off,
        until the map names a node that answers; a map that cannot be read is weather too."""
        if not self._stale or self._resolve is None:
            return
        try:
            self._client = self._resolve()
        except (redis.RedisError, RedisClusterException) as exc:
            raise redis.ConnectionError(f"reading the cluster's slot map: {exc}") from exc
        self._stale = False

    def _register_first(self) -> None:
        """The member registration, retried like a send while Redis is away or busy; a
        permanent refusal (e.g. an ACL without HSET) is reported once and not retried."""
        if self._register is None:
            return
        self._busy = True
        try:
            self.info = self._register()
        except CONNECTION_ERRORS:
            raise
        except redis.ResponseError as exc:
            if transient(str(exc).encode()):
                raise _Busy(str(exc)) from None
            log.error("pluto: Redis refused to record this process in the run (%s); its "
                      "metrics are still sent, but the worker cannot track it", exc)
        self._register = None

    def _take(self) -> list[Any]:
        """Pop up to CHUNK whole entries off the left of the deque.

        ``Run.log`` extends the deque with a whole entry at once (atomic under the GIL), and only
        this thread pops, so the deque always starts on an entry boundary.
        """
        queue = self.queue
        width = ENTRY_HEAD + len(queue[2])
        count = min(len(queue), CHUNK * width)
        count -= count % width
        items = list(starmap(queue.popleft, repeat((), count)))  # a C-level loop of pops
        cut = whole_entries(items)
        if cut < len(items):  # entries of other widths: give back the broken tail
            queue.extendleft(reversed(items[cut:]))
            del items[cut:]
        return items

    def _pack(self, items: list[Any]) -> Chunk:
        packed = self._packer.pack(items)
        for names, reason in packed.bad:
            self.ledger.drop("bad_entry")
            self._warn_once(f"bad:{names!r}", f"dropped an entry logging {list(names)[:5]} "
                            f"that cannot be sent ({reason}); the other entries still go")
        return Chunk(packed.items, packed.count, packed.payload)

    def _drop_overflow(self) -> None:
        """Keep at most ``max_buffer`` entries (of the current width): drop the oldest, count them.

        Entries that were in flight when the connection failed are kept: Redis may have taken
        them before it went away, so dropping (and counting) them could count a stored entry as
        lost. They are at most two chunks; the oldest entries behind them go instead.
        """
        queue = self.queue
        if not queue or len(queue) <= self.max_buffer * (ENTRY_HEAD + len(queue[2])):
            return
        keep = [queue.popleft() for _ in range(min(self._uncertain, len(queue)))]
        while queue and len(queue) + len(keep) > self.max_buffer * (ENTRY_HEAD + len(queue[2])):
            for _ in range(ENTRY_HEAD + len(queue[2])):
                queue.popleft()
            self.ledger.drop("overflow")
        queue.extendleft(reversed(keep))

    def _write(self, chunk: Chunk) -> None:
        """Send the chunk's XADDs; note the reply count that marks them all answered."""
        payload, chunk.payload = chunk.payload, b""
        wire = self._connected()
        # Uncertain only on a connection Redis has answered on: a stale pooled socket that
        # fails on its first write never reached a live server.
        chunk.written = self._replies.count > 0
        wire.send(payload)
        self._written += chunk.count
        chunk.end = self._written

    def _settle(self, inflight: deque[Chunk]) -> None:
        """Wait for the oldest chunk's replies; account for each entry by its reply."""
        chunk = inflight[0]
        wire, replies = self._connected(), self._replies
        while replies.count < chunk.end:
            replies.feed(wire.recv())
        errors = replies.take_errors(chunk.end)
        if not errors:
            inflight.popleft()
            self.ledger.sent += chunk.count
            self._uncertain = max(0, self._uncertain - len(chunk.items))  # answered for
            return
        start = chunk.end - chunk.count
        retry = next((i - start for i, text in errors if transient(text)), None)
        refused = [(i - start, text) for i, text in errors
                   if retry is None or i - start < retry]
        for _, text in refused:
            self.ledger.drop("refused")
            kind = text.split(b" ", 1)[0].decode(errors="replace")
            self._warn_once(f"refused:{kind}", "Redis refused entries for good (dropped, "
                            f"counted): {text[:200].decode(errors='replace')}")
        if retry is None:
            inflight.popleft()
            self.ledger.sent += chunk.count - len(refused)
            return
        # From the first "busy" reply on, everything goes again (order kept; a repeat of an
        # entry Redis took after all is absorbed by the backend's upsert).
        self.ledger.sent += retry - len(refused)
        chunk.items = chunk.items[_offset(chunk.items, retry):]
        chunk.count -= retry
        raise _Busy(dict(errors)[start + retry][:200].decode(errors="replace"))

    def _requeue(self, inflight: deque[Chunk]) -> None:
        for chunk in reversed(inflight):
            self.queue.extendleft(reversed(chunk.items))
        # Still uncertain after a retry that could not even connect: what an earlier write may
        # have left in Redis stays at the head until Redis answers for it.
        self._uncertain = max(self._uncertain,
                              sum(len(chunk.items) for chunk in inflight if chunk.written))
        inflight.clear()
        self._disconnect()

    def pending(self) -> int:
        """Entries still in memory, queued or in flight (after the thread stopped: never sent)."""
        return count_entries(list(self.queue)) + sum(c.count for c in list(self._inflight))

    def _in_memory_estimate(self) -> int:
        """``pending()`` without walking the deque (exact while the entries share a width)."""
        queue = self.queue
        queued = len(queue) // (ENTRY_HEAD + len(queue[2])) if len(queue) > 2 else 0
        return queued + sum(c.count for c in list(self._inflight))

    # -- connection ---------------------------------------------------------------------------
    def _connected(self) -> Wire:
        """The raw socket of a pooled redis-py connection: it has done AUTH, SELECT and TLS."""
        if self._wire is None:
            self._conn = self._client.connection_pool.get_connection()
            self._written, self._replies = 0, Replies()
            self._conn.connect()
            self._wire = Wire(self._conn._sock)
        return self._wire

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
                self._client.connection_pool.release(self._conn)
            except Exception:  # noqa: BLE001, S110 - a broken connection may fail to close; drop it
                pass
            self._conn = self._wire = None

    def _note_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("pluto: Redis unreachable (%s); buffering entries in memory (up to %d) "
                        "and retrying", exc, self.max_buffer)

    def _heartbeat(self) -> None:
        """Tell the worker this process lives (and how its entries fared), whenever Redis
        answers — only a connection that is known to be down skips it until the next retry."""
        now = time.monotonic()
        if now < self._next_heartbeat or self._down_since is not None:
            return
        self._next_heartbeat = now + self._heartbeat_interval
        t = self._target
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(t.heartbeats, t.member, int(time.time() * 1000))
                ledger = self.ledger.as_fields(self._in_memory_estimate())
                if self.info is not None and ledger != self._written_ledger:
                    pipe.hset(t.members, t.member, pack({**self.info, **ledger}))
                pipe.execute()
            self._written_ledger = ledger
        except CONNECTION_ERRORS as exc:
            self._note_down(exc)
        except redis.ResponseError as exc:  # busy, or refused: the next beat tries again
            log.debug("pluto: heartbeat refused: %s", exc)

    def _report(self, kind: str, total: int, message: str) -> None:
        """At most one warning per kind per REPORT_EVERY, and only when ``total`` moved."""
        seen, next_at = self._reported.get(kind, (0, 0.0))
        now = time.monotonic()
        if total != seen and now >= next_at:
            self._reported[kind] = (total, now + REPORT_EVERY)
            log.warning("pluto: " + message.replace("%d", str(total)))

    def _warn_once(self, key: str, message: str) -> None:
        """One warning per offending name (or refusal kind), for the life of the run."""
        if key not in self._reported:
            self._reported[key] = (1, 0.0)
            log.warning("pluto: " + message)

    # -- called from the user's thread ----------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Wait until everything logged so far is in Redis; False if ``timeout`` ran out first
        (or :meth:`cut_short` moved the deadline)."""
        self._deadline = time.monotonic() + timeout
        # queue first: an entry is popped only while busy is set
        while self.queue or self._busy or self._register is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0 or not self.is_alive():
                return False
            self._drained.clear()
            self._wake.set()
            self._drained.wait(min(remaining, 0.05))
        return True

    def cut_short(self, seconds: float) -> None:
        """Let a flush in progress wait at most ``seconds`` more (a signal arrived)."""
        self._deadline = min(self._deadline, time.monotonic() + seconds)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self.join(max(timeout, 0.0))
        if not self.is_alive():
            self._disconnect()


def _offset(items: list[Any], entries: int) -> int:
    """Index in flat ``items`` where entry number ``entries`` begins."""
    at = 0
    for _ in range(entries):
        at += ENTRY_HEAD + len(items[at + 2])
    return at
