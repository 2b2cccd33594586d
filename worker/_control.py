"""Control stream operations: create, attach, finish, config (DESIGN.md §3).

Every handler is idempotent, because a control entry is redelivered whenever a worker dies
before acknowledging it: the backend upserts runs (on project + external id), members and
config, and the Redis writes here only ever set the same values again.
"""

from __future__ import annotations

import logging
from typing import Any

from pluto import protocol as K
from pluto.protocol import CREATED_TTL, INT64_MAX, RUN_KEY_TTL, Keys, State, unpack

from ._backend import Backend, Interrupted, Rejected, Unavailable
from ._redis import RedisClient
from ._streams import ensure_group, is_weather

log = logging.getLogger("worker.control")



_INT64 = INT64_MAX


def member_info(raw: bytes | str | None) -> dict[str, Any] | None:
    """A members-hash value as the SDK writes it (a msgpack map); None for anything else
    (a ``str`` only comes from a client that decodes replies, which the worker's does not)."""
    if not isinstance(raw, bytes):
        return None
    try:
        info = unpack(raw)
    except Exception:  # noqa: BLE001 - msgpack raises many types on junk
        return None
    return info if isinstance(info, dict) else None


def member_row(member: str, info: dict[str, Any], state: str | None = None) -> dict[str, Any]:
    """One row of ``POST /api/runs/{id}/members`` from a members-hash value (None if unknown);
    with the member's loss ledger (``logged``, ``sent``, ``dropped``, ``drops``) when it has one."""
    host, _, pid = member.rpartition(":")

    def num(key: str, default: int | None = None) -> int | None:
        value = info.get(key)
        return value if type(value) is int and -_INT64 <= value <= _INT64 else default

    row: dict[str, Any] = {
        "member": member,
        "rank": num("rank"),
        "local_rank": num("local_rank"),
        "node": num("node"),
        "attempt": num("attempt"),
        "host": str(info.get("host") or host or member),
        "pid": num("pid", int(pid) if pid.isdigit() and int(pid) <= _INT64 else None),
        "state": state or str(info.get("state") or State.RUNNING.value),
    }
    for key in ("logged", "sent", "dropped"):
        if num(key) is not None:
            row[key] = num(key)
    drops = info.get("drops")
    if isinstance(drops, dict):
        row["drops"] = {str(k): v for k, v in drops.items()
                        if type(v) is int and 0 <= v <= _INT64}
    return row


DONE, DEAD, RETRY = "done", "dead", "retry"


def order_key(msg: dict[str, Any]) -> tuple[Any, ...]:
    """Entries with one key are applied in stream order (an attach before its finish)."""
    if msg["op"] == K.OP_CREATE:
        return (K.OP_CREATE, msg["project"], msg["run_id"])
    return ("run", msg["id"])


