"""Control stream operations: create, attach, finish, config (DESIGN.md §3).

Every handler is idempotent, because a control entry is redelivered whenever a worker dies
before acknowledging it: the backend upserts runs (on project + external id), members and
config, and the Redis writes here only ever set the same values again.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from pluto import _keys as K
from pluto._keys import Keys
from pluto._protocol import decode_control, unpack

from ._acks import Acks
from ._backend import Backend, Interrupted, Rejected, Unavailable
from ._entries import fields_dict
from ._problems import Problems
from ._streams import Entry, ensure_group, is_weather

log = logging.getLogger("worker.control")

RUN_KEY_TTL = 30 * 24 * 3600
CREATED_TTL = 3600


_INT64 = 2**63 - 1


def member_info(raw: bytes | None) -> dict[str, Any] | None:
    """A members-hash value as the SDK writes it (a msgpack map); None for anything else."""
    if raw is None:
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
        "host": str(info.get("host") or host or member),
        "pid": num("pid", int(pid) if pid.isdigit() and int(pid) <= _INT64 else None),
        "state": state or str(info.get("state") or "running"),
    }
    for key in ("logged", "sent", "dropped"):
        if num(key) is not None:
            row[key] = num(key)
    drops = info.get("drops")
    if isinstance(drops, dict):
        row["drops"] = {str(k): v for k, v in drops.items()
                        if type(v) is int and 0 <= v <= _INT64}
    return row


def _order(msg: dict[str, Any]) -> tuple[Any, ...]:
    """Entries with one key are applied in stream order (an attach before its finish)."""
    if msg["op"] == K.OP_CREATE:
        return (K.OP_CREATE, msg["project"], msg["run_id"])
    return ("run", msg["id"])


@dataclass
class Deferred:
    entries: list[Entry]
    due: float
    reason: str


class Control:
    """Applies control entries to the backend and to Redis, each inside its own error
    boundary: a malformed entry or one the backend refuses for good goes to the control
    dead-letter stream (``Keys.control_dead``) with its reason and is acknowledged; one whose
    backend call fails transiently stays pending and is retried with back-off (later entries
    of the same run wait behind it, the others go on)."""

    def __init__(self, r: Any, keys: Keys, backend: Backend, projects: dict[int, str | None],
                 problems: Problems, retry_max: float = 5.0) -> None:
        self.r = r
        self.keys = keys
        self.backend = backend
        self.projects = projects  # run id -> project name, shared with the metrics path
        self.problems = problems
        self.retry_max = retry_max
        self.deferred: dict[tuple[Any, ...], Deferred] = {}
        self._delays: dict[tuple[Any, ...], float] = {}

    @property
    def held(self) -> set[bytes]:
        """Ids of the entries waiting for a retry (pending, so a re-read returns them too)."""
        return {e[0] for d in self.deferred.values() for e in d.entries}

    def apply(self, entries: list[Entry], acks: Acks) -> None:
        """Retry the deferred entries that are due, then apply ``entries`` in order."""
        now = time.monotonic()
        for key in [k for k, d in self.deferred.items() if d.due <= now]:
            for entry in self.deferred.pop(key).entries:
                self._apply_one(entry, acks)
        held = self.held
        for entry in entries:
            if entry[0] not in held:
                self._apply_one(entry, acks)

    def _apply_one(self, entry: Entry, acks: Acks) -> None:
        entry_id, flat = entry
        if flat is None:  # deleted while pending
            acks.add(self.keys.control, entry_id)
            return
        try:
            msg = decode_control(fields_dict(flat))
        except ValueError as exc:
            return self._bury(entry, str(exc), acks)
        key = _order(msg)
        if key in self.deferred:
            self.deferred[key].entries.append(entry)
            return
        handler = {K.OP_CREATE: self.create, K.OP_ATTACH: self.attach,
                   K.OP_FINISH: self.finish, K.OP_CONFIG: self.config}[msg["op"]]
        try:
            handler(msg)
        except Rejected as exc:
            return self._bury(entry, f"rejected: {exc}", acks)
        except Unavailable as exc:
            return self._defer(key, entry, str(exc))
        except Exception as exc:
            if is_weather(exc) or isinstance(exc, Interrupted):
                raise
            return self._bury(entry, f"worker error: {type(exc).__name__}: {exc}", acks, exc)
        self._delays.pop(key, None)
        acks.add(self.keys.control, entry_id)

    def _bury(self, entry: Entry, reason: str, acks: Acks,
              exc: BaseException | None = None) -> None:
        entry_id, flat = entry
        fields = fields_dict(flat or [])
        about = fields.get(b"id") or b"/".join(
            fields.get(k, b"?") for k in (b"project", b"run_id"))
        self.problems.report(f"control:{about[:100]!r}", f"control entry {entry_id.decode()} "
                             f"(run {about[:100].decode(errors='replace')}) dead-lettered to "
                             f"{self.keys.control_dead}: {reason[:500]}", exc=exc)
        self.problems.counts["control"] += 1
        acks.bury(self.keys.control_dead, self.keys.control, entry_id, flat or [],
                  reason[:2000], count=False)

    def _defer(self, key: tuple[Any, ...], entry: Entry, reason: str) -> None:
        delay = min(self._delays.get(key, 0.25) * 2, self.retry_max)
        self._delays[key] = delay
        pause = delay * random.uniform(0.75, 1.0)
        self.deferred[key] = Deferred([entry], time.monotonic() + pause, reason)
        self.problems.report(f"control-retry:{key}", f"control {key[0]} {key[1:]}: {reason}; "
                             f"left pending, retry in {pause:.1f} s", logging.WARNING)

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
        self.r.set(self.keys.run(project, run_id), str(run), ex=RUN_KEY_TTL)
        self.announce(project, run_id, str(run))
        log.info("run %s/%s -> id %d (%s)", project, run_id, run, "resumed" if resumed else "new")

    def announce(self, project: str, run_id: str, run: str) -> None:
        """Wake every init blocked on this run (they re-read the run key, the source of truth)."""
        key = self.keys.announce(project, run_id)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"id": run}, maxlen=1, approximate=False)
            pipe.expire(key, CREATED_TTL)
            pipe.execute()

    def attach(self, msg: dict[str, Any]) -> None:
        run, member = msg["id"], msg["member"]
        info = msg.get("info") or {}
        self.backend.upsert_members(run, [member_row(member, info)])
        if self.activate(run):
            # The run had left the active set (it completed or failed before); a process has
            # come back under the same run id, so it is running again.
            self.backend.update_status(run, "RUNNING")
            log.info("run %d: %s re-attached; status RUNNING again", run, member)
        log.info("run %d: %s attached (rank %s)", run, member, info.get("rank"))

    def finish(self, msg: dict[str, Any]) -> None:
        run, member, state = msg["id"], msg["member"], msg.get("state") or "finished"
        info = member_info(self.r.hget(self.keys.members(run), member)) or {}
        self.backend.upsert_members(run, [member_row(member, info, state)])
        log.info("run %d: %s %s", run, member, state)

    def config(self, msg: dict[str, Any]) -> None:
        self.backend.update_config(msg["id"], msg.get("config") or {})

    def activate(self, run: int) -> bool:
        """Make ``run`` one the workers read; True if it was not active before."""
        added = bool(self.r.sadd(self.keys.runs, str(run)))
        ensure_group(self.r, self.keys.metrics(run))
        return added
