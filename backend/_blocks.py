"""Block summaries of a columnar batch, made from the batch itself (the SQLite store).

``REFRESH_BLOCK`` summarises a block by reading its points back: ~11 µs a block, a sixth of
what storing its 64 points costs. A batch that only *appends* to a series (its steps of that
series increase, all above the highest step stored before) cannot have changed a point an
old summary was made of, so the block's new summary is the old one merged with the batch's
own points, which are in hand: one upsert per block, nothing read back. Whatever is not
plainly such an append (a step again, an older step, a NaN, an infinity of each sign, one name
twice in an entry) is left to ``REFRESH_BLOCK``, exactly as before.

The batch's shape is what the worker sends: runs of entries with one name list (a rank's
metrics), so a series' values are a strided slice of the value column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, compress, pairwise, repeat
from operator import lt, ne, rshift
from typing import Any

from ._schema import BLOCK_SHIFT

MERGE_BLOCK = """
INSERT INTO point_blocks (run, name, block, first, last, lo, hi) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, name, block) DO UPDATE SET
    first = min(first, excluded.first), last = max(last, excluded.last),
    lo = CASE WHEN lo IS NULL THEN excluded.lo ELSE min(lo, excluded.lo) END,
    hi = max(hi, excluded.hi)
"""
"""Merge a batch's summary of a block (no NaN in it) into the stored one, if any; the stored
``lo`` is NULL when the block held only NaNs, and ``min`` of a NULL is NULL."""

MAX_SPANS = 64
"""Runs of one name list beyond which the batch is not summarised here (one Python step per
run: a batch of mixed entries is cheaper to summarise from its stored points)."""


@dataclass
class Summary:
    merged: list[tuple[int, int, int, int, Any, Any]] = field(default_factory=list)
    """``(name id, block, first, last, lo, hi)`` for ``MERGE_BLOCK``."""
    refresh: set[tuple[int, int]] = field(default_factory=set)
    """``(name id, block)`` to summarise from the stored points (``REFRESH_BLOCK``)."""
    tops: dict[int, int] = field(default_factory=dict)
    """The highest step of each name id in the batch."""


def summarise(ids: list[int], name_idx: list[int], values: list[Any], counts: list[int],
              steps: list[int], tail: Callable[[int], int | None]) -> Summary | None:
    """The block summaries of a batch (see the module doc); ``tail(name id)`` is the highest
    step stored for that series before it (None: none). None when the batch is not made of
    a few runs of one name list each: the caller summarises every touched block itself."""
    offsets = list(accumulate(counts, initial=0))
    signatures = list(map(tuple, map(name_idx.__getitem__, map(slice, offsets, offsets[1:]))))
    cuts = [0, *compress(range(1, len(counts)), map(ne, signatures[1:], signatures)),
            len(counts)]
    if len(cuts) - 1 > MAX_SPANS or len(set(ids)) != len(ids):
        return None
    out = Summary()
    seen: dict[int, int] = {}  # name id -> its highest step in the batch so far
    slow: set[int] = set()
    pending: dict[tuple[int, int], list[Any]] = {}
    for a, b in pairwise(cuts):
        width, signature = counts[a], signatures[a]
        if not width:
            continue
        span = steps[a:b]
        blocks = list(map(rshift, span, repeat(BLOCK_SHIFT)))
        touched = set(blocks)
        nids = [ids[slot] for slot in signature]
        rising = all(map(lt, span, span[1:]))
        top = span[-1] if rising else max(span)
        edges = [0, *compress(range(1, len(blocks)), map(ne, blocks[1:], blocks)), len(blocks)]
        for j, nid in enumerate(nids):
            before = seen[nid] if nid in seen else tail(nid)
            seen[nid] = max(seen.get(nid, top), top)
            column = values[offsets[a] + j:offsets[b]:width]
            if (nid in slow or not rising or not _plain(column)
                    or (before is not None and span[0] <= before)):
                slow.add(nid)
                out.refresh.update(zip(repeat(nid), touched))
                continue
            for lo, hi in pairwise(edges):
                part = column[lo:hi]
                key = (nid, blocks[lo])
                low, high = min(part), max(part)
                got = pending.get(key)
                if got is None:
                    pending[key] = [span[lo], span[hi - 1], low, high]
                else:  # the block continues a block of an earlier run of this batch
                    got[1], got[2], got[3] = span[hi - 1], min(got[2], low), max(got[3], high)
    out.tops = seen
    out.merged = [(nid, block, *summary) for (nid, block), summary in pending.items()
                  if nid not in slow]
    out.refresh.update((nid, block) for nid, block in pending if nid in slow)
    return out


def _plain(column: list[Any]) -> bool:
    """No NaN and not both infinities (their sum is NaN), nor a None (a NaN as the SQLite
    store's callers may give it): min and max then mean what SQLite's do."""
    try:
        total = sum(column)
    except TypeError:
        return False
    return bool(total == total)
