"""Electing the creator of a run and waiting for its server-assigned id.

Every process of a job calls ``elect``. ``SET NX`` on the run key with a short lease picks one
creator, which asks the workers (control stream) to create the run and keeps its lease alive while
it waits. The others wait on the run's announce stream and re-read the key until it holds the
numeric id. If the creator dies before the id
arrives, its lease expires, the key disappears and the next ``SET NX`` picks a new creator — a
duplicate create request is harmless because the backend is idempotent on (project, run id).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from . import protocol as proto
from .errors import InitTimeout, PlutoError
from .protocol import CREATE_REFUSED, PENDING_PREFIX, Keys

# Extend the lease only while the key still holds *our* token (a compare-and-expire).
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

MAX_BLOCK = 5.0
"""Longest XREAD BLOCK on the announce stream: well under the client's 10 s socket timeout."""


@dataclass(frozen=True)
class Election:
    id: int
    resumed: bool
    name: str | None = None
    """The run's name as the worker announced it with the id (a run it just created); None:
    read it from the run's ``info`` hash."""


@dataclass(frozen=True)
class CreateRequest:
    project: str
    run_id: str
    name: str | None
    config: dict[str, Any] | None
    tags: list[str] | None


def elect(client: redis.Redis, keys: Keys, req: CreateRequest, lease: float,
          timeout: float, redis_url: str) -> Election:
    """The run's numeric id, and whether it existed before this process asked for it.

    Between reads of the run key every process blocks on the run's announce stream, which the
    worker appends to right after it writes the id: all waiters wake within one round trip of
    the answer, and no one polls. They still wake every lease/3 to take over from a dead
    creator (its key expired) or, as the creator, to extend the lease.
    """
    key, announce = keys.run(req.project, req.run_id), keys.announce(req.project, req.run_id)
    token = uuid.uuid4().hex
    mine = PENDING_PREFIX + token
    lease_ms = max(int(lease * 1000), 100)
    refresh = client.register_script(_REFRESH)
    deadline = time.monotonic() + timeout
    seen: bytes | str = "0-0"
    announced: dict[bytes, bytes] = {}
    won_once = requested = False
    next_refresh = 0.0
    while True:
        value: Any = client.get(key)  # bytes: the client does not decode responses
        if value is None:
            if not client.set(key, mine, nx=True, px=lease_ms):
                continue  # someone else won between GET and SET: read what they wrote
            value, won_once, requested, next_refresh = mine.encode(), True, False, 0.0
        if value.isdigit():
            # Only the process whose request created the run is not resumed.
            resumed = not won_once or client.get(keys.created(token)) != b"0"
            name = announced.get(b"name") if announced.get(b"id") == value else None
            return Election(int(value), resumed,
                            None if name is None else name.decode(errors="replace"))
        wake = deadline
        if value.decode() == mine:
            if not requested:
                client.xadd(keys.control, proto.control_create(  # type: ignore[arg-type]
                    req.project, req.run_id, req.name, req.config, req.tags, token))
                requested = True
            refused: Any = client.get(keys.created(token))
            if refused and refused.startswith(CREATE_REFUSED.encode()):
                raise PlutoError(f"the backend refused to create run {req.run_id!r} of project "
                                 f"{req.project!r}: {refused[len(CREATE_REFUSED):].decode()} "
                                 "(see the `pluto worker` log)")
            now = time.monotonic()
            if now >= next_refresh:
                refresh(keys=[key], args=[mine, lease_ms])
                next_refresh = now + lease / 3
            wake = min(deadline, next_refresh)
        now = time.monotonic()
        if now >= deadline:
            raise InitTimeout(
                f"pluto.init waited {timeout:.0f} s for run {req.run_id!r} of project "
                f"{req.project!r} to be created, and no worker answered: is `pluto worker` running "
                f"against this Redis ({redis_url})? Start one with `pluto worker` (or everything "
                "on one machine with `pluto up`), or raise PLUTO_INIT_TIMEOUT.")
        block = min(wake - now, lease / 3, MAX_BLOCK)
        news: Any = client.xread({announce: seen}, block=max(1, int(block * 1000)))
        if news:
            seen, announced = news[0][1][-1]
