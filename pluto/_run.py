"""``Run``: what ``pluto.init`` returns, one per process, all of a job's sharing one run id."""

from __future__ import annotations

import enum
import logging
import operator
import threading
import time
import warnings
from types import TracebackType
from typing import Any

import redis

from . import _protocol as proto
from ._keys import Keys
from ._producer import Producer
from ._settings import Settings
from ._sysmetrics import stop_sampler  # issue 20 (H4)
from ._values import SCALARS, Cleaner, PlutoWarning
from .errors import RunFinished

log = logging.getLogger("pluto")
_is_scalar = SCALARS.__contains__


class State(str, enum.Enum):
    """Lifecycle of one process's membership in a run (also its ``state`` in the members hash)."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    TERMINATED = "terminated"


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
        self._cleaner = Cleaner(settings.strict)
        self._names = self._cleaner.good_names
        self._step = 0
        self._closed = False
        self._finish_lock = threading.Lock()

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

        Returns how many entries were lost (dropped on buffer overflow or never sent); 0 normally.
        """
        with self._finish_lock:
            if self._closed:
                return self.lost
            self._closed = True
            self.state = state
            if self._producer is None:
                return 0
            stop_sampler(self)  # issue 20 (H4): its last entry is flushed below
            limit = self.settings.finish_timeout if timeout is None else max(float(timeout), 0.0)
            self._producer.flush(limit)
            self._producer.stop()
            self.lost = self._producer.dropped + self._producer.failed + self._producer.pending()
            self._announce(state)
        if self.lost:
            warnings.warn(f"pluto: {self.lost} logged entries of run {self.run_id!r} never reached "
                          f"Redis ({self._producer.dropped} dropped when the buffer "
                          f"(PLUTO_BUFFER_SIZE={self._max}) was full, the rest unsent when "
                          "finish() timed out)", PlutoWarning, stacklevel=2)
        return self.lost

    def _announce(self, state: State) -> None:
        """Tell the workers this process is done: members hash first, then the control stream."""
        assert self._client is not None
        try:
            info = self._client.hget(self._keys.members(self.id), self.member)
            member = proto.unpack(info) if info else {}
            member["state"] = state.value
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hset(self._keys.members(self.id), self.member, proto.pack(member))
                pipe.xadd(self._keys.control,  # type: ignore[arg-type]
                          proto.control_finish(self.id, self.member, state.value))
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("pluto: could not record that %s finished (%s); the worker will see its "
                        "heartbeat stop instead", self.member, exc)

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
