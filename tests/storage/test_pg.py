"""PostgreSQL behind several backend replicas: migrations once, one id per create, newest seq
wins under concurrency. Real PostgreSQL (a throwaway cluster or PLUTO_TEST_DB_URL), real
backend processes."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pluto import _servers
from pluto_server._pgstore import PgStore
from pluto_server._schema import PG_MIGRATIONS, pg_migrate
from tests.backend.test_read import _check_m4, _series
from tests.conftest import Backend

pytestmark = pytest.mark.e2e  # a PostgreSQL server process, some tests backend processes


def _together(n: int, job: Callable[[int], Any]) -> list[Any]:
    """``job(0..n-1)`` on n threads released at one moment."""
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait(10)
        return job(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_migrations_run_once_when_replicas_start_together(pg_url: str) -> None:
    def migrate(_: int) -> int:
        with psycopg.connect(pg_url, autocommit=True) as db:
            return pg_migrate(db)

    assert _together(4, migrate) == [len(PG_MIGRATIONS)] * 4
    assert migrate(0) == len(PG_MIGRATIONS)  # and again: nothing to do
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(i + 1, name) for i, (name, _) in enumerate(PG_MIGRATIONS)]


def test_an_older_database_is_migrated_keeping_its_rows(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:  # a database at version 1
        db.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT"
                   " NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        db.execute(PG_MIGRATIONS[0][1])
        db.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'base')")
        db.execute("INSERT INTO runs (project, external_id, status, created_at, updated_at)"
                   " VALUES ('p', 'old', 'RUNNING', 1, 1)")
        db.execute("INSERT INTO members (run, member, rank, updated_at) VALUES (1, 'h:1', 0, 1)")
    store = PgStore(pg_url)
    try:
        assert store.find_run("p", "old") == 1
        assert store.upsert_members(1, [{"member": "h:1", "logged": 7, "sent": 7}])
        assert store.upsert_ledger(1, [{"rank": 0, "stored": 7, "dead": 0}])
        got = store.get_run(1)
        assert got["members"][0]["rank"] == 0 and got["ledger"]["stored"] == 7
        assert got["members"][0]["logged"] == 7
    finally:
        store.close()


def test_concurrent_upserts_from_two_stores_keep_the_newest_seq(pg_url: str) -> None:
    """Two stores (two replicas' connection pools) write the same keys with shuffled seqs at
    once; every key ends with the value of its highest seq."""
    stores = [PgStore(pg_url, pool_size=4), PgStore(pg_url, pool_size=4)]
    try:
        run, _ = stores[0].create_run("p", "race", "n", None, None)
        seqs = list(range(1, 41))
        random.Random(7).shuffle(seqs)

        def write(i: int) -> None:
            seq = seqs[i]
            entries = [(step, seq, seq, i % 3, {"loss": float(seq), "acc": seq})
                       for step in range(1, 51)]
            store = stores[i % 2]
            if i % 4 < 2:
                store.write_points(run, entries)
            else:
                store.write_columns(run, ["loss", "acc"], [0, 1] * 50,
                                    [v for s in range(50) for v in (float(seq), seq)],
                                    [2] * 50, list(range(1, 51)), [seq] * 50, [seq] * 50,
                                    [i % 3] * 50)

        _together(len(seqs), write)
        top = max(seqs)
        assert stores[1].points(run, "loss") == [(s, float(top), top) for s in range(1, 51)]
        assert stores[0].points(run, "acc") == [(s, top, top) for s in range(1, 51)]
    finally:
        for s in stores:
            s.close()


def test_two_backend_processes_answer_one_id_for_one_create(pg_url: str, tmp_path: Path) -> None:
    key = "replica-key"  # one deployment: one key, two replicas, one database
    urls = [f"http://127.0.0.1:{_servers.free_port()}" for _ in range(2)]
    children = [_servers.start_backend(u, pg_url, key, tmp_path, name=f"replica{i}")
                for i, u in enumerate(urls)]
    try:
        clients = [httpx.Client(base_url=u, timeout=30, headers={"Authorization": f"Bearer {key}"})
                   for u in urls]

        def create(i: int) -> dict[str, Any]:
            resp = clients[i % 2].post("/api/runs/create", json={
                "projectName": "p", "runName": f"r{i}", "externalId": f"job-{i // 2}",
                "config": f'{{"from{i % 2}": {i}}}'})
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        answers = _together(20, create)
        for job in range(10):
            a, b = answers[2 * job], answers[2 * job + 1]
            assert a["runId"] == b["runId"], (a, b)
            assert sorted([a["resumed"], b["resumed"]]) == [False, True]
            got = clients[job % 2].get(f"/api/runs/{a['runId']}").json()
            assert got["config"] == {"from0": 2 * job, "from1": 2 * job + 1}  # both merged
        assert len({a["runId"] for a in answers}) == 10

        # ingest through both replicas at once, same keys, different seqs: the newest wins
        run = answers[0]["runId"]

        def ingest(i: int) -> None:
            body = "".join(f'{{"time": {i}, "step": {s}, "seq": "{1000 + i}-0", "data": '
                           f'{{"m": {i}}}}}\n' for s in range(1, 101))
            resp = clients[i % 2].post("/ingest/metrics", content=body, headers={
                "X-Run-Id": str(run), "Content-Type": "application/x-ndjson"})
            assert resp.status_code == 200, resp.text

        _together(12, ingest)
        pts = clients[1].get(f"/api/runs/{run}/metrics/m").json()["points"]
        assert pts == [[s, 11, 11] for s in range(1, 101)]
        for c in clients:
            c.close()
    finally:
        for child in children:
            child.stop()


def test_nul_in_text_is_a_400_not_a_500(backend: Backend) -> None:
    with backend.client() as c:
        resp = c.post("/api/runs/create", json={"projectName": "p", "runName": "a\x00b"})
        assert resp.status_code == 400, resp.text
        assert "NUL" in resp.json()["error"]
        ok = c.post("/api/runs/create", json={"projectName": "p", "runName": "fine"})
        assert ok.status_code == 200


def test_the_backend_refuses_a_db_url_it_cannot_use(tmp_path: Path) -> None:
    from pluto.errors import ConfigError
    from pluto_server._settings import ServerSettings

    for bad in ("mysql://x/y", "postgresql://u@h:99999/db", "postgresql://u@h:5432"):
        with pytest.raises(ConfigError, match="PLUTO_DB_URL"):
            ServerSettings.from_env({"PLUTO_DB_URL": bad})


def test_dashboard_reads(pg_url: str) -> None:
    """The read methods the dashboard's routes use (bucketed M4, spans, last steps)."""
    store = PgStore(pg_url)
    try:
        run, _ = store.create_run("p", "dash", "n", None, None)
        values: dict[int, float] = {s: float((s * 37) % 101) for s in range(1, 201)}
        values[57] = float("nan")
        store.write_points(run, [(s, s, None, None, {"m": None if math.isnan(v) else v})
                                 for s, v in values.items()])
        store.upsert_members(run, [{"member": "a"}, {"member": "b"}])
        nid = store.name_ids(["m", "unknown"])
        assert list(nid) == ["m"]
        assert store.step_span(run, nid["m"], 10, 1000) == (10, 200)
        assert store.step_span(run, nid["m"], 300, 400) is None
        assert len(store.points_between(run, nid["m"], 1, 200, 7)) == 7
        assert store.more_than(run, nid["m"], 1, 200, 199)
        assert not store.more_than(run, nid["m"], 1, 200, 200)
        assert store.last_steps([run, run + 1]) == {run: 200}
        assert store.member_counts([run]) == {run: 2}
        assert store.run_version(run) == store.get_run(run)["updatedAt"]
        picked = store.points_m4(run, nid["m"], 1, 200, 50)
        for lo in range(0, 201, 50):  # the buckets are the multiples of the width
            bucket = {s: v for s, v in values.items() if lo <= s < lo + 50}
            numbers = {s: v for s, v in bucket.items() if not math.isnan(v)}
            want = {min(bucket), max(bucket), min(numbers, key=lambda s: (numbers[s], s))}
            want.add(57 if 57 in bucket else max(numbers, key=lambda s: (numbers[s], -s)))
            assert {p[0] for p in picked if lo <= p[0] < lo + 50} == want, lo
        assert next(p for p in picked if p[0] == 57)[1] is None  # the NaN is shown, as None
    finally:
        store.close()


def test_m4_on_postgresql_matches_the_rule(pg_url: str) -> None:
    """PostgreSQL's M4 statement picks what the rule picks (the same absolute bucket grid as
    SQLite's block summaries), over the full range and random zooms."""
    store = PgStore(pg_url)
    rng = random.Random(61)
    try:
        run, _ = store.create_run("p", "m4", "", None, None)
        rows = _series(rng, 9000)
        store.write_points(run, [(s, t, None, None, {"m": v}) for s, v, t in rows])
        _check_m4(store, run, "m", rows, rng)  # type: ignore[arg-type]
    finally:
        store.close()