class Control:
    """Applies one decoded control message to the backend and to Redis (:meth:`call`, on a
    helper thread of :class:`worker._dispatch.Dispatcher`, which keeps the stream order)."""

    def __init__(self, r: RedisClient, keys: Keys, backend: Backend,
                 projects: dict[int, str | None]) -> None:
        self.r = r
        self.keys = keys
        self.backend = backend
        self.projects = projects  # run id -> project name, shared with the metrics path

    def call(self, msg: dict[str, Any]) -> tuple[str, str, BaseException | None]:
        """``(outcome, reason, exception)``: ``done``; ``dead`` (refused for good, or a bug:
        dead-letter it); ``retry`` (the backend or Redis is unavailable: try again later)."""
        handler = {K.OP_CREATE: self.create, K.OP_ATTACH: self.attach,
                   K.OP_FINISH: self.finish, K.OP_CONFIG: self.config}[msg["op"]]
        try:
            handler(msg)
        except Rejected as exc:
            return DEAD, f"rejected: {exc}", None
        except (Unavailable, Interrupted) as exc:
            return RETRY, str(exc), None
        except Exception as exc:  # noqa: BLE001 - one entry must never stop the others
            if is_weather(exc):
                return RETRY, f"redis unavailable: {type(exc).__name__}: {exc}", None
            return DEAD, f"worker error: {type(exc).__name__}: {exc}", exc
        return DONE, "", None

    def create(self, msg: dict[str, Any]) -> None:
        project, run_id, token = msg["project"], msg["run_id"], msg["token"]
        try:
            run, resumed = self.backend.create_run(project, run_id, msg.get("name") or "",
                                                   msg.get("config"), msg.get("tags") or [])
        except Rejected as exc:  # tell the waiting init why, instead of letting it time out
            self.r.set(self.keys.created(token), f"{K.CREATE_REFUSED}{exc}"[:2000], ex=CREATED_TTL)
            self.announce(project, run_id, "")
            raise
        self.projects[run] = project
        # Order matters: once the run key holds the id (and waiters are woken), the run must
        # already be readable by every worker (in the runs set, with its group).
        self.r.set(self.keys.created(token), "1" if resumed else "0", ex=CREATED_TTL)
        self.activate(run)
        name = None if resumed else msg.get("name") or run_id
        if name is not None:  # what attaching processes show as run.name (the creator's stands)
            info = self.keys.info(run)
            with self.r.pipeline(transaction=False) as pipe:
                pipe.hset(info, mapping={"name": name, "project": project, "run_id": run_id})
                pipe.expire(info, RUN_KEY_TTL)
                pipe.execute()
        self.r.set(self.keys.run(project, run_id), str(run), ex=RUN_KEY_TTL)
        self.announce(project, run_id, str(run), name)
        log.info("run %s/%s -> id %d (%s)", project, run_id, run, "resumed" if resumed else "new")

    def announce(self, project: str, run_id: str, run: str, name: str | None = None) -> None:
        """Wake every init blocked on this run (they re-read the run key, the source of truth);
        the name of a run just created comes along, so they need not read it (one round trip
        less for each of 64 ranks woken at once)."""
        key = self.keys.announce(project, run_id)
        fields = {"id": run} if name is None else {"id": run, "name": name}
        with self.r.pipeline(transaction=False) as pipe:
            pipe.xadd(key, fields, maxlen=1, approximate=False)  # type: ignore[arg-type]
            pipe.expire(key, CREATED_TTL)
            pipe.execute()

    def owned(self, run: int) -> None:
        """A rank can put any run id on its tenant's control stream: one of another tenant's
        runs is refused (:class:`Rejected`, so dead-lettered with the reason) before anything
        of it is touched. Known runs (created here, or checked before) cost nothing."""
        if self.backend.tenant and run not in self.projects:  # without tenants: no check
            self.projects[run] = self.backend.project_of(run)

    def attach(self, msg: dict[str, Any]) -> None:
        run, member = msg["id"], msg["member"]
        info = msg.get("info") or {}
        self.owned(run)
        self.backend.upsert_members(run, [member_row(member, info)])
        if not self.r.sismember(self.keys.runs, str(run)) and self._running(run, member):
            # The run had left the active set (it completed or failed before); a process has
            # come back under the same run id, so it is running again. RUNNING goes first,
            # then the run is active: a check that completes it from then on has the last
            # word. (The other way round, a check between the two could complete the run and
            # take it out of the set, and RUNNING written after would stay for good.)
            self.backend.update_status(run, "RUNNING")
            log.info("run %d: %s re-attached; status RUNNING again", run, member)
        self.activate(run)
        log.info("run %d: %s attached (rank %s)", run, member, info.get("rank"))

    def _running(self, run: int, member: str) -> bool:
        """The member has not finished since it attached (a short process may be done before
        its attach is applied: then the run needs no RUNNING, only the check that follows)."""
        info = self._member(run, member)
        return info is None or info.get("state") in (None, State.RUNNING.value)

    def _member(self, run: int, member: str) -> dict[str, Any] | None:
        """The member's value in the members hash as the SDK last wrote it (None: unreadable)."""
        return member_info(self.r.hget(self.keys.members(run), member))

    def finish(self, msg: dict[str, Any]) -> None:
        run, member, state = msg["id"], msg["member"], msg.get("state") or "finished"
        self.owned(run)
        info = self._member(run, member) or {}
        self.backend.upsert_members(run, [member_row(member, info, state)])
        log.info("run %d: %s %s", run, member, state)

    def config(self, msg: dict[str, Any]) -> None:
        self.owned(msg["id"])
        self.backend.update_config(msg["id"], msg.get("config") or {})

    def activate(self, run: int) -> None:
        """Make ``run`` one the workers read (in the runs set, with its group)."""
        self.r.sadd(self.keys.runs, str(run))
        ensure_group(self.r, self.keys.metrics(run))
