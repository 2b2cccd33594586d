"""The schemas and their migrations: what a database of any earlier version becomes.

SQLite and PostgreSQL each have their list (``_MIGRATIONS``, ``PG_MIGRATIONS``); a change
to the data model appends one step to each, and a test runs both stores through every step.

SQLite:
A file records its version in ``schema_version`` (one row). Version 0 is the schema before
versioning (``_BASE``, which files created then already have); each function of
``_MIGRATIONS`` brings version ``i`` to ``i + 1`` and checks before it alters, so a file that
was half migrated by a crash, or created by ``_BASE`` a moment ago, ends up the same. All of it
runs in one ``BEGIN IMMEDIATE`` transaction, so two backends opening one file migrate it once.

PostgreSQL: ``schema_migrations`` holds one row per applied step (version, name, time).
``pg_migrate`` runs the missing steps in one transaction holding an advisory lock, so replicas
starting together migrate once: the second waits on the lock, then finds nothing to do.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("pluto.server")

_BASE = """
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
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""

MEMBER_LEDGER = (("logged", "INTEGER"), ("sent", "INTEGER"), ("dropped", "INTEGER"),
                 ("drops", "TEXT"))
"""The loss-ledger columns of ``members`` (issue 13): what each process counted; ``drops`` is
a JSON object of reason -> count."""


def _v1_loss_ledger(db: sqlite3.Connection) -> None:
    """Members gain the SDK's counts; ``rank_ledger`` holds the worker's per rank. ``slot`` is
    the rank as decimal text, ``'?'`` for entries whose rank was unreadable (rank NULL), so
    the primary key never holds a NULL."""
    have = {row[1] for row in db.execute("PRAGMA table_info(members)")}
    for column, kind in MEMBER_LEDGER:
        if column not in have:
            db.execute(f"ALTER TABLE members ADD COLUMN {column} {kind}")
    db.execute("""
        CREATE TABLE IF NOT EXISTS rank_ledger (
            run        INTEGER NOT NULL,
            slot       TEXT NOT NULL,
            rank       INTEGER,
            stored     INTEGER NOT NULL,
            dead       INTEGER NOT NULL,
            last_step  INTEGER,
            last_time  INTEGER,
            updated_at INTEGER NOT NULL,
            PRIMARY KEY (run, slot)
        ) WITHOUT ROWID""")


def _v2_api_keys(db: sqlite3.Connection) -> None:
    """API keys made by ``pluto server keys create`` (issue 18): only the SHA-256 of each
    token is kept, with its scope; ``revoked_at`` set means refused (``backend/_auth.py``)."""
    db.execute("""
        CREATE TABLE IF NOT EXISTS api_keys (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            hash       TEXT NOT NULL UNIQUE,
            scope      TEXT NOT NULL,
            name       TEXT NOT NULL DEFAULT '',
            created_at INTEGER NOT NULL,
            revoked_at INTEGER
        )""")


def _v3_logs_data_files(db: sqlite3.Connection) -> None:
    """What the official SDK sends besides metrics (issue 21): console lines, structured data
    (histograms, tables, ...), file records and registered log names. Each row carries a
    ``digest`` of its content in its key, so a batch the client resends stores nothing twice;
    a file row is keyed by where it was logged, so a repeated presign reuses it."""
    # One execute per statement: executescript() would COMMIT the migration's transaction.
    for statement in _V3_TABLES.split(";"):
        if statement.strip():
            db.execute(statement)


_V3_TABLES = """
        CREATE TABLE IF NOT EXISTS console_logs (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            run         INTEGER NOT NULL,
            slot        TEXT NOT NULL,
            rank        INTEGER,
            time        INTEGER NOT NULL,
            line_number INTEGER NOT NULL,
            log_type    TEXT NOT NULL,
            step        INTEGER,
            message     TEXT NOT NULL,
            digest      BLOB NOT NULL,
            UNIQUE (run, slot, time, line_number, log_type, digest)
        );
        CREATE INDEX IF NOT EXISTS console_logs_by_run ON console_logs (run, id);
        CREATE TABLE IF NOT EXISTS run_data (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            run       INTEGER NOT NULL,
            log_name  TEXT NOT NULL,
            data_type TEXT NOT NULL,
            step      INTEGER NOT NULL,
            time      INTEGER NOT NULL,
            data      TEXT NOT NULL,
            digest    BLOB NOT NULL,
            UNIQUE (run, log_name, step, digest)
        );
        CREATE INDEX IF NOT EXISTS run_data_by_name ON run_data (run, log_name, step);
        CREATE TABLE IF NOT EXISTS run_files (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            run          INTEGER NOT NULL,
            log_name     TEXT NOT NULL,
            file_name    TEXT NOT NULL,
            file_type    TEXT NOT NULL,
            step         INTEGER NOT NULL,
            sample_index INTEGER NOT NULL,
            time         INTEGER NOT NULL,
            caption      TEXT,
            declared     INTEGER,
            size         INTEGER,
            uploaded_at  INTEGER,
            UNIQUE (run, log_name, step, sample_index, file_name)
        );
        CREATE TABLE IF NOT EXISTS log_names (
            run      INTEGER NOT NULL,
            log_name TEXT NOT NULL,
            log_type TEXT NOT NULL,
            PRIMARY KEY (run, log_name)
        ) WITHOUT ROWID
"""


