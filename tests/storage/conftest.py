"""Fixtures for the storage tests: ``store`` is the SQLite store and the PostgreSQL store in
turn, and ``backend`` here is a real backend process on PostgreSQL, so backend API tests
imported into this folder run against PostgreSQL (``test_api_pg.py``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pluto import _servers
from tests.backend.conftest import api, project  # noqa: F401  (re-used with our backend)
from tests.conftest import Backend


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pluto.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    from pluto_server._store import open_store

    s = open_store(store_url)
    yield s
    s.close()


def start_backend(db_url: str, log_dir: Path, name: str = "pg-backend") -> Backend:
    port = _servers.free_port()
    url = f"http://127.0.0.1:{port}"
    key = "test-" + secrets.token_hex(8)
    child = _servers.start_backend(url, db_url, key, log_dir, name=name)
    return Backend(url, key, child)


@pytest.fixture(scope="session")
def pg_session_db(pg_server: str) -> str:
    from tests.storage.pgcluster import new_database

    return new_database(pg_server, "session")


@pytest.fixture(scope="session")
def backend(pg_session_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One real backend process on PostgreSQL for this folder's API tests."""
    b = start_backend(pg_session_db, tmp_path_factory.mktemp("pg-backend"))
    yield b
    assert b.child is not None
    b.child.stop()
