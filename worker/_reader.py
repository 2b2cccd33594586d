"""Reading the group's streams, and working around what breaks a read.

One XREADGROUP serves the control stream and every run's metrics stream (per stream on a
Cluster, where one call cannot span slots). A read that fails with an error reply other than
Redis's busy ones names no culprit, so each stream's type is checked: a missing group is
re-created, and a key that is not a stream (``SET P:{7}:metrics x``) is left out for a while
and reported — one bad key never stops the reads of the others.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.typing import KeyT, StreamIdT

from pluto.protocol import GROUP

from ._problems import Problems
from ._redis import RedisClient
from ._streams import Entry, ensure_group, is_nogroup, is_weather, stream_entries

log = logging.getLogger("worker")

Batch = dict[str, list[Entry]]
SKIP_S = 30.0
"""How long a key found not to be a stream is left out before it is tried again."""


class Reader:
    def __init__(self, r: RedisClient, name: str, cluster: bool, problems: Problems) -> None:
        self.r = r
        self.name = name
        self.cluster = cluster
        self.problems = problems
        self._skip: dict[str, float] = {}  # stream -> monotonic time it may be read again

    def read(self, starts: dict[str, str], count: int, block: int | None) -> Batch:
        """Entries by stream, from each stream's start id (``>`` new, ``0`` own pending)."""
        now = time.monotonic()
        ready: dict[KeyT, StreamIdT] = {k: v for k, v in starts.items()
                                        if self._skip.get(k, 0.0) <= now}
        try:
            if self.cluster:  # one slot per run: no multi-stream reads on a cluster
                reply: list[Any] = []
                for stream, start in ready.items():
                    reply += self.r.xreadgroup(GROUP, self.name, {stream: start},
                                               count=count) or []
                if not reply and block:
                    time.sleep(block / 1000)
            else:
                reply = self.r.xreadgroup(GROUP, self.name, ready, count=count,
                                          block=block) or []
        except redis.ResponseError as exc:
            if is_weather(exc):
                raise
            self._repair([k for k in starts if k in ready], exc)
            return {}
        return stream_entries(reply)

    def _repair(self, streams: list[str], exc: redis.ResponseError) -> None:
        """A read failed: a group is missing (re-create it) or a key is not a stream."""
        if is_nogroup(exc):
            log.warning("consumer group missing (Redis restarted without persistence?); "
                        "re-creating it from the start of each stream")
        pipe = self.r.pipeline(transaction=False)
        for stream in streams:
            pipe.type(stream)
        for stream, kind in zip(streams, pipe.execute()):
            if kind not in (b"stream", "stream", b"none", "none"):
                self._skip[stream] = time.monotonic() + SKIP_S
                self.problems.report(f"type:{stream}", f"{stream} is a {kind!r}, not a stream; "
                                     f"skipped (checked again every {SKIP_S:.0f} s)")
                continue
            try:
                ensure_group(self.r, stream)
            except redis.ResponseError as err:
                if is_weather(err):
                    raise
                self.problems.report(f"group:{stream}", f"creating the group of {stream}: {err}")
