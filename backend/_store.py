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
* What was stored can be returned: configs and tags pass ``_json.clean`` on the way in and on
  the way out, and a row that still fails (written by an older version) is reported as that
  run's error (``BrokenRow``, an error item in ``list_runs``), never an exception that would
  take the whole list down. An id beyond int64 is simply not found.
* The schema is versioned (``schema_version``); ``_MIGRATIONS`` bring an older file up to
  date when the store opens it.
* ``PLUTO_DB_URL=postgresql://…`` selects ``_pgstore.PgStore`` instead (:func:`open_store`),
  which has every public method of :class:`Store` with the same meaning (tests/storage runs
  the storage tests against both and checks that the two interfaces agree).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain, groupby, repeat
from typing import Any

from pluto.protocol import INT64_MAX, INT64_MIN

from . import _json, _rows
from ._blocks import MERGE_BLOCK, summarise
from ._rows import MEMBER_FIELDS, RANK_FIELDS
from ._schema import BLOCK_SHIFT, REFRESH_BLOCK, block_rows, migrate

__all__ = ["Store", "Unstorable", "open_store"]


Stored = int | float | str | None
"""A value as the ``points.value`` column holds it (see the module docstring)."""

Entry = tuple[int, int, int | None, int | None, dict[str, Stored]]
"""One ingest line, validated: ``(step, time_ms, seq_ms, seq_n, {name: stored value})``."""

_TAIL = "SELECT last FROM point_blocks WHERE run = ? AND name = ? ORDER BY block DESC LIMIT 1"
_UPSERT_POINT = """
INSERT INTO points (run, name, step, value, time, seq_ms, seq_n) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, name, step) DO UPDATE SET
    value = excluded.value, time = excluded.time,
    seq_ms = excluded.seq_ms, seq_n = excluded.seq_n
WHERE excluded.seq_ms IS NULL OR points.seq_ms IS NULL
   OR (excluded.seq_ms, excluded.seq_n) >= (points.seq_ms, points.seq_n)
"""

_UPSERT_MEMBER = f"""
INSERT INTO members (run, member, updated_at, {", ".join(MEMBER_FIELDS)})
VALUES (?, ?, ?, {", ".join("?" for _ in MEMBER_FIELDS)})
ON CONFLICT (run, member) DO UPDATE SET updated_at = excluded.updated_at,
    {", ".join(f"{f} = coalesce(excluded.{f}, members.{f})" for f in MEMBER_FIELDS)}
"""

_UPSERT_LEDGER = """
INSERT INTO rank_ledger (run, slot, rank, stored, dead, last_step, last_time, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run, slot) DO UPDATE SET
    stored = excluded.stored, dead = excluded.dead,
    last_step = coalesce(excluded.last_step, rank_ledger.last_step),
    last_time = coalesce(excluded.last_time, rank_ledger.last_time),
    updated_at = excluded.updated_at
"""

_RUN_COLUMNS = "id, project, external_id, name, status, config, tags, created_at, updated_at"


class Unstorable(ValueError):
    """A value the database cannot hold (PostgreSQL text with a NUL): the request's 400."""


def open_store(db_url: str) -> Store:
    """The store ``PLUTO_DB_URL`` names: SQLite (the default) or PostgreSQL.

    >>> open_store("sqlite:///:memory:").close()
    """
    from ._settings import db_path, is_postgres

    if is_postgres(db_url):
        try:
            from ._pgstore import PgStore
        except ImportError as exc:
            from pluto.errors import ConfigError

            raise ConfigError(f"PLUTO_DB_URL is a PostgreSQL URL but psycopg is missing ({exc}):"
                              " pip install 'pluto-stream[server,postgres]'") from None
        return PgStore(db_url)  # type: ignore[return-value]  # same interface, see tests/storage
    return Store(db_path(db_url))


def now_ms() -> int:
    return int(time.time() * 1000)


