"""Console capture: each rank's stdout and stderr lines, streamed through Redis like metrics.

``sys.stdout``/``sys.stderr`` are wrapped by a tee that writes through to the original stream
and appends ``(stream, text, time)`` to a bounded deque — that is all the training thread does
(no lock, no I/O of ours). A daemon thread wakes every :data:`INTERVAL`, splits the text into
lines and ``XADD``s them to the run's ``P:{id}:logs`` stream (``Keys.logs``; fields ``rank``,
``time`` ms, ``type`` INFO for stdout / ERROR for stderr, ``n`` the line number per stream,
``msg``), trimmed to about :data:`RETENTION` entries. The worker persists them to the
backend's ``/ingest/logs``; ``pluto tail <run> --logs [--rank N]`` follows them live.

Bounded like the metrics buffer: while Redis is unreachable, lines wait in memory up to
``PLUTO_CONSOLE_BUFFER`` pieces; beyond it the oldest are dropped and counted
(``dropped``), never blocking a ``print``. The count is part of the process's loss ledger
(``drops["console"]`` in the members hash, ``protocol.DROPS_CONSOLE``), so the backend's
runs list shows it next to the entries lost. ``PLUTO_CAPTURE_CONSOLE=0`` turns it off. Only
Python-level writes are seen (``print``, ``logging``, tracebacks), not C code writing to fd 1/2.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("pluto")

INTERVAL = 0.2
RETENTION = 100_000
MAX_LINE = 65_536
"""Longest line sent as one entry, in characters; a longer one is sent in pieces."""

TYPES = {"stdout": "INFO", "stderr": "ERROR"}


class _Tee:
    """A text stream that writes through to ``original`` and hands a copy to the capture."""

    def __init__(self, original: TextIO, name: str, capture: Console) -> None:
        self._original = original
        self._name = name
        self._capture = capture

    def write(self, text: str) -> int:
        written = self._original.write(text)
        if text and type(text) is str:
            self._capture.feed(self._name, text)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._original, name)


class Console:
    """Captures this process's console into ``stream`` as ``rank``; :meth:`close` at finish."""

    def __init__(self, client: redis.Redis | Callable[[], redis.Redis], stream: str, rank: int,
                 buffer: int = 100_000, interval: float = INTERVAL, own_client: bool = False
                 ) -> None:
        self._client_or_factory = client
        """The client, or how to make it at the first send: building a redis-py client costs a
        millisecond of CPU, which ``init`` should not spend while 64 ranks attach at once."""
        self._own_client = own_client
        self._stream = stream
        self._rank = rank
        self._pieces: deque[tuple[str, str, int]] = deque(maxlen=max(buffer, 1))
        self._partial = {"stdout": "", "stderr": ""}
        self._numbers = {"stdout": 0, "stderr": 0}
        self._unsent: deque[dict[str, Any]] = deque(maxlen=max(buffer, 1))
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pluto-console", daemon=True)
        self._tees: list[tuple[str, _Tee, TextIO]] = []
        self.sent = 0
        self._lost = 0  # lines dropped by the thread (its queue full, or unsent at close)
        self._fed = 0  # pieces written (by any thread); the deque drops the oldest when full
        self._taken = 0  # pieces the thread took out of the deque
        self._closed = False

    @property
    def dropped(self) -> int:
        """Lines lost, plus pieces written but never taken (a piece is one ``write``: a
        ``print`` makes one or two). Read from other threads while the counts move, it may be
        off by a piece for a moment (never below 0); once :meth:`close` returned it is exact."""
        return max(0, self._lost + self._fed - self._taken - len(self._pieces))

    def feed(self, name: str, text: str) -> None:
        """Called by the tee on the writing thread: one count and one append, nothing else.
        After :meth:`close` a stale tee (still wrapped by someone) only writes through, so
        the count the ledger reported at finish stays the final one."""
        if self._closed:
            return
        self._fed += 1
        self._pieces.append((name, text, int(time.time() * 1000)))

    def install(self, starts: list[Callable[[], None]] | None = None) -> Console:
        """Tee stdout/stderr now; the sending thread is started at once, or by whoever runs
        ``starts`` (the producer thread: see ``Producer.on_start``)."""
        for name in ("stdout", "stderr"):
            original = getattr(sys, name)
            if original is None:
                continue
            tee = _Tee(original, name, self)
            setattr(sys, name, tee)
            self._tees.append((name, tee, original))
        if starts is None:
            self._thread.start()
        else:
            starts.append(self._thread.start)
        return self

    def close(self, timeout: float = 1.0) -> None:
        """Stop capturing, send what is left (partial lines too) within about ``timeout``.
        If the thread is stuck on an unresponsive Redis, what it holds is counted as
        dropped rather than waited for: ``finish`` must stay bounded."""
        for name, tee, original in self._tees:
            if getattr(sys, name) is tee:  # someone else may have wrapped it since
                setattr(sys, name, original)
        self._tees.clear()
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + max(timeout, 0.1)
        if self._thread.is_alive():
            self._thread.join(timeout / 2)
        if self._thread.is_alive():
            lost = len(self._unsent)
            self._pieces.clear()  # never to be taken now: counted by ``dropped`` as such
        else:
            self._drain(final=True)
            self._send(deadline)
            lost = len(self._unsent)
            self._unsent.clear()
        self._lost += lost
        if self.dropped:
            log.warning("pluto: %d console lines never reached Redis", self.dropped)
        if self._own_client and isinstance(self._client_or_factory, redis.Redis):
            self._client_or_factory.close()

    def _client(self) -> redis.Redis:
        if not isinstance(self._client_or_factory, (redis.Redis, redis.RedisCluster)):
            self._client_or_factory = self._client_or_factory()
        return self._client_or_factory  # type: ignore[return-value]

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._drain()
                self._send()
            except Exception as exc:  # noqa: BLE001 - capture must never take a rank down
                log.debug("pluto: console capture: %s", exc)

    def _drain(self, final: bool = False) -> None:
        """Split the pieces written so far into lines; keep each stream's unfinished tail."""
        pieces = self._pieces
        while pieces:
            name, text, at = pieces.popleft()
            self._taken += 1
            text = self._partial[name] + text
            *lines, rest = text.split("\n")
            self._partial[name] = rest
            for line in lines:
                self._line(name, line, at)
            if len(rest) > MAX_LINE:
                self._line(name, rest, at)
                self._partial[name] = ""
        if final:
            for name, rest in self._partial.items():
                if rest:
                    self._line(name, rest, int(time.time() * 1000))
                self._partial[name] = ""

    def _line(self, name: str, line: str, at: int) -> None:
        for start in range(0, max(len(line), 1), MAX_LINE):
            self._numbers[name] += 1
            unsent = self._unsent
            if len(unsent) == unsent.maxlen:
                self._lost += 1
            unsent.append({"rank": self._rank, "time": at, "type": TYPES[name],
                           "n": self._numbers[name],
                           "msg": line[start:start + MAX_LINE].encode("utf-8", "replace")})

    def _send(self, deadline: float | None = None) -> None:
        """XADD what waits, 500 lines per round trip; on a Redis error keep them for later."""
        while self._unsent:
            if deadline is not None and time.monotonic() > deadline:
                return
            batch = [self._unsent[i] for i in range(min(500, len(self._unsent)))]
            try:
                with self._client().pipeline(transaction=False) as pipe:
                    for fields in batch:
                        pipe.xadd(self._stream, fields, maxlen=RETENTION,  # type: ignore[arg-type]
                                  approximate=True)
                    pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.debug("pluto: console lines wait for Redis: %s", exc)
                if deadline is None:
                    return
                time.sleep(0.1)
                continue
            for _ in batch:
                self._unsent.popleft()
            self.sent += len(batch)


def start(redis_url: str, client: Any, stream: str, rank: int, buffer: int,
          starts: list[Callable[[], None]] | None = None,
          options: Mapping[str, Any] | None = None) -> Console | None:
    """Capture this process's console into ``stream``; None (and a debug line) if it cannot.
    ``starts``: see :meth:`Console.install`; ``options`` go to the console's own client."""
    try:
        if isinstance(client, redis.RedisCluster):
            return Console(client, stream, rank, buffer).install(starts)  # type: ignore[arg-type]
        def own() -> redis.Redis:
            return redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                        retry=Retry(NoBackoff(), 0), **(options or {}))

        return Console(own, stream, rank, buffer, own_client=True).install(starts)
    except Exception as exc:  # noqa: BLE001 - a rank runs on without console capture
        log.debug("pluto: no console capture: %s", exc)
        return None
