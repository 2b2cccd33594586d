"""Redis stream plumbing for the worker: connecting, groups, entry ids, drained checks, trimming.

Everything here is a small function over a redis-py client; the key names come from
``pluto.protocol`` and are passed in.
"""

from __future__ import annotations

from typing import Any

import redis

from pluto.protocol import GROUP

from ._redis import RedisClient
from ._settings import WorkerSettings

Entry = tuple[bytes, "list[bytes] | None"]
"""One stream entry: (id, [field, value, field, value, ...]); None for a deleted entry."""


def raw_reply(response: Any, **options: Any) -> Any:
    """Response callback keeping XREADGROUP's reply as Redis sent it: building a dict per
    entry costs more than decoding the entry does."""
    return response


def stream_entries(reply: Any) -> dict[str, list[Entry]]:
    """XREADGROUP's reply (raw RESP2 list, RESP3 map, or redis-py's parsed form) by stream."""
    pairs = reply.items() if isinstance(reply, dict) else (reply or [])
    out: dict[str, list[Entry]] = {}
    for name, entries in pairs:
        key = name.decode() if isinstance(name, bytes) else name
        if entries and isinstance(entries[0][1], dict):  # parsed by redis-py (cluster)
            entries = [as_entry(e) for e in entries]
        out[key] = entries  # raw [id, [field, value, ...]] pairs unpack like Entry tuples
    return out


def as_entry(entry: Any) -> Entry:
    entry_id, fields = entry[0], entry[1]
    if isinstance(fields, dict):
        fields = [x for kv in fields.items() for x in kv]
    return entry_id, fields


def connect(settings: WorkerSettings) -> RedisClient:
    """A client for ``PLUTO_REDIS_URL``; its socket timeout outlasts the blocking read."""
    timeout = max(10.0, settings.block_ms / 1000 + 5)
    if settings.cluster:
        return redis.RedisCluster.from_url(settings.redis_url, socket_timeout=timeout,
                                           socket_connect_timeout=3.0, **settings.tls())
    return redis.Redis.from_url(settings.redis_url, socket_timeout=timeout,
                                socket_connect_timeout=3.0, health_check_interval=30,
                                **settings.tls())


def is_nogroup(exc: redis.ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


WEATHER = frozenset({"OOM", "LOADING", "READONLY", "BUSY", "TRYAGAIN", "MASTERDOWN",
                     "CLUSTERDOWN", "MOVED", "ASK", "NOREPLICAS", "MISCONF"})
"""Error replies a busy or constrained Redis gives (DESIGN.md §5): wait and retry."""


def error_code(exc: redis.ResponseError) -> str:
    """The reply's first word (``OOM``, ``WRONGTYPE``...); redis-py strips it from the message
    of the errors it maps to classes and keeps it in ``status_code``."""
    code = getattr(exc, "status_code", None)
    return str(code) if code else (str(exc).split(" ", 1)[0] if str(exc) else "")


def is_weather(exc: BaseException) -> bool:
    """Transient: connection trouble, a timeout, or one of the :data:`WEATHER` replies."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return True  # BusyLoadingError (LOADING) is a ConnectionError too
    return isinstance(exc, redis.ResponseError) and error_code(exc) in WEATHER


def ensure_group(r: RedisClient, stream: str) -> None:
    """Create the ``workers`` group reading from the start (``0``): after Redis lost the group,
    re-reading is harmless (the backend upserts) while starting at ``$`` could skip entries."""
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _group(r: RedisClient, stream: str) -> dict[str, Any] | None:
    for info in r.xinfo_groups(stream):
        name = info.get("name")
        if name in (GROUP, GROUP.encode()):
            return dict(info)
    return None


def drained(r: RedisClient, stream: str) -> bool:
    """True when the group has delivered every entry of ``stream`` and nothing is pending."""
    try:
        last_generated = r.xinfo_stream(stream)["last-generated-id"]
        group = _group(r, stream)
    except redis.ResponseError:  # no such stream: nothing was ever logged
        return True
    if group is None:
        return r.xlen(stream) == 0
    if group["pending"]:
        return False
    return parse_id(group["last-delivered-id"]) >= parse_id(last_generated)


def oldest_needed(r: RedisClient, stream: str) -> tuple[bool, bytes] | None:
    """Where the entries someone still needs begin: ``(inclusive, id)``, or None without groups.

    Needed are the entries pending in any group (from the oldest pending id, inclusive) and the
    entries no group has been delivered yet (strictly after the smallest last-delivered id).
    """
    groups = r.xinfo_groups(stream)
    if not groups:
        return None
    bounds: list[tuple[tuple[int, int], bool, bytes]] = []
    for info in groups:
        if info["pending"]:
            first = r.xpending(stream, info["name"])["min"]
            bounds.append((parse_id(first), True, _b(first)))
        else:
            last = info["last-delivered-id"]
            bounds.append((parse_id(last), False, _b(last)))
    # The smallest bound wins; at equal ids "inclusive" keeps one more entry, so it goes first.
    _, inclusive, entry_id = min(bounds, key=lambda b: (b[0], not b[1]))
    return inclusive, entry_id


def trim(r: RedisClient, stream: str, retention: int) -> int:
    """Trim ``stream`` below what any group still needs, keeping ``retention`` entries below
    that point for live viewing. Returns how many entries were removed. Never removes an entry
    that is pending or undelivered: MINID only drops ids below a bound taken from the group."""
    if r.xlen(stream) <= retention + max(1, retention // 10):
        return 0  # a little slack, so the range read below does not run on every call
    bound = oldest_needed(r, stream)
    if bound is None:
        return 0
    inclusive, entry_id = bound
    top = b"(" + entry_id if inclusive else entry_id  # entries strictly below what is needed
    if retention > 0:
        tail = r.xrevrange(stream, max=top, min="-", count=retention) or []
        if len(tail) < retention:
            return 0
        minid = tail[-1][0]
    else:
        if not r.xrevrange(stream, max=top, min="-", count=1):
            return 0
        minid = entry_id if inclusive else _successor(entry_id)
    return int(r.xtrim(stream, minid=minid, approximate=False))


def _successor(entry_id: bytes) -> bytes:
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq + 1}".encode()


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
