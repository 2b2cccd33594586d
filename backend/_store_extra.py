"""SQL for what the read API (``_query``) and the official SDK's extra uploads need: console
lines, structured data, file records, log names, and the per-run aggregates behind runs
listing, statistics, compare and the leaderboard.

Kept apart from ``_store`` (runs, members, points: the hot path) so a second store (say
PostgreSQL) can port it on its own; every function takes the :class:`Store` and uses its
transaction helpers. Inputs are validated by the routes: strings are UTF-8, ints within int64.

Aggregates use finite values only: SQLite holds NaN as NULL (skipped by ``min``/``avg``) and
±inf as REAL, excluded by :data:`_FINITE`; an int beyond 64 bits (stored as TEXT) is skipped
too. ``count`` counts every stored point, ``finite`` only those aggregated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from ._store import Store, Stored, now_ms

_FINITE = "typeof(value) IN ('integer', 'real') AND value BETWEEN -1.7976931348623157e308 " \
          "AND 1.7976931348623157e308"

LogLine = tuple[int | None, int, int, str, int | None, str]
"""``(rank, time_ms, line_number, log_type, step, message)``."""

DataItem = tuple[str, str, int, int, str]
"""``(log_name, data_type, step, time_ms, data text)``."""


def digest(text: str) -> bytes:
    """16 bytes identifying ``text``, so a resent line is recognised without indexing it."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# -- console logs ------------------------------------------------------------------------------

def write_logs(store: Store, run: int, lines: Sequence[LogLine]) -> int:
    """Insert console lines; a line already stored (same rank, time, number, type and text)
    is not stored twice. Returns how many lines were given (resent ones included)."""
    rows = [(run, "?" if rank is None else str(rank), rank, t, n, kind, step, msg, digest(msg))
            for rank, t, n, kind, step, msg in lines]
    with store._write() as db:
        db.executemany(
            "INSERT OR IGNORE INTO console_logs (run, slot, rank, time, line_number, log_type,"
            " step, message, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
    return len(rows)


def read_logs(store: Store, run: int, log_type: str | None, rank: int | None, limit: int,
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


# -- structured data (histograms, tables, graphs, string series) ---------------------------------

def write_data(store: Store, run: int, items: Sequence[DataItem]) -> int:
    rows = [(run, name, kind, step, t, text, digest(text)) for name, kind, step, t, text in items]
    with store._write() as db:
        db.executemany(
            "INSERT OR IGNORE INTO run_data (run, log_name, data_type, step, time, data, digest)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT OR IGNORE INTO log_names (run, log_name, log_type) "
                       "VALUES (?, ?, ?)", sorted({(run, r[1], r[2]) for r in rows}))
        db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
    return len(rows)


def read_data(store: Store, run: int, log_name: str | None, data_type: str | None,
              limit: int, offset: int) -> list[tuple[Any, ...]]:
    """``(log_name, data_type, step, time, data text)`` by name, step, arrival."""
    where, args = ["run = ?"], list[Any]([run])
    if log_name is not None:
        where.append("log_name = ?")
        args.append(log_name)
    if data_type is not None:
        where.append("upper(data_type) = upper(?)")
        args.append(data_type)
    with store._read() as db:
        return db.execute(
            "SELECT log_name, data_type, step, time, data FROM run_data "
            f"WHERE {' AND '.join(where)} ORDER BY log_name, step, id LIMIT ? OFFSET ?",
            (*args, limit, offset)).fetchall()


# -- log names ---------------------------------------------------------------------------------

def add_log_names(store: Store, run: int, names: Iterable[tuple[str, str]]) -> None:
    rows = [(run, n, kind) for n, kind in names]
    with store._write() as db:
        db.executemany("INSERT OR REPLACE INTO log_names (run, log_name, log_type) "
                       "VALUES (?, ?, ?)", rows)


def log_names(store: Store, run: int) -> list[tuple[str, str]]:
    """``(name, type)``: the run's metrics (``METRIC``) and every other registered name."""
    with store._read() as db:
        rows = db.execute(
            "SELECT n.name, 'METRIC' FROM run_metrics m JOIN names n ON n.id = m.name "
            "WHERE m.run = ? UNION SELECT log_name, log_type FROM log_names WHERE run = ? "
            "UNION SELECT log_name, 'FILE' FROM run_files WHERE run = ? AND uploaded_at "
            "IS NOT NULL ORDER BY 1", (run, run, run)).fetchall()
    return list(dict(rows).items())


# -- files -------------------------------------------------------------------------------------

FILE_COLUMNS = ("id", "log_name", "file_name", "file_type", "step", "sample_index", "time",
                "caption", "declared", "size", "uploaded_at")


def add_file(store: Store, run: int, log_name: str, file_name: str, file_type: str, step: int,
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


def file_uploaded(store: Store, run: int, file_id: int, size: int) -> bool:
    with store._write() as db:
        return db.execute("UPDATE run_files SET size = ?, uploaded_at = ? WHERE id = ? AND "
                          "run = ?", (size, now_ms(), file_id, run)).rowcount == 1


def get_file(store: Store, run: int, file_id: int) -> dict[str, Any] | None:
    with store._read() as db:
        row = db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM run_files WHERE id = ? AND "
                         "run = ?", (file_id, run)).fetchone()
    return None if row is None else dict(zip(FILE_COLUMNS, row))


def list_files(store: Store, run: int, name: str | None) -> list[dict[str, Any]]:
    """Uploaded files of ``run`` (by log name, step, sample), optionally those whose log name
    or file name is ``name``."""
    where, args = "run = ? AND uploaded_at IS NOT NULL", list[Any]([run])
    if name is not None:
        where += " AND (log_name = ? OR file_name = ?)"
        args += [name, name]
    with store._read() as db:
        rows = db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM run_files WHERE {where} "
                          "ORDER BY log_name, step, sample_index, id", args).fetchall()
    return [dict(zip(FILE_COLUMNS, r)) for r in rows]


# -- runs and metrics, for the read API --------------------------------------------------------

RUN_COLUMNS = "id, project, external_id, name, status, config, tags, created_at, updated_at"


def project_runs(store: Store, project: str) -> list[tuple[Any, ...]]:
    """Every run row of ``project``, oldest first (the order display ids count in)."""
    with store._read() as db:
        return db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE project = ? ORDER BY id",
                          (project,)).fetchall()


