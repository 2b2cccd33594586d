"""Run lifecycle checks the worker makes in maintenance: dead members and completed runs.

A run is done when no member in its members hash is ``running`` and the ``workers`` group has
persisted every entry of its metrics stream. The SDK XADDs a process's last entries before it
marks itself finished, so once every member is finished, "drained" means "all of it stored".
Every worker replica may run these checks; they are idempotent, and marking a member failed is
a compare-and-set so it never overwrites the member's own last word.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from pluto.protocol import INT_TEXT, Keys, State, pack

from ._backend import Backend, Interrupted, Rejected, Unavailable
from ._control import member_info, member_row
from ._ledger import LedgerSync
from ._problems import Problems
from ._redis import RedisClient
from ._streams import drained, is_weather, trim

log = logging.getLogger("worker.runs")

RUNNING = State.RUNNING.value

# Set a member's value only if it is still the one we judged on (the SDK may finish meanwhile).
_CAS = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


SUPERSEDED = ("failed", "terminated")
"""States a later member of the same rank replaces: an elastic restart (torchrun
``--max-restarts``) or a requeued job fails one rank and terminates its siblings, then attaches
every rank again; the last attempt decides the run's status."""


def live_states(members: list[dict[str, Any]]) -> list[str]:
    """Member states that decide the run's status: a failed or terminated member whose rank
    attached again later (the job restarted that rank under the same run id) is replaced."""
    later: dict[Any, int] = {}
    for info in members:
        at = _epoch_ms(info.get("attached_at")) or 0
        later[info.get("rank")] = max(later.get(info.get("rank"), 0), at)
    return [str(info.get("state")) for info in members
            if not (info.get("state") in SUPERSEDED
                    and later.get(info.get("rank"), 0) > (_epoch_ms(info.get("attached_at")) or 0))]


def final_status(states: list[str]) -> str:
    if "failed" in states:
        return "FAILED"
    if "terminated" in states:
        return "TERMINATED"
    return "COMPLETED"


def _epoch_ms(value: Any) -> int | None:
    """``attached_at`` as epoch ms, whether the SDK wrote seconds or milliseconds."""
    if not isinstance(value, (int, float)) or value <= 0:
        return None
    return int(value if value > 1e11 else value * 1000)


