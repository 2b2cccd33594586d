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

Memory per request stays proportional to the body with a small factor (README "Limits"):
entries are decoded one at a time (an NDJSON line, a JSON array element, a msgpack array
element through a streaming ``Unpacker``), a bad entry is forgotten as soon as it is judged
(only its index is kept, 8 bytes, and the reasons of the first :data:`MAX_REASONS`), and a
msgpack entry may hold no arrays (none is ever valid in one), so a body of tiny containers
cannot turn each byte into a 64-byte Python object.
"""

from __future__ import annotations

import json
import math
import re
import time
from array import array
from collections.abc import Iterator
from typing import Any

import msgpack

from pluto.protocol import INT64_MAX, INT64_MIN, name_problem

from ._json import encodable
from ._store import Entry, Stored

_INT64 = (INT64_MIN, INT64_MAX)
_SPECIAL: dict[str, Stored] = {"NaN": None, "nan": None, "Infinity": math.inf, "inf": math.inf,
                               "-Infinity": -math.inf, "-inf": -math.inf}
_SEQ = re.compile(r"(\d{1,19})(?:-(\d{1,19}))?\Z")

MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack",
                           "application/vnd.msgpack"})
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


MAX_REASONS = 20
"""Bad lines whose reason is spelled out in a 422; the rest are listed by index only."""


class BadLines:
    """The indexes of the bad lines of one body, and the reasons of the first few.

    The 422 names the first problem in ``error`` and lists every bad index (the worker
    dead-letters exactly those entries): the first :data:`MAX_REASONS` as
    ``{"index": i, "error": why}``, the rest as ``{"index": i}`` (at most ~20 bytes each),
    plus ``bad_count``.
    """

    def __init__(self) -> None:
        self.indexes = array("q")
        self.reasons: list[str] = []

    def add(self, index: int, reason: str) -> None:
        self.indexes.append(index)
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def __len__(self) -> int:
        return len(self.indexes)

    def as_list(self) -> list[dict[str, Any]]:
        """Every bad line as a dict (for small answers and tests)."""
        return [{"index": i, "error": why} for i, why in zip(self.indexes, self.reasons)] + [
            {"index": i} for i in self.indexes[len(self.reasons):]]

    def json_chunks(self, stored: int) -> Iterator[bytes]:
        """The 422 body ``{"error", "stored", "bad_count", "bad_lines"}`` as JSON, in pieces."""
        head = [json.dumps({"index": i, "error": why}) for i, why in
                zip(self.indexes, self.reasons)]
        summary = json.dumps(f"{len(self)} bad line(s), not stored; the first, line "
                             f"{self.indexes[0]}: {self.reasons[0]}")
        yield (f'{{"error":{summary},"stored":{stored},"bad_count":{len(self)},"bad_lines":['
               + ",".join(head)).encode()
        for start in range(len(self.reasons), len(self.indexes), 8192):
            tail = self.indexes[start:start + 8192]
            yield ("," if start else "").encode() + ",".join(
                map('{"index":%d}'.__mod__, tail)).encode()
        yield b"]}"


def shown(value: Any) -> str:
    """A short, encodable rendering of a client's value for an error message; containers by
    their type only (their repr could be huge, or too deep to produce)."""
    if isinstance(value, (str, bytes)):
        return ascii(value[:40]) + ("..." if len(value) > 40 else "")
    if type(value) in (int, float, bool) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return type(value).__name__


_valid_names: set[str] = set()
"""Names already checked; a cache so the regex runs once per name, not once per point."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str):  # first: a columns body's "name" may even be unhashable
        raise _BadLine(f"metric names must be strings, got {type(name).__name__}")
    if name in _valid_names:
        return name
    problem = name_problem(name, leading_underscore=True)
    if problem:
        raise _BadLine(f"{problem}: {shown(name)}")
    if not encodable(name):
        raise _BadLine(f"metric name {shown(name)} is not valid UTF-8 (a lone surrogate?)")
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
    raise _BadLine(f"value of {shown(name)} is not a number: {shown(value)}")


