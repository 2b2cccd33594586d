"""Turning metrics stream entries into the backend's ingest records, fast.

:func:`pluto._protocol.decode_entry` is the definition of a valid entry. Calling it for every
entry costs a validation of every metric name on every entry, which dominates a drain; so the
hot path here remembers names it has seen validated and parses values with the same rules
(``-?\\d+`` -> int, else ``float``). Whenever the fast path meets anything it has not seen —
a new name, a missing field, a value ``float`` refuses — it hands the whole entry to
``decode_entry``, so the accepted entries, their values and the error messages are exactly
``decode_entry``'s.
"""

from __future__ import annotations

from typing import Any

from pluto import _keys as K
from pluto._protocol import decode_entry, name_problem

_RANK = K.F_RANK.encode()
_STEP = K.F_STEP.encode()
_TIME = K.F_TIME.encode()
_MINUS = b"-"
_SKIP = ""
"""Cached for reserved (``_``-prefixed) field names: present, but not a metric."""
_MAX_CACHE = 100_000

_names: dict[bytes, str] = {}


def fields_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it))


def flatten(fields: dict[bytes, bytes]) -> list[bytes]:
    return [x for kv in fields.items() for x in kv]


def _learn(fields: dict[bytes, bytes]) -> None:
    """Remember the names of an entry ``decode_entry`` accepted."""
    if len(_names) > _MAX_CACHE:
        _names.clear()
    for raw in fields:
        if raw.startswith(b"_"):
            _names[raw] = _SKIP
        else:
            name = raw.decode("utf-8")
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
                else:
                    data[name] = float(value)
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
