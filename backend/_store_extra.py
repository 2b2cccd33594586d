"""SQL for what the read API (``_query``) and the official SDK's extra uploads need: console
lines, structured data, file records, log names, and the per-run aggregates behind runs
listing, statistics, compare and the leaderboard.

Kept apart from ``_store`` (runs, members, points: the hot path). One SQL text serves both
stores: every function takes the store (SQLite :class:`Store` or PostgreSQL ``PgStore``) and
uses its ``_read()``/``_write()``, which yield a connection taking ``?`` placeholders (the
PostgreSQL store translates them); what the two engines spell differently (how a point's value
is held, "is finite", text order) is the store's :class:`Dialect`. Inputs are
validated by the routes: strings are UTF-8, ints within int64.

Aggregates use finite values only: SQLite holds NaN as NULL (skipped by ``min``/``avg``) and
±inf as REAL, PostgreSQL NaN and ±inf as float8, excluded by ``Dialect.finite``; an int beyond
64 bits (stored as text) is skipped too. ``count`` counts every stored point, ``finite`` only
those aggregated. Text sorts by code point on both (PostgreSQL: ``COLLATE "C"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ._store import Stored, now_ms

_IN_RANGE = "BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308"


@dataclass(frozen=True)
class Dialect:
    """What the SQL of this module spells differently per engine."""

    value: str
    """The columns holding a point's value, as selected (one in SQLite, three in PostgreSQL)."""
    load: Callable[[Sequence[Any]], Stored]
    """Those columns of a row (from its start) as the ``Stored`` value the routes read."""
    number: str
    """A point's value as a number to aggregate (NULL where it has none)."""
    finite: str
    """The condition "the point's value is a finite number"."""
    text_order: str
    """Appended to a text column in ORDER BY so both engines sort by code point."""


SQLITE = Dialect(value="value", load=lambda row: row[0], number="value",
                 finite=f"typeof(value) IN ('integer', 'real') AND value {_IN_RANGE}",
                 text_order="")


class SqlStore(Protocol):
    """A store this module can work on: both stores' transaction helpers (and, on a store
    other than SQLite's, a ``dialect`` attribute)."""

    def _read(self) -> AbstractContextManager[Any]: ...

    def _write(self) -> AbstractContextManager[Any]: ...


def _dialect(store: Any) -> Dialect:
    return getattr(store, "dialect", SQLITE)  # the SQLite Store predates dialects (and
    # cannot import this module, which imports it)

LogLine = tuple[int | None, int, int, str, int | None, str]
"""``(rank, time_ms, line_number, log_type, step, message)``."""

DataItem = tuple[str, str, int, int, str]
"""``(log_name, data_type, step, time_ms, data text)``."""


