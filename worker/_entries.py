"""Turning metrics stream entries into the backend's ingest records, fast.

:func:`pluto.protocol.decode_entry` is the definition of a valid entry. Calling it for every
entry costs a validation of every metric name on every entry, which dominates a drain; so the
hot path here remembers names it has seen validated and parses values with the same grammar
(``-?[0-9]+`` -> int; what ``repr`` writes for a float -> float; nothing else). Whenever the
fast path meets anything it has not seen — a new name, a missing field, a value ``float``
refuses — it hands the whole entry to ``decode_entry``, so the accepted entries, their values
and the error messages are exactly ``decode_entry``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

import msgpack

from pluto import protocol as K
from pluto.protocol import FLOAT_TEXT, INT64_MAX, INT64_MIN, INT_TEXT, decode_entry, name_problem

_HEAD = K.WIRE_HEAD
_RANK, _STEP, _TIME = _HEAD
_MINUS = b"-"
_SKIP = ""
"""Cached for reserved (``_``-prefixed) field names: present, but not a metric."""
_MAX_CACHE = 100_000

_names: dict[bytes, str] = {}
_is_int = INT_TEXT.match
_is_float = FLOAT_TEXT.match


def fields_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it))


def flatten(fields: dict[bytes, bytes]) -> list[bytes]:
    return [x for kv in fields.items() for x in kv]


def _learn(fields: Iterable[bytes]) -> None:
    """Remember the names of an entry ``decode_entry`` accepted, or of a group's field list
    (a name that is not valid text, or not a valid name, stays unknown: its entries then go
    to ``decode_entry``, which refuses them with the reason)."""
    if len(_names) > _MAX_CACHE:
        _names.clear()
    for raw in fields:
        if raw.startswith(b"_"):
            _names[raw] = _SKIP
            continue
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name_problem(name) is None:
            _names[raw] = name


def record(entry_id: bytes, flat: list[bytes]) -> dict[str, Any]:
    """``{"time", "step", "data", "seq"}`` for one entry given as its flat field/value list
    (as XREADGROUP returns it); ``ValueError`` if it is malformed."""
    names = _names
    rank = step = time_ms = None
    data: dict[str, int | float] = {}
    it = iter(flat)
    try:
        for raw, value in zip(it, it):
            name = names[raw]  # KeyError: a name not validated yet
            if name:
                if value.isdigit() or (value.startswith(_MINUS) and value[1:].isdigit()):
                    data[name] = int(value)
                elif _is_float(value):
                    data[name] = float(value)
                else:
                    raise ValueError(name)
            elif not _is_int(value):
                if raw in _HEAD:
                    raise ValueError(raw)
            elif raw == _STEP:
                step = int(value)
            elif raw == _TIME:
                time_ms = int(value)
            elif raw == _RANK:
                rank = int(value)
        if rank is None or step is None or time_ms is None:
            raise KeyError(K.F_RANK)
    except (KeyError, ValueError):
        fields = fields_dict(flat)
        _rank, step, time_ms, data = decode_entry(fields)  # the authority; raises ValueError
        _learn(fields)
    return {"time": time_ms, "step": step, "data": data, "seq": entry_id.decode()}


_INT64 = (INT64_MIN, INT64_MAX)
_INTS = re.compile(rb"-?[0-9]+(?:\n-?[0-9]+)*")
_NUM = rb"(?:-?(?:[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|inf)|nan)"
_NUMS = re.compile(_NUM + rb"(?:\n" + _NUM + rb")*")
"""A column of values in the grammar of ``pluto.protocol.parse_value``, one per line."""
_AN_INT = re.compile(rb"\n-?[0-9]+\n")
_MANY = 16
"""Entries below which :meth:`Columns.add_many` is not worth its set-up."""


def _fits(*columns: list[int] | list[float]) -> bool:
    return all(_INT64[0] <= min(c) and max(c) <= _INT64[1] for c in columns)


class Columns:
    """One run's batch decoded straight into the backend's columnar body (``COLUMNS``), with
    no dict per entry: the same values as :func:`record`, which it falls back to for anything
    but the producer's layout (``_rank _step _time`` first, names seen before)."""

    def __init__(self) -> None:
        self.index: dict[bytes, int] = {}  # field -> position in names
        self.names: list[str] = []
        self.name: list[int] = []
        self.value: list[int | float] = []
        self.count: list[int] = []
        self.step: list[int] = []
        self.time: list[int] = []
        self.seq_ms: list[int] = []
        self.seq_n: list[int] = []
        self.big = False
        """An int beyond 64 bits was met: the batch must go as records (JSON takes those)."""

    def add(self, entry_id: bytes, flat: list[bytes]) -> None:
        """Append one entry; ``ValueError`` if it is malformed (nothing is appended then)."""
        names, index = _names, self.index
        ms, _, n = entry_id.partition(b"-")
        seq_ms, seq_n = int(ms), int(n or 0)
        slots: list[int] = []
        values: list[int | float] = []
        try:
            if flat[0] != _RANK or flat[2] != _STEP or flat[4] != _TIME:
                raise KeyError(K.F_RANK)  # not the producer's layout: record() decides
            if not (_is_int(flat[1]) and _is_int(flat[3]) and _is_int(flat[5])):
                raise ValueError(K.F_RANK)
            step, time_ms = int(flat[3]), int(flat[5])
            for raw, value in zip(flat[6::2], flat[7::2]):
                if not names[raw]:  # KeyError: a name not validated yet
                    raise KeyError(raw)  # a reserved field again: record() decides
                slot = index.get(raw)
                slots.append(self._slot(raw, names[raw]) if slot is None else slot)
                if value.isdigit() or (value.startswith(_MINUS) and value[1:].isdigit()):
                    v = int(value)
                    if not _INT64[0] <= v <= _INT64[1]:
                        self.big = True
                    values.append(v)
                elif _is_float(value):
                    values.append(float(value))
                else:
                    raise ValueError(raw)
        except (KeyError, ValueError, IndexError):
            rec = record(entry_id, flat)  # the authority; raises ValueError
            step, time_ms, data = rec["step"], rec["time"], rec["data"]
            slots = [self._slot(name.encode(), name) for name in data]
            values = list(data.values())
            self.big = self.big or any(
                type(v) is int and not _INT64[0] <= v <= _INT64[1] for v in values)
        if not (_INT64[0] <= step <= _INT64[1] and _INT64[0] <= time_ms <= _INT64[1]
                and seq_ms <= _INT64[1] and seq_n <= _INT64[1]):
            self.big = True  # e.g. a _step of 2**70 written by hand: msgpack cannot carry it
        self.name += slots
        self.value += values
        self.count.append(len(values))
        self.step.append(step)
        self.time.append(time_ms)
        self.seq_ms.append(seq_ms)
        self.seq_n.append(seq_n)

    def add_many(self, entries: list[tuple[bytes, list[bytes] | None]]
                 ) -> tuple[list[Any], list[Any]]:
        """Append, column by column in C (about half :meth:`add`'s cost per entry), every
        group of entries that share one field list (a rank's names, in the producer's layout);
        returns ``(taken, left)``: the caller adds what is left one by one with :meth:`add`.
        Within a group stream order is kept; across groups it does not matter: for one
        (name, step) the backend keeps the point with the newest stream id (``seq``), whatever
        its place in the body."""
        groups: dict[tuple[bytes, ...] | None, list[Any]] = {}
        for entry in entries:
            flat = entry[1]
            groups.setdefault(None if flat is None else tuple(flat[0::2]), []).append(entry)
        taken: list[Any] = []
        left: list[Any] = []
        for fields, group in groups.items():
            if fields is not None and len(group) >= _MANY and self._add_group(fields, group):
                taken += group
            else:
                left += group
        return taken, left

    def _add_group(self, fields: tuple[bytes, ...], entries: list[tuple[bytes, list[bytes]]]
                   ) -> bool:
        """All of ``entries`` (one field list), or nothing and False if any is not plain."""
        names = fields[3:]
        if fields[:3] == _HEAD and not all(map(_names.__contains__, names)):
            _learn(names)  # first sight: checked once here, not by decode_entry per entry
        if (fields[:3] != _HEAD or not names or len(set(names)) != len(names)
                or not all(map(_names.get, names))):  # each a metric name validated before
            return False
        ids, flats = [e[0] for e in entries], [e[1] for e in entries]
        parts = b"-".join(ids).split(b"-")
        head = [b"\n".join(map(itemgetter(i), flats)) for i in (1, 3, 5)]
        if not all(map(_INTS.fullmatch, head)):  # ranks are checked, not stored
            return False
        try:
            steps = list(map(int, map(itemgetter(3), flats)))
            times = list(map(int, map(itemgetter(5), flats)))
            seq_ms, seq_n = list(map(int, parts[0::2])), list(map(int, parts[1::2]))
            found = [self._column(list(map(itemgetter(7 + 2 * i), flats)))
                     for i in range(len(names))]
        except ValueError:
            return False
        columns = [c for c in found if c is not None]
        if len(seq_ms) != len(flats) or len(columns) != len(found):
            return False
        width, count = len(names), len(flats)
        values: list[Any] = [None] * (width * count)
        slots: list[int] = [0] * (width * count)
        for i, (raw, column) in enumerate(zip(names, columns)):
            values[i::width] = column
            slots[i::width] = [self._slot(raw, _names[raw])] * count
        self.big = self.big or not _fits(steps, times, seq_ms, seq_n) or not all(
            _fits(c) for c in columns if type(c[0]) is int)
        self.name += slots
        self.value += values
        self.count += [width] * count
        self.step += steps
        self.time += times
        self.seq_ms += seq_ms
        self.seq_n += seq_n
        return True

    @staticmethod
    def _column(texts: list[bytes]) -> list[int] | list[float] | None:
        """One metric's values with :func:`record`'s rule (``-?[0-9]+`` is an int, else a
        float as ``repr`` writes it); None for a column mixing both or holding anything else
        (left to the per-entry path, which dead-letters what is not a number)."""
        joined = b"\n".join(texts)
        if _INTS.fullmatch(joined):
            return list(map(int, texts))
        if not _NUMS.fullmatch(joined) or _AN_INT.search(b"\n%s\n" % joined):
            return None
        return list(map(float, texts))

    def _slot(self, raw: bytes, name: str) -> int:
        slot = self.index.get(raw)
        if slot is None:
            slot = self.index[raw] = len(self.names)
            self.names.append(name)
        return slot

    def extend(self, other: Columns) -> None:
        """Append ``other``'s entries (a later read of the same run) after this batch's."""
        slot = [self._slot(raw, name) for raw, name in zip(other.index, other.names)]
        self.name += other.name if slot == list(range(len(slot))) else \
            list(map(slot.__getitem__, other.name))
        self.value += other.value
        self.count += other.count
        self.step += other.step
        self.time += other.time
        self.seq_ms += other.seq_ms
        self.seq_n += other.seq_n
        self.big = self.big or other.big

    def points(self) -> int:
        return len(self.value)

    def pack(self) -> bytes:
        blob: bytes = msgpack.packb({"names": self.names, "name": self.name, "value": self.value,
                                     "count": self.count, "step": self.step, "time": self.time,
                                     "seq_ms": self.seq_ms, "seq_n": self.seq_n})
        return blob  # msgpack is untyped: its packb returns Any
