"""The contract the SDK, the worker, the backend and the CLI share (DESIGN.md §3-§6).

One module owns every Redis key and stream field, the entry layout of the producer's buffer,
the value text codec (one encoder, one decoder: the grammar of DESIGN §4), metric name rules,
member states and run statuses, media types, TTLs, integer bounds and default URLs. Nothing
else formats a key or restates a rule: the worker and the backend import this module, never
the SDK's private ones, so a reader with ``redis-cli`` and the code always agree. All keys of
one run share the hash tag ``{<id>}`` so that, on a Redis Cluster, a run lives on one slot.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack

# -- bounds, defaults, lifetimes, media types ----------------------------------------------------
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""What msgpack, SQLite and PostgreSQL carry as an integer."""
MAX_ID = INT64_MAX
"""Largest numeric run id."""
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_DB_URL = "sqlite:///.pluto/pluto.db"
RUN_KEY_TTL = 30 * 24 * 3600
"""Seconds a run key (and the run's info hash) lives; refreshed whenever a process attaches."""
CREATED_TTL = 3600
"""Seconds the answer to one create request, and a run's announce stream, live."""
MSGPACK_TYPE = "application/msgpack"
NDJSON_TYPE = "application/x-ndjson"
REFUSED_HEADER = "X-Pluto-Refused"
"""Ours only: ``tenant`` on a 403 that no key rotation changes (the create named a project of
another tenant), so the worker takes it as final instead of retrying it like a key refusal."""
COLUMNS_TYPE = "application/x-pluto-columns"
"""Ours only: a batch as one msgpack map of columns; the worker sends it only to a backend that
lists it in the ``X-Pluto-Ingest`` header of an answer, so other servers never see it."""