def digest(text: str) -> bytes:
    """16 bytes identifying ``text``, so a resent line is recognised without indexing it."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# -- console logs ------------------------------------------------------------------------------

def write_logs(store: SqlStore, run: int, lines: Sequence[LogLine]) -> int:
    """Insert console lines; a line already stored (same rank, time, number, type and text)
    is not stored twice. Returns how many lines were given (resent ones included)."""
    rows = [(run, "?" if rank is None else str(rank), rank, t, n, kind, step, msg, digest(msg))
            for rank, t, n, kind, step, msg in lines]
    with store._write() as db:
        db.executemany(
            "INSERT INTO console_logs (run, slot, rank, time, line_number, log_type, step,"
            " message, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
        db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
    return len(rows)


def read_logs(store: SqlStore, run: int, log_type: str | None, rank: int | None, limit: int,
              offset: int = 0, after_id: int | None = None) -> list[tuple[Any, ...]]:
    """``(id, rank, time, line_number, log_type, step, message)`` in arrival order."""
    where, args = ["run = ?"], list[Any]([run])
    if log_type is not None:
        where.append("upper(log_type) = upper(?)")
        args.append(log_type)
    if rank is not None:
        where.append("rank = ?")
        args.append(rank)
    if after_id is not None:
        where.append("id > ?")
        args.append(after_id)
    with store._read() as db:
        return db.execute(
            "SELECT id, rank, time, line_number, log_type, step, message FROM console_logs "
            f"WHERE {' AND '.join(where)} ORDER BY time, id LIMIT ? OFFSET ?",
            (*args, limit, offset)).fetchall()


def page_logs(store: SqlStore, run: int, rank: int | None, text: str | None,
              after: int | None, before: int | None, limit: int
              ) -> tuple[list[tuple[Any, ...]], bool]:
    """One page of the dashboard's console view: ``(rows, more)``, rows ``(id, rank, time,
    line_number, log_type, step, message)`` by id (arrival order, a stable cursor). With
    ``after``: the oldest ``limit`` lines past it (live polling; ``more``: newer ones remain).
    Else the newest ``limit`` before ``before`` (or the end; ``more``: older ones remain), so
    a long run opens on its tail. ``text``: lines containing it, case folded by the engine's
    ``lower`` on both sides (SQLite folds ASCII only), ``%``/``_``/``\\`` taken literally."""
    where, args = ["run = ?"], list[Any]([run])
    if rank is not None:
        where.append("rank = ?")
        args.append(rank)
    if text:
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("lower(message) LIKE lower(?) ESCAPE '\\'")
        args.append(f"%{pattern}%")
    if after is not None or before is not None:
        where.append("id > ?" if after is not None else "id < ?")
        args.append(after if after is not None else before)
    order = "id" if after is not None else "id DESC"
    with store._read() as db:
        rows = db.execute(
            "SELECT id, rank, time, line_number, log_type, step, message FROM console_logs "
            f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?", (*args, limit + 1)
        ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return (rows if after is not None else rows[::-1]), more


# -- structured data (histograms, tables, graphs, string series) ---------------------------------

def write_data(store: SqlStore, run: int, items: Sequence[DataItem]) -> int:
    rows = [(run, name, kind, step, t, text, digest(text)) for name, kind, step, t, text in items]
    with store._write() as db:
        db.executemany(
            "INSERT INTO run_data (run, log_name, data_type, step, time, data, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
        db.executemany("INSERT INTO log_names (run, log_name, log_type) VALUES (?, ?, ?)"
                       " ON CONFLICT DO NOTHING", sorted({(run, r[1], r[2]) for r in rows}))
        db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
    return len(rows)


def read_data(store: SqlStore, run: int, log_name: str | None, data_type: str | None,
              limit: int, offset: int) -> list[tuple[Any, ...]]:
    """``(log_name, data_type, step, time, data text)`` by name, step, arrival."""
    where, args = ["run = ?"], list[Any]([run])
    if log_name is not None:
        where.append("log_name = ?")
        args.append(log_name)
    if data_type is not None:
        where.append("upper(data_type) = upper(?)")
        args.append(data_type)
    order = _dialect(store).text_order
    with store._read() as db:
        return db.execute(
            "SELECT log_name, data_type, step, time, data FROM run_data "
            f"WHERE {' AND '.join(where)} ORDER BY log_name{order}, step, id LIMIT ? OFFSET ?",
            (*args, limit, offset)).fetchall()


# -- log names ---------------------------------------------------------------------------------

def add_log_names(store: SqlStore, run: int, names: Iterable[tuple[str, str]]) -> None:
    rows = [(run, n, kind) for n, kind in names]
    with store._write() as db:
        db.executemany("INSERT INTO log_names (run, log_name, log_type) VALUES (?, ?, ?)"
                       " ON CONFLICT (run, log_name) DO UPDATE SET log_type = excluded.log_type",
                       sorted(rows))


def log_names(store: SqlStore, run: int) -> list[tuple[str, str]]:
    """``(name, type)``: the run's metrics (``METRIC``) and every other registered name."""
    with store._read() as db:
        rows = db.execute(
            "SELECT n.name, 'METRIC' FROM run_metrics m JOIN names n ON n.id = m.name "
            "WHERE m.run = ? UNION SELECT log_name, log_type FROM log_names WHERE run = ? "
            "UNION SELECT log_name, 'FILE' FROM run_files WHERE run = ? AND uploaded_at "
            "IS NOT NULL", (run, run, run)).fetchall()
    return sorted(dict(sorted(rows)).items())


# -- files -------------------------------------------------------------------------------------

FILE_COLUMNS = ("id", "log_name", "file_name", "file_type", "step", "sample_index", "time",
                "caption", "declared", "size", "uploaded_at")