def _int(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
        raise _BadLine(f"{key!r} must be a 64-bit integer, got {shown(value)}")
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
        raw = raw[:64].decode("ascii", "replace")
    match = _SEQ.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _BadLine("'seq' must be a stream entry id like '1764000000123-0', got "
                       f"{shown(raw)}")
    seq_ms, seq_n = int(match[1]), int(match[2] or 0)
    if seq_ms > _INT64[1] or seq_n > _INT64[1]:
        raise _BadLine(f"'seq' out of range: {shown(raw)}")
    return seq_ms, seq_n


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
            if value != value:
                values[name] = None
        elif kind is not int or not _INT64[0] <= value <= _INT64[1]:
            values[name] = _value(name, value)  # replacing a value while iterating is fine
    return step, time_ms, seq_ms, seq_n, values


class _Containers:
    """msgpack hooks that stop decoding at the first container beyond the expected ones (a
    columns body is one map of arrays of scalars; an entry two maps), so a body of tiny
    containers cannot amplify memory."""

    def __init__(self, maps: int, lists: int) -> None:
        self.maps, self.lists = maps, lists

    def map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self.maps -= 1
        if self.maps < 0:
            raise BadBody("more maps than a body of this size can hold in valid entries")
        return value

    def list(self, value: list[Any]) -> list[Any]:
        self.lists -= 1
        if self.lists < 0:
            raise BadBody("a columns body is one map of arrays of scalars; it holds more arrays")
        return value


_ARRAY_HEADER = {0xdc: 2, 0xdd: 4}  # array 16, array 32: bytes of length after the type


def _msgpack_objects(body: bytes) -> Iterator[Any]:
    """The entries of a msgpack array, one at a time (an Unpacker per body, no list of all)."""
    first = body[0] if body else -1
    if 0x90 <= first <= 0x9f:
        count, start = first & 0x0f, 1
    elif first in _ARRAY_HEADER:
        start = 1 + _ARRAY_HEADER[first]
        count = int.from_bytes(body[1:start], "big")
    else:
        raise BadBody("a msgpack body must be an array of entries")
    # max_array_len=0: an entry holds maps and scalars only, so an array inside one is the
    # client's mistake; refusing it keeps a body of tiny containers from amplifying memory.
    # And at most one map per 8 bytes of body: an entry of the worker's is two maps in some
    # 60 bytes; a body of empty maps (one byte each, 64 in memory) is refused early.
    maps = _Containers(maps=len(body) // 8 + 64, lists=0)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_array_len=0,
                                max_buffer_size=max(len(body), 1), object_hook=maps.map)
    unpacker.feed(memoryview(body)[start:])
    for index in range(count):
        try:
            yield unpacker.unpack()
        except msgpack.OutOfData:
            raise BadBody(f"msgpack body ends inside entry {index} of {count}") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # TypeError: an unhashable map key (a map inside a key); ValueError: not UTF-8,
            # an array inside an entry, nesting beyond msgpack's own stack
            raise BadBody(f"entry {index} is not valid msgpack here: "
                          f"{exc or type(exc).__name__}") from None
    if unpacker.tell() != len(body) - start:
        raise BadBody("bytes after the msgpack array of entries")


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_objects(text: str) -> Iterator[Any]:
    """The elements of a JSON array, decoded one at a time with ``raw_decode``."""
    decoder = json.JSONDecoder()

    def skip(at: int) -> int:  # past JSON whitespace (the pattern always matches)
        found = _JSON_SPACE.match(text, at)
        return found.end() if found else at

    pos = skip(text.index("[") + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except RecursionError:
                raise BadBody("body nests deeper than the JSON parser allows") from None
            except ValueError as exc:
                raise BadBody(f"body is not a valid JSON array: {exc}") from None
            yield obj
            pos = skip(pos)
            if text.startswith(",", pos):
                pos = skip(pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise BadBody(f"body is not a valid JSON array: ',' or ']' expected at {pos}")
    if text[pos:].strip(" \t\n\r"):
        raise BadBody("data after the JSON array of entries")


def _ndjson_objects(body: bytes) -> Iterator[Any]:
    """Each non-blank line parsed (an unparsable line becomes a :class:`_BadLine`)."""
    start, size = 0, len(body)
    line_no = 0
    while start < size:
        end = body.find(b"\n", start)
        end = size if end < 0 else end
        raw = body[start:end]
        start = end + 1
        line_no += 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadBody(f"line {line_no} of the body is not UTF-8: {exc}") from None
        try:
            yield json.loads(line)
        except RecursionError:
            yield _BadLine("invalid JSON: nested too deeply")
        except ValueError as exc:
            yield _BadLine(f"invalid JSON: {exc}")


_ARRAY_START = re.compile(rb"[ \t\n\r]*\[")


def _objects(body: bytes, media_type: str) -> Iterator[Any]:
    """The body's entries as Python objects, one at a time."""
    if media_type in MSGPACK_TYPES:
        return _msgpack_objects(body)
    if _ARRAY_START.match(body):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadBody(f"body is not UTF-8: {exc}") from None
        return _json_array_objects(text)
    return _ndjson_objects(body)


def decode(body: bytes, media_type: str) -> tuple[list[Entry], BadLines]:
    """``(entries, bad lines)``; :class:`BadBody` if the body as a whole cannot be read."""
    now = int(time.time() * 1000)
    entries: list[Entry] = []
    bad = BadLines()
    for index, obj in enumerate(_objects(body, media_type)):
        try:
            if isinstance(obj, _BadLine):
                raise obj
            entries.append(entry(obj, now))
        except _BadLine as exc:
            bad.add(index, str(exc))
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
    budget = _Containers(maps=1, lists=16)  # 8 columns today; room for a few more
    try:
        obj = msgpack.unpackb(body, raw=False, object_hook=budget.map, list_hook=budget.list)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
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
