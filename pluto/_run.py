"""``Run``: what ``pluto.init`` returns, one per process, all of a job's sharing one run id."""

from __future__ import annotations

import logging
import operator
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import protocol as proto
from ._producer import Producer
from ._settings import Settings
from ._sysmetrics import stop_sampler  # issue 20 (H4)
from ._values import SCALARS, Cleaner, PlutoWarning
from .errors import RunFinished
from .protocol import Keys, State

log = logging.getLogger("pluto")
_is_scalar = SCALARS.__contains__


class Run:
    """One process's handle on a (possibly shared) run.

    >>> with pluto.init(project="demo", run_id="job-1") as run:
    ...     run.log({"train/loss": 0.25})
    """

    def __init__(self, *, id: int, run_id: str, resumed: bool, name: str | None, project: str,
                 config: dict[str, Any] | None, rank: int, member: str, settings: Settings,
                 client: redis.Redis | None, keys: Keys, producer: Producer | None) -> None:
        self.id = id
        self.run_id = run_id
        self.resumed = resumed
        self.name = name
        self.project = project
        self.config: dict[str, Any] = dict(config or {})
        self.rank = rank
        self.member = member
        self.settings = settings
        self.state = State.RUNNING
        self.lost = 0
        self._client = client
        self._keys = keys
        self._producer = producer
        self._queue = producer.queue if producer else None
        self._max = settings.buffer_size
        self._interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._cleaner = Cleaner(settings.strict, self._count_bad_value if producer else None)
        self._names = self._cleaner.good_names
        self._step = 0
        self._closed = False
        self._finishing = False
        self._deadline = 0.0
        self._finish_lock = threading.Lock()
        self.on_finishing: Callable[[Run], None] | None = None
        """Called first thing in ``finish`` (``_init`` closes the console capture, so its last
        lines reach Redis before this process announces that it finished)."""
        self.on_finished: Callable[[Run], None] | None = None
        """Called at the end of every ``finish`` (``_init`` releases the run and, when a signal
        interrupted this finish, lets the process die of it)."""

    def __repr__(self) -> str:
        return (f"Run(id={self.id}, run_id={self.run_id!r}, project={self.project!r}, "
                f"rank={self.rank}, resumed={self.resumed}, state={self.state.value})")

    # -- the hot path -----------------------------------------------------------------------
    def log(self, data: dict[str, Any], step: int | None = None,
            timestamp: float | None = None) -> None:
        """Record metrics for this step; returns at once, the producer thread sends them.

        >>> run.log({"loss": 0.3, "acc": {"top1": 0.9}})   # stored as loss, acc/top1
        """
        if (type(data) is not dict or self._closed or not self._names.issuperset(data)
                or not all(map(_is_scalar, map(type, data.values())))):
            data = self._slow_path(data)
        if step is None and timestamp is None:
            self._step += 1
            ts = time.time()
        else:
            ts = self._explicit_stamp(step, timestamp)
        if self._queue is not None and data:
            names = tuple(data)  # one shared tuple per set of names: entries stay small
            names = self._interned.get(names) or self._intern(names)
            self._queue.extend((self._step, ts, names, *data.values()))

    def _count_bad_value(self) -> None:
        assert self._producer is not None
        self._producer.ledger.drop("bad_value")

    def _intern(self, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(self._interned) > 10_000:
            self._interned.clear()
        return self._interned.setdefault(names, names)

    def _slow_path(self, data: Any) -> dict[str, Any]:
        if self._closed:
            if self.settings.strict:
                raise RunFinished(f"log() after finish() on run {self.run_id!r}")
            warnings.warn(f"pluto: log() after finish() on run {self.run_id!r} is ignored",
                          PlutoWarning, stacklevel=3)
            return {}
        return self._cleaner.clean(data)

    def _explicit_stamp(self, step: Any, timestamp: Any) -> float:
        if step is None:
            self._step += 1
        else:
            try:
                value = operator.index(step)
                if value < 0:
                    raise ValueError
                self._step = value
            except (TypeError, ValueError):
                self._cleaner.reject_arg("step", f"step must be an int >= 0, got {step!r}")
                self._step += 1
        if timestamp is None:
            return time.time()
        if type(timestamp) in (int, float) and timestamp == timestamp and 0 <= timestamp < 1e11:
            return float(timestamp)
        self._cleaner.reject_arg("timestamp", f"timestamp must be epoch seconds, got {timestamp!r}")
        return time.time()

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self, timeout: float | None = None, *, state: State = State.FINISHED) -> int:
        """Flush what was logged to Redis (bounded by ``timeout``), mark this process done.

        Returns how many entries were lost (dropped on buffer overflow, refused, unencodable,
        or still unsent when the timeout ran out); 0 normally. Releases the connection and the
        thread, so a process can run many runs one after another.
        """
        if self._finishing:  # re-entered from a signal handler on this very thread
            return self.lost
        with self._finish_lock:
            if self._closed:
                return self.lost
            self._closed = self._finishing = True
            self.state = state
            try:
                self._flush_and_release(timeout)
            finally:
                self._finishing = False
        if self.lost:
            assert self._producer is not None
            drops = {k: v for k, v in self._producer.ledger.drops.items() if v}
            warnings.warn(f"pluto: {self.lost} logged entries of run {self.run_id!r} never reached "
                          f"Redis ({', '.join(f'{v} {k}' for k, v in drops.items())}; overflow "
                          f"means the buffer (PLUTO_BUFFER_SIZE={self._max}) was full, "
                          "finish_timeout that finish() gave up waiting for Redis)",
                          PlutoWarning, stacklevel=2)
        if self.on_finished is not None:
            self.on_finished(self)
        return self.lost

    def terminate(self, budget: float) -> None:
        """A signal arrived while ``finish`` runs: record ``terminated`` and let the flush
        wait at most ``budget`` seconds more."""
        self.state = State.TERMINATED
        self._deadline = min(self._deadline, time.monotonic() + budget)
        if self._producer is not None:
            self._producer.cut_short(budget)

    @property
    def finishing(self) -> bool:
        return self._finishing

    def _flush_and_release(self, timeout: float | None) -> None:
        producer = self._producer
        if producer is None:
            return
        stop_sampler(self)  # its last entry is flushed below
        limit = self.settings.finish_timeout if timeout is None else max(float(timeout), 0.0)
        self._deadline = time.monotonic() + limit
        if self.on_finishing is not None:  # a signal meanwhile shortens self._deadline
            self.on_finishing(self)
        producer.flush(max(self._deadline - time.monotonic(), 0.0))
        producer.stop(self._left(5.0))
        unsent = producer.pending()
        if unsent:
            producer.ledger.drop("finish_timeout", unsent)
        self.lost = producer.ledger.dropped
        self._announce(self._left(5.0))
        if self._client is not None:
            self._client.close()

    def _left(self, at_most: float) -> float:
        """What is left of finish's time budget, between 0.5 s and ``at_most``."""
        return max(0.5, min(at_most, self._deadline - time.monotonic()))

    def _announce(self, timeout: float) -> None:
        """Tell the workers this process is done, with its final ledger: members hash first,
        then the control stream. Bounded by ``timeout``: a paused Redis cannot hold us."""
        assert self._client is not None and self._producer is not None
        client = _bounded(self._client, timeout)
        try:
            member = dict(self._producer.info or {})
            if not member:
                info: Any = client.hget(self._keys.members(self.id), self.member)
                member = proto.unpack(info) if info else {}
            member.update(self._producer.ledger.as_fields(0), state=self.state.value)
            with client.pipeline(transaction=False) as pipe:
                pipe.hset(self._keys.members(self.id), self.member, proto.pack(member))
                fields: Any = proto.control_finish(self.id, self.member, self.state.value)
                pipe.xadd(self._keys.control, fields)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("pluto: could not record that %s finished (%s); the worker will see its "
                        "heartbeat stop instead", self.member, exc)
        finally:
            if client is not self._client:
                client.connection_pool.disconnect()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish(state=State.TERMINATED)
        elif issubclass(exc_type, SystemExit) and getattr(exc, "code", None) in (0, None):
            self.finish()
        else:
            self.finish(state=State.FAILED)


def _bounded(client: redis.Redis, timeout: float) -> redis.Redis:
    """A client like ``client`` whose commands give up after ``timeout`` seconds (a plain
    Redis only; a cluster client is used as it is)."""
    if not isinstance(client, redis.Redis):
        return client
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs.update(socket_timeout=timeout, socket_connect_timeout=min(timeout, 3.0),
                  retry=Retry(NoBackoff(), 0))
    pool = redis.ConnectionPool(connection_class=client.connection_pool.connection_class,
                                **kwargs)
    return redis.Redis(connection_pool=pool)