def _v4_member_node_attempt(db: sqlite3.Connection) -> None:
    """Members gain the node they ran on and the launcher's attempt (an elastic restart)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(members)")}
    for column in ("node", "attempt"):
        if column not in have:
            db.execute(f"ALTER TABLE members ADD COLUMN {column} INTEGER")


def _v5_project_tenants(db: sqlite3.Connection) -> None:
    """Each project belongs to one tenant (issue 18), the one whose worker created its first
    run; projects that already exist belong to the default tenant (``''``, no tenant)."""
    db.execute(_PROJECT_TENANTS)
    db.execute("INSERT OR IGNORE INTO project_tenants SELECT DISTINCT project, '' FROM runs")


_PROJECT_TENANTS = """
    CREATE TABLE IF NOT EXISTS project_tenants (
        project TEXT PRIMARY KEY,
        tenant  TEXT NOT NULL
    )"""

BLOCK_SHIFT = 6
"""A block is the ``2**BLOCK_SHIFT`` (64) steps ``[64 k, 64 k + 63]`` of one series."""

REFRESH_BLOCK = """
INSERT OR REPLACE INTO point_blocks (run, name, block, first, last, lo, hi)
SELECT ?1, ?2, ?3, min(step), max(step), min(value), max(ifnull(value, 9e999)) FROM points
WHERE run = ?1 AND name = ?2 AND step BETWEEN ?4 AND ?5
"""
"""Summarise one block from its points, parameters ``(run, name, block, first step, last
step)``: its first and last step, its minimum (``lo``, NULL when it holds only NaNs) and its
maximum (``hi``, a NaN counting as +Infinity). One scan of at most 64 rows (~16 µs); which
step holds ``lo``/``hi`` is looked up only when a chart needs it."""


def block_rows(pairs: Iterable[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, int, int]]:
    """``REFRESH_BLOCK``'s parameters for ``(run, name, block)`` triples."""
    size = 1 << BLOCK_SHIFT
    for run, name, block in pairs:
        yield run, name, block, block * size, block * size + size - 1


def _v6_point_blocks(db: sqlite3.Connection) -> None:
    """Each 64-step block of a series is summarised in ``point_blocks`` (issue 16), kept up to
    date by every write, so M4 over 100,000 steps reads ~1,600 summaries instead of scanning
    every point twice (~6 ms instead of ~30 ms of CPU a series; the first chart of 64 ranks x
    100,000 steps draws in ~1.3 s instead of ~2.2 s). A file with points gets its summaries
    here, once (~9-14 s per 20 million points)."""
    db.execute("""
        CREATE TABLE IF NOT EXISTS point_blocks (
            run     INTEGER NOT NULL,
            name    INTEGER NOT NULL,
            block   INTEGER NOT NULL,
            first   INTEGER NOT NULL,
            last    INTEGER NOT NULL,
            lo,
            hi,
            PRIMARY KEY (run, name, block)
        ) WITHOUT ROWID""")
    if db.execute("SELECT 1 FROM points LIMIT 1").fetchone() is None:
        return
    log.warning("pluto server: summarising the stored points in 64-step blocks (schema 6; once, "
                "about a second per 1.5 million points)")
    blocks = db.execute(f"SELECT DISTINCT run, name, step >> {BLOCK_SHIFT} FROM points").fetchall()
    db.executemany(REFRESH_BLOCK, block_rows(blocks))
    log.warning("pluto server: %d blocks summarised", len(blocks))


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1_loss_ledger, _v2_api_keys, _v3_logs_data_files, _v4_member_node_attempt,
    _v5_project_tenants, _v6_point_blocks]