def projects(store: Store) -> list[tuple[str, int, int, int, int]]:
    """``(name, first run id, run count, first created, last updated)`` by name."""
    with store._read() as db:
        return db.execute("SELECT project, min(id), count(*), min(created_at), max(updated_at)"
                          " FROM runs GROUP BY project ORDER BY project").fetchall()


def run_row(store: Store, run: int) -> tuple[Any, ...] | None:
    with store._read() as db:
        return db.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run,)).fetchone()


def ordinal(store: Store, project: str, run: int) -> int:
    """The run's position (1-based) among its project's runs by id: its display number."""
    with store._read() as db:
        return int(db.execute("SELECT count(*) FROM runs WHERE project = ? AND id <= ?",
                              (project, run)).fetchone()[0])


def nth_run(store: Store, project: str, n: int) -> int | None:
    with store._read() as db:
        row = db.execute("SELECT id FROM runs WHERE project = ? ORDER BY id LIMIT 1 OFFSET ?",
                         (project, n - 1)).fetchone()
    return None if row is None else int(row[0])


def _name_id(db: Any, name: str) -> int | None:
    row = db.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def last_values(store: Store, runs: Sequence[int], name: str) -> dict[int, Stored]:
    """The value at the highest step of metric ``name`` for each run that has it."""
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return {}
        out: dict[int, Stored] = {}
        for run in runs:
            row = db.execute("SELECT value FROM points WHERE run = ? AND name = ? ORDER BY "
                             "step DESC LIMIT 1", (run, nid)).fetchone()
            if row is not None:
                out[run] = row[0]
        return out


