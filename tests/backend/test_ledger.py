"""The backend side of the loss ledger (notes/ledger.md §3) and the schema migration under it.

A COMPLETED run with a loss must not look complete: members carry the SDK's counts, the
worker posts per-rank counts, and ``GET /api/runs[/{id}]`` add them up into ``lost``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pluto_server._schema import VERSION
from pluto_server._store import Store
from tests.conftest import Backend

from . import inproc
from .conftest import create
from .inproc import TestClient

OLD_SCHEMA = """
CREATE TABLE runs (
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
CREATE INDEX runs_by_project ON runs (project, id);
CREATE TABLE names (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE run_metrics (run INTEGER NOT NULL, name INTEGER NOT NULL,
                          PRIMARY KEY (run, name)) WITHOUT ROWID;
CREATE TABLE points (run INTEGER NOT NULL, name INTEGER NOT NULL, step INTEGER NOT NULL, value,
                     time INTEGER NOT NULL, seq_ms INTEGER, seq_n INTEGER,
                     PRIMARY KEY (run, name, step)) WITHOUT ROWID;
CREATE TABLE members (
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
INSERT INTO runs VALUES (1, 'old', 'e1', 'r', 'COMPLETED', '{"lr": NaN}', '[]', 1, 1);
INSERT INTO members VALUES (1, 'h:1', 0, 0, 'h', 1, 'finished', 1);
"""
"""The schema as the backend created it before ``schema_version`` existed, with a run in it."""


@pytest.fixture
def c(tmp_path: Path) -> Iterator[TestClient]:
    with inproc.client(tmp_path / "pluto.db") as client:
        yield client


def member(name: str, rank: int | None, **counts: Any) -> dict[str, Any]:
    return {"member": name, "rank": rank, "local_rank": 0, "node": None, "attempt": None,
            "host": "h", "pid": 1, "state": "running", **counts}


def test_an_old_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as sql:
        sql.executescript(OLD_SCHEMA)
    for _ in range(2):  # opening it again changes nothing
        Store(str(db)).close()
    with sqlite3.connect(db) as sql:
        columns = {row[1] for row in sql.execute("PRAGMA table_info(members)")}
        assert {"logged", "sent", "dropped", "drops"} <= columns
        assert sql.execute("SELECT version FROM schema_version").fetchall() == [(VERSION,)]
        assert sql.execute("SELECT count(*) FROM rank_ledger").fetchone() == (0,)
    with inproc.client(db) as c:
        run = c.get("/api/runs/1").json()
        assert run["config"] == {"lr": "NaN"}
        assert run["members"] == [dict(member("h:1", 0), state="finished", logged=None,
                                       sent=None, dropped=None, drops=None, stored=None,
                                       dead=None)]
        assert run["ledger"] == {"logged": 0, "sent": 0, "dropped": 0, "stored": 0, "dead": 0,
                                 "missing": 0, "lost": 0, "console_dropped": 0}
        assert c.post("/api/runs/1/members", json=[{"member": "h:1", "sent": 5}]).status_code \
            == 200
        assert c.post("/api/runs/1/ledger", json=[{"rank": 0, "stored": 3, "dead": 0}]
                      ).status_code == 200
        assert c.get("/api/runs/1").json()["ledger"]["lost"] == 2  # COMPLETED: 2 missing
        assert [(r["id"], r["lost"], r["members"]) for r in c.get("/api/runs").json()["runs"]] \
            == [(1, 2, 1)]


def test_a_fresh_database_has_the_same_schema_as_a_migrated_one(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    with sqlite3.connect(old) as sql:
        sql.executescript(OLD_SCHEMA)
    for path in (old, fresh):
        Store(str(path)).close()

    def shape(path: Path) -> dict[str, list[tuple[Any, ...]]]:
        with sqlite3.connect(path) as sql:
            tables = [t for (t,) in sql.execute("SELECT name FROM sqlite_master WHERE "
                                                "type = 'table' ORDER BY name")]
            return {t: sorted(r[1:3] for r in sql.execute(f"PRAGMA table_info({t})"))
                    for t in tables}

    assert shape(old) == shape(fresh)


def test_members_carry_the_ledger_and_runs_add_it_up(c: TestClient) -> None:
    run = inproc.new_run(c)
    members = [member("a:1", 0, logged=100, sent=90, dropped=10, drops={"overflow": 10}),
               member("b:2", 1, logged=50, sent=50, dropped=0, drops={"console": 7}),
               member("c:3", 1),  # rank 1 twice: the worker's counts cannot be split
               member("d:4", 2)]  # an older SDK: no counts
    assert c.post(f"/api/runs/{run}/members", json=members).json() == {"ok": True}
    ledger = [{"rank": 1, "stored": 45, "dead": 1, "last_step": 9, "last_time": 1000},
              {"rank": None, "stored": 0, "dead": 2, "last_step": None, "last_time": None},
              {"rank": 0, "stored": 80, "dead": 0, "last_step": 7, "last_time": 900}]
    assert c.post(f"/api/runs/{run}/ledger", json=ledger).json() == {"ok": True}
    got = c.get(f"/api/runs/{run}").json()
    by_name = {m["member"]: m for m in got["members"]}
    assert by_name["a:1"] == dict(members[0], stored=80, dead=0)
    assert (by_name["b:2"]["stored"], by_name["c:3"]["dead"]) == (None, None)
    assert by_name["d:4"]["logged"] is None and by_name["d:4"]["stored"] is None
    assert got["ranks"] == [ledger[2], ledger[0], ledger[1]]  # by rank, the unreadable last
    running = {"logged": 150, "sent": 140, "dropped": 10, "stored": 125, "dead": 3,
               "missing": 0, "lost": 13, "console_dropped": 7}  # lines, not entries
    assert got["ledger"] == running  # still running: what is not stored yet may be in flight
    [listed] = c.get("/api/runs").json()["runs"]
    assert (listed["lost"], listed["members"], listed["console_dropped"]) == (13, 4, 7)
    assert c.post("/api/runs/status/update", json={"runId": run, "status": "COMPLETED"}
                  ).status_code == 200
    assert c.get(f"/api/runs/{run}").json()["ledger"] == dict(running, missing=12, lost=25)
    assert c.get("/api/runs").json()["runs"][0]["lost"] == 25
    # absolute values: a later post replaces; null last_step keeps the stored one
    again = [{"rank": 0, "stored": 90, "dead": 0, "last_step": None, "last_time": None},
             {"rank": 1, "stored": 49, "dead": 1}, {"rank": None, "stored": 0, "dead": 0}]
    assert c.post(f"/api/runs/{run}/ledger", json=again).status_code == 200
    final = c.get(f"/api/runs/{run}").json()
    assert final["ranks"][0] == {"rank": 0, "stored": 90, "dead": 0, "last_step": 7,
                                 "last_time": 900}
    assert final["ledger"] == {"logged": 150, "sent": 140, "dropped": 10, "stored": 139,
                               "dead": 1, "missing": 0, "lost": 11, "console_dropped": 7}
    # a member update without counts keeps them (null keeps the stored value)
    assert c.post(f"/api/runs/{run}/members", json=[{"member": "a:1", "state": "finished"}]
                  ).status_code == 200
    a = next(m for m in c.get(f"/api/runs/{run}").json()["members"] if m["member"] == "a:1")
    assert (a["state"], a["sent"], a["drops"]) == ("finished", 90, {"overflow": 10})


def test_ledger_route_refuses_and_404s(c: TestClient) -> None:
    run = inproc.new_run(c)
    ok = [{"rank": 0, "stored": 1, "dead": 0}]
    assert c.post("/api/runs/999/ledger", json=ok).status_code == 404
    assert c.post(f"/api/runs/{2**63}/ledger", json=ok).status_code == 404
    for body in ([{"rank": 0, "stored": -1, "dead": 0}], [{"rank": 0, "dead": 0}],
                 [{"rank": 0, "stored": 1, "dead": "2"}], [{"rank": 0.0, "stored": 1, "dead": 0}],
                 [{"rank": 0, "stored": 1, "dead": 0, "last_time": 2**63}], "x", [None]):
        resp = c.post(f"/api/runs/{run}/ledger", json=body)
        assert resp.status_code == 400 and "ledger" in resp.json()["error"], (body, resp.text)
    assert c.get(f"/api/runs/{run}").json()["ranks"] == []
    one = {"rank": 3, "stored": 2, "dead": 1, "last_step": -5, "last_time": 0}
    assert c.post(f"/api/runs/{run}/ledger", json=one).status_code == 200  # one object is fine
    assert c.get(f"/api/runs/{run}").json()["ranks"] == [one]


def test_ledger_through_the_real_backend(backend: Backend, api: httpx.Client,
                                         project: str) -> None:
    run = create(api, project, "ledger")["runId"]
    assert api.post(f"/api/runs/{run}/members",
                    json=[member("h:1", 0, logged=10, sent=10, dropped=0, drops={})]
                    ).status_code == 200
    assert api.post(f"/api/runs/{run}/ledger",
                    json=[{"rank": 0, "stored": 7, "dead": 1, "last_step": 6,
                           "last_time": 5}]).status_code == 200
    assert api.post("/api/runs/status/update",
                    json={"runId": run, "status": "FAILED"}).status_code == 200
    got = backend.run(run)
    assert got["ledger"] == {"logged": 10, "sent": 10, "dropped": 0, "stored": 7, "dead": 1,
                             "missing": 2, "lost": 3, "console_dropped": 0}
    assert got["members"][0]["stored"] == 7
    [listed] = backend.runs(project)
    assert (listed["lost"], listed["members"]) == (3, 1)
