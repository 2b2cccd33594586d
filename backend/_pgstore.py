"""Runs, members, ledger and points in PostgreSQL (psycopg 3): ``PLUTO_DB_URL=postgresql://``.

The same interface as the SQLite :class:`~backend._store.Store` (a test holds the two to it),
built for several backend processes on one database:

* Every write is one short transaction on a pooled connection; nothing is cached that another
  replica could change (only interned name ids, which never change, and "this run exists",
  since runs are never deleted).
* Creates race through the UNIQUE ``(project, external_id)``: ``INSERT … ON CONFLICT DO
  NOTHING RETURNING id``, and the loser ``SELECT``\\ s the winner's id, so two replicas given
  the same create at the same moment answer one id. Config merges lock the run row
  (``SELECT … FOR UPDATE``), so concurrent merges on two replicas both land.
* Points are upserted by ``(run, name, step)``; the ``WHERE`` of ``ON CONFLICT DO UPDATE`` is
  evaluated against the newest committed row version, which PostgreSQL locks first, so "newest
  stream entry (seq) wins" holds under concurrency. A batch that names one key twice (which
  ``ON CONFLICT`` refuses, rarely: a rank logging one step twice) is written again from a
  savepoint with ``DISTINCT ON``, keeping the line with the highest seq (a line without seq
  counts as newest, ties go to the later line). Two transactions over overlapping keys (a
  redelivery racing its original) may deadlock: PostgreSQL aborts one and it is retried.
* Ingest is binary ``COPY`` into a temporary table, then ``INSERT … SELECT … ON CONFLICT``:
  measured about twice as fast here as one ``INSERT … SELECT FROM unnest(arrays) ON
  CONFLICT`` (``bench/pg_ingest.py``; README "Deploying at scale"), which stays available as
  ``ingest="unnest"`` for re-measuring.
* Values: ``value`` float8 for floats (NaN and ±inf native), ``ival`` int8 for ints,
  ``big`` text for ints beyond 64 bits; read back as the SQLite store's ``Stored`` (None for
  NaN, decimal text for big ints), so the routes see no difference.
* ``runs.updated_at`` is raised after a batch commits, in its own statement, so concurrent
  batches of one run never queue on the run row (and a reader keyed on it sees the points).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain, repeat
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors

from . import _json, _rows
from ._pgsql import (
    DIALECT,
    INGEST,
    M4,
    PG_TYPES,
    POINT_COLS,
    POINT_OUT,
    RETRIED,
    RUN_COLUMNS,
    STAGE,
    UPSERT_LEDGER,
    UPSERT_MEMBER,
    Pool,
    Qmark,
    split,
    stored,
)
from ._rows import MEMBER_FIELDS, RANK_FIELDS
from ._schema import pg_migrate
from ._store import INT64_MAX, INT64_MIN, Entry, Stored, Unstorable, _in_range, now_ms

T = TypeVar("T")


class PgStore:
    """The backend's database in PostgreSQL. Thread-safe; one per process, ``close()`` it."""

    dialect = DIALECT  # console logs, data, files and the read API: ``_store_extra``

    def __init__(self, url: str, pool_size: int = 8, ingest: str = "copy") -> None:
        if ingest not in ("unnest", "copy"):
            raise ValueError("ingest must be 'unnest' or 'copy'")
        self.url, self.ingest = url, ingest
        self._pool = Pool(url, pool_size)
        with self._pool.conn() as db:
            pg_migrate(db)
        self._names: dict[str, int] = {}
        self._lock = threading.Lock()
        self._run_metrics: set[tuple[int, int]] = set()
        self._runs: set[int] = set()

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _db(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; text PostgreSQL cannot hold (NUL) is the caller's 400."""
        with self._pool.conn() as db:
            try:
                yield db
            except pg_errors.UntranslatableCharacter as exc:
                raise Unstorable(f"text PostgreSQL cannot store: {exc}") from None
            except pg_errors.ProgramLimitExceeded as exc:  # a key too long for its index
                raise Unstorable(f"a value too long for PostgreSQL: {exc}") from None
            except psycopg.DataError as exc:
                if "NUL" in str(exc):
                    raise Unstorable("text holds a NUL character, which PostgreSQL cannot "
                                     "store") from None
                raise

    @contextmanager
    def _read(self) -> Iterator[Qmark]:
        with self._db() as db:
            yield Qmark(db)

    @contextmanager
    def _write(self) -> Iterator[Qmark]:
        """One transaction, for ``_store_extra`` (which writes with the SQLite store's SQL)."""
        with self._db() as db, db.transaction():
            yield Qmark(db)

    def _transaction(self, body: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``body`` in one transaction, retried when PostgreSQL chose it as a deadlock victim."""
        for attempt in range(5):
            with self._db() as db:
                try:
                    with db.transaction():
                        return body(db)
                except RETRIED:
                    if attempt == 4:
                        raise
        raise AssertionError("unreachable")

    def _rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        with self._db() as db:
            return db.execute(sql, args).fetchall()

    def _touch(self, db: psycopg.Connection[Any], run: int, now: int | None = None) -> None:
        db.execute("UPDATE runs SET updated_at = greatest(updated_at, %s) WHERE id = %s",
                   (now or now_ms(), run))

    # -- runs ----------------------------------------------------------------------------------

    def create_run(self, project: str, external_id: str | None, name: str,
                   config: dict[str, Any] | None, tags: list[str] | None,
                   tenant: str = "") -> tuple[int, bool]:
        """``(id, resumed)``; the UNIQUE constraint elects one creator across replicas; a
        project of another tenant is refused (see ``Store.create_run``)."""
        now = now_ms()

        def create(db: psycopg.Connection[Any]) -> tuple[int, bool]:
            db.execute("INSERT INTO project_tenants (project, tenant) VALUES (%s, %s)"
                       " ON CONFLICT DO NOTHING", (project, tenant))
            if self._tenant(db, project) != tenant:
                raise _rows.ForeignProject(project)
            row = db.execute(
                "INSERT INTO runs (project, external_id, name, status, config, tags, created_at,"
                " updated_at) VALUES (%s, %s, %s, 'RUNNING', %s, %s, %s, %s)"
                " ON CONFLICT (project, external_id) DO NOTHING RETURNING id",
                (project, external_id, name, _rows.merged_config(0, "{}", config),
                 _json.dumps(tags or []), now, now)).fetchone()
            if row is not None:
                return int(row[0]), False
            found: Any = db.execute("SELECT id, config FROM runs WHERE project = %s AND "
                                  "external_id = %s FOR UPDATE", (project, external_id)).fetchone()
            run, old = found
            if config:
                db.execute("UPDATE runs SET config = %s, updated_at = %s WHERE id = %s",
                           (_rows.merged_config(run, old, config), now, run))
            return int(run), True

        run, resumed = self._transaction(create)
        self._runs.add(run)
        return run, resumed

    def tenant_of(self, project: str) -> str:
        """The tenant the project belongs to (``''``: the default one, or no such project)."""
        with self._db() as db:
            return self._tenant(db, project)

    @staticmethod
    def _tenant(db: psycopg.Connection[Any], project: str) -> str:
        row = db.execute("SELECT tenant FROM project_tenants WHERE project = %s",
                         (project,)).fetchone()
        return "" if row is None else str(row[0])

    def find_run(self, project: str, external_id: str) -> int | None:
        rows = self._rows("SELECT id FROM runs WHERE project = %s AND external_id = %s",
                          (project, external_id))
        return int(rows[0][0]) if rows else None

    def run_exists(self, run: int) -> bool:
        if run in self._runs:
            return True
        if not _in_range(run):
            return False
        found = bool(self._rows("SELECT 1 FROM runs WHERE id = %s", (run,)))
        if found:
            self._runs.add(run)  # runs are never deleted
        return found

    def status(self, run: int) -> str | None:
        if not _in_range(run):
            return None
        rows = self._rows("SELECT status FROM runs WHERE id = %s", (run,))
        return str(rows[0][0]) if rows else None

    def _update(self, sql: str, args: Sequence[Any]) -> bool:
        with self._db() as db:
            return db.execute(sql, args).rowcount == 1

    def set_status(self, run: int, status: str) -> bool:
        return _in_range(run) and self._update(
            "UPDATE runs SET status = %s, updated_at = %s WHERE id = %s", (status, now_ms(), run))

    def merge_config(self, run: int, config: dict[str, Any] | None) -> bool:
        if not _in_range(run):
            return False

        def merge(db: psycopg.Connection[Any]) -> bool:
            row = db.execute("SELECT config FROM runs WHERE id = %s FOR UPDATE", (run,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE runs SET config = %s, updated_at = %s WHERE id = %s",
                       (_rows.merged_config(run, row[0], config), now_ms(), run))
            return True

        return self._transaction(merge)

    def set_tags(self, run: int, tags: list[str]) -> bool:
        return _in_range(run) and self._update(
            "UPDATE runs SET tags = %s, updated_at = %s WHERE id = %s",
            (_json.dumps(tags), now_ms(), run))

    def _upsert(self, run: int, sql: str, rows: list[tuple[Any, ...]]) -> bool:
        if not _in_range(run) or not self.run_exists(run):
            return False
        rows.sort(key=lambda r: r[1])  # one lock order across replicas

        def upsert(db: psycopg.Connection[Any]) -> None:
            with db.cursor() as cur:
                cur.executemany(sql, rows)

        self._transaction(upsert)
        with self._db() as db:
            self._touch(db, run)
        return True

    def upsert_members(self, run: int, members: Sequence[dict[str, Any]]) -> bool:
        """Insert or update members by ``(run, member)``; a field given as None is kept."""
        now = now_ms()
        return self._upsert(run, UPSERT_MEMBER, [
            (run, m["member"], now, *(m.get(f) for f in MEMBER_FIELDS[:-1]),
             None if m.get("drops") is None else _json.dumps(m["drops"])) for m in members])

    def upsert_ledger(self, run: int, ranks: Sequence[dict[str, Any]]) -> bool:
        """The worker's per-rank counts by ``(run, rank)``; None keeps last_step/last_time."""
        now = now_ms()
        return self._upsert(run, UPSERT_LEDGER, [
            (run, "?" if r.get("rank") is None else str(r["rank"]), r.get("rank"), r["stored"],
             r["dead"], r.get("last_step"), r.get("last_time"), now) for r in ranks])

    def get_run(self, run: int) -> dict[str, Any] | None:
        """The run with members, per-rank ledger and loss summary (see ``Store.get_run``)."""
        if not _in_range(run):
            return None
        with self._db() as db, db.transaction():  # one snapshot for the three reads
            row = db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = %s", (run,)).fetchone()
            if row is None:
                return None
            members = db.execute(
                f"SELECT member, {', '.join(MEMBER_FIELDS)} FROM members WHERE run = %s"
                ' ORDER BY rank NULLS FIRST, member COLLATE "C"', (run,)).fetchall()
            ranks = db.execute(
                f"SELECT {', '.join(RANK_FIELDS)} FROM rank_ledger WHERE run = %s"
                " ORDER BY rank NULLS LAST", (run,)).fetchall()
        return _rows.run_with_ledger(run, row, members, ranks)

    def count_by_status(self) -> dict[str, int]:
        """Runs per status, for the ``pluto_backend_runs`` gauge."""
        return {str(s): int(n) for s, n in self._rows(
            "SELECT status, count(*) FROM runs GROUP BY status")}

    def list_runs(self, project: str | None) -> list[dict[str, Any]]:
        """Runs newest first with their member count and ``lost`` (see ``Store.list_runs``)."""
        where, args = ("", ()) if project is None else (" WHERE r.project = %s", (project,))
        with self._db() as db, db.transaction():
            rows = db.execute(f"SELECT {RUN_COLUMNS} FROM runs r{where} ORDER BY id DESC",
                              args).fetchall()
            members = db.execute("SELECT m.run, m.sent, m.dropped, m.drops FROM members m "
                                 "JOIN runs r "
                                 f"ON r.id = m.run{where}", args).fetchall()
            ranks = db.execute("SELECT l.run, l.stored, l.dead FROM rank_ledger l JOIN runs r "
                               f"ON r.id = l.run{where}", args).fetchall()
        return _rows.listed(rows, members, ranks)

    # -- metrics -------------------------------------------------------------------------------

    def _intern(self, names: Sequence[str]) -> dict[str, int]:
        """Ids of ``names``, inserting the new ones in a transaction of their own (in sorted
        order, so replicas interning the same new names cannot deadlock)."""
        known = self._names
        missing = sorted(set(names) - known.keys())
        if missing:
            with self._db() as db:
                db.execute("INSERT INTO names (name) SELECT unnest(%s::text[]) ORDER BY 1"
                           " ON CONFLICT (name) DO NOTHING", (missing,))
                found = db.execute("SELECT name, id FROM names WHERE name = ANY(%s::text[])",
                                   (missing,)).fetchall()
            with self._lock:
                known.update(found)
        return known

    def _write_cols(self, run: int, cols: list[list[Any]], name_ids: set[int]) -> int:
        """Upsert the point columns (``POINT_COLS`` order) of one run in one transaction."""
        n = len(cols[0])
        if not n:
            return 0
        new = sorted({(run, i) for i in name_ids} - self._run_metrics)

        plain, dedupe = INGEST[self.ingest]
        args = (run, *cols) if self.ingest == "unnest" else (run,)

        def write(db: psycopg.Connection[Any]) -> None:
            with db.cursor() as cur:
                if self.ingest == "copy":
                    cur.execute(STAGE)
                    with cur.copy(f"COPY stage ({POINT_COLS}) FROM STDIN (FORMAT BINARY)") as cp:
                        cp.set_types(PG_TYPES)
                        for row in zip(*cols):
                            cp.write_row(row)
                try:
                    with db.transaction():  # a savepoint: the staged rows survive a retry
                        cur.execute(plain, args, binary=True)
                except pg_errors.CardinalityViolation:  # the batch names a key twice
                    cur.execute(dedupe, args, binary=True)
                if new:
                    cur.execute("INSERT INTO run_metrics (run, name) SELECT %s, unnest(%s::int4[])"
                                " ON CONFLICT DO NOTHING", (run, [i for _, i in new]))

        self._transaction(write)
        self._run_metrics.update(new)
        with self._db() as db:
            self._touch(db, run)
        return n

    def write_points(self, run: int, entries: Sequence[Entry]) -> int:
        """Upsert every point of ``entries`` in one transaction; returns how many points."""
        ids = self._intern(list({n for e in entries for n in e[4]}))
        cols: list[list[Any]] = [[] for _ in range(8)]
        name_col, step_col, values, time_col, sms_col, sn_col = (
            cols[i] for i in (0, 1, 2, 5, 6, 7))
        for step, time_ms, seq_ms, seq_n, data in entries:
            k = len(data)
            name_col += [ids[n] for n in data]
            values += data.values()
            step_col += [step] * k
            time_col += [time_ms] * k
            sms_col += [seq_ms] * k
            sn_col += [seq_n] * k
        cols[2], cols[3], cols[4] = split(values)
        return self._write_cols(run, cols, set(name_col))

    def write_columns(self, run: int, names: list[str], name_idx: list[int], values: list[Any],
                      counts: list[int], steps: list[int], times: list[int], seq_ms: list[int],
                      seq_n: list[int]) -> int:
        """``write_points`` for a columnar batch; an int beyond 64 bits raises OverflowError."""
        known = self._intern(names)
        ids = [known[n] for n in names]
        ints = [v if type(v) is int else None for v in values]
        if any(v is not None and not INT64_MIN <= v <= INT64_MAX for v in ints):
            raise OverflowError("a value is an integer beyond 64 bits")

        def each(col: list[int]) -> list[int]:
            return list(chain.from_iterable(map(repeat, col, counts)))

        cols: list[list[Any]] = [list(map(ids.__getitem__, name_idx)), each(steps),
                [v if type(v) is float else None for v in values], ints, [None] * len(values),
                each(times), each(seq_ms), each(seq_n)]
        return self._write_cols(run, cols, {ids[i] for i in set(name_idx)})

    def metric_names(self, run: int) -> list[str]:
        if not _in_range(run):
            return []
        return [r[0] for r in self._rows(
            "SELECT n.name FROM run_metrics m JOIN names n ON n.id = m.name WHERE m.run = %s"
            ' ORDER BY n.name COLLATE "C"', (run,))]

    def points(self, run: int, name: str, since_step: int | None = None, last_only: bool = False
               ) -> list[tuple[int, Stored, int]]:
        """``(step, stored value, time_ms)`` by step from ``since_step``; or just the newest."""
        if not _in_range(run) or not _json.encodable(name) or "\x00" in name:
            return []
        since = INT64_MIN if since_step is None else min(max(since_step, INT64_MIN), INT64_MAX)
        order = "DESC LIMIT 1" if last_only else ""
        return stored(self._rows(
            f"SELECT {POINT_OUT} FROM points WHERE run = %s AND step >= %s AND name ="
            f" (SELECT id FROM names WHERE name = %s) ORDER BY step {order}", (run, since, name)))

    # -- dashboard reads (the same as the SQLite store's) ---------------------------------------

    def name_ids(self, names: Sequence[str]) -> dict[str, int]:
        """The interned id of each of ``names`` that was ever stored (unknown ones left out)."""
        found = {n: self._names[n] for n in names if n in self._names}
        missing = [n for n in names if n not in found and "\x00" not in n]
        if missing:
            found.update(self._rows("SELECT name, id FROM names WHERE name = ANY(%s::text[])",
                                    (missing,)))
        return found

    def last_steps(self, runs: Sequence[int]) -> dict[int, int]:
        """The newest step of each of ``runs``: one index seek per (run, metric)."""
        rows = self._rows(
            "SELECT m.run, max((SELECT max(p.step) FROM points p WHERE p.run = m.run AND"
            " p.name = m.name)) FROM run_metrics m WHERE m.run = ANY(%s::int8[]) GROUP BY m.run",
            ([r for r in runs if _in_range(r)],))
        return {run: step for run, step in rows if step is not None}

    def member_counts(self, runs: Sequence[int]) -> dict[int, int]:
        return dict(self._rows("SELECT run, count(*) FROM members WHERE run = ANY(%s::int8[])"
                               " GROUP BY run", ([r for r in runs if _in_range(r)],)))

    def step_span(self, run: int, name_id: int, low: int, high: int) -> tuple[int, int] | None:
        rows = self._rows("SELECT min(step), max(step) FROM points WHERE run = %s AND name = %s"
                          " AND step BETWEEN %s AND %s", (run, name_id, low, high))
        return None if not rows or rows[0][0] is None else (int(rows[0][0]), int(rows[0][1]))

    def points_between(self, run: int, name_id: int, low: int, high: int, limit: int
                       ) -> list[tuple[int, Stored, int]]:
        return stored(self._rows(
            f"SELECT {POINT_OUT} FROM points WHERE run = %s AND name = %s AND step BETWEEN %s"
            " AND %s ORDER BY step LIMIT %s", (run, name_id, low, high, limit)))

    def more_than(self, run: int, name_id: int, low: int, high: int, n: int) -> bool:
        return bool(self._rows(
            "SELECT 1 FROM points WHERE run = %s AND name = %s AND step BETWEEN %s AND %s"
            " ORDER BY step LIMIT 1 OFFSET %s", (run, name_id, low, high, n)))

    def run_version(self, run: int) -> int | None:
        rows = self._rows("SELECT updated_at FROM runs WHERE id = %s", (run,))
        return int(rows[0][0]) if rows else None

    def points_m4(self, run: int, name_id: int, low: int, high: int, width: int
                  ) -> list[tuple[int, Stored, int]]:
        """M4: of each bucket (the multiples of ``width``, as ``Store.points_m4``) its first,
        last, minimum and maximum point (NaN sorts above every number in PostgreSQL, so a
        bucket holding one shows it)."""
        return stored(self._rows(M4, {"run": run, "name": name_id, "low": low, "high": high,
                                        "origin": low - low % width, "width": width}))

