"""What an operator asks of a running deployment: ``pluto status`` and ``pluto dead``.

Read straight from Redis (and the backend's ``/healthz``), so it works whatever state the
workers are in. ``status`` is also a readiness probe: :func:`status` lists the problems, and
the command exits non-zero when there is one. Dead letters can be listed and replayed into
their stream once their cause is fixed; the backend's upsert on (run, name, step) makes a
replayed entry land exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from .protocol import F_DEAD_ID, F_DEAD_REASON, F_RANK, GROUP, Keys, unpack
from .streams import group_state

WORKER_ALIVE_S = 15.0
"""A worker whose heartbeat is older than this counts as gone (it beats every second)."""


@dataclass
class Report:
    """``pluto status`` as data: ``problems`` is empty when the deployment is healthy."""

    redis: dict[str, Any] = field(default_factory=dict)
    backend: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "problems": self.problems, "redis": self.redis,
                "backend": self.backend, "workers": self.workers, "runs": self.runs}


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def status(r: Any, keys: Keys, backend: dict[str, Any], max_pending_age: float) -> Report:
    """The deployment as Redis shows it; ``backend`` is what ``/healthz`` answered."""
    rep = Report(backend=backend)
    if not backend.get("ok"):
        rep.problems.append(f"backend unreachable at {backend.get('url')}: "
                            f"{backend.get('error')} (start `pluto server`)")
    try:
        info = r.info()
    except (redis.RedisError, OSError) as exc:
        rep.redis = {"ok": False, "error": str(exc)}
        rep.problems.append(f"Redis unreachable: {exc} (check PLUTO_REDIS_URL)")
        return rep
    rep.redis = {"ok": True, "version": info.get("redis_version"),
                 "used_memory": info.get("used_memory"), "maxmemory": info.get("maxmemory")}
    now_ms = time.time() * 1000
    beats = {_text(k): int(v) for k, v in (r.hgetall(keys.workers) or {}).items()
             if _text(v).isdigit()}
    idle = {}
    try:
        idle = {_text(c["name"]): c for c in r.xinfo_consumers(keys.control, GROUP)}
    except redis.ResponseError:
        pass
    for name in sorted(set(beats) | set(idle)):
        beat = beats.get(name)
        age = None if beat is None else round((now_ms - beat) / 1000, 1)
        rep.workers.append({"name": name, "heartbeat_age_s": age,
                            "alive": age is not None and age < WORKER_ALIVE_S,
                            "idle_s": round(int(idle[name]["idle"]) / 1000, 1) if name in idle
                            else None})
    alive = any(w["alive"] for w in rep.workers)
    control = group_state(r, keys.control)
    waiting = bool(control["lag"] or control["pending"])
    for run in sorted(int(x) for x in r.smembers(keys.runs) if _text(x).isdigit()):
        row = _run_state(r, keys, run)
        rep.runs.append(row)
        waiting = waiting or bool(row["lag"] or row["pending"])
        oldest = row["oldest_pending_s"]
        if oldest is not None and oldest > max_pending_age:
            rep.problems.append(f"run {run}: an entry has been pending {oldest:.0f} s (more than "
                                f"{max_pending_age:.0f} s): is its worker stuck, or the backend "
                                "refusing it?")
    if waiting and not alive:
        rep.problems.append("entries are waiting and no worker is alive: start `pluto worker`")
    return rep


def _run_state(r: Any, keys: Keys, run: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": run, **group_state(r, keys.metrics(run))}
    states: dict[str, int] = {}
    for raw in r.hvals(keys.members(run)):
        try:
            state = str(unpack(raw).get("state"))
        except Exception:  # noqa: BLE001 - a junk value is shown, not fatal
            state = "unreadable"
        states[state] = states.get(state, 0) + 1
    row["members"] = states
    row["dead_letters"] = int(_safe(lambda: r.xlen(keys.dead(run)), 0))
    steps = {k: int(v) for k, v in ((_text(k), _text(v)) for k, v in
                                    _safe(lambda: r.hgetall(keys.ledger(run)), {}).items())
             if k.startswith("step:") and v.lstrip("-").isdigit()}
    if steps:
        fastest = max(steps.values())
        rank, slowest = min(steps.items(), key=lambda kv: kv[1])
        row["slowest_rank"] = {"rank": rank[5:], "step": slowest, "behind": fastest - slowest}
    return row


def _safe(fn: Any, default: Any) -> Any:
    try:
        return fn()
    except redis.ResponseError:
        return default


# -- dead letters -------------------------------------------------------------------------------

def dead_stream(keys: Keys, run: str) -> tuple[str, str]:
    """``(dead-letter stream, stream to replay into)`` for a run id or ``control``."""
    if run == "control":
        return keys.control_dead, keys.control
    if not run.isdigit():
        raise ValueError(f"run must be a numeric run id or 'control', got {run!r}")
    return keys.dead(int(run)), keys.metrics(int(run))


def dead_letters(r: Any, keys: Keys, run: str, ids: list[str] | None = None
                 ) -> list[dict[str, Any]]:
    """The dead letters of ``run``: their id, the original entry's id, reason and fields."""
    stream, _ = dead_stream(keys, run)
    out = []
    for entry_id, fields in r.xrange(stream):
        if ids and _text(entry_id) not in ids:
            continue
        flat = list(fields.items())
        original = [(k, v) for k, v in flat if _text(k) not in (F_DEAD_ID, F_DEAD_REASON)]
        out.append({"id": _text(entry_id), "original_id": _text(fields.get(F_DEAD_ID.encode(), b"")),
                    "reason": _text(fields.get(F_DEAD_REASON.encode(), b"")),
                    "fields": original})
    return out


def replay(r: Any, keys: Keys, run: str, ids: list[str] | None = None) -> int:
    """Put dead letters back into their stream (and make the run active again, so a worker
    reads them); returns how many. The ledger's dead count goes down by what was replayed:
    each entry is counted once, by its final fate."""
    letters = dead_letters(r, keys, run, ids)
    dead, target = dead_stream(keys, run)
    for letter in letters:
        with r.pipeline(transaction=True) as pipe:
            pipe.xadd(target, dict(letter["fields"]))
            pipe.xdel(dead, letter["id"])
            if run != "control":
                rank = {_text(k): _text(v) for k, v in letter["fields"]}.get(F_RANK, "?")
                pipe.hincrby(keys.ledger(int(run)), f"dead:{rank if rank.isdigit() else '?'}",
                             -1)
            pipe.execute()
    if letters and run != "control":
        try:
            r.xgroup_create(keys.metrics(int(run)), GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        r.sadd(keys.runs, run)
    return len(letters)
