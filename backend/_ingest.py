"""Decoding ``POST /ingest/metrics`` bodies into validated entries, line by line.

A body is NDJSON (one ``{"time", "step", "data", "seq"?}`` object per line; a JSON array of
them is accepted too) or, with ``Content-Type: application/msgpack``, a msgpack array of the
same dicts. A bad line never spoils its neighbours: the good ones are stored and the bad ones
reported by index, so the worker can dead-letter exactly those stream entries and ack the rest.
An index counts entries: the position in the msgpack/JSON array, or among the non-blank
lines of an NDJSON body.

Values may be numbers or the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no
NaN); Python's bare ``NaN``/``Infinity`` tokens, as the official SDK's ``json.dumps`` writes
them, are accepted as well. Values are converted to what ``_store`` keeps (None for NaN).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import msgpack

from ._store import Entry, Stored

MAX_NAME = 256
_INT64 = (-(2**63), 2**63 - 1)
_SPECIAL: dict[str, Stored] = {"NaN": None, "nan": None, "Infinity": math.inf, "inf": math.inf,
                               "-Infinity": -math.inf, "-inf": -math.inf}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEQ = re.compile(r"(\d{1,19})(?:-(\d{1,19}))?\Z")

MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack",
                           "application/vnd.msgpack"})
COLUMNS_TYPE = "application/x-pluto-columns"
"""Ours only: a whole batch as one msgpack map of columns (see :func:`columns`). Our worker
sends it once the backend offered it (``X-Pluto-Ingest``): it has decoded and checked every
entry already, so the batch is checked here as a whole, in C-speed passes over the columns,
and the store zips the rows without building a Python object per point."""
TEXT_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                        "application/json", "application/jsonlines", "text/plain",
                        "text/x-ndjson", ""})


class BadBody(ValueError):
    """The body as a whole cannot be read (not one of its lines): the request gets 400."""


class _BadLine(ValueError):
    pass


_valid_names: set[str] = set()
"""Names already checked; a cache so the regex runs once per name, not once per point."""


def _check_name(name: Any) -> str:
    if name in _valid_names:
        return name  # type: ignore[no-any-return]
    if not isinstance(name, str):
        raise _BadLine(f"metric names must be strings, got {type(name).__name__}")
    if not name:
        raise _BadLine("empty metric name")
    if len(name) > MAX_NAME:
        raise _BadLine(f"metric name of {len(name)} characters (limit {MAX_NAME}): "
                       f"{name[:40]!r}...")
    if _CONTROL.search(name):
        raise _BadLine(f"metric name with control characters: {name[:80]!r}")
    if len(_valid_names) > 100_000:
        _valid_names.clear()
    _valid_names.add(name)
    return name


def _value(name: str, value: Any) -> Stored:
    kind = type(value)
    if kind is float:
        return None if math.isnan(value) else value  # SQLite would turn NaN into NULL anyway
    if kind is int:
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if kind is bool:
        return int(value)
    if kind is str and value in _SPECIAL:
        return _SPECIAL[value]
    raise _BadLine(f"value of {name[:80]!r} is not a number: {str(value)[:40]!r}")


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
        raise _BadLine(f"{key!r} must be a 64-bit integer, got {str(value)[:40]!r}")
    return value


def _seq(raw: Any) -> tuple[int | None, int | None]:
    if raw is None:
        return None, None
    if type(raw) is str:  # the common "1764000000123-0", without the regex
        ms, dash, n = raw.partition("-")
        if dash and ms.isascii() and ms.isdigit() and n.isascii() and n.isdigit() \
                and len(ms) < 19 and len(n) < 19:
            return int(ms), int(n)
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    match = _SEQ.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _BadLine(f"'seq' must be a stream entry id like '1764000000123-0', got {raw!r}")
    ms, n = int(match[1]), int(match[2] or 0)
    if ms > _INT64[1] or n > _INT64[1]:
        raise _BadLine(f"'seq' out of range: {raw!r}")
    return ms, n


def entry(obj: Any, now: int) -> Entry:
    """One validated line; raises ``ValueError`` naming the problem."""
    if not isinstance(obj, dict):
        raise _BadLine(f"a line must be a JSON object, got {type(obj).__name__}")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise _BadLine("'data' must be an object of metric name -> value")
    step = _int(obj, "step")
    time_ms = _int(obj, "time", now)
    seq_ms, seq_n = _seq(obj.get("seq"))
    # The hot path: one C-level subset test for the names, and the common finite float or
    # 64-bit int kept as is, so a typical line costs one type check per value.
    if not _valid_names.issuperset(data):
        for name in data:
            _check_name(name)
    values: dict[str, Stored] = data
    for name, value in data.items():
        kind = type(value)
        if kind is float:
            if value != value:  # noqa: PLR0124 -- NaN test without a call, on the hot path
                values[name] = None
        elif kind is not int or not _INT64[0] <= value <= _INT64[1]:
            values[name] = _value(name, value)  # replacing a value while iterating is fine
    return step, time_ms, seq_ms, seq_n, values


def _objects(body: bytes, media_type: str) -> list[Any]:
    """The body's entries as Python objects; an unparsable NDJSON line becomes an exception."""
    if media_type in MSGPACK_TYPES:
        try:
            items = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise BadBody(f"body is not valid msgpack: {exc}") from None
        if not isinstance(items, list):
            raise BadBody("a msgpack body must be an array of entries")
        return items
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"body is not UTF-8: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise BadBody(f"body is not a valid JSON array: {exc}") from None
        return items if isinstance(items, list) else [items]
    out: list[Any] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as exc:
            out.append(_BadLine(f"invalid JSON: {exc}"))
    return out


