"""PostgreSQL plumbing for ``_pgstore``: the SQL it sends, a small connection pool, and the
conversion of point values between Python and the three value columns.

Kept apart so that ``_pgstore`` reads as the store's behaviour; see its docstring for why the
statements are shaped as they are.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from math import isnan
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from ._rows import MEMBER_FIELDS
from ._store import Stored
from ._store_extra import Dialect

POINT_COLS = "name, step, value, ival, big, time, seq_ms, seq_n"
PG_TYPES = ["int4", "int8", "float8", "int8", "text", "int8", "int8", "int8"]
_UPSERT_TAIL = """
ON CONFLICT (run, name, step) DO UPDATE SET
    value = excluded.value, ival = excluded.ival, big = excluded.big, time = excluded.time,
    seq_ms = excluded.seq_ms, seq_n = excluded.seq_n
WHERE excluded.seq_ms IS NULL OR points.seq_ms IS NULL
   OR (excluded.seq_ms, excluded.seq_n) >= (points.seq_ms, points.seq_n)
"""
_NEWEST_FIRST = " ORDER BY name, step, seq_ms DESC NULLS FIRST, seq_n DESC NULLS FIRST, {} DESC"
_UNNEST = (
    f"INSERT INTO points (run, {POINT_COLS}) SELECT {{}}%s, {POINT_COLS}"
    " FROM unnest(%s::int4[], %s::int8[], %s::float8[], %s::int8[], %s::text[], %s::int8[],"
    f" %s::int8[], %s::int8[]) WITH ORDINALITY AS u({POINT_COLS}, ord)")
STAGE = ("CREATE TEMP TABLE IF NOT EXISTS stage (name int4, step int8, value float8, ival int8,"
          " big text, time int8, seq_ms int8, seq_n int8) ON COMMIT DELETE ROWS")
_FROMSTAGE = f"INSERT INTO points (run, {POINT_COLS}) SELECT {{}}%s, {POINT_COLS} FROM stage"
_DISTINCT = "DISTINCT ON (name, step) "
INGEST = {  # (the common batch: every key once, the batch that names a key twice)
    "copy": (_FROMSTAGE.format("") + _UPSERT_TAIL,
             _FROMSTAGE.format(_DISTINCT) + _NEWEST_FIRST.format("ctid") + _UPSERT_TAIL),
    "unnest": (_UNNEST.format("") + _UPSERT_TAIL,
               _UNNEST.format(_DISTINCT) + _NEWEST_FIRST.format("ord") + _UPSERT_TAIL),
}
UPSERT_MEMBER = f"""
INSERT INTO members (run, member, updated_at, {", ".join(MEMBER_FIELDS)})
VALUES (%s, %s, %s, {", ".join("%s" for _ in MEMBER_FIELDS)})
ON CONFLICT (run, member) DO UPDATE SET updated_at = excluded.updated_at,
    {", ".join(f"{f} = coalesce(excluded.{f}, members.{f})" for f in MEMBER_FIELDS)}
"""
UPSERT_LEDGER = """
INSERT INTO rank_ledger (run, slot, rank, stored, dead, last_step, last_time, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run, slot) DO UPDATE SET
    stored = excluded.stored, dead = excluded.dead,
    last_step = coalesce(excluded.last_step, rank_ledger.last_step),
    last_time = coalesce(excluded.last_time, rank_ledger.last_time),
    updated_at = excluded.updated_at
"""
RUN_COLUMNS = "id, project, external_id, name, status, config, tags, created_at, updated_at"
POINT_OUT = "step, value, ival, big, time"
RETRIED = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def stored(rows: list[tuple[Any, ...]]) -> list[tuple[int, Stored, int]]:
    """``(step, value, ival, big, time)`` rows as the SQLite store returns them."""
    return [(r[0], _load(r[1:4]), r[4]) for r in rows]


def split(values: Sequence[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """Per value: float8 (floats; None, i.e. NaN, as NaN), int8 (ints) and text (big ints)."""
    floats = [v if type(v) is float else None for v in values]
    ints = [v if type(v) is int else None for v in values]
    bigs: list[Any] = [None] * len(values)
    for i, v in enumerate(values):
        if v is None:
            floats[i] = float("nan")
        elif type(v) is str:
            bigs[i] = v
    return floats, ints, bigs


def _load(row: Sequence[Any]) -> Stored:
    v, i, b = row[0], row[1], row[2]
    return i if i is not None else b if b is not None else None if v is None or isnan(v) else v


_NUMBER = "coalesce(value, ival::float8)"
DIALECT = Dialect(value="value, ival, big", load=_load, number=_NUMBER,
                  finite=f"{_NUMBER} BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308",
                  text_order=' COLLATE "C"')
"""``_store_extra``'s SQL in PostgreSQL: NaN sorts above every float8, so the BETWEEN of
``finite`` leaves out NaN, ±inf and NULL (a big int) alike."""


class Qmark:
    """A psycopg connection that takes the SQLite store's ``?`` placeholders, so the SQL of
    ``_store_extra`` serves both stores (none of it holds a literal ``?`` or ``%``)."""

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.db.execute(sql.replace("?", "%s"), args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.db.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


class Pool:
    """At most ``size`` autocommit connections, made on demand; a broken one is dropped."""

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        self._slots.acquire()
        try:
            try:
                db = self._idle.get_nowait()
            except queue.Empty:
                db = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
                with self._lock:
                    self._all.append(db)
            try:
                yield db
            finally:
                if db.closed or db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    db.close()
                    with self._lock:
                        self._all.remove(db)
                else:
                    self._idle.put(db)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()


M4 = f"""
WITH b AS (
    SELECT step, coalesce(value, ival::float8, big::float8) AS v,
           (step - %(origin)s) / %(width)s AS bucket,
           nullif(coalesce(value, ival::float8, big::float8), 'NaN') AS n
    FROM points WHERE run = %(run)s AND name = %(name)s AND step BETWEEN %(low)s AND %(high)s
), picks AS (
    SELECT DISTINCT unnest(ARRAY[min(step), max(step),
        (array_agg(step ORDER BY v, step))[1],
        (array_agg(step ORDER BY coalesce(n, 'Infinity') DESC, step))[1]]) AS s
    FROM b GROUP BY bucket
)
SELECT {POINT_OUT} FROM points
WHERE run = %(run)s AND name = %(name)s AND step IN (SELECT s FROM picks) ORDER BY step
"""
