"""Telling the backend a run's loss ledger (/work/notes/ledger.md §2): per member what its
process logged, sent and dropped (members rows), per rank what the workers stored and
dead-lettered (``POST /api/runs/{id}/ledger``, from the ledger hash :mod:`._acks` counts in).

Sent when it changed, at most every ``interval`` seconds per run, and once more, final, right
before the run's final status. A backend without the ledger route (the official server: 404
Not Found / 405) is not asked again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pluto import protocol as K
from pluto.protocol import INT64_MAX, Keys

from ._backend import Backend, Rejected
from ._control import member_row
from ._redis import RedisClient

_INT64 = INT64_MAX

log = logging.getLogger("worker.ledger")


def ledger_rows(raw: dict[bytes, bytes]) -> list[dict[str, Any]]:
    """``[{rank, stored, dead, last_step, last_time}]`` from a ledger hash, rank None for ``?``."""
    by_rank: dict[str, dict[str, Any]] = {}
    names = {K.LEDGER_STORED: "stored", K.LEDGER_DEAD: "dead", K.LEDGER_STEP: "last_step",
             K.LEDGER_TIME: "last_time"}
    for field, value in raw.items():
        kind, _, text = field.decode(errors="replace").partition(":")
        if kind not in names or not value.lstrip(b"-").isdigit():
            continue
        rank = int(text) if text.lstrip("-").isdigit() else None
        rank = rank if rank is not None and -_INT64 <= rank <= _INT64 else None  # unreadable
        row = by_rank.setdefault(str(rank), {"rank": rank, "stored": 0, "dead": 0,
                                             "last_step": None, "last_time": None})
        if names[kind] in ("stored", "dead"):
            row[names[kind]] += int(value)
        elif rank is not None:
            row[names[kind]] = int(value)
    return sorted(by_rank.values(), key=lambda r: (r["rank"] is None, r["rank"] or 0))


class LedgerSync:
    def __init__(self, r: RedisClient, keys: Keys, backend: Backend, interval: float = 2.0) -> None:
        self.r = r
        self.keys = keys
        self.backend = backend
        self.interval = interval
        self.route = True  # until the backend says it has no ledger route
        self._due: dict[int, float] = {}
        self._members: dict[tuple[int, str], dict[str, Any]] = {}
        self._ledger: dict[int, list[dict[str, Any]]] = {}

    def sync(self, run: int, members: dict[str, dict[str, Any]], final: bool = False) -> None:
        """Send what changed (everything when ``final``). A refusal (4xx) is logged and not sent
        again; a transient failure raises (the caller backs off, and does not set a final status
        before it)."""
        now = time.monotonic()
        if not final and now < self._due.get(run, 0.0):
            return
        self._due[run] = now + self.interval
        rows = [member_row(m, info) for m, info in members.items()]
        changed = [row for row in rows
                   if final or self._members.get((run, row["member"])) != row]
        if changed:
            try:
                self.backend.upsert_members(run, changed)
            except Rejected as exc:
                log.error("run %d: the backend refused members rows: %s", run, exc)
            for row in changed:
                self._members[(run, row["member"])] = row
        if self.route:
            ledger = ledger_rows(self.r.hgetall(self.keys.ledger(run)))
            if ledger and (final or ledger != self._ledger.get(run)):
                try:
                    if not self.backend.upsert_ledger(run, ledger):
                        self.route = False
                        log.info("the backend has no ledger route (404/405); not sending "
                                 "ledgers")
                except Rejected as exc:
                    log.error("run %d: the backend refused the ledger: %s", run, exc)
                self._ledger[run] = ledger

    def forget(self, run: int) -> None:
        self._due.pop(run, None)
        self._ledger.pop(run, None)
        for key in [k for k in self._members if k[0] == run]:
            del self._members[key]