def decode(body: bytes, media_type: str) -> tuple[list[Entry], list[dict[str, Any]]]:
    """``(entries, bad_lines)`` where each bad line is ``{"index": i, "error": why}``."""
    now = int(time.time() * 1000)
    entries: list[Entry] = []
    bad: list[dict[str, Any]] = []
    for index, obj in enumerate(_objects(body, media_type)):
        try:
            if isinstance(obj, _BadLine):
                raise obj
            entries.append(entry(obj, now))
        except _BadLine as exc:
            bad.append({"index": index, "error": str(exc)})
    return entries, bad


Columns = tuple[list[str], list[int], list[Any], list[int], list[int], list[int], list[int],
                list[int]]
"""``(names, name, value, count, step, time, seq_ms, seq_n)``: see :func:`columns`."""

_COLUMN_BOUNDS = {"name": None, "count": (0, _INT64[1]), "step": _INT64, "time": _INT64,
                  "seq_ms": (0, _INT64[1]), "seq_n": (0, _INT64[1])}


def columns(body: bytes) -> Columns:
    """A columnar batch, checked as a whole; anything wrong in it makes it a :class:`BadBody`.

    ``{"names": [metric name, ...], "name": [index into names, per point], "value": [number,
    per point], "count": [points per entry], "step"|"time"|"seq_ms"|"seq_n": [int, per entry]}``
    (a value's entry is the one whose ``count`` covers its position).
    """
    try:
        obj = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadBody(f"body is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise BadBody("a columns body must be a map")
    try:
        names, values = obj["names"], obj["value"]
        cols = {key: obj[key] for key in _COLUMN_BOUNDS}
    except KeyError as exc:
        raise BadBody(f"columns body without the column {exc}") from None
    if not all(type(c) is list for c in (names, values, *cols.values())):
        raise BadBody("every column must be an array")
    try:
        for name in names:
            _check_name(name)
    except _BadLine as exc:
        raise BadBody(str(exc)) from None
    for key, col in cols.items():
        low, high = _COLUMN_BOUNDS[key] or (0, len(names) - 1)
        if col and (set(map(type, col)) != {int} or min(col) < low or max(col) > high):
            raise BadBody(f"column {key!r} must hold integers from {low} to {high}")
    entries = len(cols["count"])
    if any(len(cols[k]) != entries for k in ("step", "time", "seq_ms", "seq_n")) \
            or len(cols["name"]) != len(values) or sum(cols["count"]) != len(values):
        raise BadBody("columns of inconsistent lengths")
    if values and not set(map(type, values)) <= {int, float}:
        raise BadBody("every value must be a number")  # ints beyond 64 bits: the store refuses
    return (names, cols["name"], values, cols["count"], cols["step"], cols["time"],
            cols["seq_ms"], cols["seq_n"])