class State(str, enum.Enum):
    """Lifecycle of one process's membership in a run (its ``state`` in the members hash)."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    TERMINATED = "terminated"


STATUSES = ("RUNNING", "COMPLETED", "FAILED", "TERMINATED")
"""Run statuses, as the backend API spells them."""

# -- the producer's buffer ------------------------------------------------------------------------
ENTRY_HEAD = 3
"""A logged entry sits in the producer's flat deque as ``step, time, names, value...``: three
items, then one value per name in ``names`` (a shared tuple)."""


def entry_width(names: tuple[str, ...]) -> int:
    """Items one entry with these metric names takes in the flat buffer."""
    return ENTRY_HEAD + len(names)


# -- Redis keys and stream fields -------------------------------------------------------------
GROUP = "workers"
"""Consumer group every worker reads the control and metrics streams with."""

# Fields of a metrics stream entry; they come first and start with "_" so no metric collides.
F_RANK = "_rank"
F_STEP = "_step"
F_TIME = "_time"
RESERVED_FIELDS = (F_RANK, F_STEP, F_TIME)
WIRE_HEAD: tuple[bytes, bytes, bytes] = (F_RANK.encode(), F_STEP.encode(), F_TIME.encode())
"""The reserved fields as the producer writes them, first and in this order, in every entry
(``_rank, _step, _time``: what readers of the raw stream test for the usual layout)."""

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

DROPS_CONSOLE = "console"
"""The reason, in a member's ``drops`` (members hash, ``POST /api/runs/{id}/members``), under
which its console lines lost on the rank side are counted: console lines, not entries, so the
member's ``dropped`` leaves them out and the backend's ledger shows them as ``console_dropped``."""

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


TENANT = re.compile(r"[a-z0-9_-]{1,32}\Z")
"""A tenant (team) name: short, and free of ``:``, ``@`` and glob characters, so that no
tenant's ACL key pattern (``P@<tenant>:*``) matches another tenant's keys."""


def tenant_problem(tenant: object) -> str | None:
    """Why ``tenant`` cannot name a tenant, or None when it can (``""`` = no tenant)."""
    if not isinstance(tenant, str):
        return f"a tenant must be a str, got {type(tenant).__name__}"
    if tenant and not TENANT.match(tenant):
        return (f"tenant {tenant[:40]!r} is invalid: use 1-32 characters of a-z, 0-9, '_' "
                "and '-'")
    return None


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (ACL ``~pattern``, ``SCAN MATCH``)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``PLUTO_PREFIX``), so deployments can share one Redis;
    with a tenant (``PLUTO_TENANT``) under ``<prefix>@<tenant>`` instead, a root that no
    other tenant's pattern matches (``pluto:*`` does not match ``pluto@a:...``, and
    ``pluto@a:*`` not ``pluto@ab:...``): Redis ACLs can then confine a team's ranks and
    workers to its own runs, streams and control messages (``pluto acl``).

    >>> Keys("pluto", "vision").control
    'pluto@vision:control'
    """

    prefix: str = "pluto"
    tenant: str = ""

    def __post_init__(self) -> None:
        problem = tenant_problem(self.tenant)
        if problem:
            raise ValueError(problem)

    @property
    def root(self) -> str:
        """What every key of this deployment (and tenant) starts with, before a ``:``."""
        return f"{self.prefix}@{self.tenant}" if self.tenant else self.prefix

    @property
    def pattern(self) -> str:
        """Glob pattern of every key under :attr:`root` (for ACLs)."""
        return glob_escape(self.root) + ":*"

    @property
    def control(self) -> str:
        return f"{self.root}:control"

    @property
    def control_dead(self) -> str:
        """Stream: control entries a worker could not apply (malformed, or refused for good):
        fields ``id``, ``reason``, then the original entry's fields."""
        return f"{self.root}:control:dead"

    @property
    def runs(self) -> str:
        """Set of numeric run ids whose metrics streams workers must read."""
        return f"{self.root}:runs"

    @property
    def workers(self) -> str:
        """Hash: worker name -> last heartbeat (epoch ms)."""
        return f"{self.root}:workers"

    def run(self, project: str, run_id: str) -> str:
        """String: ``pending:<token>`` while being created, then the numeric id."""
        return f"{self.root}:run:{quote(project)}:{quote(run_id)}"

    def created(self, token: str) -> str:
        """String: the backend's answer to one create request (``0``/``1`` = resumed, or
        ``error:<why>`` when it refused)."""
        return f"{self.root}:created:{token}"

    def announce(self, project: str, run_id: str) -> str:
        """Stream: one entry each time a worker answers a create request for this run, so that
        waiting ``init`` calls block on it (XREAD) instead of polling the run key. Fields:
        ``id`` (the run's id, ``""`` after a refused create) and, for a run just created,
        ``name`` (what ``info`` holds: the waiters need not ask for it)."""
        return f"{self.root}:announce:{quote(project)}:{quote(run_id)}"

    def info(self, run: int | str) -> str:
        """Hash: the run's ``name``, ``project`` and ``run_id``, written by the worker when it
        created the run, so a process that attaches shows the run's real name."""
        return f"{self.root}:{{{run}}}:info"

    def metrics(self, run: int | str) -> str:
        return f"{self.root}:{{{run}}}:metrics"

    def logs(self, run: int | str) -> str:
        """Stream: console lines of the run's processes (``pluto/_console.py``): fields
        ``rank``, ``time`` (ms), ``type`` (INFO stdout / ERROR stderr), ``n``, ``msg``."""
        return f"{self.root}:{{{run}}}:logs"

    def members(self, run: int | str) -> str:
        """Hash: member (``host:pid``) -> msgpack {rank, local_rank, host, pid, attached_at, state,
        and its ledger: logged, sent, dropped, drops (reason -> count; see ``DROPS_CONSOLE``)}."""
        return f"{self.root}:{{{run}}}:members"

    def heartbeats(self, run: int | str) -> str:
        """Hash: member -> last heartbeat (epoch ms) of that process's producer thread."""
        return f"{self.root}:{{{run}}}:heartbeats"

    def dead(self, run: int | str) -> str:
        """Stream: entries that could not be decoded or were rejected, with the reason."""
        return f"{self.root}:{{{run}}}:dead"

    def ledger(self, run: int | str) -> str:
        """Hash: ``stored:<rank>`` / ``dead:<rank>`` -> entries the workers acknowledged as
        stored by the backend / dead-lettered (``dead:?`` for an unreadable rank), counted
        once per entry at XACK; ``step:<rank>`` / ``time:<rank>``: the newest step stored."""
        return f"{self.root}:{{{run}}}:ledger"

    def run_of_stream(self, stream: str) -> int | None:
        """The run id in a ``P:{<id>}:metrics`` key, or None for any other key."""
        head = f"{self.root}:{{"
        if not (stream.startswith(head) and stream.endswith("}:metrics")):
            return None
        inner = stream[len(head) : -len("}:metrics")]
        return int(inner) if inner.isdigit() else None


# -- values, names, entries and control messages -------------------------------------------------
INT_TEXT = re.compile(rb"-?[0-9]+\Z")
FLOAT_TEXT = re.compile(rb"(?:-?(?:[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|inf)|nan)\Z")
"""What ``repr`` writes for a float (``0.1``, ``1e-05``, ``5e-324``, ``inf``, ``-inf``, ``nan``);
the value grammar of DESIGN.md §4 is exactly ``INT_TEXT`` or this, nothing ``float()`` merely
tolerates (``1_000``, `` 7 ``, ``+5``, ``Infinity``, ``NaN``, ``0x10``)."""
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 256


def format_value(value: int | float) -> bytes:
    """Text for one metric value: ints exact, floats by ``repr`` (``nan``, ``inf``, ``-inf``)."""
    if type(value) is float:
        return repr(value).encode()
    return str(int(value)).encode()


def parse_value(text: bytes) -> int | float:
    """Inverse of :func:`format_value`; raises ``ValueError`` on anything else."""
    if INT_TEXT.match(text):
        return int(text)
    if FLOAT_TEXT.match(text):
        return float(text)
    raise ValueError(f"not a number as the SDK writes one: {text[:40]!r}")


