"""Console lines: from each active run's ``P:{id}:logs`` stream (``pluto/_console.py``) to the
backend's ``POST /ingest/logs``, acknowledged once the backend answered for good.

A thread of its own with its own Redis connection and HTTP client, so console lines never
delay metrics nor change the main loop's rhythm. A run stays served for :data:`LINGER`
seconds after it left the worker's active runs, so the last lines of a run that just
completed still go.

Read with the same consumer group as metrics, this worker's own pending entries first (a
post that failed is re-read and re-sent; the backend stores a resent line once), up to
:data:`BATCH` lines per stream per round. A 422 means the backend refused some lines for good:
those are acknowledged too (and logged with the reason), the rest were stored. Anything else
(the backend unreachable) leaves them pending for the next round. Lines a dead worker left
pending longer than ``PLUTO_CLAIM_IDLE_MS`` are claimed (``XAUTOCLAIM``) and sent by this one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pluto.protocol import GROUP, Keys

from ._backend import Backend, Unavailable
from ._redis import RedisClient
from ._streams import ensure_group

log = logging.getLogger("worker")

BATCH = 2000
LINGER = 30.0
"""Seconds a run is still served after it left the active runs (its last lines)."""
ABSENT_RECHECK = 2.0
"""Seconds before a run whose processes had no logs stream is looked at again."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int | None:
    text = _text(value)
    return int(text) if text.lstrip("-").isdigit() and len(text) < 19 else None


class LogShipper:
    """Moves console lines of the runs a worker serves into the backend."""

    def __init__(self, r: RedisClient, keys: Keys, backend: Backend, consumer: str,
                 claim_idle_ms: int = 15_000) -> None:
        self.r = r
        self.keys = keys
        self.backend = backend
        self.consumer = consumer
        self._grouped: set[int] = set()
        self._absent: dict[int, float] = {}  # run -> when to look for its stream again
        self.claim_idle_ms = claim_idle_ms
        self._claim_due = 0.0
        self.shipped = 0

    def serve(self, active: Callable[[], list[int]], stop: threading.Event,
              interval: float = 0.2) -> None:
        """Ship every ``interval`` until ``stop``; Redis or backend trouble is waited out."""
        seen: dict[int, float] = {}
        delay = interval
        while not stop.wait(delay):
            now = time.monotonic()
            for run in active():
                seen[run] = now
            seen = {run: t for run, t in seen.items() if now - t < LINGER}
            try:
                self.ship(sorted(seen))
                delay = interval
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any weather
                log.warning("console lines wait: %s: %s", type(exc).__name__, exc)
                delay = min(delay * 2, 10.0)
        try:
            self.ship(sorted(seen))  # what arrived meanwhile, once more before exiting
        except Exception as exc:  # noqa: BLE001 - left pending for the next worker
            log.warning("console lines left pending: %s: %s", type(exc).__name__, exc)
        finally:
            self.backend.close()
            self.r.close()

    def ship(self, runs: list[int]) -> int:
        """One round over ``runs``; returns how many lines the backend answered for."""
        done = 0
        claim = time.monotonic() >= self._claim_due
        if claim:
            self._claim_due = time.monotonic() + max(1.0, self.claim_idle_ms / 2000)
        for run in runs:
            stream = self.keys.logs(run)
            if run not in self._grouped:
                if time.monotonic() < self._absent.get(run, 0.0):
                    continue
                if not self.r.exists(stream):  # no console captured (yet): look again later
                    self._absent[run] = time.monotonic() + ABSENT_RECHECK
                    continue
                self._absent.pop(run, None)
                ensure_group(self.r, stream)
                self._grouped.add(run)
            if claim:  # a dead worker's pending lines become ours, read below from "0"
                self.r.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms, "0-0",
                                  count=BATCH, justid=True)
            done += self._ship_one(run, stream)
        self.shipped += done
        return done

    def _ship_one(self, run: int, stream: str) -> int:
        entries = self._read(stream, "0") or self._read(stream, ">")
        if not entries:
            return 0
        lines = []
        for _, fields in entries:
            f = {_text(k): v for k, v in fields.items()}
            lines.append(json.dumps({"time": _int(f.get("time", b"0")) or 0,
                                     "rank": _int(f.get("rank", b"")),
                                     "lineNumber": _int(f.get("n", b"0")) or 0,
                                     "logType": _text(f.get("type", b"INFO"))[:64],
                                     "message": _text(f.get("msg", b""))}))
        body = ("\n".join(lines) + "\n").encode()
        try:
            resp = self.backend._request("POST", "/ingest/logs", f"run {run} logs", content=body,
                                         headers={"X-Run-Id": str(run),
                                                  "Content-Type": "application/x-ndjson"})
        except Unavailable as exc:
            log.warning("run %d: %d console lines wait: %s", run, len(entries), exc)
            return 0
        if resp.status_code == 422:
            log.warning("run %d: the backend refused some console lines: %s", run,
                        resp.text[:300])
        elif resp.status_code >= 400:
            log.warning("run %d: console lines refused (%d): %s; left pending", run,
                        resp.status_code, resp.text[:300])
            return 0
        self.r.xack(stream, GROUP, *[entry_id for entry_id, _ in entries])
        return len(entries)

    def _read(self, stream: str, start: str) -> list[Any]:
        reply = self.r.xreadgroup(GROUP, self.consumer, {stream: start}, count=BATCH)
        if not reply:
            return []
        items = reply.items() if isinstance(reply, dict) else reply
        for _, entries in items:
            gone = [e[0] for e in entries if not e[1]]  # pending, but trimmed since: no fields
            if gone:
                self.r.xack(stream, GROUP, *gone)
            return [e for e in entries if e[1]]
        return []