def _in_range(run: int) -> bool:
    """Whether ``run`` can be an id at all; a larger one is not found rather than an error."""
    return INT64_MIN <= run <= INT64_MAX


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


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
        migrate(self._db)
        self._names: dict[str, int] = {
            n: i for i, n in self._db.execute("SELECT id, name FROM names")}
        self._run_metrics: set[tuple[int, int]] = set()
        self._tails: dict[tuple[int, int], int | None] = {}
        """The highest step stored per ``(run, name id)``, as far as learnt (see ``_blocks``)."""
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
        # Text that is not UTF-8 (written by another tool) reads as U+FFFD, not an exception
        # that would fail a whole listing; all that we write was checked to be UTF-8.
        db.text_factory = _text
        return db

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._db.close()

    @contextmanager
    def _write(self, undo: Callable[[], None] | None = None,
               done: Callable[[], None] | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction under the writer lock; ``undo`` reverts in-memory caches on failure
        and ``done`` updates them after COMMIT, both while the lock is still held, so no other
        writer ever sees a rolled-back or a not yet committed cache entry.
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
            if done is not None:
                done()

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
                   config: dict[str, Any] | None, tags: list[str] | None,
                   tenant: str = "") -> tuple[int, bool]:
        """``(id, resumed)``. Idempotent on ``(project, external_id)``, also across processes:
        the UNIQUE constraint decides, so concurrent creates of one external id make one run.
        The first create of a project makes it ``tenant``'s; another tenant's is refused
        (:class:`ForeignProject`), so no tenant can resume or write into another's runs.
        """
        now = now_ms()
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO project_tenants (project, tenant) VALUES (?, ?)",
                       (project, tenant))
            if self._tenant(db, project) != tenant:
                raise _rows.ForeignProject(project)
            cur = db.execute(
                "INSERT OR IGNORE INTO runs (project, external_id, name, status, config, tags,"
                " created_at, updated_at) VALUES (?, ?, ?, 'RUNNING', ?, ?, ?, ?)",
                (project, external_id, name, _rows.merged_config(0, "{}", config),
                 _json.dumps(tags or []), now, now))
            if cur.rowcount == 1:
                run = int(cur.lastrowid or 0)
                self._runs.add(run)
                return run, False
            run, old = db.execute("SELECT id, config FROM runs WHERE project = ? AND "
                                  "external_id = ?", (project, external_id)).fetchone()
            if config:
                db.execute("UPDATE runs SET config = ?, updated_at = ? WHERE id = ?",
                           (_rows.merged_config(run, old, config), now, run))
            return int(run), True

    def tenant_of(self, project: str) -> str:
        """The tenant the project belongs to (``''``: the default one, or no such project)."""
        with self._read() as db:
            return self._tenant(db, project)

    @staticmethod
    def _tenant(db: sqlite3.Connection, project: str) -> str:
        row = db.execute("SELECT tenant FROM project_tenants WHERE project = ?",
                         (project,)).fetchone()
        return "" if row is None else str(row[0])

    def find_run(self, project: str, external_id: str) -> int | None:
        with self._read() as db:
            row = db.execute("SELECT id FROM runs WHERE project = ? AND external_id = ?",
                             (project, external_id)).fetchone()
        return None if row is None else int(row[0])

    def run_exists(self, run: int) -> bool:
        if run in self._runs:
            return True
        if not _in_range(run):
            return False
        with self._read() as db:
            found = db.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone()
        if found:
            self._runs.add(run)  # runs are never deleted, so a positive answer can be cached
        return found is not None

    def status(self, run: int) -> str | None:
        """The run's status alone (what the official SDK's heartbeat asks), None if unknown."""
        if not _in_range(run):
            return None
        with self._read() as db:
            row = db.execute("SELECT status FROM runs WHERE id = ?", (run,)).fetchone()
        return None if row is None else str(row[0])

    def set_status(self, run: int, status: str) -> bool:
        if not _in_range(run):
            return False
        with self._write() as db:
            return db.execute("UPDATE runs SET status = ?, updated_at = ? WHERE id = ?",
                              (status, now_ms(), run)).rowcount == 1

    def merge_config(self, run: int, config: dict[str, Any] | None) -> bool:
        if not _in_range(run):
            return False
        with self._write() as db:
            row = db.execute("SELECT config FROM runs WHERE id = ?", (run,)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE runs SET config = ?, updated_at = ? WHERE id = ?",
                       (_rows.merged_config(run, row[0], config), now_ms(), run))
            return True

    def set_tags(self, run: int, tags: list[str]) -> bool:
        if not _in_range(run):
            return False
        with self._write() as db:
            return db.execute("UPDATE runs SET tags = ?, updated_at = ? WHERE id = ?",
                              (_json.dumps(tags), now_ms(), run)).rowcount == 1

    def upsert_members(self, run: int, members: Sequence[dict[str, Any]]) -> bool:
        """Insert or update members by ``(run, member)``; a field given as None is kept.
        ``drops`` is a dict of reason -> count, kept as JSON."""
        if not _in_range(run):
            return False
        now = now_ms()
        rows = [(run, m["member"], now, *(m.get(f) for f in MEMBER_FIELDS[:-1]),
                 None if m.get("drops") is None else _json.dumps(m["drops"])) for m in members]
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone() is None:
                return False
            db.executemany(_UPSERT_MEMBER, rows)
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run))
            return True

    def upsert_ledger(self, run: int, ranks: Sequence[dict[str, Any]]) -> bool:
        """The worker's per-rank counts, absolute values upserted by ``(run, rank)``; a
        ``last_step``/``last_time`` given as None keeps the stored one."""
        if not _in_range(run):
            return False
        now = now_ms()
        rows = [(run, "?" if r.get("rank") is None else str(r["rank"]), r.get("rank"),
                 r["stored"], r["dead"], r.get("last_step"), r.get("last_time"), now)
                for r in ranks]
        with self._write() as db:
            if db.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone() is None:
                return False
            db.executemany(_UPSERT_LEDGER, rows)
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now, run))
            return True

    def get_run(self, run: int) -> dict[str, Any] | None:
        """The run with its members, per-rank ledger and loss summary; None if there is no
        such run, :class:`BrokenRow` if its stored row cannot be returned."""
        if not _in_range(run):
            return None
        with self._read() as db:
            row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run,)).fetchone()
            if row is None:
                return None
            members = db.execute(
                f"SELECT member, {', '.join(MEMBER_FIELDS)} FROM members WHERE run = ?"
                " ORDER BY rank, member", (run,)).fetchall()
            ranks = db.execute(
                f"SELECT {', '.join(RANK_FIELDS)} FROM rank_ledger WHERE run = ?"
                " ORDER BY rank IS NULL, rank", (run,)).fetchall()
        return _rows.run_with_ledger(run, row, members, ranks)

    def count_by_status(self) -> dict[str, int]:
        """Runs per status, for the ``pluto_backend_runs`` gauge."""
        with self._read() as db:
            rows = db.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
        return {str(status): int(n) for status, n in rows}

    def list_runs(self, project: str | None) -> list[dict[str, Any]]:
        """Runs newest first, without members (``get_run`` has them) but with their count,
        ``lost`` and ``console_dropped``. A row that cannot be returned is an item ``{"id", "error"}``."""
        where, args = ("", ()) if project is None else (" WHERE r.project = ?", (project,))
        with self._read() as db:
            rows = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs r{where} ORDER BY id DESC",
                              args).fetchall()
            members = db.execute("SELECT m.run, m.sent, m.dropped, m.drops FROM members m "
                                 "JOIN runs r "
                                 f"ON r.id = m.run{where}", args).fetchall()
            ranks = db.execute("SELECT l.run, l.stored, l.dead FROM rank_ledger l JOIN runs r "
                               f"ON r.id = l.run{where}", args).fetchall()
        return _rows.listed(rows, members, ranks)

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
            touched = {(run, r[1], r[2] >> BLOCK_SHIFT) for r in rows}
            db.executemany(REFRESH_BLOCK, block_rows(sorted(touched)))
            self._forget_tails(run, {nid for _, nid, _ in touched})
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

        tops: dict[tuple[int, int], int] = {}  # the batch's highest steps: after COMMIT

        def undo() -> None:
            for name in fresh:
                self._names.pop(name, None)

        def each(col: list[int]) -> Iterator[int]:
            return chain.from_iterable(map(repeat, col, counts))

        with self._write(undo, lambda: self._raise_tails(tops)) as db:
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
            tops.update(self._summarise(db, run, ids, name_idx, values, counts, steps))
            new = {(run, ids[i]) for i in set(name_idx)} - self._run_metrics
            if new:
                db.executemany("INSERT OR IGNORE INTO run_metrics (run, name) VALUES (?, ?)",
                               sorted(new))
            db.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (now_ms(), run))
        self._run_metrics |= new
        return len(values)

    def _summarise(self, db: sqlite3.Connection, run: int, ids: list[int], name_idx: list[int],
                   values: list[Any], counts: list[int], steps: list[int]
                   ) -> dict[tuple[int, int], int]:
        """Bring the summaries of the blocks a columnar batch touched up to date: merged from
        the batch where it only appended to a series (``_blocks``), else from the stored
        points. Returns the batch's highest step per series, for ``_tails`` once committed.
        Runs in the batch's transaction under the writer lock, so no writer sees a stale tail."""
        tails = self._tails

        def tail(nid: int) -> int | None:
            key = (run, nid)
            if key not in tails:  # what is committed: this batch's blocks are written below
                row = db.execute(_TAIL, key).fetchone()
                tails[key] = None if row is None else int(row[0])
            return tails[key]

        summary = summarise(ids, name_idx, values, counts, steps, tail)
        if summary is None:  # entries of many shapes: from the stored points
            each = chain.from_iterable(map(repeat, [s >> BLOCK_SHIFT for s in steps], counts))
            touched = {(ids[i], block) for i, block in zip(name_idx, each)}
            self._forget_tails(run, {nid for nid, _ in touched})
            tops = {}
        else:
            db.executemany(MERGE_BLOCK, [(run, *row) for row in summary.merged])
            touched = summary.refresh
            tops = {(run, nid): top for nid, top in summary.tops.items()}
        db.executemany(REFRESH_BLOCK, block_rows((run, nid, block)
                                                 for nid, block in sorted(touched)))
        return tops

    def _forget_tails(self, run: int, nids: set[int]) -> None:
        """A batch summarised from the stored points: its series' tails are learnt again
        when next needed (cheaper than working out whether it raised them)."""
        for nid in nids:
            self._tails.pop((run, nid), None)

    def _raise_tails(self, tops: dict[tuple[int, int], int]) -> None:
        for key, top in tops.items():
            old = self._tails.get(key)
            self._tails[key] = top if old is None else max(old, top)

    @staticmethod
    def _intern(db: sqlite3.Connection, name: str) -> int:
        db.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
        return int(db.execute("SELECT id FROM names WHERE name = ?", (name,)).fetchone()[0])

    def metric_names(self, run: int) -> list[str]:
        if not _in_range(run):
            return []
        with self._read() as db:
            rows = db.execute("SELECT n.name FROM run_metrics m JOIN names n ON n.id = m.name "
                              "WHERE m.run = ? ORDER BY n.name", (run,)).fetchall()
        return [r[0] for r in rows]

    def points(self, run: int, name: str, since_step: int | None = None, last_only: bool = False
               ) -> list[tuple[int, Stored, int]]:
        """``(step, stored value, time_ms)`` ordered by step, from ``since_step`` on; with
        ``last_only`` just the newest one (a live view's poll, without reading the history)."""
        if not _in_range(run) or not _json.encodable(name):
            return []
        if since_step is not None:
            since_step = min(max(since_step, INT64_MIN), INT64_MAX)
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
        names = [n for n in names if _json.encodable(n)]
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
        """M4 of the steps ``[low, high]``: the buckets are the multiples of ``width`` (bucket
        ``k`` holds ``k * width <= step < (k + 1) * width``), and of each its first, last,
        minimum and maximum point (a NaN, stored as NULL, counts as a maximum so a bucket
        holding one shows it; of equal values the first). A ``width`` that is a multiple of
        64 makes every bucket whole blocks, read from their summaries (``_m4_blocks``);
        otherwise each bucket is read with range scans of the primary key."""
        with self._read() as db:
            db.execute("BEGIN")  # one snapshot for every statement below
            try:
                if width % (1 << BLOCK_SHIFT) == 0:
                    return _m4_blocks(db, run, name_id, low, high, width)
                return db.execute(_M4, {"run": run, "name": name_id, "low": low, "high": high,
                                        "origin": low - low % width, "width": width}).fetchall()
            finally:
                db.execute("COMMIT")


