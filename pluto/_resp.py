"""RESP encoding of many ``XADD`` commands at once, for the producer thread.

redis-py packs ~10 µs per command and even a per-entry Python template costs ~4 µs, which would
make the producer (sharing the GIL with the training loop) the bottleneck. ``Run.log`` leaves
entries in a flat deque (``step, time, names, value, value, ...``); a run of entries with the same
names is packed here with C-level loops only: slices pick each column, ``map`` makes the texts and
their lengths, slice assignment interleaves them with shared constant pieces, one join.
``repr`` of an int or float is exactly the text DESIGN §4 asks for (``0.1``, ``nan``, ``-inf``).
"""

from __future__ import annotations

from typing import Any

from .protocol import ENTRY_HEAD, F_RANK, F_STEP, F_TIME

_MS = 1000.0


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _uniform(items: list[Any], start: int, names: tuple[str, ...]) -> int:
    """How many whole entries from ``start`` on all log exactly ``names`` (C-level check first)."""
    width = ENTRY_HEAD + len(names)
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
    while at + ENTRY_HEAD <= len(items):
        names = items[at + 2]
        same = _uniform(items, at, names)
        if same == 0:
            if at + ENTRY_HEAD + len(names) > len(items):
                break
            same = 1
        at += same * (ENTRY_HEAD + len(names))
    return at


def count_entries(items: list[Any]) -> int:
    count, at = 0, 0
    while at < len(items):
        at += ENTRY_HEAD + len(items[at + 2])
        count += 1
    return count


class _Lengths(dict[int, str]):
    """``"<n>\r\n"`` for a text of length n: looked up, not formatted, once per value."""

    def __missing__(self, n: int) -> str:
        self[n] = text = f"{n}\r\n"
        return text


_LENGTH = _Lengths()


