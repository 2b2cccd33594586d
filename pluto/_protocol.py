"""Wire formats shared by the SDK and the worker: metrics entries and control messages.

A metrics entry (DESIGN.md §4) is ``_rank _step _time`` followed by one field per metric, every
value as text so that ``redis-cli XREAD`` is readable and ``float(text)`` gives back the exact
number. Control messages carry small msgpack blobs for structured parts (config, tags, member).
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack

from . import _keys as K

_INT = re.compile(rb"-?[0-9]+\Z")
_FLOAT = re.compile(rb"(?:-?(?:[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|inf)|nan)\Z")
"""What ``repr`` writes for a float (``0.1``, ``1e-05``, ``5e-324``, ``inf``, ``-inf``, ``nan``);
the value grammar of DESIGN.md §4 is exactly ``_INT`` or this, nothing ``float()`` merely
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
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    raise ValueError(f"not a number as the SDK writes one: {text[:40]!r}")


def parse_int(text: bytes, what: str) -> int:
    """A ``_rank``/``_step``/``_time`` value: ``-?[0-9]+`` only."""
    if not _INT.match(text):
        raise ValueError(f"{what} is not an integer: {text[:40]!r}")
    return int(text)


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a metric name, or None when it can."""
    if not isinstance(name, str):
        return f"metric names must be str, got {type(name).__name__}"
    if not name:
        return "metric name is empty"
    if len(name) > MAX_NAME:
        return f"metric name is {len(name)} characters long; the limit is {MAX_NAME}"
    if name.startswith("_"):
        return "metric names must not start with '_' (reserved for _rank, _step, _time)"
    if _CONTROL_CHARS.search(name):
        return "metric name contains control characters"
    return None


def decode_entry(fields: dict[bytes, bytes]) -> tuple[int, int, int, dict[str, int | float]]:
    """``(rank, step, time_ms, data)`` of one stream entry; ``ValueError`` if malformed."""
    try:
        rank = parse_int(fields[K.F_RANK.encode()], K.F_RANK)
        step = parse_int(fields[K.F_STEP.encode()], K.F_STEP)
        time_ms = parse_int(fields[K.F_TIME.encode()], K.F_TIME)
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
    return msgpack.packb(obj, use_bin_type=True)


def unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False, strict_map_key=False)


def control_create(
    project: str, run_id: str, name: str | None, config: dict[str, Any] | None,
    tags: list[str] | None, token: str,
) -> dict[str, bytes | str]:
    return {
        "op": K.OP_CREATE, "project": project, "run_id": run_id, "name": name or "",
        "config": pack(config), "tags": pack(tags or []), "token": token,
    }


def control_attach(run: int, member: str, info: dict[str, Any]) -> dict[str, bytes | str]:
    return {"op": K.OP_ATTACH, "id": str(run), "member": member, "info": pack(info)}


def control_finish(run: int, member: str, state: str) -> dict[str, bytes | str]:
    return {"op": K.OP_FINISH, "id": str(run), "member": member, "state": state}


def control_config(run: int, config: dict[str, Any]) -> dict[str, bytes | str]:
    return {"op": K.OP_CONFIG, "id": str(run), "config": pack(config)}


_REQUIRED = {K.OP_CREATE: ("project", "run_id", "token"), K.OP_ATTACH: ("id", "member"),
             K.OP_FINISH: ("id", "member"), K.OP_CONFIG: ("id",)}
_TEXT = ("project", "run_id", "name", "token", "member", "state")
_BLOBS = {"config": (dict, type(None)), "tags": (list, type(None)), "info": (dict, type(None))}
MAX_ID = 2**63 - 1


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
        if not _INT.match(out["id"]) or not 0 < int(out["id"]) <= MAX_ID:
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
