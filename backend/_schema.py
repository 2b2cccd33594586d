"""The SQLite schema and its migrations: what a database file of any earlier version becomes.

A file records its version in ``schema_version`` (one row). Version 0 is the schema before
versioning (``_BASE``, which files created then already have); each function of
``_MIGRATIONS`` brings version ``i`` to ``i + 1`` and checks before it alters, so a file that
was half migrated by a crash, or created by ``_BASE`` a moment ago, ends up the same. All of it
runs in one ``BEGIN IMMEDIATE`` transaction, so two backends opening one file migrate it once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

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


def _v2_logs_data_files(db: sqlite3.Connection) -> None:
    """What the official SDK sends besides metrics (issue 21): console lines, structured data
    (histograms, tables, ...), file records and registered log names. Each row carries a
    ``digest`` of its content in its key, so a batch the client resends stores nothing twice;
    a file row is keyed by where it was logged, so a repeated presign reuses it."""
    # One execute per statement: executescript() would COMMIT the migration's transaction.
    for statement in _V2_TABLES.split(";"):
        if statement.strip():
            db.execute(statement)


_V2_TABLES = """
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


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1_loss_ledger, _v2_logs_data_files]
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