def add_file(store: SqlStore, run: int, log_name: str, file_name: str, file_type: str, step: int,
             sample_index: int, time_ms: int, caption: str | None, declared: int | None) -> int:
    """The id of the file row for this place (created, or reused by a repeated presign)."""
    with store._write() as db:
        db.execute(
            "INSERT INTO run_files (run, log_name, file_name, file_type, step, sample_index,"
            " time, caption, declared) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run,"
            " log_name, step, sample_index, file_name) DO UPDATE SET file_type ="
            " excluded.file_type, time = excluded.time, caption = excluded.caption,"
            " declared = excluded.declared",
            (run, log_name, file_name, file_type, step, sample_index, time_ms, caption,
             declared))
        row = db.execute("SELECT id FROM run_files WHERE run = ? AND log_name = ? AND step = ?"
                         " AND sample_index = ? AND file_name = ?",
                         (run, log_name, step, sample_index, file_name)).fetchone()
    return int(row[0])


def file_uploaded(store: SqlStore, run: int, file_id: int, size: int) -> bool:
    with store._write() as db:
        return db.execute("UPDATE run_files SET size = ?, uploaded_at = ? WHERE id = ? AND "
                          "run = ?", (size, now_ms(), file_id, run)).rowcount == 1


def get_file(store: SqlStore, run: int, file_id: int) -> dict[str, Any] | None:
    with store._read() as db:
        row = db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM run_files WHERE id = ? AND "
                         "run = ?", (file_id, run)).fetchone()
    return None if row is None else dict(zip(FILE_COLUMNS, row))


def list_files(store: SqlStore, run: int, name: str | None) -> list[dict[str, Any]]:
    """Uploaded files of ``run`` (by log name, step, sample), optionally those whose log name
    or file name is ``name``."""
    where, args = "run = ? AND uploaded_at IS NOT NULL", list[Any]([run])
    if name is not None:
        where += " AND (log_name = ? OR file_name = ?)"
        args += [name, name]
    order = _dialect(store).text_order
    with store._read() as db:
        rows = db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM run_files WHERE {where} "
                          f"ORDER BY log_name{order}, step, sample_index, id", args).fetchall()
    return [dict(zip(FILE_COLUMNS, r)) for r in rows]


# -- runs and metrics, for the read API --------------------------------------------------------

RUN_COLUMNS = "id, project, external_id, name, status, config, tags, created_at, updated_at"


def project_runs(store: SqlStore, project: str) -> list[tuple[Any, ...]]:
    """Every run row of ``project``, oldest first (the order display ids count in)."""
    with store._read() as db:
        return db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE project = ? ORDER BY id",
                          (project,)).fetchall()


def projects(store: SqlStore) -> list[tuple[str, int, int, int, int]]:
    """``(name, first run id, run count, first created, last updated)`` by name."""
    order = _dialect(store).text_order
    with store._read() as db:
        return db.execute("SELECT project, min(id), count(*), min(created_at), max(updated_at)"
                          f" FROM runs GROUP BY project ORDER BY project{order}").fetchall()


def run_row(store: SqlStore, run: int) -> tuple[Any, ...] | None:
    with store._read() as db:
        return db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run,)).fetchone()


def ordinal(store: SqlStore, project: str, run: int) -> int:
    """The run's position (1-based) among its project's runs by id: its display number."""
    with store._read() as db:
        return int(db.execute("SELECT count(*) FROM runs WHERE project = ? AND id <= ?",
                              (project, run)).fetchone()[0])


def nth_run(store: SqlStore, project: str, n: int) -> int | None:
    with store._read() as db:
        row = db.execute("SELECT id FROM runs WHERE project = ? ORDER BY id LIMIT 1 OFFSET ?",
                         (project, n - 1)).fetchone()
    return None if row is None else int(row[0])


def _name_id(db: Any, name: str) -> int | None:
    row = db.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def _last(db: Any, d: Dialect, run: int, nid: int) -> list[Any] | None:
    """The stored value at the highest step of metric ``nid`` of ``run``, in a list (None:
    the run has no such point)."""
    row = db.execute(f"SELECT {d.value} FROM points WHERE run = ? AND name = ? ORDER BY step "
                     "DESC LIMIT 1", (run, nid)).fetchone()
    return None if row is None else [d.load(row)]


def last_values(store: SqlStore, runs: Sequence[int], name: str) -> dict[int, Stored]:
    """The value at the highest step of metric ``name`` for each run that has it."""
    d = _dialect(store)
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return {}
        got = {run: _last(db, d, run, nid) for run in runs}
    return {run: v[0] for run, v in got.items() if v is not None}


