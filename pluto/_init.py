"""``pluto.init``: validate, connect, elect or attach, start the producer, hook process exit."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import _console
from . import protocol as proto
from ._agree import agree_run_id  # issue 20 (H4)
from ._attach import CreateRequest, elect
from ._launch import member_name  # issue 20 (H4)
from ._preflight import check_workers  # issue 20 (H4)
from ._producer import Producer, Target
from ._run import Run
from ._settings import Settings
from ._sysmetrics import start_sampler  # issue 20 (H4)
from ._values import PlutoWarning, clean_config, user_stacklevel
from .env import redact
from .errors import ConfigError, ConnectionFailed
from .protocol import RUN_KEY_TTL, Keys, State

MAX_ID_TEXT = 512
"""Longest project or run id accepted (characters)."""
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")

# redis-py >= 7.1 sends CLIENT SETINFO on every connect and reads its own package metadata for
# it: about a third of init's CPU time when 64 ranks start at once. Skip it where it exists.
_NO_SETINFO: dict[str, Any] = (
    {"driver_info": None} if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
    else {})

_active: list[Run] = []
"""Runs of this process not finished yet (what SIGTERM and exit must finish)."""
_last: Run | None = None
_hooks_installed = False
_uncaught = False


def init(project: str | None = None, name: str | None = None, config: Any = None,
         run_id: str | None = None, tags: list[str] | None = None,
         settings: Settings | Mapping[str, Any] | None = None) -> Run:
    """Attach this process to a run, creating it if this process is the first to arrive.

    >>> run = pluto.init(project="llm", name="baseline", config={"lr": 3e-4}, run_id="job-7")
    """
    s = settings if isinstance(settings, Settings) else Settings.from_env(**dict(settings or {}))
    project = _check_id("project", project if project is not None else s.project, "PLUTO_PROJECT")
    given = run_id if run_id is not None else s.run_id
    run_id = agree_run_id(_check_id("run_id", given, "PLUTO_RUN_ID") if given is not None else None,
                          project, s)  # issue 20 (H4): rank 0's id wins (pluto/_agree.py)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name is not None and not _encodable(name):
        raise TypeError("name is not valid text (a lone surrogate?); decode it with "
                        "errors='replace'")
    cfg = clean_config(config)
    tag_list = _check_tags(tags)
    keys = Keys(s.prefix, s.tenant)
    member = member_name()  # issue 20 (H4): a second init in this process is a second member
    if s.mode == "disabled":
        return Run(id=0, run_id=run_id, resumed=False, name=name, project=project, config=cfg,
                   rank=s.rank, member=member, settings=s, client=None, keys=keys, producer=None)
    client = connect(s)
    check_workers(client, keys, keys.run(project, run_id), s)  # issue 20 (H4): pluto/_preflight.py
    won = elect(client, keys, CreateRequest(project, run_id, name, cfg, tag_list), s.lease,
                s.init_timeout, redact(s.redis_url))
    given_name = name
    if won.resumed and won.name is not None:  # announced with the id: no round trip
        name = won.name
    elif won.resumed:  # the run's real name, as its creator gave it (kept by the worker)
        stored: Any = client.hget(keys.info(won.id), "name")
        name = stored.decode(errors="replace") if stored else name
    if won.resumed and given_name is not None and given_name != name:
        warnings.warn(f"pluto: run {run_id!r} already exists (id {won.id}, name {name!r}); this "
                      f"process attached to it and ignored name={given_name!r} (the creator's "
                      "name stands)", PlutoWarning, stacklevel=user_stacklevel())
    register = functools.partial(_register_member, client, keys, s, won.id, member, project,
                                 run_id, cfg if won.resumed else None)
    stream = keys.metrics(won.id)
    target = Target(stream, keys.heartbeats(won.id), keys.members(won.id), member)
    resolve = functools.partial(_stream_client, client, stream, True)
    producer = Producer(_stream_client(client, stream), target, s.rank, s.flush_interval,
                        s.heartbeat_interval, s.buffer_size, register=register,
                        resolve=resolve if s.cluster else None)
    run = Run(id=won.id, run_id=run_id, resumed=won.resumed, name=name, project=project, config=cfg,
              rank=s.rank, member=member, settings=s, client=client, keys=keys, producer=producer)
    start_sampler(run, producer.on_start)  # per-rank system metrics (pluto/_sysmetrics.py)
    if s.capture_console:
        _capture_console(run, client, keys.logs(won.id), producer.on_start)
    producer.start()  # starts the sampler's and the console's threads (Producer.on_start)
    _track(run)
    return run


def _capture_console(run: Run, client: Any, stream: str, starts: list[Callable[[], None]]
                     ) -> None:
    """Tee stdout/stderr into the run's logs stream until ``finish`` (``_console``); its
    sending thread is started by the producer thread (``starts``)."""
    console = _console.start(run.settings.redis_url, client, stream, run.rank,
                             run.settings.console_buffer, starts, _NO_SETINFO)
    if console is None:
        return
    if run._producer is not None:  # its losses go in this process's ledger (members hash)
        run._producer.ledger.console = lambda: console.dropped
    run.on_finishing = lambda r: console.close(min(1.0, r.settings.finish_timeout))


def quick_retry() -> Retry:
    """Two retries within ~0.1 s. redis-py 8's default retries a failed command 10 times with
    up to 1 s of back-off (~4 s in all); the producer has its own back-off and must trim its
    buffer and answer finish() meanwhile."""
    return Retry(ExponentialBackoff(0.1, 0.01), 2)


def connect(s: Settings) -> redis.Redis:
    """A client for ``PLUTO_REDIS_URL`` that answered PING, or one clear ``PlutoError``."""
    where = redact(s.redis_url)
    kind: Any = redis.RedisCluster if s.cluster else redis.Redis
    tls = s.tls()  # ConfigError naming PLUTO_REDIS_CA/CERT/KEY
    try:
        client = kind.from_url(s.redis_url, socket_connect_timeout=s.connect_timeout,
                               socket_timeout=10.0, retry=quick_retry(),
                               **_NO_SETINFO, **tls)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"PLUTO_REDIS_URL={where!r} is not a Redis URL ({exc}); use "
                          "redis://host:port/0, rediss:// for TLS, redis://user:pass@host:port") from None
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConnectionFailed(f"Redis at {where} refused the credentials ({exc}): fix the "
                               "user:password in PLUTO_REDIS_URL") from exc
    except (redis.RedisError, OSError) as exc:
        raise ConnectionFailed(f"cannot reach Redis at {where} ({exc}): set PLUTO_REDIS_URL to a "
                               "running Redis, or start one on this machine with `pluto up`") from exc
    return client  # type: ignore[no-any-return]


def _check_id(what: str, value: Any, env: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a str, got {type(value).__name__} (argument or {env})")
    if not value or len(value) > MAX_ID_TEXT or _BAD_ID.search(value) or not _encodable(value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise ConfigError(f"{what} {shown!r} ({len(value)} chars) is invalid: it must be 1-{MAX_ID_TEXT} "
                          f"characters of valid text without control characters (argument or {env})")
    return value


def _check_tags(tags: Any) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, (list, tuple, set)) or not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be a list of str")
    if not all(map(_encodable, tags)):
        raise TypeError("a tag is not valid text (a lone surrogate?); decode it with "
                        "errors='replace'")
    return list(tags)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _register_member(client: redis.Redis, keys: Keys, s: Settings, run: int, member: str,
                     project: str, run_id: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """Record this process in the run (members hash + attach op); a late config is merged in.
    Returns the member's value, which the producer's heartbeats keep up to date."""
    host, pid = socket.gethostname(), os.getpid()  # the member name may carry "/<n>"
    info: dict[str, Any] = {"rank": s.rank, "local_rank": s.local_rank, "host": host,
                            "pid": pid, "node": s.node, "attempt": s.attempt,
                            "attached_at": int(time.time() * 1000),
                            "state": State.RUNNING.value}
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(keys.members(run), member, proto.pack(info))
        pipe.hset(keys.heartbeats(run), member, int(time.time() * 1000))
        pipe.expire(keys.run(project, run_id), RUN_KEY_TTL)
        pipe.xadd(keys.control, proto.control_attach(run, member, info))  # type: ignore[arg-type]
        if config is not None:  # the creator's config travelled with its create request
            pipe.xadd(keys.control, proto.control_config(run, config))  # type: ignore[arg-type]
        pipe.execute()
    return info


def _stream_client(client: Any, stream: str, refresh: bool = False) -> redis.Redis:
    """On a cluster, the node that owns the run's slot: the producer writes raw RESP to it
    (``refresh``: after a ``MOVED``, read the slot map again first)."""
    if isinstance(client, redis.RedisCluster):
        if refresh:
            client.nodes_manager.initialize()
        node = client.get_node_from_key(stream)  # type: ignore[no-untyped-call]
        return client.get_redis_connection(node)
    return client  # type: ignore[no-any-return]


# -- process exit ------------------------------------------------------------------------------
def _track(run: Run) -> None:
    global _hooks_installed
    _active.append(run)
    run.on_finished = _finished
    import pluto

    pluto.run = run
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_finish_all_at_exit)
    previous_hook = sys.excepthook

    def excepthook(*args: Any) -> None:
        global _uncaught
        _uncaught = True
        previous_hook(*args)

    sys.excepthook = excepthook
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            _chain_signal(signum)


def _finished(run: Run) -> None:
    """A run finished: forget it (a sweep of 1,000 runs keeps nothing but the last), and if a signal
    interrupted this finish, now die of it as the signal asked."""
    global _last
    if run in _active:
        _active.remove(run)
    _last = run  # pluto.log() after finish() warns instead of raising; one run, not a list
    if _deferred and not any(r.finishing for r in _active):
        _die(*_deferred.pop())


def _finish_all_at_exit() -> None:
    """A run the user forgot to finish is finished at exit; failed if an exception ended it."""
    for run in list(_active):
        run.finish(state=State.FAILED if _uncaught else State.FINISHED)


_handling: list[int] = []
"""One item per signal handler running: Python runs a pending handler at a bytecode boundary of
the one running, so a flag tested and then set would leave a window for the second to miss."""
_deferred: list[tuple[int, FrameType | None, Any]] = []
"""A signal that arrived while ``finish`` was running: acted on when that finish returns."""


def _chain_signal(signum: int) -> None:
    """On SIGTERM/SIGINT (launchers send it to every rank), flush what log() accepted within
    ``PLUTO_TERM_TIMEOUT``, record ``terminated``, then die as the signal asked — also when the
    signal interrupts a ``finish`` already running, and when a second signal follows the first
    (that one cuts the flush short). Never re-enters a lock, so it cannot deadlock."""
    previous = signal.getsignal(signum)
    if previous == signal.SIG_IGN:
        return  # the process ignores this signal: so do we

    def handler(sig: int, frame: FrameType | None) -> None:
        _handling.append(sig)  # first, in one C call: a signal arriving next sees it
        try:
            runs = list(_active)
            if len(_handling) > 1 or _deferred:  # a second signal: flush no longer
                for run in runs:
                    run.terminate(0.0)
                return
            interrupted = False
            for run in runs:
                budget = run.settings.term_timeout
                if run.finishing:  # this signal interrupted it: it goes on, bounded, then we die
                    run.terminate(budget)
                    interrupted = True
                else:
                    run.finish(timeout=budget, state=State.TERMINATED)
        finally:
            _handling.pop()
        if interrupted:
            _deferred.append((sig, frame, previous))
            return
        _die(sig, frame, previous)

    try:
        signal.signal(signum, handler)
    except (ValueError, OSError):  # not the main thread of the main interpreter
        pass


def _die(sig: int, frame: FrameType | None, previous: Any) -> None:
    """Hand the signal to the handler that was there before ours, or die of it."""
    if callable(previous):
        previous(sig, frame)  # e.g. Python's SIGINT handler raises KeyboardInterrupt
        return
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def current() -> Run | None:
    return _active[-1] if _active else _last


def log(data: dict[str, Any], step: int | None = None, timestamp: float | None = None) -> None:
    """``pluto.run.log`` of the current run (the last ``init`` of this process)."""
    run = current()
    if run is None:
        raise ConfigError("pluto.log() before pluto.init(): call pluto.init(...) first")
    run.log(data, step=step, timestamp=timestamp)


def finish(timeout: float | None = None) -> int:
    """Finish the current run; see ``Run.finish``."""
    run = current()
    return run.finish(timeout) if run is not None else 0
