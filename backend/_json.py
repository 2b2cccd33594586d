"""JSON the backend can always give back: checked at the door, checked again when read.

What is accepted must read back (DESIGN.md §6), and a response is UTF-8 JSON without NaN, so
three things are refused before anything reaches SQLite, naming where they are:

* strings that cannot be encoded as UTF-8 (lone surrogates such as ``"\\udc80"``, which a
  JSON ``\\u`` escape or a bare surrogate in Python produce), in values and keys alike;
* nesting deeper than :data:`MAX_DEPTH` (a RecursionError in ``json`` is the same mistake);
* non-string keys (msgpack only; JSON keys are strings).

Non-finite floats (the bare ``NaN``/``Infinity`` tokens of Python's ``json.dumps``, or
``1e999``) are not refused: they are spelled ``"NaN"``, ``"Infinity"``, ``"-Infinity"``,
as metric values are, so a config holding them stores and reads back in that spelling.
The walk is iterative: its own depth never depends on the input's.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting accepted in a request (a config, a members list); deeper is a 400."""

READ_DEPTH = 256
"""Deepest nesting a stored value may have to be returned; rows written before the limit
existed may be deeper than :data:`MAX_DEPTH` and still read back up to this."""

_SPELLING = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}


class Problem(ValueError):
    """A value that cannot be stored or returned; the message names where and why."""


def spelled(value: float) -> str:
    """``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` for a non-finite float."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 material (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _where(path: tuple[Any, ...]) -> str:
    """``config.a[3].b``; a key that is long or not a plain name is shown quoted, cut at 40."""
    out = ""
    for part in path:
        if type(part) is int:
            out += f"[{part}]"
            continue
        text = part if part.isidentifier() and len(part) <= 40 else _shown(part)
        out += f".{text}" if out else text
    return out or "body"


def _shown(text: str) -> str:
    return ascii(text[:40])  # ascii(): an error message must itself be encodable


def clean(obj: Any, where: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """``obj`` with non-finite floats spelled (changed in place); :class:`Problem` if it
    holds an unencodable string, a non-string key or nesting beyond ``max_depth``.

    >>> clean({"lr": float("nan"), "x": [1e999]})
    {'lr': 'NaN', 'x': ['Infinity']}
    """
    if type(obj) is float and not math.isfinite(obj):
        return spelled(obj)
    if type(obj) is str and not encodable(obj):
        raise Problem(f"{where}: string {_shown(obj)} is not valid UTF-8 (a lone surrogate?)")
    if not isinstance(obj, (dict, list)):
        return obj
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, (where,))]
    while stack:
        node, path = stack.pop()
        if len(path) > max_depth:
            raise Problem(f"{_where(path[:8])}...: nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key in node:
                if type(key) is not str:
                    raise Problem(f"{_where(path)}: keys must be strings, got "
                                  f"{type(key).__name__}")
                if not encodable(key):
                    raise Problem(f"{_where(path)}: key {_shown(key)} is not valid UTF-8 "
                                  "(a lone surrogate?)")
            items: Any = node.items()
        else:
            items = enumerate(node)
        for key, value in items:
            kind = type(value)
            if kind is str:
                if not value.isascii() and not encodable(value):
                    raise Problem(f"{_where((*path, key))}: string {_shown(value)} is not "
                                  "valid UTF-8 (a lone surrogate?)")
            elif kind is float:
                if value - value != 0.0:  # inf - inf and nan - nan are nan: not finite
                    node[key] = spelled(value)
            elif isinstance(value, (dict, list)):
                stack.append((value, (*path, key)))
    return obj


def loads(raw: str | bytes, where: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """Parse and :func:`clean` JSON; :class:`Problem` (a ValueError) naming what is wrong."""
    try:
        obj = json.loads(raw, parse_constant=_SPELLING.__getitem__)
    except RecursionError:
        raise Problem(f"{where}: nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise Problem(f"{where} is not valid JSON: {exc}") from None
    return clean(obj, where, max_depth)


def dumps(obj: Any) -> str:
    """Compact JSON text of a :func:`clean` value (``allow_nan=False``: none can remain)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