class Packed:
    """One chunk as RESP: the payload, the entries it holds (flat), how many, and the entries
    left out as ``(names, reason)``."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.items: list[Any] = []
        self.count = 0
        self.bad: list[tuple[tuple[str, ...], str]] = []

    def add(self, payload: bytes, items: list[Any], count: int) -> None:
        self.parts.append(payload)
        self.items += items
        self.count += count

    @property
    def payload(self) -> bytes:
        return b"".join(self.parts)


class XaddPacker:
    """Packs entries as ``XADD <stream> * _rank r _step s _time t name value ...``.

    One same-named run becomes one list of string pieces, filled column by column with slice
    assignments (C-level loops), then joined once: per entry, 3 + 3 * metrics pieces, of which
    only the lengths and texts are computed; everything constant is one shared string.
    """

    def __init__(self, stream: str, rank: int) -> None:
        self._head = (bulk(b"XADD") + bulk(stream.encode()) + bulk(b"*") + bulk(F_RANK.encode())
                      + bulk(b"%d" % rank) + bulk(F_STEP.encode())).decode()
        self._time_field = "\r\n" + bulk(F_TIME.encode()).decode() + "$"
        self._fields: dict[tuple[str, ...], tuple[str, list[str]]] = {}

    def pack(self, items: list[Any]) -> Packed:
        """The flat entries in ``items`` (whole entries only) as RESP.

        A run of same-named entries is packed in one go; if that fails (an int too long for
        ``repr``, a name that cannot be encoded), its entries are packed one by one and only
        the ones that fail are left out, each with the reason: one bad entry never costs its
        neighbours, and the chunk never fails as a whole.
        """
        out = Packed()
        at = 0
        while at < len(items):
            names = items[at + 2]
            count = max(_uniform(items, at, names), 1)
            end = at + count * (ENTRY_HEAD + len(names))
            group = items[at:end]
            try:
                out.add(self._encode(names, group, count), group, count)
            except (ValueError, OverflowError, TypeError, UnicodeError):
                width = ENTRY_HEAD + len(names)
                for i in range(0, len(group), width):
                    one = group[i:i + width]
                    try:
                        out.add(self._encode(names, one, 1), one, 1)
                    except (ValueError, OverflowError, TypeError, UnicodeError) as exc:
                        out.bad.append((names, f"{type(exc).__name__}: {str(exc)[:200]}"))
            at = end
        return out

    def _encode(self, names: tuple[str, ...], items: list[Any], count: int) -> bytes:
        return "".join(self._pieces(names, items, count)).encode()

    def _pieces(self, names: tuple[str, ...], items: list[Any], count: int) -> list[str]:
        width, per = ENTRY_HEAD + len(names), 7 + 3 * len(names)
        start, name_pieces = self._constants(names)
        length = _LENGTH.__getitem__
        parts: list[Any] = [None] * (per * count)
        steps = list(map(str, items[0::width]))
        stamps = _texts(list(map(int, map(_MS.__mul__, items[1::width]))))  # fast logs share ms
        parts[0::per] = [start] * count
        parts[1::per] = map(length, map(len, steps))
        parts[2::per] = steps
        parts[3::per] = [self._time_field] * count
        parts[4::per] = map(length, map(len, stamps))
        parts[5::per] = stamps
        for i, piece in enumerate(name_pieces):
            texts = _texts(items[3 + i::width])
            parts[6 + 3 * i::per] = [piece] * count
            parts[7 + 3 * i::per] = map(length, map(len, texts))
            parts[8 + 3 * i::per] = texts
        parts[per - 1::per] = ["\r\n"] * count
        return parts

    def _constants(self, names: tuple[str, ...]) -> tuple[str, list[str]]:
        """The entry's opening piece (up to the step's length) and, per metric, the piece from
        the previous value's CRLF up to this value's length: ``\r\n$<n>\r\n<name>\r\n$``."""
        known = self._fields.get(names)
        if known is None:
            if len(self._fields) > 10_000:  # names that change every call: don't grow forever
                self._fields.clear()
            known = self._fields[names] = (
                f"*{9 + 2 * len(names)}\r\n{self._head}$",
                ["\r\n" + bulk(n.encode()).decode() + "$" for n in names])
        return known


TRANSIENT = (b"LOADING", b"BUSY", b"TRYAGAIN", b"MOVED", b"ASK", b"READONLY", b"MASTERDOWN",
             b"CLUSTERDOWN", b"OOM")
"""Error replies of a healthy but busy or changing server (redis-py's ``_parsers/base.py``
maps the same prefixes to retryable classes): keep the entry and send it again later."""


def transient(error: bytes) -> bool:
    """Whether an error reply (without its ``-``) means "try again", not "never"."""
    return error.split(b" ", 1)[0] in TRANSIENT


class Replies:
    """Counts XADD replies as they stream in and records the error ones, by reply index.

    Each XADD answers ``$<n>\r\n<id>\r\n`` (two lines) or ``-<error>\r\n`` (one line; a
    RESP3 connection may send a long one as ``!<n>\r\n<error>\r\n``). Stream ids contain no
    CRLF and never start with ``-`` or ``!``, so splitting on CRLF (in C) tells them apart;
    only input that holds an error is walked in Python. ``count`` is the number of whole
    replies read so far; ``errors`` lists ``(index, text)``.
    """

    def __init__(self) -> None:
        self.count = 0
        self.errors: list[tuple[int, bytes]] = []
        self._tail = b""  # an incomplete line carried to the next chunk
        self._next = b""  # after a ``$<n>`` or ``!<n>`` line: what its second line is

    def feed(self, chunk: bytes) -> int:
        """Account for ``chunk``; returns how many error replies it completed."""
        data = self._tail + chunk if self._tail else chunk
        lines = data.split(b"\r\n")
        self._tail = lines.pop()
        if not (data[:1] in (b"-", b"!") or b"\r\n-" in data or b"\r\n!" in data
                or self._next == b"!"):
            total = len(lines) + (self._next == b"$")  # every reply is exactly two lines
            self.count += total // 2
            self._next = b"$" if total % 2 else b""
            return 0
        found = 0
        for line in lines:
            if self._next:
                if self._next == b"!":
                    self.errors.append((self.count, line))
                    found += 1
                self._next = b""
                self.count += 1
            elif line[:1] == b"-":
                self.errors.append((self.count, line[1:]))
                self.count += 1
                found += 1
            elif line == b"$-1" or line[:1] == b"_":  # a nil reply: one reply all the same
                self.count += 1
            else:
                self._next = line[:1]
        return found

    def take_errors(self, below: int) -> list[tuple[int, bytes]]:
        """The recorded errors of replies before index ``below``, removed from the record."""
        mine = [e for e in self.errors if e[0] < below]
        if mine:
            self.errors = [e for e in self.errors if e[0] >= below]
        return mine
