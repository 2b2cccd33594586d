"""The runs list's ``filter`` (wandb-style MongoDB queries) and ``sort`` (``[+|-]field``),
evaluated in Python over a project's runs.

Why in Python and not SQL: the grammar reaches into JSON configs and last metric values, and a
project holds at most thousands of runs, so one pass over their rows is cheap and the same
code serves any store. Semantics follow MongoDB where the official docs are silent:

* a leaf ``{field: value}`` is ``$eq``; ``{field: {"$op": v, ...}}`` needs every op to hold;
* an array field (``tags``) matches ``$eq``/``$in``/``$regex`` when any element does;
* a missing field matches ``$ne``, ``$nin``, ``$eq: null`` and ``$exists: false`` only;
* values of different kinds (a number and a string, a bool and a number) are never equal
  nor ordered: the comparison is false, not an error;
* ``status``/``state`` compare case-insensitively, and wandb's states map to ours
  (``finished`` = COMPLETED, ``crashed`` = FAILED, ``killed`` = TERMINATED);
* times (``created_at``, ``updated_at``, ``heartbeat_at``) take ISO 8601 text or epoch
  milliseconds; ``heartbeat_at`` is when the run last received anything (its update time);
* ``config.<key>`` and ``config.<key>.value`` are the same (wandb nests values under
  ``value``); a dotted key is looked up whole first, then as a path into nested objects.

Anything else (an unknown operator or field, a bad regex, ``$in`` without a list) is a
:class:`FilterError`, which the route answers with a 400 naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

MAX_DEPTH = 50
MAX_REGEX = 1000

Doc = dict[str, Any]
"""A run as the filter sees it: status, name, tags, created, updated (ms), config, summary."""

_MISSING = object()
_TIMES = {"created_at": "created", "createdAt": "created", "updated_at": "updated",
          "updatedAt": "updated", "heartbeat_at": "updated", "heartbeatAt": "updated"}
_PLAIN = {"state": "status", "status": "status", "name": "name", "displayName": "name",
          "display_name": "name", "tags": "tags", **_TIMES}
_SUMMARY = ("summaryMetrics.", "summary_metrics.")
_STATES = {"finished": "COMPLETED", "crashed": "FAILED", "killed": "TERMINATED",
           "preempted": "TERMINATED"}
_LEAF_OPS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$regex", "$exists"}


class FilterError(ValueError):
    """A filter or sort the grammar does not allow; the message names the part."""


def summary_name(field: str) -> str | None:
    for prefix in _SUMMARY:
        if field.startswith(prefix) and len(field) > len(prefix):
            return field[len(prefix):]
    return None


def check_field(field: str) -> None:
    if field in _PLAIN or summary_name(field) is not None:
        return
    for prefix in ("config.", "systemMetadata."):
        if field.startswith(prefix) and len(field) > len(prefix):
            return
    raise FilterError(f"unknown filter field {field[:80]!r}: use status, name, tags, "
                      "created_at, updated_at, heartbeat_at, config.<key>, summaryMetrics.<name>")


def metrics_used(node: Any, out: set[str] | None = None, depth: int = 0) -> set[str]:
    """Check the filter's structure; the metric names its ``summaryMetrics.*`` leaves use."""
    out = set() if out is None else out
    if depth > MAX_DEPTH:
        raise FilterError(f"filter nested deeper than {MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise FilterError(f"a filter must be an object, got {type(node).__name__}")
    for key, value in node.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list):
                raise FilterError(f"{key} expects a list of filters")
            for child in value:
                metrics_used(child, out, depth + 1)
        elif key == "$not":
            metrics_used(value, out, depth + 1)
        elif key.startswith("$"):
            raise FilterError(f"unknown operator {key[:40]!r}: use $and, $or, $not")
        else:
            check_field(key)
            if (name := summary_name(key)) is not None:
                out.add(name)
            if isinstance(value, dict) and any(k.startswith("$") for k in value):
                for op, arg in value.items():
                    _check_op(key, op, arg)
    return out


def _check_op(field: str, op: str, arg: Any) -> None:
    if op not in _LEAF_OPS:
        raise FilterError(f"unknown operator {op[:40]!r} on {field[:80]!r}: use one of "
                          f"{', '.join(sorted(_LEAF_OPS))}")
    if op in ("$in", "$nin") and not isinstance(arg, list):
        raise FilterError(f"{op} on {field[:80]!r} expects a list")
    if op == "$regex":
        _regex(arg)
    if op == "$exists" and not isinstance(arg, bool):
        raise FilterError(f"$exists on {field[:80]!r} expects true or false")


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _regex(arg: Any) -> re.Pattern[str]:
    if not isinstance(arg, str) or len(arg) > MAX_REGEX:
        raise FilterError(f"$regex expects a pattern string of at most {MAX_REGEX} characters")
    try:
        return _compiled(arg)
    except (re.error, RecursionError, OverflowError) as exc:
        raise FilterError(f"$regex {arg[:60]!r} is not a valid pattern: {exc}") from None


def time_ms(value: Any) -> Any:
    """An ISO 8601 text or a number as epoch milliseconds; anything else as it is."""
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return value
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return int(when.timestamp() * 1000)
    return value


