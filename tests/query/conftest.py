"""Fixtures for the read-API tests: a database URL of each store in turn (``db_url``), a
backend process of its own on it (files under the test's temporary directory) and a runner
for scripts under either SDK's interpreter.

The official SDK (``pluto-ml`` 0.0.29) runs in its own virtualenv, as in
``tests/backend/test_official_sdk.py``: ``PLUTO_ML_PYTHON`` names the interpreter (``make test``
creates ``.venv-pluto-ml``). Scripts get a clean environment: the backend's URL and key only.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pluto import _servers
from tests.backend.test_official_sdk import official_python
from tests.conftest import ROOT, Backend

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def db_url(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database of each store for the module: a SQLite file, then a PostgreSQL
    database on the session's cluster (tests/conftest.py ``pg_server``), dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('query-db') / 'pluto.db'}"
        return
    from tests.storage.pgcluster import drop_database, new_database

    server = request.getfixturevalue("pg_server")
    url = new_database(server, "query")
    yield url
    drop_database(server, url)


@pytest.fixture(scope="module")
def query_backend(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A backend on ``db_url`` whose PLUTO_FILES_DIR is this module's temporary directory."""
    tmp = tmp_path_factory.mktemp("query-backend")
    port = _servers.free_port()
    url = f"http://127.0.0.1:{port}"
    key = "test-" + secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUTO_")}
    env["PLUTO_FILES_DIR"] = str(tmp / "files")
    child = _servers.start_backend(url, db_url, key, tmp, env=env, name="query-backend")
    yield Backend(url, key, child)
    child.stop()


def run_script(python: Path | str, script: Path, backend: Backend, cwd: Path, *args: str,
               timeout: float = 120) -> list[Any]:
    """Run ``script`` with ``python`` against ``backend``; the JSON of its ``RESULT`` lines."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PLUTO_", "MLOP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(cwd), PLUTO_API_KEY=backend.key, PLUTO_DISABLE_TELEMETRY="1",
               PLUTO_URL_APP=backend.url, PLUTO_URL_API=backend.url,
               PLUTO_URL_INGEST=backend.url, PLUTO_URL_PY=backend.url)
    if str(python) == sys.executable:
        env["PYTHONPATH"] = str(ROOT)  # our SDK from this checkout
    proc = subprocess.run([str(python), str(script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert results, proc.stdout[-4000:] + proc.stderr[-8000:]
    return results


@pytest.fixture(scope="module")
def official() -> Path:
    return official_python()
