"""RESP encoding of many ``XADD`` commands at once, for the producer thread.

redis-py packs ~10 µs per command and even a per-entry Python template costs ~4 µs, which would
make the producer (sharing the GIL with the training loop) the bottleneck. ``Run.log`` leaves
entries in a flat deque (``step, time, names, value, value, ...``); a run of entries with the same
names is packed here with C-level loops only: slices pick each column, ``map`` makes the texts and
their lengths, slice assignment interleaves them, and one ``%`` fills a repeated template.
``repr`` of an int or float is exactly the text DESIGN §4 asks for (``0.1``, ``nan``, ``-inf``).
"""

from __future__ import annotations

from typing import Any

from ._keys import F_RANK, F_STEP, F_TIME

_MS = 1000.0


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _uniform(items: list[Any], start: int, names: tuple[str, ...]) -> int:
    """How many whole entries from ``start`` on all log exactly ``names`` (C-level check first)."""
    width = 3 + len(names)
    count = (len(items) - start) // width
    if items[start + 2::width].count(names) == count:
        return count
    done = 0
    while done < count and items[start + done * width + 2] == names:
        done += 1
    return done


def _texts(column: list[Any]) -> list[str]:
    """``repr`` of each value; a column that mostly repeats (lr, epoch...) is rendered once per
    distinct value. Zeros (``0.0`` equals ``-0.0``) and mixed int/float (``1`` equals ``1.0``)
    would share a text, so those columns take the plain path."""
    distinct = set(column)
    if len(distinct) * 4 <= len(column) and 0 not in distinct and len(set(map(type, column))) == 1:
        return list(map({v: repr(v) for v in distinct}.__getitem__, column))
    return list(map(repr, column))


def whole_entries(items: list[Any]) -> int:
    """Length of the longest prefix of ``items`` made of whole entries."""
    at = 0
    while at + 3 <= len(items):
        names = items[at + 2]
        same = _uniform(items, at, names)
        if same == 0:
            if at + 3 + len(names) > len(items):
                break
            same = 1
        at += same * (3 + len(names))
    return at


def count_entries(items: list[Any]) -> int:
    count, at = 0, 0
    while at < len(items):
        at += 3 + len(items[at + 2])
        count += 1
    return count


class XaddPacker:
    """Packs entries as ``XADD <stream> * _rank r _step s _time t name value ...``."""

    def __init__(self, stream: str, rank: int) -> None:
        self._head = (bulk(b"XADD") + bulk(stream.encode()) + bulk(b"*") + bulk(F_RANK.encode())
                      + bulk(b"%d" % rank) + bulk(F_STEP.encode())).decode().replace("%", "%%")
        self._time_field = bulk(F_TIME.encode()).decode()
        self._templates: dict[tuple[str, ...], str] = {}

    def pack(self, items: list[Any]) -> tuple[bytes, int]:
        """The flat entries in ``items`` (whole entries only) as RESP, and how many there are."""
        parts, at, total = [], 0, 0
        while at < len(items):
            names = items[at + 2]
            count = max(_uniform(items, at, names), 1)
            end = at + count * (3 + len(names))
            parts.append(self._pack_same(names, items[at:end], count))
            at, total = end, total + count
        return b"".join(parts), total

    def _pack_same(self, names: tuple[str, ...], items: list[Any], count: int) -> bytes:
        width, fields = 3 + len(names), 4 + 2 * len(names)
        steps = list(map(str, items[0::width]))
        stamps = list(map(str, map(int, map(_MS.__mul__, items[1::width]))))
        args: list[Any] = [None] * (fields * count)
        args[0::fields] = map(len, steps)
        args[1::fields] = steps
        args[2::fields] = map(len, stamps)
        args[3::fields] = stamps
        for i in range(len(names)):
            texts = _texts(items[3 + i::width])
            args[4 + 2 * i::fields] = map(len, texts)
            args[5 + 2 * i::fields] = texts
        return ((self._template(names) * count) % tuple(args)).encode()

    def _template(self, names: tuple[str, ...]) -> str:
        template = self._templates.get(names)
        if template is None:
            if len(self._templates) > 10_000:  # names that change every call: don't grow forever
                self._templates.clear()
            fields = "".join(bulk(n.encode()).decode().replace("%", "%%") + "$%d\r\n%s\r\n"
                             for n in names)
            template = self._templates[names] = (
                f"*{9 + 2 * len(names)}\r\n" + self._head + "$%d\r\n%s\r\n" + self._time_field
                + "$%d\r\n%s\r\n" + fields)
        return template


class ReplyCounter:
    """Counts XADD replies as they stream in, in C (``bytes.count``), without parsing them.

    Each XADD answers ``$<n>\\r\\n<id>\\r\\n`` (two CRLFs); a refused entry (e.g. OOM) answers
    ``-<error>\\r\\n`` (one CRLF, its ``-`` right after the previous reply's CRLF). So ``count``
    (CRLFs + errors) reaches exactly 2 per reply once every byte arrived.
    """

    def __init__(self) -> None:
        self.count = 0
        self._tail = b""
        self._after_crlf = True  # the first reply starts the stream

    def feed(self, chunk: bytes) -> int:
        """Account for ``chunk``; returns how many error replies began in it."""
        tail = self._tail
        errors = chunk.count(b"\r\n-")
        errors += (tail == b"\r" and chunk[:2] == b"\n-") + (self._after_crlf and chunk[:1] == b"-")
        crlf = chunk.count(b"\r\n") + (tail == b"\r" and chunk[:1] == b"\n")
        self._after_crlf = chunk[-2:] == b"\r\n" or (chunk == b"\n" and tail == b"\r")
        self._tail = chunk[-1:]
        self.count += crlf + errors
        return errors