def metric_names(store: SqlStore, runs: Sequence[int], search: str | None,
                 limit: int) -> list[str]:
    """Distinct metric names of ``runs``, sorted, containing ``search`` case-insensitively
    (Unicode case folding, done here: SQLite's ``lower`` folds ASCII only; sorted here too,
    as ``DISTINCT`` in PostgreSQL cannot order by a collation it did not select)."""
    if not runs:
        return []
    marks = ", ".join("?" for _ in runs)
    with store._read() as db:
        rows = db.execute(f"SELECT DISTINCT n.name FROM run_metrics m JOIN names n ON n.id = "
                          f"m.name WHERE m.run IN ({marks})", list(runs)).fetchall()
    needle = (search or "").casefold()
    return sorted(r[0] for r in rows if needle in r[0].casefold())[:limit]


def points_between(store: SqlStore, run: int, name: str, step_min: int | None,
                   step_max: int | None) -> list[tuple[int, Stored, int]]:
    """``(step, stored value, time)`` of one metric from ``step_min`` to ``step_max``."""
    lo = -(2**63) if step_min is None else step_min
    hi = 2**63 - 1 if step_max is None else step_max
    d = _dialect(store)
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return []
        rows = db.execute(f"SELECT step, time, {d.value} FROM points WHERE run = ? AND name = ?"
                          " AND step BETWEEN ? AND ? ORDER BY step", (run, nid, lo, hi))
        return [(r[0], d.load(r[2:]), r[1]) for r in rows.fetchall()]


STAT_FIELDS = ("count", "finite", "min", "max", "mean", "variance", "firstStep", "lastStep")


def statistics(store: SqlStore, run: int, name: str) -> dict[str, Any] | None:
    """Counts, min, max, mean and population variance of one metric (finite values)."""
    d = _dialect(store)
    number, finite = d.number, d.finite
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return None
        row = db.execute(
            f"SELECT count(*), count(CASE WHEN {finite} THEN 1 END), "
            f"min(CASE WHEN {finite} THEN {number} END), "
            f"max(CASE WHEN {finite} THEN {number} END), "
            f"avg(CASE WHEN {finite} THEN {number} END), min(step), max(step) FROM points "
            "WHERE run = ? AND name = ?", (run, nid)).fetchone()
        if not row[0]:
            return None
        mean = row[4]
        variance = None
        if mean is not None:
            variance = db.execute(
                f"SELECT avg(({number} - ?) * ({number} - ?)) FROM points WHERE run = ? AND "
                f"name = ? AND {finite}", (mean, mean, run, nid)).fetchone()[0]
    return dict(zip(STAT_FIELDS, (*row[:5], variance, *row[5:])))


def outliers(store: SqlStore, run: int, name: str, mean: float, bound: float,
             limit: int) -> list[tuple[int, Stored]]:
    """Up to ``limit`` ``(step, value)`` farthest from ``mean``, beyond ``bound``."""
    d = _dialect(store)
    with store._read() as db:
        nid = _name_id(db, name)
        rows = db.execute(
            f"SELECT step, {d.value} FROM points WHERE run = ? AND name = ? AND {d.finite} AND "
            f"abs({d.number} - ?) > ? ORDER BY abs({d.number} - ?) DESC, step LIMIT ?",
            (run, nid, mean, bound, mean, limit)).fetchall()
    return [(r[0], d.load(r[1:])) for r in rows]


_AGGREGATES = {"MIN": "min({0})", "MAX": "max({0})", "AVG": "avg({0})",
               "VARIANCE": "avg({0} * {0}) - avg({0}) * avg({0})"}


def aggregate(store: SqlStore, project: str, name: str, how: str) -> dict[int, Stored]:
    """Run id -> ``how`` (MIN, MAX, AVG, VARIANCE, LAST) of metric ``name`` over the
    project's runs that have a finite value of it (LAST: the value at the last step)."""
    d = _dialect(store)
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return {}
        if how == "LAST":
            runs = [r[0] for r in db.execute(
                "SELECT r.id FROM runs r JOIN run_metrics m ON m.run = r.id WHERE r.project = ?"
                " AND m.name = ?", (project, nid)).fetchall()]
            got = {run: _last(db, d, run, nid) for run in runs}
            return {run: v[0] for run, v in got.items() if v is not None}
        return dict(db.execute(
            f"SELECT p.run, {_AGGREGATES[how].format(d.number)} FROM points p JOIN runs r ON "
            f"r.id = p.run WHERE r.project = ? AND p.name = ? AND {d.finite} GROUP BY p.run",
            (project, nid)).fetchall())
