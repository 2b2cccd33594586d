"""Runs, members and metric points in SQLite. Every SQL statement of the backend lives here.

Why it is shaped this way:

* One writer connection behind a lock (SQLite has one writer at a time anyway) and one reader
  connection per thread; WAL mode lets the dashboard read while a worker writes.
* Points are keyed by ``(run, name, step)`` and written with an UPSERT, so a batch the worker
  resends after a timeout can never create a duplicate (DESIGN.md §5). The stream entry id
  ``seq`` breaks ties: a point is replaced only by an entry whose seq is not older. A line
  without a seq (the official SDK sends none) always replaces, i.e. "the later write wins",
  and a point stored without a seq is replaced by any later write.
* Metric names are interned in ``names`` (an integer per name, cached in memory), so a point
  row is a handful of integers and the hot path does one dict lookup per value.
* SQLite stores a NaN REAL as NULL, so NULL in ``value`` *means* NaN; ints beyond 64 bits are
  stored as decimal TEXT. Every other int or float is stored as itself and comes back
  bit-identical (the column has no declared type, so SQLite never converts 3.0 into 3).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain, repeat
from typing import Any

STATUSES = ("RUNNING", "COMPLETED", "FAILED", "TERMINATED")

Stored = int | float | str | None
"""A value as the ``points.value`` column holds it (see the module docstring)."""

Entry = tuple[int, int, int | None, int | None, dict[str, Stored]]
"""One ingest line, validated: ``(step, time_ms, seq_ms, seq_n, {name: stored value})``."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    project     TEXT NOT NULL,
    external_id TEXT,
    name        TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    config      TEXT NOT NULL DEFAULT '{}',
    tags        TEXT NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (project, external_id)
);
CREATE INDEX IF NOT EXISTS runs_by_project ON runs (project, id);
CREATE TABLE IF NOT EXISTS names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS run_metrics (
    run  INTEGER NOT NULL,
    name INTEGER NOT NULL,
    PRIMARY KEY (run, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS points (
    run    INTEGER NOT NULL,
    name   INTEGER NOT NULL,
    step   INTEGER NOT NULL,
    value,
    time   INTEGER NOT NULL,
    seq_ms INTEGER,
    seq_n  INTEGER,
    PRIMARY KEY (run, name, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    run        INTEGER NOT NULL,
    member     TEXT NOT NULL,
    rank       INTEGER,
    local_rank INTEGER,
    host       TEXT,
    pid        INTEGER,
    state      TEXT,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (run, member)
) WITHOUT ROWID;
"""

_UPSERT_POINT = """
INSERT INTO points (run, name, step, value, time, seq_ms, seq_n) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, name, step) DO UPDATE SET
    value = excluded.value, time = excluded.time,
    seq_ms = excluded.seq_ms, seq_n = excluded.seq_n
WHERE excluded.seq_ms IS NULL OR points.seq_ms IS NULL
   OR (excluded.seq_ms, excluded.seq_n) >= (points.seq_ms, points.seq_n)
"""

_UPSERT_MEMBER = """
INSERT INTO members (run, member, rank, local_rank, host, pid, state, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, member) DO UPDATE SET
    rank = coalesce(excluded.rank, members.rank),
    local_rank = coalesce(excluded.local_rank, members.local_rank),
    host = coalesce(excluded.host, members.host),
    pid = coalesce(excluded.pid, members.pid),
    state = coalesce(excluded.state, members.state),
    updated_at = excluded.updated_at
"""

_RUN_COLUMNS = "id, project, external_id, name, status, config, tags, created_at, updated_at"


def now_ms() -> int:
    return int(time.time() * 1000)


def _merge(old: str, new: dict[str, Any] | None) -> str:
    """Top-level dict merge of ``new`` into the JSON object ``old``; None changes nothing."""
    merged = json.loads(old)
    if new:
        merged.update(new)
    return json.dumps(merged, separators=(",", ":"))


def loaded(value: Stored) -> int | float:
    """The number a stored value stands for (inverse of the ingest encoding)."""
    if value is None:
        return float("nan")
    if type(value) is str:
        return int(value)
    return value  # type: ignore[return-value]


class Store:
    """The backend's database. Thread-safe; create one per process and ``close()`` it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._memory = path == ":memory:"
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._db = self._connect()
        self._db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the points B-tree stays hot
        self._db.executescript(_SCHEMA)
        self._names: dict[str, int] = {
            n: i for i, n in self._db.execute("SELECT id, name FROM names")}
        self._run_metrics: set[tuple[int, int]] = set()
        self._runs: set[int] = set()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # one batch. check_same_thread=False: close() may run on another thread.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        db.execute("PRAGMA page_size=16384")  # new databases only; ~20% faster bulk upserts
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=OFF")
        return db

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()

    @contextmanager
    def _write(self, undo: Callable[[], None] | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction under the writer lock; ``undo`` reverts in-memory caches on failure
        while the lock is still held, so no other writer ever sees a rolled-back cache entry.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if undo is not None:
                    undo()
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        if self._memory:  # one in-memory database: share the writer connection
            with self._lock:
                yield self._db
            return
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            with self._lock:
                self._readers.append(db)
        yield db

    # -- runs ----------------------------------------------------------------------------------

    def create_run(self, project: str, external_id: str | None, name: str,
                   config: dict[str, Any] | None, tags: list[str] | None) -> tuple[int, bool]:
        """``(id, resumed)``. Idempotent on ``(project, external_id)``, also across processes:
        the UNIQUE constraint decides, so concurrent creates of one external id make one run.
        """
        now = now_ms()
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO runs (project, external_id, name, status, config, tags,"
                " created_at, updated_at) VALUES (?, ?, ?, 'RUNNING', ?, ?, ?, ?)",
                (project, external_id, name, _merge("{}", config), json.dumps(tags or []),
                 now, now))
            if cur.rowcount == 1:
                run = int(cur.lastrowid or 0)
                self._runs.add(run)
                return run, False
            run, old = db.execute("SELECT id, config FROM runs WHERE project = ? AND "
                                  "external_id = ?", (project, external_id)).fetchone()
            if config:
                db.execute("UPDATE runs SET config = ?, updated_at = ? WHERE id = ?",
                           (_merge(old, config), now, run))
            return int(run), True

    def find_run(self, project: str, external_id: str) -> int | None:
        with self._read() as db:
            row = db.execute("SELECT id FROM runs WHERE project = ? AND external_id = ?",
                             (project, external_id)).fetchone()
        return None if row is None else int(row[0])

    def run_exists(self, run: int) -> bool:
        if run in self._runs:
            return True
        with self._read() as db:
            found = db.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone()
        if found:
            self._runs.add(run)  # runs are never deleted, so a positive answer can be cached
        return found is not None

    def set_status(self, run: int, status: str) -> bool:
        with self._write() as db:
            return db.execute("UPDATE runs SET status = ?, updated_at = ? WHERE id = ?",
                              (status, now_ms(), run)).rowcount == 1

    def merge_config(self, run: int, config: dict[str, Any] | None) -> bool:
        with self._write() as db:
            row = db.execute("SELECT config FROM runs WHERE id = ?", (run,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE runs SET config = ?, updated_at = ? WHERE id = ?",
                       (_merge(row[0], config), now_ms(), run))
            return True

    def set_tags(self, run: int, tags: list[str]) -> bool:
        with self._write() as db:
            return db.execute("UPDATE runs SET tags = ?, updated_at = ? WHERE id = ?",
                              (json.dumps(tags), now_ms(), run)).rowcount == 1

    def upsert_members(self, run: int, members: Sequence[dict[str, Any]]) -> bool:
        """Insert or update members by ``(run, member)``; a field given as None is kept."""
        now = now_ms()
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone() is None:
                return False
            db.executemany(_UPSERT_MEMBER, [
                (run, m["member"], m.get("rank"), m.get("local_rank"), m.get("host"),
                 m.get("pid"), m.get("state"), now) for m in members])
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run))
            return True

    def get_run(self, run: int) -> dict[str, Any] | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run,)).fetchone()
            if row is None:
                return None
            members = db.execute(
                "SELECT member, rank, local_rank, host, pid, state FROM members WHERE run = ?"
                " ORDER BY rank, member", (run,)).fetchall()
        out = _run_dict(row)
        out["members"] = [dict(zip(("member", "rank", "local_rank", "host", "pid", "state"), m))
                          for m in members]
        return out

    def list_runs(self, project: str | None) -> list[dict[str, Any]]:
        """Runs newest first, without members (``get_run`` has them)."""
        with self._read() as db:
            if project is None:
                rows = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY id DESC")
            else:
                rows = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE project = ? "
                                  "ORDER BY id DESC", (project,))
            return [_run_dict(r) for r in rows.fetchall()]

    # -- metrics -------------------------------------------------------------------------------

    def write_points(self, run: int, entries: Sequence[Entry]) -> int:
        """Upsert every point of ``entries`` in one transaction; returns how many points."""
        fresh: list[str] = []  # names interned by this call; uncached again on rollback

        def undo() -> None:
            for name in fresh:
                self._names.pop(name, None)

        with self._write(undo) as db:
            names = self._names
            used: set[str] = set()
            rows: list[tuple[Any, ...]] = []
            for step, time_ms, seq_ms, seq_n, data in entries:
                used.update(data)
                if not names.keys() >= data.keys():
                    for name in data.keys() - names.keys():
                        names[name] = self._intern(db, name)
                        fresh.append(name)
                rows += [(run, names[n], step, v, time_ms, seq_ms, seq_n) for n, v in data.items()]
            if not rows:
                return 0
            db.executemany(_UPSERT_POINT, rows)
            new = {(run, names[n]) for n in used} - self._run_metrics
            if new:
                db.executemany("INSERT OR IGNORE INTO run_metrics (run, name) VALUES (?, ?)",
                               sorted(new))
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
        self._run_metrics |= new  # after COMMIT: a rolled-back batch stored no (run, name)
        return len(rows)

    def write_columns(self, run: int, names: list[str], name_idx: list[int], values: list[Any],
                      counts: list[int], steps: list[int], times: list[int], seq_ms: list[int],
                      seq_n: list[int]) -> int:
        """``write_points`` for a columnar batch (``_ingest.columns``): the per-entry columns
        are repeated ``counts`` times and zipped into rows in C, so the only per-point work left
        is SQLite's. A NaN is bound as NULL by SQLite itself; an int beyond 64 bits raises
        ``OverflowError`` and rolls the batch back."""
        fresh: list[str] = []

        def undo() -> None:
            for name in fresh:
                self._names.pop(name, None)

        def each(col: list[int]) -> Iterator[int]:
            return chain.from_iterable(map(repeat, col, counts))

        with self._write(undo) as db:
            known = self._names
            for name in names:
                if name not in known:
                    known[name] = self._intern(db, name)
                    fresh.append(name)
            ids = [known[n] for n in names]
            if not values:
                return 0
            db.executemany(_UPSERT_POINT, zip(repeat(run), map(ids.__getitem__, name_idx),
                                              each(steps), values, each(times), each(seq_ms),
                                              each(seq_n)))
            new = {(run, ids[i]) for i in set(name_idx)} - self._run_metrics
            if new:
                db.executemany("INSERT OR IGNORE INTO run_metrics (run, name) VALUES (?, ?)",
                               sorted(new))
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
        self._run_metrics |= new
        return len(values)

    @staticmethod
    def _intern(db: sqlite3.Connection, name: str) -> int:
        db.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
        return int(db.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()[0])

    def metric_names(self, run: int) -> list[str]:
        with self._read() as db:
            rows = db.execute("SELECT n.name FROM run_metrics m JOIN names n ON n.id = m.name "
                              "WHERE m.run = ? ORDER BY n.name", (run,)).fetchall()
        return [r[0] for r in rows]

    def points(self, run: int, name: str, since_step: int | None = None, last_only: bool = False
               ) -> list[tuple[int, Stored, int]]:
        """``(step, stored value, time_ms)`` ordered by step, from ``since_step`` on; with
        ``last_only`` just the newest one (a live view's poll, without reading the history)."""
        with self._read() as db:
            row = db.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()
            if row is None:
                return []
            order = "DESC LIMIT 1" if last_only else ""
            return db.execute(
                "SELECT step, value, time FROM points WHERE run = ? AND name = ? AND step >= ?"
                f" ORDER BY step {order}",
                (run, row[0], -(2**63) if since_step is None else since_step)).fetchall()


    # -- dashboard reads -----------------------------------------------------------------------

    def name_ids(self, names: Sequence[str]) -> dict[str, int]:
        """The interned id of each of ``names`` that was ever stored (unknown names left out)."""
        found = {n: self._names[n] for n in names if n in self._names}
        missing = [n for n in names if n not in found]
        if missing:  # interned by another process on the same file; the writer's cache is
            with self._read() as db:  # left to the writer
                for i in range(0, len(missing), 500):
                    chunk = missing[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    found.update(db.execute(f"SELECT name, id FROM names WHERE name IN ({marks})",
                                            chunk).fetchall())
        return found

    def last_steps(self, runs: Sequence[int]) -> dict[int, int]:
        """The newest step stored in each of ``runs`` (runs without points left out): one
        index seek per (run, metric), never a scan of the points."""
        out: dict[int, int] = {}
        with self._read() as db:
            for i in range(0, len(runs), 500):
                chunk = list(runs[i:i + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    "SELECT m.run, max((SELECT max(p.step) FROM points p WHERE p.run = m.run"
                    f" AND p.name = m.name)) FROM run_metrics m WHERE m.run IN ({marks})"
                    " GROUP BY m.run", chunk).fetchall()
                out.update((run, step) for run, step in rows if step is not None)
        return out

    def member_counts(self, runs: Sequence[int]) -> dict[int, int]:
        """How many members (processes) each of ``runs`` has had."""
        out: dict[int, int] = {}
        with self._read() as db:
            for i in range(0, len(runs), 500):
                chunk = list(runs[i:i + 500])
                marks = ",".join("?" * len(chunk))
                out.update(db.execute(f"SELECT run, count(*) FROM members WHERE run IN ({marks})"
                                      " GROUP BY run", chunk).fetchall())
        return out

    def step_span(self, run: int, name_id: int, low: int, high: int) -> tuple[int, int] | None:
        """``(first step, last step)`` of one series within ``[low, high]`` (two index
        seeks), or None when it has no point there."""
        where = "FROM points WHERE run = ? AND name = ? AND step BETWEEN ? AND ? ORDER BY step"
        args = (run, name_id, low, high)
        with self._read() as db:  # two queries: min() and max() in one would scan the range
            first = db.execute(f"SELECT step {where} LIMIT 1", args).fetchone()
            if first is None:
                return None
            last = db.execute(f"SELECT step {where} DESC LIMIT 1", args).fetchone()
        return int(first[0]), int(last[0])

    def points_between(self, run: int, name_id: int, low: int, high: int, limit: int
                       ) -> list[tuple[int, Stored, int]]:
        """At most ``limit`` points of one series with ``low <= step <= high``, by step."""
        with self._read() as db:
            return db.execute("SELECT step, value, time FROM points WHERE run = ? AND name = ?"
                              " AND step BETWEEN ? AND ? ORDER BY step LIMIT ?",
                              (run, name_id, low, high, limit)).fetchall()

    def more_than(self, run: int, name_id: int, low: int, high: int, n: int) -> bool:
        """Whether the series has more than ``n`` points in ``[low, high]``: one walk of the
        index past ``n`` entries, without moving them into Python."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM points WHERE run = ? AND name = ? AND step BETWEEN"
                              " ? AND ? ORDER BY step LIMIT 1 OFFSET ?",
                              (run, name_id, low, high, n)).fetchone() is not None

    def run_version(self, run: int) -> int | None:
        """The run's ``updated_at``, which every write to the run raises: a cache key."""
        with self._read() as db:
            row = db.execute("SELECT updated_at FROM runs WHERE id = ?", (run,)).fetchone()
        return None if row is None else int(row[0])

    def points_m4(self, run: int, name_id: int, low: int, high: int, width: int
                  ) -> list[tuple[int, Stored, int]]:
        """M4 downsampling in one statement: the steps ``[low, high]`` cut into buckets of
        ``width`` steps, and of each bucket its first, last, minimum and maximum point (a NaN,
        stored as NULL, counts as a maximum so a bucket holding one shows it). Each bucket is
        read with range scans of the primary key, so SQLite never sorts the series."""
        with self._read() as db:
            return db.execute(_M4, {"run": run, "name": name_id, "low": low, "high": high,
                                    "width": width}).fetchall()


def _run_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, project, external_id, name, status, config, tags, created, updated = row
    return {"id": rid, "externalId": external_id, "project": project, "name": name,
            "status": status, "config": json.loads(config), "tags": json.loads(tags),
            "createdAt": created, "updatedAt": updated}


_M4_BUCKET = "run = :run AND name = :name AND step >= lo AND step < lo + :width"
_M4 = f"""
WITH RECURSIVE buckets(lo) AS (
    SELECT :low UNION ALL SELECT lo + :width FROM buckets WHERE lo + :width <= :high
), picks(step) AS (
    SELECT (SELECT min(step) FROM points WHERE {_M4_BUCKET}) FROM buckets
    UNION SELECT (SELECT max(step) FROM points WHERE {_M4_BUCKET}) FROM buckets
    UNION SELECT (SELECT step FROM (SELECT step, min(value) AS v FROM points
                                    WHERE {_M4_BUCKET}) WHERE v IS NOT NULL) FROM buckets
    UNION SELECT (SELECT step FROM (SELECT step, max(ifnull(value, 9e999)) FROM points
                                    WHERE {_M4_BUCKET})) FROM buckets
)
SELECT step, value, time FROM points
WHERE run = :run AND name = :name AND step IN (SELECT step FROM picks) ORDER BY step
"""
