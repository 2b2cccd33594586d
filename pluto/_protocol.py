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

_INT = re.compile(rb"-?\d+\Z")
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
    value = float(text)  # accepts nan/inf/-inf and every repr() of a float
    return value


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
        rank = int(fields[K.F_RANK.encode()])
        step = int(fields[K.F_STEP.encode()])
        time_ms = int(fields[K.F_TIME.encode()])
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


def decode_control(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A control message as a dict of str/objects; ``ValueError`` if malformed."""
    try:
        out: dict[str, Any] = {k.decode(): v for k, v in fields.items()}
        op = out["op"] = out["op"].decode()
        for key in ("project", "run_id", "name", "token", "member", "state"):
            if key in out:
                out[key] = out[key].decode()
        if "id" in out:
            out["id"] = int(out["id"])
        for key in ("config", "tags", "info"):
            if key in out:
                out[key] = unpack(out[key])
    except (KeyError, UnicodeDecodeError, ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed control message: {exc!r}") from None
    if op not in (K.OP_CREATE, K.OP_ATTACH, K.OP_FINISH, K.OP_CONFIG):
        raise ValueError(f"unknown control op {op!r}")
    return out
