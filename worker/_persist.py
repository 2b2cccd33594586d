"""One run's entries on their way to the backend: decode, post, and what came of it.

:func:`decode` turns a run's share of one read into a :class:`Post` of parts no larger than
``batch_bytes`` (raw entry bytes), dead-lettering each entry that is not what the SDK writes;
a later read decoded into the same (queued) post joins its last part while both fit.
:func:`deliver` runs on a poster thread, one post per run at a time: it looks the run's
project up if needed, then posts each part. An answer of 413 splits a part in halves until it
fits (halves of about equal bytes; only a single entry too large on its own is
dead-lettered, with the reason); an
unexpected error splits the same way, so one entry that trips the worker never takes its
neighbours with it. A transient failure (:class:`Unavailable`) stops the post: what was not
confirmed stays pending, and the loop parks the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from ._backend import Backend, Interrupted, Rejected, Unavailable
from ._entries import Columns, record
from ._streams import Entry

log = logging.getLogger("worker")

Bury = Callable[[Entry, str], None]
NO_PROJECT = object()
"""``Post.project`` before the look-up: the backend has not been asked yet."""


@dataclass
class Part:
    entries: list[Entry]
    columns: Columns | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    """Raw bytes of ``entries`` (as :func:`size` counts them)."""

    def absorb(self, other: Part, batch_bytes: int) -> bool:
        """Take ``other`` (decoded the same way, from a later read) into this part if the two
        fit in ``batch_bytes`` together: one body instead of two."""
        if self.size + other.size > batch_bytes or (self.columns is None) != (
                other.columns is None):
            return False
        if self.columns is not None and other.columns is not None:
            self.columns.extend(other.columns)
        self.records += other.records
        self.entries += other.entries
        self.size += other.size
        return True


@dataclass
class Post:
    """One run's decoded entries, and what the backend made of them."""

    run: int
    stream: str
    project: Any = NO_PROJECT
    parts: list[Part] = field(default_factory=list)
    stored: list[Entry] = field(default_factory=list)
    bad: list[tuple[Entry, str]] = field(default_factory=list)
    failed: str | None = None
    """Why the rest was not sent (the backend was unavailable); those entries stay pending."""
    splits: int = 0
    sent_at: float = 0.0
    """``time.monotonic()`` when it went to a poster thread."""

    def entries(self) -> int:
        return sum(len(p.entries) for p in self.parts)


def size(flat: list[bytes] | None) -> int:
    return sum(map(len, flat)) + 4 * len(flat) if flat else 0


def decode(post: Post, entries: list[Entry], columns: bool, batch_bytes: int,
           bury: Bury) -> None:
    """Append ``entries`` to ``post`` as parts of at most ``batch_bytes`` raw bytes each."""
    flats = [flat or () for _, flat in entries]
    total = sum(map(len, chain.from_iterable(flats))) + 4 * sum(map(len, flats))
    if total <= batch_bytes:
        _add_part(post, entries, columns, bury, total, batch_bytes)  # the usual case: one part
        return
    chunk: list[Entry] = []
    used = 0
    for entry in entries:
        n = size(entry[1])
        if chunk and used + n > batch_bytes:
            _add_part(post, chunk, columns, bury, used, batch_bytes)
            chunk, used = [], 0
        chunk.append(entry)
        used += n
    if chunk:
        _add_part(post, chunk, columns, bury, used, batch_bytes)


def _add_part(post: Post, entries: list[Entry], columns: bool, bury: Bury, used: int,
              batch_bytes: int) -> None:
    part = make_part(entries, columns, bury)
    part.size = used
    if part.entries and not (post.parts and post.parts[-1].absorb(part, batch_bytes)):
        post.parts.append(part)


def make_part(entries: list[Entry], columns: bool, bury: Bury) -> Part:
    """The entries that decode, as columns or records; each one that does not is buried."""
    cols = Columns() if columns else None
    part = Part([], cols)
    todo = entries
    if cols is not None:
        try:
            part.entries, todo = cols.add_many(entries)
        except Exception:
            log.exception("column-wise decoding failed; decoding entry by entry")
            part.columns = cols = Columns()
            part.entries, todo = [], entries
    for entry in todo:
        entry_id, flat = entry
        if flat is None:  # deleted while pending: nothing left to store
            bury(entry, "")
            continue
        try:
            if cols is None:
                part.records.append(record(entry_id, flat))
            else:
                cols.add(entry_id, flat)
        except ValueError as exc:
            bury(entry, f"undecodable: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one entry must never stop the others
            bury(entry, f"worker error decoding it: {type(exc).__name__}: {exc}")
            continue
        part.entries.append(entry)
    return part


def deliver(backend: Backend, post: Post, projects: dict[int, str | None]) -> Post:
    """On a poster thread: look the project up, then post every part (see the module doc)."""
    try:
        if post.project is NO_PROJECT:
            if post.run not in projects:
                projects[post.run] = backend.project_of(post.run)
            post.project = projects[post.run]
        for i, part in enumerate(post.parts):
            _send(backend, post, part)
            post.parts[i] = Part([])  # sent: nothing of it is left to retry
    except Rejected as exc:  # by project_of: another tenant's run, none of it is posted
        post.bad += [(e, f"refused: {exc}") for part in post.parts for e in part.entries]
        post.parts = []
    except (Unavailable, Interrupted) as exc:
        post.failed = str(exc)
    return post


def _send(backend: Backend, post: Post, part: Part) -> None:
    entries = part.entries
    try:
        if part.columns is not None:
            result = backend.ingest_columns(post.run, post.project, part.columns, entries)
        else:
            records = part.records or [record(e, f or []) for e, f in entries]
            result = backend.ingest(post.run, post.project, records)
    except Rejected as exc:
        if exc.status == 413 and len(entries) > 1:
            return _split(backend, post, part)
        reason = ("too large for the backend on its own: " if exc.status == 413 else "") + str(exc)
        post.bad += [(e, f"rejected: {reason}") for e in entries]
        return None
    except (Unavailable, Interrupted):
        raise
    except Exception as exc:
        if len(entries) > 1:
            return _split(backend, post, part)
        log.exception("run %d: posting entry %r failed", post.run, entries[0][0])
        post.bad.append((entries[0], f"worker error posting it: {type(exc).__name__}: {exc}"))
        return None
    post.bad += [(entries[i], f"rejected: {why}") for i, why in result.bad.items()]
    post.stored += [e for i, e in enumerate(entries) if i not in result.bad] if result.bad \
        else entries
    return None


def halves(entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
    """Two non-empty halves of about equal bytes: an entry far larger than its neighbours
    ends up alone within a split or two, instead of being halved down to by count."""
    total, used = sum(size(e[1]) for e in entries), 0
    for i, entry in enumerate(entries):
        n = size(entry[1])
        used += n
        if 2 * used >= total:  # entry i crosses the middle: with the first half, unless it
            cut = i if 2 * n > total else i + 1  # outweighs all the rest (then on its own)
            cut = min(max(cut, 1), len(entries) - 1)
            return entries[:cut], entries[cut:]
    return entries[:1], entries[1:]  # not reached: the loop always reaches half


def _split(backend: Backend, post: Post, part: Part) -> None:
    """Post ``part`` as two halves (each re-decoded the way the whole was)."""
    post.splits += 1
    columns = part.columns is not None
    for entries in halves(part.entries):
        sub = make_part(entries, columns, lambda e, why: post.bad.append((e, why)))
        if sub.entries:
            _send(backend, post, sub)