VERSION = len(_MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Create or upgrade the schema on ``db`` (autocommit mode); returns the version now."""
    db.executescript(_BASE)
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        for step in _MIGRATIONS[version:]:
            step(db)
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (VERSION,))
        elif version < VERSION:
            db.execute("UPDATE schema_version SET version = ?", (VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return max(version, VERSION)


# -- PostgreSQL ------------------------------------------------------------------------------

PG_LOCK = 0x706C75746F  # "pluto": the advisory lock key held while migrating
_PG_BASE = """
CREATE TABLE runs (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    project     text NOT NULL,
    external_id text,
    name        text NOT NULL DEFAULT '',
    status      text NOT NULL,
    config      text NOT NULL DEFAULT '{}',
    tags        text NOT NULL DEFAULT '[]',
    created_at  bigint NOT NULL,
    updated_at  bigint NOT NULL,
    UNIQUE (project, external_id)
);
CREATE INDEX runs_by_project ON runs (project, id);
CREATE TABLE names (
    id   integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
);
CREATE TABLE run_metrics (
    run  bigint NOT NULL,
    name integer NOT NULL,
    PRIMARY KEY (run, name)
);
CREATE TABLE points (
    run    bigint NOT NULL,
    name   integer NOT NULL,
    step   bigint NOT NULL,
    value  float8,
    ival   bigint,
    big    text,
    time   bigint NOT NULL,
    seq_ms bigint,
    seq_n  bigint,
    PRIMARY KEY (run, name, step)
);
CREATE TABLE members (
    run        bigint NOT NULL,
    member     text NOT NULL,
    rank       bigint,
    local_rank bigint,
    host       text,
    pid        bigint,
    state      text,
    updated_at bigint NOT NULL,
    PRIMARY KEY (run, member)
);
"""
_PG_LEDGER = """
ALTER TABLE members ADD COLUMN logged bigint, ADD COLUMN sent bigint,
    ADD COLUMN dropped bigint, ADD COLUMN drops text;
CREATE TABLE rank_ledger (
    run        bigint NOT NULL,
    slot       text NOT NULL,
    rank       bigint,
    stored     bigint NOT NULL,
    dead       bigint NOT NULL,
    last_step  bigint,
    last_time  bigint,
    updated_at bigint NOT NULL,
    PRIMARY KEY (run, slot)
);
"""

_PG_LOGS_DATA_FILES = """
CREATE TABLE console_logs (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run         bigint NOT NULL,
    slot        text NOT NULL,
    rank        bigint,
    time        bigint NOT NULL,
    line_number bigint NOT NULL,
    log_type    text NOT NULL,
    step        bigint,
    message     text NOT NULL,
    digest      bytea NOT NULL,
    UNIQUE (run, slot, time, line_number, log_type, digest)
);
CREATE INDEX console_logs_by_run ON console_logs (run, id);
CREATE TABLE run_data (
    id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run       bigint NOT NULL,
    log_name  text NOT NULL,
    data_type text NOT NULL,
    step      bigint NOT NULL,
    time      bigint NOT NULL,
    data      text NOT NULL,
    digest    bytea NOT NULL,
    UNIQUE (run, log_name, step, digest)
);
CREATE TABLE run_files (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run          bigint NOT NULL,
    log_name     text NOT NULL,
    file_name    text NOT NULL,
    file_type    text NOT NULL,
    step         bigint NOT NULL,
    sample_index bigint NOT NULL,
    time         bigint NOT NULL,
    caption      text,
    declared     bigint,
    size         bigint,
    uploaded_at  bigint,
    UNIQUE (run, log_name, step, sample_index, file_name)
);
CREATE TABLE log_names (
    run      bigint NOT NULL,
    log_name text NOT NULL,
    log_type text NOT NULL,
    PRIMARY KEY (run, log_name)
);
"""
"""The SQLite ``_v3_logs_data_files`` (``run_data``'s UNIQUE index serves its reads by name)."""

PG_MIGRATIONS: list[tuple[str, str]] = [
    ("base", _PG_BASE),
    ("loss ledger", _PG_LEDGER),  # the SQLite _v1_loss_ledger
    ("member node and attempt",  # the SQLite _v4_member_node_attempt
     "ALTER TABLE members ADD COLUMN IF NOT EXISTS node bigint;"
     " ALTER TABLE members ADD COLUMN IF NOT EXISTS attempt bigint"),
    ("console logs, data, files and log names", _PG_LOGS_DATA_FILES),  # the SQLite _v3
    ("project tenants",  # the SQLite _v5_project_tenants
     _PROJECT_TENANTS.replace("TEXT", "text") + "; INSERT INTO project_tenants SELECT DISTINCT"
     " project, '' FROM runs ON CONFLICT DO NOTHING"),
]
"""``(name, SQL)`` per version (version = position + 1); append, never edit a released one."""


def pg_migrate(db: Any) -> int:
    """Bring the PostgreSQL database of ``db`` (a psycopg connection in autocommit mode) to
    ``len(PG_MIGRATIONS)``, once across replicas; returns the version now."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                   " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        row = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        version = int(row[0] or 0)
        for i, (name, sql) in enumerate(PG_MIGRATIONS[version:], start=version + 1):
            db.execute(sql)
            db.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                       (i, name))
    return max(version, len(PG_MIGRATIONS))