_M4_BUCKET = ("run = :run AND name = :name AND step >= lo AND step < lo + :width"
              " AND step BETWEEN :low AND :high")
_M4 = f"""
WITH RECURSIVE buckets(lo) AS (
    SELECT :origin UNION ALL SELECT lo + :width FROM buckets WHERE lo + :width <= :high
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


_ATOMS_OF_POINTS = ("SELECT step, step, value, ifnull(value, 9e999) FROM points"
                    " WHERE run = ? AND name = ? AND step BETWEEN ? AND ? ORDER BY step")
_ATOMS_OF_BLOCKS = ("SELECT first, last, lo, hi FROM point_blocks"
                    " WHERE run = ? AND name = ? AND block BETWEEN ? AND ? ORDER BY block")
_HUNT = """
SELECT (SELECT step FROM points WHERE run = ? AND name = ? AND step BETWEEN w.f AND w.l
        AND (CASE WHEN w.h THEN ifnull(value, 9e999) ELSE value END) = w.v ORDER BY step LIMIT 1)
FROM (SELECT column1 AS f, column2 AS l, column3 AS v, column4 AS h FROM (VALUES {})) AS w
"""
_PICKED = ("SELECT step, value, time FROM points WHERE run = ? AND name = ?"
           " AND step IN (SELECT value FROM json_each(?)) ORDER BY step")


def _order(value: Stored) -> tuple[bool, Any]:
    """SQLite's order of the values a point holds: every number below every text."""
    return isinstance(value, str), value


