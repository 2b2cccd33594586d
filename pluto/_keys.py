"""Every Redis key, stream field and group name pluto uses (DESIGN.md §3-4).

Nothing else in the SDK, the worker, the CLI or the tests formats a key: they call these
helpers, so a reader with `redis-cli` and the code always agree. All keys of one run share the
hash tag ``{<id>}`` so that, on a Redis Cluster, a run lives on one slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "workers"
"""Consumer group every worker reads the control and metrics streams with."""

# Fields of a metrics stream entry; they come first and start with "_" so no metric collides.
F_RANK = "_rank"
F_STEP = "_step"
F_TIME = "_time"
RESERVED_FIELDS = (F_RANK, F_STEP, F_TIME)

# Control stream operations.
OP_CREATE = "create"
OP_ATTACH = "attach"
OP_FINISH = "finish"
OP_CONFIG = "config"

# Fields a dead-letter entry starts with; the original entry's fields follow them.
F_DEAD_ID = "id"
F_DEAD_REASON = "reason"

# Field prefixes of a run's ledger hash (``Keys.ledger``): ``<prefix>:<rank>``.
LEDGER_STORED = "stored"
LEDGER_DEAD = "dead"
LEDGER_STEP = "step"
LEDGER_TIME = "time"

CREATE_REFUSED = "error:"
"""``created(token)`` value when the backend refused the create: ``error:<why>``."""

PENDING_PREFIX = "pending:"
"""Run key value while the creator's request is in flight: ``pending:<token>``."""

_UNSAFE = re.compile(r"[{}:%\s]")


def quote(part: str) -> str:
    """Percent-encode ``{ } : %`` and whitespace, so a user's id can't break the key layout."""
    if not _UNSAFE.search(part):
        return part
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), part)


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``PLUTO_PREFIX``), so deployments can share one Redis."""

    prefix: str = "pluto"

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    @property
    def control_dead(self) -> str:
        """Stream: control entries a worker could not apply (malformed, or refused for good):
        fields ``id``, ``reason``, then the original entry's fields."""
        return f"{self.prefix}:control:dead"

    @property
    def runs(self) -> str:
        """Set of numeric run ids whose metrics streams workers must read."""
        return f"{self.prefix}:runs"

    @property
    def workers(self) -> str:
        """Hash: worker name -> last heartbeat (epoch ms)."""
        return f"{self.prefix}:workers"

    def run(self, project: str, run_id: str) -> str:
        """String: ``pending:<token>`` while being created, then the numeric id."""
        return f"{self.prefix}:run:{quote(project)}:{quote(run_id)}"

    def created(self, token: str) -> str:
        """String: the backend's answer to one create request (``0``/``1`` = resumed, or
        ``error:<why>`` when it refused)."""
        return f"{self.prefix}:created:{token}"

    def announce(self, project: str, run_id: str) -> str:
        """Stream: one entry each time a worker answers a create request for this run, so that
        waiting ``init`` calls block on it (XREAD) instead of polling the run key."""
        return f"{self.prefix}:announce:{quote(project)}:{quote(run_id)}"

    def metrics(self, run: int | str) -> str:
        return f"{self.prefix}:{{{run}}}:metrics"

    def logs(self, run: int | str) -> str:
        """Stream: console lines of the run's processes (``pluto/_console.py``): fields
        ``rank``, ``time`` (ms), ``type`` (INFO stdout / ERROR stderr), ``n``, ``msg``."""
        return f"{self.prefix}:{{{run}}}:logs"

    def members(self, run: int | str) -> str:
        """Hash: member (``host:pid``) -> msgpack {rank, local_rank, host, pid, attached_at, state}."""
        return f"{self.prefix}:{{{run}}}:members"

    def heartbeats(self, run: int | str) -> str:
        """Hash: member -> last heartbeat (epoch ms) of that process's producer thread."""
        return f"{self.prefix}:{{{run}}}:heartbeats"

    def dead(self, run: int | str) -> str:
        """Stream: entries that could not be decoded or were rejected, with the reason."""
        return f"{self.prefix}:{{{run}}}:dead"

    def ledger(self, run: int | str) -> str:
        """Hash: ``stored:<rank>`` / ``dead:<rank>`` -> entries the workers acknowledged as
        stored by the backend / dead-lettered (``dead:?`` for an unreadable rank), counted
        once per entry at XACK; ``step:<rank>`` / ``time:<rank>``: the newest step stored."""
        return f"{self.prefix}:{{{run}}}:ledger"

    def run_of_stream(self, stream: str) -> int | None:
        """The run id in a ``P:{<id>}:metrics`` key, or None for any other key."""
        head = f"{self.prefix}:{{"
        if not (stream.startswith(head) and stream.endswith("}:metrics")):
            return None
        inner = stream[len(head) : -len("}:metrics")]
        return int(inner) if inner.isdigit() else None
