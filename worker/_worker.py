"""The worker loop: claim stale -> read -> persist -> ack -> maintain.

One iteration reads the control stream and every active run's metrics stream in one
XREADGROUP (bounded COUNT, so an iteration stays short and control is served even while a
large backlog drains), posts one batch per run to the backend, and acknowledges everything the
backend confirmed in one pipelined call. An entry is acknowledged only after the backend stored
it, dead-lettered it on purpose, or it could never be decoded: a crash at any point leaves the
rest pending, to be re-read by this consumer or claimed by another (XAUTOCLAIM).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from pluto import _keys as K
from pluto._keys import GROUP, Keys

from ._backend import Backend, IngestResult, Interrupted, Rejected
from ._control import Control
from ._entries import Columns, fields_dict, record
from ._runs import RunWatcher
from ._settings import WorkerSettings
from ._streams import (
    Entry, as_entry, connect, ensure_group, is_nogroup, raw_reply, stream_entries, trim,
)

log = logging.getLogger("worker")

Batch = dict[str, list[Entry]]


@dataclass
class Post:
    """One run's decoded entries on their way to the backend, and the backend's answer."""

    run: int
    stream: str
    project: str | None
    records: list[dict[str, Any]] = field(default_factory=list)
    columns: Columns | None = None
    """The batch as columns instead of records, when the backend takes them."""
    kept: list[Entry] = field(default_factory=list)
    result: IngestResult | Rejected | None = None


@dataclass
class Acks:
    """What one iteration settled: ids to XACK per stream, entries to dead-letter first."""

    ids: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    dead: list[tuple[int, bytes, list[bytes], str]] = field(default_factory=list)

    def add(self, stream: str, entry_id: bytes) -> None:
        self.ids[stream].append(entry_id)

    def bury(self, stream: str, run: int, entry_id: bytes, fields: list[bytes],
             reason: str) -> None:
        self.dead.append((run, entry_id, fields, reason))
        self.ids[stream].append(entry_id)


class Worker:
    """One consumer of the ``workers`` group.

    >>> Worker(WorkerSettings.from_env()).run()  # doctest: +SKIP
    """

    def __init__(self, settings: WorkerSettings | None = None, r: Any = None) -> None:
        self.settings = s = settings or WorkerSettings.from_env()
        self.keys = Keys(s.prefix)
        self.name = s.name
        self.r = r if r is not None else connect(s)
        if not s.cluster:
            self.r.set_response_callback("XREADGROUP", raw_reply)
        self._stop = threading.Event()
        self.backend = Backend(s, self._stop, on_wait=self._beat_quietly)
        self.projects: dict[int, str | None] = {}
        self.control = Control(self.r, self.keys, self.backend, self.projects)
        self.watcher = RunWatcher(self.r, self.keys, self.backend, s.heartbeat_timeout,
                                  s.retention)
        self.runs: list[int] = []
        self.stored = 0  # metric points the backend confirmed, for the periodic log line
        self._ready = False
        self._poster = ThreadPoolExecutor(1, thread_name_prefix="poster")
        self._inflight: Future[list[Post]] | None = None
        self._due: dict[str, float] = defaultdict(float)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until :meth:`stop` (SIGTERM); Redis outages are waited out with back-off."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                delay = 0.1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                pause = delay * random.uniform(0.5, 1.0)
                log.warning("redis unreachable (%s); retrying in %.1f s", exc, pause)
                self._stop.wait(pause)
                delay = min(delay * 2, self.settings.retry_max)
            except Interrupted as exc:
                log.info("stopped while retrying: %s (left pending, not acknowledged)", exc)
        self.close()
        return 0

    def run_once(self, block_ms: int | None = None) -> int:
        """One iteration; returns how many entries it settled. Tests drive this (burst mode).

        Metrics are posted by one helper thread while the next batch is read and decoded;
        the batch in flight is settled (acked) here, one iteration later.
        """
        if not self._ready:
            self._start()
        batch = self._claim_stale()
        block = 0 if self._inflight else block_ms  # never sit in BLOCK with answers waiting
        for stream, entries in self._read(block).items():
            batch.setdefault(stream, []).extend(entries)
        acks = Acks()
        try:
            posts = self._persist(batch, acks)
            self._settle(acks)
            self._submit(posts)
        finally:
            self._ack(acks)
        self._maintain()
        return sum(len(ids) for ids in acks.ids.values())

    def flush(self) -> int:
        """Settle the batch in flight, if any (tests; and warm shutdown)."""
        acks = Acks()
        try:
            self._settle(acks)
        finally:
            self._ack(acks)
        return sum(len(ids) for ids in acks.ids.values())

    def stop(self) -> None:
        """Warm stop: the iteration in hand finishes (and acks), then :meth:`run` returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- steps ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Groups exist, then re-read this consumer's own pending entries (a restart under the
        same name, e.g. pid 1 in a container) before anything new."""
        ensure_group(self.r, self.keys.control)
        self._refresh_runs()
        while True:
            batch = self._xreadgroup("0", count=self.settings.batch, block=None)
            if not any(batch.values()):
                break
            acks = Acks()
            try:
                self._submit(self._persist(batch, acks))
            finally:
                self._ack(acks)
            self.flush()
        self._ready = True
        log.info("worker %s ready; %d active runs", self.name, len(self.runs))

    def _claim_stale(self) -> Batch:
        """Take over entries another consumer left pending too long (it died mid-batch)."""
        if time.monotonic() < self._due["claim"]:
            return {}
        self._due["claim"] = time.monotonic() + max(1.0, self.settings.claim_idle_ms / 2000)
        batch: Batch = {}
        for stream in self._streams():
            try:
                cursor, entries, *_ = self.r.xautoclaim(
                    stream, GROUP, self.name, self.settings.claim_idle_ms, "0-0",
                    count=self.settings.batch)
            except redis.ResponseError as exc:
                if not is_nogroup(exc):
                    raise
                continue
            if entries:
                log.info("claimed %d stale entries of %s", len(entries), stream)
                batch[stream] = [as_entry(e) for e in entries]
            if cursor not in (b"0-0", "0-0"):
                self._due["claim"] = 0.0  # more to claim: next iteration continues
        return batch

    def _read(self, block_ms: int | None) -> Batch:
        self._refresh_runs()
        count = max(100, self.settings.batch // max(1, len(self.runs)))
        block = self.settings.block_ms if block_ms is None else block_ms
        return self._xreadgroup(">", count=count, block=block or None)

    def _persist(self, batch: Batch, acks: Acks) -> list[Post]:
        """Apply control entries now (a create must not wait behind metrics); decode metrics
        into one post per run, for :meth:`_submit`."""
        for entry_id, fields in batch.pop(self.keys.control, []):
            if fields is not None:
                self.control.handle(entry_id, fields_dict(fields))
            acks.add(self.keys.control, entry_id)
        posts = []
        for stream, entries in batch.items():
            run = self.keys.run_of_stream(stream)
            if run is not None and entries:
                post = self._decode(run, stream, entries, acks)
                if post.kept:
                    posts.append(post)
        return posts

    def _decode(self, run: int, stream: str, entries: list[Entry], acks: Acks) -> Post:
        post = Post(run, stream, self._project(run))
        cols = post.columns = Columns() if self.backend.takes_columns else None
        if cols is not None:
            post.kept, entries = cols.add_many(entries)
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending: nothing left to store
                acks.add(stream, entry_id)
                continue
            try:
                if cols is None:
                    post.records.append(record(entry_id, fields))
                else:
                    cols.add(entry_id, fields)
            except ValueError as exc:
                acks.bury(stream, run, entry_id, fields, f"undecodable: {exc}")
                continue
            post.kept.append((entry_id, fields))
        return post

    def _submit(self, posts: list[Post]) -> None:
        if posts:
            self._inflight = self._poster.submit(self._post_all, posts)

    def _post_all(self, posts: list[Post]) -> list[Post]:
        """On the poster thread: one ingest call per run; Interrupted ends it unanswered."""
        for post in posts:
            try:
                if post.columns is not None:
                    post.result = self.backend.ingest_columns(post.run, post.project,
                                                              post.columns, post.kept)
                else:
                    post.result = self.backend.ingest(post.run, post.project, post.records)
            except Rejected as exc:
                post.result = exc
        return posts

    def _settle(self, acks: Acks) -> None:
        """Wait for the batch in flight; ack what was stored, dead-letter what was refused."""
        if self._inflight is None:
            return
        future, self._inflight = self._inflight, None
        waited = time.monotonic()
        posts = future.result()
        self.watcher.excuse(time.monotonic() - waited)  # a slow backend is not a Redis outage
        for post in posts:
            self._settle_post(post, acks)

    def _settle_post(self, post: Post, acks: Acks) -> None:
        result, stream, run = post.result, post.stream, post.run
        if isinstance(result, Rejected):
            log.error("run %d: backend rejected a batch of %d entries; dead-lettered: %s",
                      run, len(post.kept), result)
        bad = result.bad if isinstance(result, IngestResult) else {}
        for i, (entry_id, fields) in enumerate(post.kept):
            if isinstance(result, Rejected) or i in bad:
                reason = str(result) if isinstance(result, Rejected) else bad[i]
                acks.bury(stream, run, entry_id, fields or [], f"rejected: {reason}")
            else:
                acks.add(stream, entry_id)
        if bad:
            log.warning("run %d: backend refused %d of %d entries; dead-lettered",
                        run, len(bad), len(post.kept))
        points = post.columns.points() if post.columns is not None else sum(
            len(rec["data"]) for rec in post.records)
        self.stored += points - len(bad)

    def _ack(self, acks: Acks) -> None:
        """Dead letters first, then XACK, in one round trip."""
        if not acks.ids:
            return
        pipe = self.r.pipeline(transaction=False)
        cap = max(self.settings.retention, 1000)
        for run, entry_id, fields, reason in acks.dead:
            pipe.execute_command("XADD", self.keys.dead(run), "MAXLEN", "~", cap, "*",
                                 K.F_DEAD_ID, entry_id, K.F_DEAD_REASON, reason, *fields)
        for stream, ids in acks.ids.items():
            pipe.xack(stream, GROUP, *ids)
        pipe.execute()

    def _maintain(self) -> None:
        """Heartbeat, run completion / dead members, trimming — each on its own interval."""
        s, now = self.settings, time.monotonic()
        if now >= self._due["beat"]:
            self._due["beat"] = now + s.heartbeat_interval
            self.r.hset(self.keys.workers, self.name, int(time.time() * 1000))
        if now >= self._due["check"]:
            self._due["check"] = now + s.check_interval
            self.watcher.check(self.runs)
        if now >= self._due["trim"]:
            self._due["trim"] = now + s.trim_interval
            for stream in self._streams():
                removed = trim(self.r, stream, s.retention)
                if removed:
                    log.debug("trimmed %d acknowledged entries from %s", removed, stream)
        if now >= self._due["report"]:
            if self.stored:
                log.info("stored %d metric points in the last %.0f s", self.stored, 30.0)
            self._due["report"], self.stored = now + 30.0, 0

    # -- helpers -------------------------------------------------------------------------

    def _streams(self) -> list[str]:
        return [self.keys.control] + [self.keys.metrics(run) for run in self.runs]

    def _refresh_runs(self) -> None:
        ids = self.r.smembers(self.keys.runs)
        self.runs = sorted(int(x) for x in ids if x.isdigit())

    def _xreadgroup(self, start: str, count: int, block: int | None) -> Batch:
        streams = self._streams()
        try:
            if self.settings.cluster:  # one slot per run: no multi-stream reads on a cluster
                reply = []
                for stream in streams:
                    reply += self.r.xreadgroup(GROUP, self.name, {stream: start},
                                               count=count) or []
                if not reply and block:
                    time.sleep(block / 1000)
            else:
                reply = self.r.xreadgroup(GROUP, self.name, {s: start for s in streams},
                                          count=count, block=block) or []
        except redis.ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("consumer group missing (Redis restarted without persistence?); "
                        "re-creating it from the start of each stream")
            for stream in streams:
                ensure_group(self.r, stream)
            return {}
        return stream_entries(reply)

    def _project(self, run: int) -> str | None:
        if run not in self.projects:
            self.projects[run] = self.backend.project_of(run)
        return self.projects[run]

    def _beat_quietly(self) -> None:
        """Heartbeat while the backend is being retried, so ``pluto status`` sees us alive."""
        try:
            self.r.hset(self.keys.workers, self.name, int(time.time() * 1000))
        except redis.RedisError as exc:  # best effort: the loop reports Redis trouble itself
            log.debug("heartbeat failed: %s", exc)

    def close(self) -> None:
        """Settle the batch in flight, then leave the group: drop this consumer from every
        stream where it holds nothing pending."""
        try:
            self.flush()
        except (Interrupted, redis.RedisError) as exc:
            log.warning("batch in flight left pending: %s", exc)
        self._poster.shutdown(wait=True)
        try:
            for stream in self._streams():
                for consumer in self.r.xinfo_consumers(stream, GROUP):
                    name = consumer["name"]
                    name = name.decode() if isinstance(name, bytes) else name
                    if name == self.name and consumer["pending"] == 0:
                        self.r.xgroup_delconsumer(stream, GROUP, self.name)
            self.r.hdel(self.keys.workers, self.name)
        except redis.RedisError as exc:
            log.warning("could not deregister from redis on exit: %s", exc)
        self.backend.close()
        log.info("worker %s stopped", self.name)