def parse_int(text: bytes, what: str) -> int:
    """A ``_rank``/``_step``/``_time`` value: ``-?[0-9]+`` only."""
    if not INT_TEXT.match(text):
        raise ValueError(f"{what} is not an integer: {text[:40]!r}")
    return int(text)


def name_problem(name: object, leading_underscore: bool = False) -> str | None:
    """Why ``name`` cannot be a metric name, or None when it can.

    A stream entry's own fields start with ``_`` (``_rank`` ...), so metric names from the SDK
    must not; the backend also takes lines from the official SDK, whose names may, and passes
    ``leading_underscore=True`` (the one difference between the two rule sets)."""
    if not isinstance(name, str):
        return f"metric names must be str, got {type(name).__name__}"
    if not name:
        return "metric name is empty"
    if len(name) > MAX_NAME:
        return f"metric name is {len(name)} characters long; the limit is {MAX_NAME}"
    if name.startswith("_") and not leading_underscore:
        return "metric names must not start with '_' (reserved for _rank, _step, _time)"
    if _CONTROL_CHARS.search(name):
        return "metric name contains control characters"
    return None


def decode_entry(fields: dict[bytes, bytes]) -> tuple[int, int, int, dict[str, int | float]]:
    """``(rank, step, time_ms, data)`` of one stream entry; ``ValueError`` if malformed."""
    try:
        rank = parse_int(fields[F_RANK.encode()], F_RANK)
        step = parse_int(fields[F_STEP.encode()], F_STEP)
        time_ms = parse_int(fields[F_TIME.encode()], F_TIME)
    except KeyError as exc:
        raise ValueError(f"missing field {exc.args[0]!r}") from None
    data: dict[str, int | float] = {}
    for raw_name, raw_value in fields.items():
        if raw_name.startswith(b"_"):
            continue
        name = raw_name.decode("utf-8")
        problem = name_problem(name)
        if problem:
            raise ValueError(f"{problem}: {name[:80]!r}")
        try:
            data[name] = parse_value(raw_value)
        except ValueError:
            raise ValueError(f"value of {name[:80]!r} is not a number: {raw_value[:40]!r}") from None
    return rank, step, time_ms, data


def json_value(value: int | float) -> int | float | str:
    """JSON has no NaN/inf: the backend API spells them ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    if type(value) is float and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def control_create(
    project: str, run_id: str, name: str | None, config: dict[str, Any] | None,
    tags: list[str] | None, token: str,
) -> dict[str, bytes | str]:
    return {
        "op": OP_CREATE, "project": project, "run_id": run_id, "name": name or "",
        "config": pack(config), "tags": pack(tags or []), "token": token,
    }


def control_attach(run: int, member: str, info: dict[str, Any]) -> dict[str, bytes | str]:
    return {"op": OP_ATTACH, "id": str(run), "member": member, "info": pack(info)}


def control_finish(run: int, member: str, state: str) -> dict[str, bytes | str]:
    return {"op": OP_FINISH, "id": str(run), "member": member, "state": state}


def control_config(run: int, config: dict[str, Any]) -> dict[str, bytes | str]:
    return {"op": OP_CONFIG, "id": str(run), "config": pack(config)}


_REQUIRED = {OP_CREATE: ("project", "run_id", "token"), OP_ATTACH: ("id", "member"),
             OP_FINISH: ("id", "member"), OP_CONFIG: ("id",)}
_TEXT = ("project", "run_id", "name", "token", "member", "state")
_BLOBS = {"config": (dict, type(None)), "tags": (list, type(None)), "info": (dict, type(None))}


def decode_control(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A control message as a dict of str/objects; ``ValueError`` naming the problem for
    anything but what :func:`control_create` and its siblings write (a worker dead-letters
    such an entry: no value in the control stream may crash it)."""
    try:
        out: dict[str, Any] = {k.decode(): v for k, v in fields.items()}
        op = out["op"] = out["op"].decode()
        for key in _TEXT:
            if key in out:
                out[key] = out[key].decode()
    except KeyError:
        raise ValueError("malformed control message: no 'op' field") from None
    except (AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed control message: {exc}") from None
    if op not in _REQUIRED:
        raise ValueError(f"unknown control op {op[:40]!r}")
    missing = [key for key in _REQUIRED[op] if not out.get(key)]
    if missing:
        raise ValueError(f"malformed control message: {op} without {', '.join(missing)}")
    if "id" in out:
        if not INT_TEXT.match(out["id"]) or not 0 < int(out["id"]) <= MAX_ID:
            raise ValueError(f"malformed control message: id {out['id'][:40]!r} is not a run id")
        out["id"] = int(out["id"])
    for key, kinds in _BLOBS.items():
        if key in out:
            try:
                out[key] = unpack(out[key])
            except Exception as exc:  # noqa: BLE001 - msgpack raises many types on junk
                raise ValueError(f"malformed control message: {key} is not msgpack "
                                 f"({type(exc).__name__})") from None
            if not isinstance(out[key], kinds):
                raise ValueError(f"malformed control message: {key} is a "
                                 f"{type(out[key]).__name__}, not a {kinds[0].__name__}")
    return out
