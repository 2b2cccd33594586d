"""The worker loop: claim stale -> read -> decode -> submit -> settle -> ack -> maintain.

One iteration reads the control stream and the active runs' metrics streams in one
XREADGROUP (bounded COUNT, so an iteration stays short and control is served even while a
large backlog drains), applies control entries at once, decodes each run's share into the
post queued for it, hands queued posts to the poster threads — one post per run at a time,
so a run the backend cannot serve is parked (:mod:`._flow`) while every other run flows —
and only then settles (acks) the posts that came back: batch N is acknowledged in the
iteration that submits batch N+1, and the backend is not kept waiting meanwhile. An entry is acknowledged
only after the backend stored it or it was dead-lettered with its reason: a crash at any point
leaves the rest pending, to be re-read by this consumer or claimed by another (XAUTOCLAIM).

Isolation (DESIGN.md §5): each run's batch, control entry and members value is handled inside
its own error boundary; Redis's busy replies and outages are waited out with back-off; no
input makes :meth:`Worker.run` return before :meth:`Worker.stop`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from operator import itemgetter
from typing import Any

import redis

from pluto import __version__
from pluto.protocol import GROUP, MAX_ID, Keys

from ._acks import Acker, Acks
from ._backend import Backend, Interrupted, Rejected, Unavailable
from ._control import Control
from ._dispatch import Dispatcher
from ._flow import Flow
from ._logs import LogShipper
from ._metrics import Metrics
from ._persist import NO_PROJECT, Post, decode, deliver
from ._problems import Problems
from ._reader import Batch, Reader
from ._redis import RedisClient
from ._runs import RunWatcher
from ._settings import WorkerSettings
from ._streams import (
    Entry,
    as_entry,
    connect,
    ensure_group,
    error_code,
    is_nogroup,
    is_weather,
    raw_reply,
    trim,
)

log = logging.getLogger("worker")

WAIT_S = 0.05
"""Longest wait for a post in flight before the loop reads Redis again."""


class Worker:
    """One consumer of the ``workers`` group.

    >>> Worker(WorkerSettings.from_env()).run()  # doctest: +SKIP
    """

    def __init__(self, settings: WorkerSettings | None = None, r: RedisClient | None = None) -> None:
        self.settings = s = settings or WorkerSettings.from_env()
        self.keys = Keys(s.prefix, s.tenant)
        self.name = s.name
        self.r = r if r is not None else connect(s)
        if not s.cluster:
            self.r.set_response_callback("XREADGROUP", raw_reply)
        self._stop = threading.Event()
        self.problems = Problems()
        self.backend = Backend(s, self._stop, on_wait=self._beat_quietly,
                               attempts=s.http_attempts)
        # Calls made on the loop itself (control, status, members) get one attempt: a failing
        # one is retried later with back-off instead of holding the loop for the others.
        self.calls = Backend(s, self._stop, attempts=1)
        self.projects: dict[int, str | None] = {}
        self.foreign: set[int] = set()  # runs of another tenant found in this tenant's runs set
        control = Control(self.r, self.keys, self.calls, self.projects)
        self._check_owner = control.owned
        self.control = Dispatcher(control,
                                  self.keys, self.problems, s.retry_max)
        self.watcher = RunWatcher(self.r, self.keys, self.calls, s.heartbeat_timeout,
                                  s.retention, self.problems)
        self.acker = Acker(self.r, self.keys, s.retention, self.problems)
        self.reader = Reader(self.r, self.name, s.cluster, self.problems)
        self.flow = Flow(s.retry_max, queue_cap=4 * s.batch)
        self.logs = LogShipper(connect(s), self.keys,  # console lines, in a thread of their own
                               Backend(s, self._stop, attempts=s.http_attempts), self.name,
                               s.claim_idle_ms)
        self._log_thread = threading.Thread(target=self.logs.serve, name="logs", daemon=True,
                                            args=(self._runs_for_logs, self._stop))
        self.runs: list[int] = []
        self._joined: deque[int] = deque()
        """Runs that entered ``runs`` since the log thread last looked: a run that starts and
        completes between two of its rounds must still have its console lines shipped."""
        self.stored = 0  # metric points the backend confirmed, for the periodic log line
        self._ready = False
        self._control_from = "0"  # this consumer's pending control entries first
        self._found = True
        """The last read returned entries: read again at once, even with posts in flight, so
        batch N+1 is read and decoded while batch N is being posted."""
        self._poster = ThreadPoolExecutor(s.posters, thread_name_prefix="poster")
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="checks")
        self._check: Future[None] | None = None
        self._due: dict[str, float] = {}
        self.metrics = Metrics(self.name, __version__)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until :meth:`stop` (SIGTERM); whatever goes wrong is reported and waited out."""
        delay = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                delay = 0.1
            except Interrupted as exc:
                log.info("stopped while retrying: %s (left pending, not acknowledged)", exc)
            except Exception as exc:  # noqa: BLE001 - the boundary of last resort: never exit
                self._trouble(exc, delay)
                delay = min(delay * 2, self.settings.retry_max)
        self.close()
        return 0

    def run_once(self, block_ms: int | None = None) -> int:
        """One iteration; returns how many entries it settled. Tests drive this (burst mode)."""
        if not self._ready:
            self._start()
        acks = Acks()
        try:
            batch = self._claim_stale()
            for stream, entries in self._read(block_ms).items():
                batch.setdefault(stream, []).extend(entries)
            self._persist(batch, acks)
            landed = self._landed()
            self._submit(landed)  # before settling what landed: the backend is not kept waiting
            self._settle(landed, acks)
        finally:
            self.acker(acks)
            for dead_stream, *_ in acks.dead:
                self.metrics.dead.labels(
                    "control" if dead_stream == self.keys.control_dead else "metrics").inc()
        self._maintain()
        return acks.count()

    def flush(self, timeout: float | None = None) -> int:
        """Post what is queued and settle every post in flight (tests; warm shutdown)."""
        settled = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.flow.flight or self.flow.queued or self.control.running:
            self._submit()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending: list[Future[Any]] = [*self.flow.flight.values(), *self.control.futures()]
            wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            acks = Acks()
            try:
                self.control.apply([], acks)
                self._settle(self._landed(), acks)
            finally:
                self.acker(acks)
            settled += acks.count()
            if deadline is not None and time.monotonic() >= deadline:
                break
        return settled

    def stop(self) -> None:
        """Warm stop: the iteration in hand finishes (and acks), then :meth:`run` returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- steps ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Groups exist; every run starts by re-reading this consumer's own pending entries
        (a restart under the same name, e.g. pid 1 in a container) before anything new."""
        self._guard("control group", lambda: ensure_group(self.r, self.keys.control))
        self._refresh_runs()
        self.flow.recover_all(self.runs)
        self._ready = True
        if not self._log_thread.is_alive():
            self._log_thread.start()
        log.info("worker %s ready; %d active runs", self.name, len(self.runs))

    def _claim_stale(self) -> Batch:
        """Take over entries another consumer left pending too long (it died mid-batch)."""
        if time.monotonic() < self._due.get("claim", 0.0):
            return {}
        self._due["claim"] = time.monotonic() + max(1.0, self.settings.claim_idle_ms / 2000)
        new, _ = self.flow.reads(self.runs)
        batch: Batch = {}
        for stream in [self.keys.control] + [self.keys.metrics(run) for run in new]:
            try:
                cursor, entries, *_ = self.r.xautoclaim(
                    stream, GROUP, self.name, self.settings.claim_idle_ms, "0-0",
                    count=self.settings.batch)
            except redis.ResponseError as exc:
                if is_weather(exc):
                    raise
                if not is_nogroup(exc):
                    self.problems.report(f"claim:{stream}", f"claiming from {stream}: {exc}")
                continue
            if entries:
                log.info("claimed %d stale entries of %s", len(entries), stream)
                batch[stream] = [as_entry(e) for e in entries]
                self.metrics.claimed.inc(len(entries))
                self.metrics.on_read(self._kind(stream), len(entries))
            if cursor not in (b"0-0", "0-0"):
                self._due["claim"] = 0.0  # more to claim: next iteration continues
        return batch

    def _read(self, block_ms: int | None) -> Batch:
        """New entries of the runs free to read, pending ones of the recovering runs."""
        self._refresh_runs()
        new, old = self.flow.reads(self.runs)
        count = max(100, self.settings.batch // max(1, len(self.runs)))
        block = self.settings.block_ms if block_ms is None else block_ms
        coming: list[Future[Any]] = [*self.flow.flight.values(), *self.control.futures()]
        if coming:  # answers are coming: never block on Redis; if it had nothing, wait for one
            if not self._found:
                wait(coming, timeout=min(block / 1000, WAIT_S), return_when=FIRST_COMPLETED)
            block = 0
        starts = {self.keys.control: self._control_from}
        starts.update({self.keys.metrics(run): ">" for run in new})
        starts.update({self.keys.metrics(run): "0" for run in old})
        batch = self.reader.read(starts, count, block or None)
        self._found = any(batch.values())
        for stream, entries in batch.items():
            self.metrics.on_read(self._kind(stream), len(entries))
            if starts.get(stream) == "0" or (stream == self.keys.control
                                               and self._control_from != ">"):
                self.metrics.redelivered.inc(len(entries))  # own pending ones, read again
        if self._control_from != ">":
            got = batch.get(self.keys.control, [])
            self._control_from = got[-1][0].decode() if got else ">"
        for run in old:
            if len(batch.get(self.keys.metrics(run), [])) < count:
                self.flow.recovering.discard(run)  # its pending entries are all in hand
        return batch

    def _persist(self, batch: Batch, acks: Acks) -> None:
        """Apply control entries now (a create must not wait behind metrics); decode each
        run's metrics into the post queued for it."""
        self.control.apply(batch.pop(self.keys.control, []), acks)
        for stream, entries in batch.items():
            run = self.keys.run_of_stream(stream)
            if run is None or not entries:
                continue
            post = self.flow.queued.get(run) or Post(run, stream,
                                                      self.projects.get(run, NO_PROJECT))
            dead = self.keys.dead(run)

            def bury(entry: Entry, reason: str, dead: str = dead, stream: str = stream) -> None:
                if reason:
                    acks.bury(dead, stream, entry[0], entry[1] or [], reason)
                else:
                    acks.add(stream, entry[0])

            try:
                decode(post, entries, self.backend.takes_columns, self.settings.batch_bytes,
                       bury)
            except Exception as exc:  # noqa: BLE001 - never reached in practice: per entry
                self.problems.report(f"decode:{run}", f"run {run}: decoding failed", exc=exc)
                self.flow.park(run, f"decoding failed: {exc!r}")
                continue
            if post.parts:
                self.flow.queued[run] = post

    def _submit(self, landed: dict[int, Future[Post]] | None = None) -> None:
        """Start the queued post of each run that has nothing in flight, unless its post
        that just ``landed`` failed (:meth:`_settle` parks the run and drops what is queued)."""
        failed = {run for run, f in (landed or {}).items()
                  if f.exception() is not None or f.result().failed}
        for run in [r for r in self.flow.queued if r not in self.flow.flight and r not in failed]:
            post = self.flow.queued.pop(run)
            post.sent_at = time.monotonic()
            self.flow.flight[run] = self._poster.submit(deliver, self.backend, post,
                                                        self.projects)

    def _landed(self) -> dict[int, Future[Post]]:
        """The posts that came back, out of flight: their runs may post again."""
        return {run: self.flow.flight.pop(run) for run in self.flow.done()}

    def _settle(self, landed: dict[int, Future[Post]], acks: Acks) -> None:
        """Ack what the backend stored, dead-letter what it refused, park what failed."""
        for run, future in landed.items():
            try:
                post = future.result()
            except Exception as exc:  # noqa: BLE001 - deliver() catches; a bug lands here
                self.problems.report(f"post:{run}", f"run {run}: posting failed", exc=exc)
                self.flow.park(run, repr(exc))
                continue
            self._settle_post(post, acks)

    def _settle_post(self, post: Post, acks: Acks) -> None:
        run, stream, dead = post.run, post.stream, self.keys.dead(post.run)
        acks.stored_all(stream, post.stored)
        for (entry_id, flat), reason in post.bad:
            acks.bury(dead, stream, entry_id, flat or [], reason)
        stored = post.stored
        points = (sum(map(len, filter(None, map(itemgetter(1), stored)))) - 6 * len(stored)) // 2
        self.stored += points
        if stored:
            took = time.monotonic() - post.sent_at
            sample = stored[:: max(1, len(stored) // 20)]  # ~20 per batch: the ingest delay
            self.metrics.on_persisted(len(stored), points, took, [i for i, _ in sample])
        if post.bad:
            self.problems.report(f"bad:{run}", f"run {run}: {len(post.bad)} entries "
                                 f"dead-lettered to {dead}: {post.bad[0][1][:300]}",
                                 logging.WARNING)
        if post.splits:
            log.info("run %d: the backend refused a body as too large (413); split %d times",
                     run, post.splits)
        if post.bad:
            self.metrics.on_failed("rejected")
        if post.failed:
            self.metrics.on_failed("failed")
            self.metrics.parked.inc()
            pause = self.flow.park(run, post.failed)
            log.warning("run %d: %s; %d entries left pending, parked, retry in %.1f s",
                        run, post.failed, post.entries(), pause)
        else:
            self.flow.succeeded(run)

    def _maintain(self) -> None:
        """Heartbeat, run completion / dead members, trimming — each on its own interval."""
        s = self.settings
        if self._due_now("beat", s.heartbeat_interval):
            self._guard("heartbeat", lambda: self.r.hset(self.keys.workers, self.name,
                                                         int(time.time() * 1000)))
        if self._due_now("check", s.check_interval):
            self._start_check()
            self.flow.forget(set(self.runs))
        if self._due_now("trim", s.trim_interval):
            for stream in self._streams():
                self._guard(f"trim:{stream}", lambda stream=stream: trim(self.r, stream, s.retention))
        if self.metrics.enabled and self._due_now("sample", s.metrics_interval):
            self._guard("metrics", lambda: self.metrics.sample(
                self.r, self.keys.control, self._streams()[1:], GROUP))
        if self._due_now("report", 30.0):
            if self.stored:
                log.info("stored %d metric points in the last %.0f s", self.stored, 30.0)
            self.stored = 0

    # -- helpers -------------------------------------------------------------------------

    def _start_check(self) -> None:
        """Member and completion checks run on their own thread (they call the backend, which
        may hang): a new one starts once the last has finished; its failure is reported."""
        last = self._check
        if last is not None and not last.done():
            return
        exc = last.exception() if last is not None else None
        if exc is not None:
            kind = "redis" if is_weather(exc) else type(exc).__name__
            self.problems.report(f"check:{kind}", f"run checks failed: {type(exc).__name__}: "
                                 f"{exc}", logging.WARNING if is_weather(exc) else logging.ERROR,
                                 None if is_weather(exc) else exc)
        self._check = self._checker.submit(self.watcher.check, list(self.runs))

    def _due_now(self, what: str, interval: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(what, 0.0):
            return False
        self._due[what] = now + interval
        return True

    def _guard(self, what: str, step: Any) -> Any:
        """Run one maintenance step; its failure (but Redis weather) is reported, not fatal."""
        try:
            return step()
        except Exception as exc:
            if is_weather(exc) or isinstance(exc, Interrupted):
                raise
            self.problems.report(what, f"{what} failed: {type(exc).__name__}: {exc}",
                                 exc=None if isinstance(exc, redis.ResponseError) else exc)
            return None

    def _trouble(self, exc: Exception, delay: float) -> None:
        """An iteration failed: report, back off, and re-read whatever may be left pending."""
        pause = delay * random.uniform(0.5, 1.0)
        if is_weather(exc):
            code = error_code(exc) if isinstance(exc, redis.ResponseError) else ""
            self.problems.report(f"redis:{code or type(exc).__name__}",
                                 f"redis unavailable ({code or type(exc).__name__}: {exc}); "
                                 f"retrying with back-off", logging.WARNING)
        else:
            self.problems.report(f"loop:{type(exc).__name__}", f"worker loop error: "
                                 f"{type(exc).__name__}: {exc}; retrying", exc=exc)
        self.flow.recover_all(self.runs)
        self._control_from = "0"
        self._stop.wait(pause)

    def _kind(self, stream: str) -> str:
        return "control" if stream == self.keys.control else "metrics"

    def _streams(self) -> list[str]:
        return [self.keys.control] + [self.keys.metrics(run) for run in self.runs]

    def _refresh_runs(self) -> None:
        """The runs set; when it cannot be read (e.g. WRONGTYPE) the runs known so far."""
        ids = self._guard("runs set", lambda: self.r.smembers(self.keys.runs))
        if ids is not None:
            runs = sorted(int(x) for x in ids if x.isdigit() and 0 < int(x) <= MAX_ID)
            runs = self._owned(runs) if self.settings.tenant else runs
            if runs != self.runs:
                self._joined.extend(set(runs).difference(self.runs))
            self.runs = runs

    def _runs_for_logs(self) -> list[int]:
        """The active runs and every run that joined since the last call (the log thread)."""
        joined = self._joined
        return list(self.runs) + [joined.popleft() for _ in range(len(joined))]

    def _owned(self, runs: list[int]) -> list[int]:
        """A tenant's runs set may still name another tenant's run (a rank that is not held
        by ``pluto acl`` can add any id): its entries, members and ledger must not reach that
        run. Each id is checked with the backend once (cached; refused ones reported); an
        unavailable backend leaves the unchecked ones for a later iteration."""
        out: list[int] = []
        for run in runs:
            if run not in self.foreign:  # (a run already known costs nothing: Control.owned)
                try:
                    self._check_owner(run)
                except Rejected as exc:
                    self.foreign.add(run)
                    self.problems.report(f"foreign:{run}", f"run {run} in {self.keys.runs} is "
                                         f"not served: {exc}", logging.WARNING)
                except (Unavailable, Interrupted):
                    return out
            if run not in self.foreign:
                out.append(run)
        return out

    def _beat_quietly(self) -> None:
        """Heartbeat while the backend is being retried, so ``pluto status`` sees us alive."""
        try:
            self.r.hset(self.keys.workers, self.name, int(time.time() * 1000))
        except redis.RedisError as exc:  # best effort: the loop reports Redis trouble itself
            log.debug("heartbeat failed: %s", exc)

    def close(self) -> None:
        """Settle the posts in flight, then leave the group: drop this consumer from every
        stream where it holds nothing pending."""
        try:
            self.flush(timeout=self.settings.read_timeout * 2)
        except (Interrupted, redis.RedisError) as exc:
            log.warning("posts in flight left pending: %s", exc)
        self._poster.shutdown(wait=True)
        if self._log_thread.is_alive():
            self._stop.set()  # (already set when run() ends; close() may come on its own)
            self._log_thread.join(10)
        self._checker.shutdown(wait=True)
        self.control.close()
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
        self.calls.close()
        log.info("worker %s stopped", self.name)
