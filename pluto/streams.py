"""The state of the workers' consumer group on a stream, read from Redis.

Shared by ``pluto status`` (the SDK's CLI) and the worker's Prometheus gauges, so an operator
reads the same numbers in both. It reads Redis, so it is not protocol (``pluto.protocol`` only
defines); it takes any client that has the three commands it uses (:class:`GroupReader`).

>>> group_state(redis.Redis(), "pluto:{control}")  # doctest: +SKIP
{'length': 12, 'lag': 0, 'pending': 0, 'oldest_pending_s': None, 'consumers': 2}
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import redis
from redis.typing import GroupT, KeyT, StreamIdT

from .protocol import GROUP

__all__ = ["GroupReader", "group_state"]

LAG_SCAN = 10_000
"""When Redis cannot tell the lag, at most this many undelivered entries are counted."""


class GroupReader(Protocol):
    """What :func:`group_state` asks of a Redis client (``redis.Redis``, ``redis.RedisCluster``)."""

    def xlen(self, name: KeyT) -> int: ...

    def xinfo_groups(self, name: KeyT) -> list[dict[str, Any]]: ...

    def xpending(self, name: KeyT, groupname: GroupT) -> dict[str, Any]: ...

    def xrange(self, name: KeyT, min: StreamIdT = "-", max: StreamIdT = "+",
               count: int | None = None) -> Any: ...


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: object) -> int:
    return int(_text(entry_id).partition("-")[0] or 0)


def group_state(r: GroupReader, stream: str) -> dict[str, Any]:
    """Lag, pending and the age of the oldest pending entry of the workers' group on ``stream``
    (Redis's own ``lag`` counts only undelivered entries; pending ones are what a stalled
    worker holds, so an operator needs both, and the oldest one's age)."""
    out: dict[str, Any] = {"length": 0, "lag": 0, "pending": 0, "oldest_pending_s": None,
                           "consumers": 0}
    try:
        out["length"] = int(r.xlen(stream))
        groups = [g for g in r.xinfo_groups(stream) if _text(g.get("name")) == GROUP]
    except redis.ResponseError:  # no such stream (or not a stream): nothing waits on it
        return out
    if not groups:
        out["lag"] = out["length"]
        return out
    group = groups[0]
    out["lag"], out["pending"] = group.get("lag"), int(group.get("pending") or 0)
    if out["lag"] is None:  # NULL after an XDEL/trim among undelivered entries: count them
        after = "(" + _text(group.get("last-delivered-id") or "0-0")
        out["lag"] = len(r.xrange(stream, after, "+", count=LAG_SCAN))
    out["consumers"] = int(group.get("consumers") or 0)
    if out["pending"]:
        oldest = r.xpending(stream, GROUP).get("min")
        if oldest:
            out["oldest_pending_s"] = round(max(0.0, time.time() - _id_ms(oldest) / 1000), 1)
    return out
