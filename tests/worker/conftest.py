"""What the worker tests share: writing control messages and stream entries the way the SDK
does (with redis-py, through ``pluto._keys`` / ``pluto._protocol``), and reading results back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import redis

from pluto import _keys as K
from pluto import _protocol as P
from pluto._keys import Keys
from tests.helpers import wait_until


def entry(step: int, values: Mapping[str, int | float], rank: int = 0,
          time_ms: int | None = None) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {
        K.F_RANK: str(rank), K.F_STEP: str(step),
        K.F_TIME: str(time_ms if time_ms is not None else 1764000000000 + step)}
    fields.update({name: P.format_value(v) for name, v in values.items()})
    return fields


def produce(r: redis.Redis, keys: Keys, run: int, entries: Iterable[Mapping[str, Any]],
            chunk: int = 5000) -> int:
    """XADD ``entries`` to the run's metrics stream, pipelined like the SDK's producer."""
    pipe, n = r.pipeline(transaction=False), 0
    for fields in entries:
        pipe.xadd(keys.metrics(run), dict(fields))
        n += 1
        if n % chunk == 0:
            pipe.execute()
    pipe.execute()
    return n


def request_create(r: redis.Redis, keys: Keys, project: str, run_id: str, name: str = "run",
                   config: dict[str, Any] | None = None, tags: list[str] | None = None) -> str:
    token = uuid.uuid4().hex
    r.set(keys.run(project, run_id), K.PENDING_PREFIX + token, nx=True)
    r.xadd(keys.control, P.control_create(project, run_id, name, config, tags, token))
    return token


def run_id_of(r: redis.Redis, keys: Keys, project: str, run_id: str) -> int | None:
    raw = r.get(keys.run(project, run_id))
    return int(raw) if raw and raw.isdigit() else None


def create(r: redis.Redis, keys: Keys, project: str, run_id: str, timeout: float = 20,
           **kw: Any) -> int:
    """Ask for a run like ``pluto.init`` does and wait for the worker to answer with its id."""
    request_create(r, keys, project, run_id, **kw)
    return int(wait_until(lambda: run_id_of(r, keys, project, run_id), timeout,
                          f"run id of {project}/{run_id}"))


def attach(r: redis.Redis, keys: Keys, run: int, member: str, rank: int = 0) -> None:
    host, _, pid = member.rpartition(":")
    info = {"rank": rank, "local_rank": rank, "host": host, "pid": int(pid),
            "attached_at": int(time.time() * 1000), "state": "running"}
    r.hset(keys.members(run), member, P.pack(info))
    beat(r, keys, run, member)
    r.xadd(keys.control, P.control_attach(run, member, info))


def beat(r: redis.Redis, keys: Keys, run: int, member: str, age_s: float = 0.0) -> None:
    r.hset(keys.heartbeats(run), member, int((time.time() - age_s) * 1000))


def finish(r: redis.Redis, keys: Keys, run: int, member: str, state: str = "finished") -> None:
    info = P.unpack(r.hget(keys.members(run), member))
    r.hset(keys.members(run), member, P.pack({**info, "state": state}))
    r.xadd(keys.control, P.control_finish(run, member, state))


def pending(r: redis.Redis, stream: str) -> int:
    try:
        return int(r.xpending(stream, K.GROUP)["pending"])
    except redis.ResponseError:
        return 0


@pytest.fixture
def project(prefix: str) -> str:
    """A project of this test's own on the shared backend."""
    return f"proj-{prefix}"
