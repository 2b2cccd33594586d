"""Turning what a user passes to ``log``/``init`` into clean metric dicts and config.

The fast path (a flat dict of known names to int/float) is decided in ``Run.log`` with two C-level
checks; everything else comes here: nested dicts are flattened with ``/``, numpy and torch
scalars become Python numbers, and bad keys/values are dropped with one warning per key (or a
``TypeError`` in strict mode). The good keys of the same call still land.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from .protocol import INT64_MAX, INT64_MIN, name_problem

SCALARS = frozenset({int, float})
"""Types that go through ``log`` untouched (bool is converted to 0/1)."""


class PlutoWarning(UserWarning):
    """Warnings pluto emits about dropped or ignored input."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the caller) of the first frame outside
    pluto: a warning points at the user's ``run.log(...)`` line, however deep inside pluto
    (nested dicts, integrations) it was raised."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def to_number(value: Any) -> int | float | None:
    """A Python int/float for ``value``, or None if it is not a single number."""
    kind = type(value)
    if kind is int or kind is float:
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return int(value)
    if isinstance(value, (int, float)):  # int/float subclasses, numpy.float64
        return float(value) if isinstance(value, float) else int(value)
    item = getattr(value, "item", None)
    if item is None or isinstance(value, (str, bytes)):
        return None
    size = getattr(value, "size", None)
    if callable(size):  # torch.Tensor.size is a method; numel() is the count
        numel = getattr(value, "numel", None)
        size = numel() if callable(numel) else None
    if size != 1:
        return None
    try:
        number = item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return to_number(number) if type(number) in (int, float, bool) else None


class Cleaner:
    """Per-run state for the slow path: which names are known good, which were warned about."""

    def __init__(self, strict: bool, on_drop: Any = None) -> None:
        self.strict = strict
        self.good_names: set[str] = set()
        self._warned: set[str] = set()
        self._on_drop = on_drop
        """Called once per value dropped (the ledger's ``bad_value``), so a drop is counted."""

    def clean(self, data: Any) -> dict[str, int | float]:
        if not isinstance(data, Mapping):
            self._reject("<data>", f"log() takes a dict of metrics, got {type(data).__name__}")
            return {}
        out: dict[str, int | float] = {}
        self._flatten(data, "", out)
        return out

    def _flatten(self, data: Mapping[Any, Any], head: str, out: dict[str, int | float]) -> None:
        for key, value in data.items():
            if not isinstance(key, str):
                self._reject(repr(key)[:80], f"metric names must be str, got {type(key).__name__}")
                continue
            name = head + key
            if isinstance(value, Mapping):
                self._flatten(value, name + "/", out)
                continue
            if name not in self.good_names:
                problem = name_problem(name) or _unencodable(name)
                if problem:
                    self._reject(name[:80], problem)
                    continue
            number = to_number(value)
            if number is None:
                self._reject(name, f"value of type {type(value).__name__} is not a single number "
                             "(log ints, floats, bools or one-element numpy/torch values)")
                continue
            self.good_names.add(name)
            out[name] = number

    def reject_arg(self, arg: str, why: str) -> None:
        """A bad ``step=``/``timestamp=``: warned once (ignored), ``TypeError`` in strict mode."""
        self._reject(f"<{arg}>", why, what="argument")

    def _reject(self, key: str, why: str, what: str = "metric") -> None:
        message = f"pluto: dropped {what} {key!r}: {why}"
        if self.strict:
            raise TypeError(message + " (strict mode: set PLUTO_STRICT=0 to warn instead)")
        if what == "metric" and self._on_drop is not None:
            self._on_drop()
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, PlutoWarning, stacklevel=user_stacklevel())


def _unencodable(name: str) -> str | None:
    """Why ``name`` cannot travel as UTF-8 (a lone surrogate, as ``os.fsdecode`` makes), or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"metric name is not valid text ({exc.reason} at position {exc.start}); "
                "decode file names with errors='replace'")
    return None


def clean_config(config: Any) -> dict[str, Any] | None:
    """Config as JSON-safe data; numpy/torch scalars converted; ``TypeError`` naming a bad key."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raw = getattr(config, "__dict__", None)  # argparse.Namespace and friends
        if not isinstance(raw, dict):
            raise TypeError(f"config must be a dict (or argparse.Namespace), got {type(config).__name__}")
        config = raw
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = str(k)
        if _unencodable(key):
            raise TypeError(f"config key {key!r} is not valid text; decode it with errors='replace'")
        out[key] = _config_value(v, key)
    return out


MAX_CONFIG_DEPTH = 32


def _config_value(value: Any, path: str, depth: int = 1) -> Any:
    if depth > MAX_CONFIG_DEPTH:
        raise TypeError(f"config key {path!r} is nested more than {MAX_CONFIG_DEPTH} levels deep; "
                        "flatten it")
    if isinstance(value, str) and type(value) is str:
        if _unencodable(value):
            raise TypeError(f"config key {path!r} holds a string that is not valid text (a lone "
                            "surrogate?); decode it with errors='replace'")
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise TypeError(f"config key {path!r} holds an integer beyond 64 bits; pass it as a "
                            "string")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = str(k)
            if _unencodable(key):
                raise TypeError(f"config key {path + '.' + key!r} is not valid text; decode it "
                                "with errors='replace'")
            out[key] = _config_value(v, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_config_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, str):  # a str subclass
        return _config_value(str(value), path, depth)
    number = to_number(value)
    if number is not None:
        return _config_value(number, path, depth)
    raise TypeError(f"config key {path!r} holds a {type(value).__name__}, which is not "
                    "JSON-serialisable; pass str/int/float/bool/None, lists or dicts")