def _lookup(config: Any, path: str) -> Any:
    if path.endswith(".value") and path[:-6]:
        found = _lookup(config, path[:-6])
        if found is not _MISSING:
            return found
    if isinstance(config, dict) and path in config:
        return config[path]
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def resolve(doc: Doc, field: str) -> Any:
    """The run's value for ``field``, or the missing marker."""
    if field in _PLAIN:
        return doc[_PLAIN[field]]
    if field.startswith("config."):
        return _lookup(doc["config"], field[7:])
    if (name := summary_name(field)) is not None:
        value = doc["summary"].get(name, _MISSING)
        return _MISSING if isinstance(value, float) and math.isnan(value) else value
    return _MISSING  # systemMetadata: not stored by this backend


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _operand(field: str, arg: Any) -> Any:
    if field in _TIMES:
        return time_ms(arg)
    if field in ("status", "state") and isinstance(arg, str):
        return _STATES.get(arg.lower(), arg.upper())
    return arg


def _equal(value: Any, arg: Any) -> bool:
    if isinstance(value, str) and isinstance(arg, str):
        return value == arg
    return _kind(value) == _kind(arg) and value == arg


def _eq(field: str, value: Any, arg: Any) -> bool:
    if value is _MISSING:
        return arg is None
    arg = _operand(field, arg)
    if field in ("status", "state") and isinstance(arg, str):
        return str(value).upper() == arg.upper()
    if isinstance(value, list) and not isinstance(arg, list):
        return any(_equal(v, arg) for v in value)
    return _equal(value, arg)


def _order(value: Any, arg: Any, test: Callable[[Any, Any], bool]) -> bool:
    if value is _MISSING or _kind(value) != _kind(arg) or _kind(arg) not in ("number", "str"):
        return False
    return test(value, arg)


_ORDERS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b}


def _leaf(field: str, value: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return _eq(field, value, arg)
    if op == "$ne":
        return not _eq(field, value, arg)
    if op == "$in":
        return any(_eq(field, value, a) for a in arg)
    if op == "$nin":
        return not any(_eq(field, value, a) for a in arg)
    if op == "$exists":
        return (value is not _MISSING) == arg
    if op == "$regex":
        pattern = _regex(arg)
        items = value if isinstance(value, list) else [value]
        return any(isinstance(v, str) and pattern.search(v) is not None for v in items)
    return _order(value, _operand(field, arg), _ORDERS[op])


def matches(node: dict[str, Any], doc: Doc) -> bool:
    """Whether the run ``doc`` satisfies the (checked) filter ``node``."""
    for key, spec in node.items():
        if key == "$and":
            ok = all(matches(child, doc) for child in spec)
        elif key == "$or":
            ok = any(matches(child, doc) for child in spec)
        elif key == "$not":
            ok = not matches(spec, doc)
        else:
            value = resolve(doc, key)
            if isinstance(spec, dict) and any(k.startswith("$") for k in spec):
                ok = all(_leaf(key, value, op, arg) for op, arg in spec.items())
            else:
                ok = _eq(key, value, spec)
        if not ok:
            return False
    return True


# -- sort --------------------------------------------------------------------------------------

_SORT_PLAIN = {"createdAt": "created", "created_at": "created", "updatedAt": "updated",
               "updated_at": "updated", "heartbeat_at": "updated", "heartbeatAt": "updated",
               "name": "name", "status": "status", "id": "id"}


def parse_sort(raw: str) -> tuple[str, bool]:
    """``(field, descending)`` of ``[+|-]field``; :class:`FilterError` for unknown fields."""
    text = raw.strip()
    descending = text.startswith("-")
    field = text[1:] if text[:1] in "+-" and text else text
    if field in _SORT_PLAIN or field.startswith(("config.", "systemMetadata.")) \
            or summary_name(field) is not None:
        if field in ("config.", "systemMetadata."):
            raise FilterError(f"sort field {field!r} needs a key")
        return field, descending
    raise FilterError(f"unknown sort field {field[:80]!r}: use createdAt, updatedAt, name, "
                      "status, heartbeat_at, config.<key>.value, summary_metrics.<name>")


def sort_docs(docs: list[Doc], field: str, descending: bool) -> list[Doc]:
    """``docs`` ordered by ``field``; runs without a value (or NaN) come last either way.
    Numbers sort before strings, which sort before anything else (as JSON text)."""
    def value(doc: Doc) -> Any:
        if field in _SORT_PLAIN:
            return doc[_SORT_PLAIN[field]]
        return resolve(doc, field)

    groups: dict[int, list[tuple[Any, Doc]]] = {0: [], 1: [], 2: []}
    missing: list[Doc] = []
    for doc in docs:
        v = value(doc)
        if v is _MISSING or v is None or (isinstance(v, float) and math.isnan(v)):
            missing.append(doc)
            continue
        kind = _kind(v)
        group = 0 if kind in ("number", "bool") else 1 if kind == "str" else 2
        groups[group].append((v if group < 2 else repr(v), doc))
    out: list[Doc] = []
    for bucket in groups.values():  # kinds keep their order in either direction
        bucket.sort(key=lambda pair: pair[0], reverse=descending)
        out += [doc for _, doc in bucket]
    return out + missing