def _m4_blocks(db: sqlite3.Connection, run: int, nid: int, low: int, high: int, width: int
               ) -> list[tuple[int, Stored, int]]:
    """``Store.points_m4`` over block summaries. Each block, and each point of the two partial
    blocks at the ends, is an atom ``(first step, last step, lo, hi)``; a bucket's extremes are
    those of its atoms (the first of equal ones), and the step holding an extreme inside a
    block is looked up afterwards with one scan of that block."""
    size = 1 << BLOCK_SHIFT
    head, tail = low >> BLOCK_SHIFT, high >> BLOCK_SHIFT
    atoms = db.execute(_ATOMS_OF_POINTS, (run, nid, low, min(high, head * size + size - 1))
                       ).fetchall()
    if tail > head:
        atoms += db.execute(_ATOMS_OF_BLOCKS, (run, nid, head + 1, tail - 1)).fetchall()
        atoms += db.execute(_ATOMS_OF_POINTS, (run, nid, tail * size, high)).fetchall()
    picks: set[int] = set()
    hunts: list[tuple[int, int, Stored, bool]] = []  # (first, last, value, is the maximum)

    def pick(atom: tuple[Any, ...], value: Stored, is_high: bool) -> None:
        if atom[0] == atom[1]:
            picks.add(atom[0])
        else:
            hunts.append((atom[0], atom[1], value, is_high))

    for _, group in groupby(atoms, key=lambda atom: atom[0] // width):
        bucket = list(group)
        picks.update((bucket[0][0], bucket[-1][1]))
        numbers = [atom for atom in bucket if atom[2] is not None]
        if numbers:  # min() and max() return the first of equal ones
            low_atom = min(numbers, key=lambda atom: _order(atom[2]))
            pick(low_atom, low_atom[2], False)
        high_atom = max(bucket, key=lambda atom: _order(atom[3]))
        pick(high_atom, high_atom[3], True)
    for i in range(0, len(hunts), 2000):  # 4 parameters each, well within SQLite's 32,766
        chunk = hunts[i:i + 2000]
        sql = _HUNT.format(",".join(["(?, ?, ?, ?)"] * len(chunk)))
        found = db.execute(sql, (run, nid, *chain.from_iterable(chunk))).fetchall()
        picks.update(step for (step,) in found if step is not None)
    return db.execute(_PICKED, (run, nid, json.dumps(sorted(picks)))).fetchall()
