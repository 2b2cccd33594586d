"""Before ``init`` waits for a run to be created: is any worker there to create it?

Without this, a newcomer with Redis up but no ``pluto worker`` sat through the whole
``PLUTO_INIT_TIMEOUT`` (60 s) in silence. Now: when no live worker is registered, ``init`` says
so at once, naming the command to start, and then waits as before; when no worker has *ever*
served this Redis under this prefix (no ``workers`` group on the control stream, nobody in the
workers hash), it gives a worker that is just starting a short grace and then fails with the
same advice instead of waiting the full timeout. A run whose id is already in Redis needs no
worker to attach to, so it skips all of this.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from ._settings import Settings
from .env import redact
from .errors import InitTimeout
from .protocol import GROUP, Keys

log = logging.getLogger("pluto")

LIVE_WITHIN = 15.0
"""Seconds since a worker's last heartbeat (workers beat every second) for it to count as live."""

GRACE = 15.0
"""Longest wait for a first worker on a Redis that never had one (it may be starting now)."""


def check_workers(client: Any, keys: Keys, run_key: str, s: Settings) -> None:
    """Warn at once if no live worker is registered; ``InitTimeout`` soon if none ever was."""
    deadline = time.monotonic() + min(GRACE, s.init_timeout)
    where = f"{redact(s.redis_url)} (PLUTO_PREFIX={s.prefix})"
    while True:
        value = client.get(run_key)
        if value is not None and value.isdigit():
            return  # the run exists: attaching needs no worker
        beats = _heartbeats(client, keys)
        if beats:
            age = time.time() - max(beats) / 1000
            if age > LIVE_WITHIN:
                log.warning("pluto: no live `pluto worker` is registered with the Redis at %s "
                            "(the last heartbeat is %.0f s old): start one (`pluto worker`, or "
                            "`pluto up` on one machine); init waits up to PLUTO_INIT_TIMEOUT="
                            "%g s for it", where, age, s.init_timeout)
            return
        if _ever_served(client, keys):
            log.warning("pluto: no `pluto worker` is registered with the Redis at %s: start one "
                        "(`pluto worker`, or `pluto up` on one machine); init waits up to "
                        "PLUTO_INIT_TIMEOUT=%g s for it", where, s.init_timeout)
            return
        if time.monotonic() >= deadline:
            raise InitTimeout(
                f"no `pluto worker` has ever served the Redis at {where}, so nothing can create "
                "the run: start one with `pluto worker` (PLUTO_REDIS_URL, PLUTO_API_URL and "
                "PLUTO_API_KEY set), or everything on one machine with `pluto up`; check that "
                "PLUTO_PREFIX matches the worker's")
        time.sleep(0.2)


def _heartbeats(client: Any, keys: Keys) -> list[int]:
    out = []
    for raw in client.hvals(keys.workers):
        try:
            out.append(int(raw))
        except (TypeError, ValueError):
            continue
    return out


def _ever_served(client: Any, keys: Keys) -> bool:
    """A worker created the ``workers`` group on the control stream at some point."""
    try:
        groups = client.xinfo_groups(keys.control)
    except redis.ResponseError:  # no such stream: no worker and no init ever used this prefix
        return False
    for group in groups:
        name = group.get("name") if isinstance(group, dict) else None
        if name in (GROUP, GROUP.encode()):
            return True
    return False