class RunWatcher:
    """Dead members and completed runs, each run inside its own error boundary: a members
    value that is not a msgpack map, a heartbeat that is not a number, a hash of the wrong
    type is reported and ignored; a backend call that fails backs that run's checks off."""

    def __init__(self, r: RedisClient, keys: Keys, backend: Backend, heartbeat_timeout: float,
                 retention: int, problems: Problems | None = None) -> None:
        self.r = r
        self.keys = keys
        self.backend = backend
        self.timeout_ms = int(heartbeat_timeout * 1000)
        self.retention = retention
        self.problems = problems or Problems()
        self.ledger = LedgerSync(r, keys, backend)
        self._cas = r.register_script(_CAS)
        self._first_seen: dict[tuple[int, str], int] = {}
        # Heartbeats are judged only over time this worker could watch Redis: after Redis was
        # down or paused (or this loop stalled), no process could write its heartbeat either,
        # so silence counts from the moment the view came back, not from the last beat.
        self.blind_s = max(1.0, heartbeat_timeout / 4)
        self._last_check = 0.0
        self._excused = 0.0
        self._watching_since = 0
        self._backoff: dict[int, tuple[float, float]] = {}  # run -> (not before, delay)

    def excuse(self, seconds: float) -> None:
        """Time the loop spent waiting for the backend, not for Redis: not a blind spell."""
        self._excused += seconds

    def check(self, runs: list[int]) -> None:
        """Fail members whose heartbeat stopped, then complete the runs that are done."""
        now = time.monotonic()
        runs = [run for run in runs if self._backoff.get(run, (0.0, 0.0))[0] <= now]
        if not runs:
            return
        pipe = self.r.pipeline(transaction=False)
        for run in runs:
            pipe.hgetall(self.keys.members(run))
            pipe.hgetall(self.keys.heartbeats(run))
        replies = pipe.execute(raise_on_error=False)
        if now - self._last_check - self._excused > self.blind_s:
            self._watching_since = int(time.time() * 1000)
        self._last_check, self._excused = now, 0.0
        for i, run in enumerate(runs):
            try:
                self._check_run(run, replies[2 * i], replies[2 * i + 1])
                self._backoff.pop(run, None)
            except Exception as exc:
                if is_weather(exc) or isinstance(exc, Interrupted):
                    raise
                self._back_off(run, exc)

    def _check_run(self, run: int, raw_members: Any, raw_beats: Any) -> None:
        for reply, _key in ((raw_members, self.keys.members(run)),
                           (raw_beats, self.keys.heartbeats(run))):
            if isinstance(reply, Exception):
                raise reply
        members = self._members(run, raw_members)
        self._reap_dead(run, members, raw_beats)
        infos = {m: info for m, (_, info) in members.items()}
        self.ledger.sync(run, infos)
        states = [info.get("state") for info in infos.values()]
        if states and RUNNING not in states:
            self._complete(run)

    def _members(self, run: int, raw: dict[bytes, bytes]) -> dict[str, tuple[bytes, dict[str, Any]]]:
        """The members hash decoded; a value that is not what the SDK writes is skipped."""
        out = {}
        for m, value in raw.items():
            info = member_info(value)
            name = m.decode(errors="replace")
            if info is None:
                self.problems.report(f"member:{run}:{name}", f"run {run}: member {name[:80]!r} "
                                     f"of {self.keys.members(run)} is not a msgpack map "
                                     f"({value[:40]!r}); ignored", logging.WARNING)
                continue
            out[name] = (value, info)
        return out

    def _back_off(self, run: int, exc: BaseException) -> None:
        delay = min(self._backoff.get(run, (0.0, 0.25))[1] * 2, 30.0)
        self._backoff[run] = (time.monotonic() + delay, delay)
        known = isinstance(exc, (Unavailable, Rejected, redis.ResponseError))
        self.problems.report(f"check:{run}", f"run {run}: status check failed "
                             f"({type(exc).__name__}: {exc}); retry in {delay:.1f} s",
                             logging.WARNING if known else logging.ERROR,
                             None if known else exc)

    def _reap_dead(self, run: int, members: dict[str, tuple[bytes, dict[str, Any]]],
                   beats: dict[bytes, bytes]) -> None:
        now = int(time.time() * 1000)
        for member, (raw, info) in members.items():
            if info.get("state") != RUNNING:
                self._first_seen.pop((run, member), None)
                continue
            beat = beats.get(member.encode())
            if beat is not None and not INT_TEXT.match(beat):
                self.problems.report(f"beat:{run}:{member}", f"run {run}: heartbeat of "
                                     f"{member[:80]!r} is not epoch ms ({beat[:40]!r}); judged "
                                     "by its attach time instead", logging.WARNING)
                beat = None
            last = int(beat) if beat else _epoch_ms(info.get("attached_at"))
            if last is None:
                last = self._first_seen.setdefault((run, member), now)
            last = max(last, self._watching_since)
            if now - last > self.timeout_ms:
                self._mark_failed(run, member, raw, info, (now - last) / 1000)

    def _mark_failed(self, run: int, member: str, raw: bytes, info: dict[str, Any],
                     silent_s: float) -> None:
        new = {**info, "state": "failed", "reason": "heartbeat lost"}
        if not self._cas(keys=[self.keys.members(run)], args=[member, raw, pack(new)]):
            return  # the member changed meanwhile (finished, or another worker marked it)
        info["state"] = "failed"
        log.warning("run %d: member %s (rank %s) heartbeat lost (silent %.1f s); marked failed",
                    run, member, info.get("rank"), silent_s)
        self.backend.upsert_members(run, [member_row(member, new)])

    def _complete(self, run: int) -> None:
        stream = self.keys.metrics(run)
        if not drained(self.r, stream):
            return  # entries still to persist; checked again next round
        members = self._members(run, self.r.hgetall(self.keys.members(run)))
        states = live_states([info for _, info in members.values()])
        if not states or RUNNING in states:
            return
        status = final_status(states)
        # The ledger, final, before the status: a COMPLETED run shows what it lost.
        self.ledger.sync(run, {m: info for m, (_, info) in members.items()}, final=True)
        self.backend.update_status(run, status)
        self.r.srem(self.keys.runs, str(run))
        # A process may have re-attached between our read and the SREM: put the run back.
        again = [(member_info(v) or {}).get("state") for v in self.r.hvals(self.keys.members(run))]
        if RUNNING in again:
            self.r.sadd(self.keys.runs, str(run))
            self.backend.update_status(run, "RUNNING")
            return
        log.info("run %d %s (%d members)", run, status, len(states))
        self.ledger.forget(run)
        trim(self.r, stream, self.retention)