def metric_names(store: Store, runs: Sequence[int], search: str | None, limit: int) -> list[str]:
    """Distinct metric names of ``runs``, sorted, containing ``search`` (case-insensitive)."""
    if not runs:
        return []
    marks = ", ".join("?" for _ in runs)
    like, args = "", list[Any](runs)
    if search:
        like = " AND instr(lower(n.name), lower(?)) > 0"
        args.append(search)
    with store._read() as db:
        rows = db.execute(f"SELECT DISTINCT n.name FROM run_metrics m JOIN names n ON n.id = "
                          f"m.name WHERE m.run IN ({marks}){like} ORDER BY n.name LIMIT ?",
                          (*args, limit)).fetchall()
    return [r[0] for r in rows]


def points_between(store: Store, run: int, name: str, step_min: int | None,
                   step_max: int | None) -> list[tuple[int, Stored, int]]:
    """``(step, stored value, time)`` of one metric from ``step_min`` to ``step_max``."""
    lo = -(2**63) if step_min is None else step_min
    hi = 2**63 - 1 if step_max is None else step_max
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return []
        return db.execute("SELECT step, value, time FROM points WHERE run = ? AND name = ? "
                          "AND step BETWEEN ? AND ? ORDER BY step", (run, nid, lo, hi)).fetchall()


STAT_FIELDS = ("count", "finite", "min", "max", "mean", "variance", "firstStep", "lastStep")


def statistics(store: Store, run: int, name: str) -> dict[str, Any] | None:
    """Counts, min, max, mean and population variance of one metric (finite values)."""
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return None
        row = db.execute(
            f"SELECT count(*), count(CASE WHEN {_FINITE} THEN 1 END), "
            f"min(CASE WHEN {_FINITE} THEN value END), max(CASE WHEN {_FINITE} THEN value END), "
            f"avg(CASE WHEN {_FINITE} THEN value END), min(step), max(step) FROM points "
            "WHERE run = ? AND name = ?", (run, nid)).fetchone()
        if not row[0]:
            return None
        mean = row[4]
        variance = None
        if mean is not None:
            variance = db.execute(
                f"SELECT avg((value - ?) * (value - ?)) FROM points WHERE run = ? AND name = ? "
                f"AND {_FINITE}", (mean, mean, run, nid)).fetchone()[0]
    return dict(zip(STAT_FIELDS, (*row[:5], variance, *row[5:])))


def outliers(store: Store, run: int, name: str, mean: float, bound: float,
             limit: int) -> list[tuple[int, Stored]]:
    """Up to ``limit`` ``(step, value)`` farthest from ``mean``, beyond ``bound``."""
    with store._read() as db:
        nid = _name_id(db, name)
        return db.execute(
            f"SELECT step, value FROM points WHERE run = ? AND name = ? AND {_FINITE} AND "
            "abs(value - ?) > ? ORDER BY abs(value - ?) DESC, step LIMIT ?",
            (run, nid, mean, bound, mean, limit)).fetchall()


_AGGREGATES = {"MIN": "min(value)", "MAX": "max(value)", "AVG": "avg(value)",
               "VARIANCE": "avg(value * value) - avg(value) * avg(value)"}


def aggregate(store: Store, project: str, name: str, how: str) -> dict[int, Stored]:
    """Run id -> ``how`` (MIN, MAX, AVG, VARIANCE, LAST) of metric ``name`` over the
    project's runs that have a finite value of it (LAST: the value at the last step)."""
    with store._read() as db:
        nid = _name_id(db, name)
        if nid is None:
            return {}
        if how == "LAST":
            runs = [r[0] for r in db.execute(
                "SELECT r.id FROM runs r JOIN run_metrics m ON m.run = r.id WHERE r.project = ?"
                " AND m.name = ?", (project, nid))]
            rows = []
            for run in runs:
                got = db.execute("SELECT value FROM points WHERE run = ? AND name = ? ORDER BY "
                                 "step DESC LIMIT 1", (run, nid)).fetchone()
                rows.append((run, got[0]))
            return dict(rows)
        return dict(db.execute(
            f"SELECT p.run, {_AGGREGATES[how]} FROM points p JOIN runs r ON r.id = p.run WHERE"
            f" r.project = ? AND p.name = ? AND {_FINITE} GROUP BY p.run",
            (project, nid)).fetchall())
