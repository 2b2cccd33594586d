"""API keys: made by `pluto server keys`, shown once, stored as hashes, scoped, revocable
while the server runs; PLUTO_API_KEY stays the bootstrap admin key."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pluto_server._auth import SCOPES, needed_scope
from tests.conftest import ROOT, Backend
from tests.helpers import PYTHON

from .conftest import clean_env


def keys_cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(PLUTO_DB_URL=f"sqlite:///{db}", PYTHONPATH=str(ROOT))
    return subprocess.run([PYTHON, "-m", "pluto._cli", "server", "keys", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def new_key(db: Path, scope: str, name: str = "") -> str:
    done = keys_cli(db, "create", "--scope", scope, *(["--name", name] if name else []))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]  # the key is the last line
    assert token.startswith("pluto_") and len(token) >= 6 + 43  # 32 random bytes, base64
    assert token not in done.stderr
    return token


def db_of(backend: Backend) -> Path:
    assert backend.child is not None and backend.child.log_path is not None
    return backend.child.log_path.parent / "pluto.db"


def call(backend: Backend, key: str, method: str, path: str, **kw: object) -> httpx.Response:
    with backend.client(key) as c:
        return c.request(method, path, **kw)  # type: ignore[arg-type]


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_scopes_hashes_and_revocation(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    db = db_of(backend)
    read, write, admin = (new_key(db, s, f"{s}-key") for s in SCOPES)
    assert len({read, write, admin}) == 3

    # Only hashes are stored: no token appears anywhere in the database file.
    raw = b"".join(p.read_bytes() for p in db.parent.glob("pluto.db*"))
    with sqlite3.connect(db) as sql:
        rows = sql.execute("SELECT hash, scope, name FROM api_keys ORDER BY id").fetchall()
    assert [(r[1], r[2]) for r in rows] == [(s, f"{s}-key") for s in SCOPES]
    assert [r[0] for r in rows] == [hashlib.sha256(t.encode()).hexdigest()
                                    for t in (read, write, admin)]
    for token in (read, write, admin):
        assert token.encode() not in raw

    body = {"runName": "r", "projectName": "keys", "externalId": "k1"}
    # write (a worker's key): creates, ingests, reads.
    created = call(backend, write, "POST", "/api/runs/create", json=body)
    assert created.status_code == 200, created.text
    run = created.json()["runId"]
    line = json.dumps({"time": 1, "step": 1, "data": {"m": 1.5}}) + "\n"
    ingest = dict(content=line.encode(), headers={"X-Run-Id": str(run),
                                                  "Content-Type": "application/x-ndjson"})
    assert call(backend, write, "POST", "/ingest/metrics", **ingest).status_code == 200

    # read: every GET, and 403 naming the fix on every write; nothing changes.
    assert call(backend, read, "GET", f"/api/runs/{run}").json()["externalId"] == "k1"
    assert call(backend, read, "GET", "/api/runs", params={"project": "keys"}).status_code == 200
    for method, path, kw in [
        ("POST", "/api/runs/create", {"json": {**body, "externalId": "k2"}}),
        ("POST", "/api/runs/status/update", {"json": {"runId": run, "status": "FAILED"}}),
        ("POST", "/api/runs/config/update", {"json": {"runId": run, "config": '{"a": 1}'}}),
        ("POST", f"/api/runs/{run}/members", {"json": [{"member": "h:1"}]}),
        ("POST", "/ingest/metrics", ingest),
    ]:
        resp = call(backend, read, method, path, **kw)
        assert resp.status_code == 403, (path, resp.text)
        assert "--scope write" in resp.json()["error"]
    stored = backend.run(run)
    assert stored["status"] == "RUNNING" and stored["config"] == {} and stored["members"] == []
    assert [r["externalId"] for r in backend.runs("keys")] == ["k1"]
    points = call(backend, read, "GET", f"/api/runs/{run}/metrics/m")
    assert [p[:2] for p in points.json()["points"]] == [[1, 1.5]]

    # admin and the bootstrap PLUTO_API_KEY can do everything.
    for key in (admin, backend.key):
        resp = call(backend, key, "POST", "/api/runs/status/update",
                    json={"runId": run, "status": "COMPLETED"})
        assert resp.status_code == 200, resp.text

    # list shows ids, scopes and states, never a key; revoke works on the next request.
    listed = keys_cli(db, "list")
    assert listed.returncode == 0 and listed.stdout.count("active") == 3
    assert not any(t in listed.stdout + listed.stderr for t in (read, write, admin))
    key_id = 2  # the write key was made second
    assert call(backend, write, "GET", "/api/runs").status_code == 200
    revoked = keys_cli(db, "revoke", str(key_id))
    assert revoked.returncode == 0, revoked.stderr
    resp = call(backend, write, "POST", "/api/runs/create", json={**body, "externalId": "k3"})
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]
    assert call(backend, write, "GET", "/api/runs").status_code == 401
    assert call(backend, read, "GET", "/api/runs").status_code == 200  # the others still work
    assert "revoked" in keys_cli(db, "list").stdout
    missing = keys_cli(db, "revoke", "999")
    assert missing.returncode == 1 and "no key with id 999" in missing.stderr

    # A made-up key of the right shape, and the hash of a real key used as a key, are refused.
    for fake in ("pluto_" + "A" * 43, hashlib.sha256(read.encode()).hexdigest()):
        assert call(backend, fake, "GET", "/api/runs").status_code == 401

    assert read not in backend.child.log() and write not in backend.child.log()  # type: ignore[union-attr]


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_keys_cli_refuses_bad_input(tmp_path: Path) -> None:
    bad = keys_cli(tmp_path / "db.sqlite", "create", "--scope", "root")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert keys_cli(tmp_path / "db.sqlite", "revoke", "x").returncode == 2
    empty = keys_cli(tmp_path / "db.sqlite", "list")
    assert empty.returncode == 0 and empty.stdout == ""


@pytest.mark.parametrize("method,path,scope", [
    ("GET", "/api/runs", "read"), ("GET", "/api/runs/3/metrics/a/b", "read"),
    ("HEAD", "/api/runs", "read"), ("POST", "/api/slug", "read"),
    ("POST", "/api/runs/create", "write"), ("POST", "/ingest/metrics", "write"),
    ("PUT", "/files", "write"), ("DELETE", "/api/runs/3", "write"),
    ("GET", "/api/keys", "admin"), ("POST", "/api/keys/create", "admin"),
])
def test_needed_scope(method: str, path: str, scope: str) -> None:
    assert needed_scope(method, path) == scope
