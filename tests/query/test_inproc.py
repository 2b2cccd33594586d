"""The read API and the extra uploads in-process (the fast tier): any query or body is a 2xx
or a 4xx JSON answer naming the problem, never a 5xx; what was accepted reads back. Every test
using ``c`` runs on SQLite and again on PostgreSQL."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pluto_server import _files, _schema
from pluto_server._app import create_app
from pluto_server._query import m4
from pluto_server._settings import ServerSettings
from tests.backend.inproc import KEY, TestClient, new_run

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
ROUTES = ["/api/runs/projects", "/api/runs/list", "/api/runs/details/1",
          "/api/runs/details/by-display-id/P-1", "/api/runs/metric-names", "/api/runs/metrics",
          "/api/runs/statistics", "/api/runs/compare", "/api/runs/leaderboard",
          "/api/runs/files", "/api/runs/logs", "/api/runs/data"]
PARAMS = ["projectName", "runId", "runIds", "logName", "limit", "offset", "stepMin", "stepMax",
          "search", "tags", "sort", "filter", "aggregation", "direction", "logType", "rank",
          "afterId", "dataType"]
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=10) | st.sampled_from(
    ["", "1", "-1", "0", "p", "P-1", "10000", "99999999999999999999", "1,2", "loss", "x/y",
     "-config.lr.value", "summary_metrics.loss", "MAX", "desc", "NaN"])
SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT | st.sampled_from(
                        ["$and", "$or", "$not", "$in", "$regex", "$gt", "status", "tags",
                         "config.lr", "summaryMetrics.loss", "created_at", "$exists"]),
                        inner, max_size=3), max_leaves=12)


@pytest.fixture(scope="module")
def c(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app in-process on each store in turn (``db_url``, tests/query/conftest.py)."""
    tmp = tmp_path_factory.mktemp("query-inproc")
    app = create_app(ServerSettings(api_keys=(KEY,), db_url=db_url,
                                    max_body=1 << 20, files_dir=str(tmp / "files"),
                                    max_file=64))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"},
                    raise_server_exceptions=True) as client:
        run = new_run(client, "p", config={"lr": 0.1}, tags=["t"])
        lines = "".join(json.dumps({"step": i, "data": {"loss": 1 / (i + 1)}}) + "\n"
                        for i in range(20))
        assert client.post("/ingest/metrics", content=lines.encode(),
                           headers={"X-Run-Id": str(run)}).status_code == 200
        yield client


def answered(resp: Any) -> Any:
    assert resp.status_code < 500, resp.text
    body = resp.json()
    if resp.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"]
    return body


@SETTINGS
@given(route=st.sampled_from(ROUTES),
       params=st.dictionaries(st.sampled_from(PARAMS), TEXT | JSON.map(json.dumps), max_size=6))
def test_any_query_is_answered_without_5xx(c: TestClient, route: str,
                                           params: dict[str, str]) -> None:
    # Percent-encoded by hand: a lone surrogate travels as the invalid UTF-8 it encodes to.
    query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'))}"
                     for k, v in params.items())
    answered(c.get(f"{route}?{query}"))


@SETTINGS
@given(node=JSON, sort=TEXT)
def test_any_filter_and_sort_is_answered_without_5xx(c: TestClient, node: Any, sort: str) -> None:
    sort_text = quote(sort.encode("utf-8", "surrogatepass"))
    answered(c.get(f"/api/runs/list?projectName=p&sort={sort_text}&filter="
                   f"{quote(json.dumps(node))}"))


@SETTINGS
@given(path=st.sampled_from(["/ingest/logs", "/ingest/data", "/files", "/api/runs/logName/add"]),
       lines=st.lists(JSON, max_size=4), raw=st.binary(max_size=40), use_raw=st.booleans(),
       run=st.sampled_from(["1", "2", "x", "-1", "99999999999999999999999"]))
def test_any_upload_body_is_answered_without_5xx(c: TestClient, path: str, lines: list[Any],
                                                 raw: bytes, use_raw: bool, run: str) -> None:
    body = raw if use_raw else ("\n".join(json.dumps(x) for x in lines)).encode()
    if path in ("/files", "/api/runs/logName/add") and not use_raw and lines:
        body = json.dumps(lines[0]).encode()
    answered(c.post(path, content=body, headers={"X-Run-Id": run}))


def test_bad_lines_are_refused_one_by_one_and_resent_lines_stored_once(c: TestClient) -> None:
    run = new_run(c, "lines")
    body = (b'{"time": 5, "message": "ok", "lineNumber": 1, "logType": "info", "rank": 3}\n'
            b'{"time": 6, "message": "bad \\udc80"}\n{"message": 7}\n[1]\n'
            b'{"time": 7, "message": "two", "lineNumber": 2, "rank": 3}\n')
    for _ in range(2):  # the second time, as a client retrying the batch
        resp = c.post("/ingest/logs", content=body, headers={"X-Run-Id": str(run)})
        assert resp.status_code == 422 and resp.json()["stored"] == 2
        assert [b["index"] for b in resp.json()["bad_lines"]] == [1, 2, 3]
    logs = c.get("/api/runs/logs", params={"runId": run}).json()["logs"]
    assert [(x["message"], x["logType"], x["rank"]) for x in logs] == [("ok", "INFO", 3),
                                                                       ("two", "INFO", 3)]
    assert c.get("/api/runs/logs", params={"runId": run, "rank": 4}).json()["logs"] == []
    after = c.get("/api/runs/logs", params={"runId": run, "afterId": logs[0]["id"]}).json()
    assert [x["message"] for x in after["logs"]] == ["two"]
    data = (b'{"logName": "h", "dataType": "HISTOGRAM", "step": 1, "data": "{\\"v\\": NaN}"}\n'
            b'{"logName": "", "data": "{}"}\n'
            b'{"logName": "s", "dataType": "string-series", "data": "warmup"}\n')
    resp = c.post("/ingest/data", content=data, headers={"X-Run-Id": str(run)})
    assert resp.status_code == 422 and resp.json()["stored"] == 2
    got = c.get("/api/runs/data", params={"runId": run}).json()["data"]
    assert [(d["logName"], d["data"]) for d in got] == [("h", {"v": "NaN"}), ("s", "warmup")]


def test_metrics_keep_spikes_and_spell_nan(c: TestClient) -> None:
    run = new_run(c, "spiky")
    values: list[Any] = [1.0] * 1000
    values[123], values[456], values[789] = 50.0, -50.0, float("nan")
    lines = "".join(json.dumps({"step": i, "data": {"m": v}}) + "\n" for i, v in enumerate(values))
    assert c.post("/ingest/metrics", content=lines.encode(),
                  headers={"X-Run-Id": str(run)}).status_code == 200
    got = c.get("/api/runs/metrics", params={"runId": run, "limit": 40}).json()["metrics"]
    assert len(got) <= 40
    kept = {p["step"]: p["value"] for p in got}
    assert kept[123] == 50.0 and kept[456] == -50.0 and kept[789] == "NaN"
    assert kept[0] == 1.0 and kept[999] == 1.0
    stats = c.get("/api/runs/statistics", params={"runId": run}).json()["statistics"][0]
    assert (stats["count"], stats["finiteCount"], stats["nonFiniteCount"]) == (1000, 999, 1)
    assert (stats["min"], stats["max"]) == (-50.0, 50.0)
    assert sorted(a["step"] for a in stats["anomalies"]) == [123, 456]


def test_m4_bounds_and_keeps_each_buckets_extremes() -> None:
    rows = [(i, math.sin(i / 7) * (100 if i == 500 else 1), 0) for i in range(10_000)]
    for limit in (1, 2, 3, 4, 7, 100, 9_999):
        picked = m4(rows, limit)
        assert 0 < len(picked) <= limit
        assert [r[0] for r in picked] == sorted({r[0] for r in picked})
        if limit >= 3:
            assert (500, rows[500][1], 0) in picked
    assert m4(rows[:5], 10) == rows[:5]


def test_file_urls_are_signed_expire_and_are_bounded(c: TestClient, monkeypatch: Any) -> None:
    run = new_run(c, "files")
    resp = c.post("/files", json={"files": [{"fileName": "a.bin", "logName": "w", "step": 2}]},
                  headers={"X-Run-Id": str(run)})
    [[name, url]] = [next(iter(m.items())) for m in resp.json()["files"]]
    assert name == "a.bin"
    assert c.put(url, content=b"x" * 65).status_code == 413  # max_file is 64 bytes here
    assert c.get("/api/runs/files", params={"runId": run}).json()["files"] == []
    assert c.put(url.replace("expires=", "expires=1"), content=b"x").status_code == 403
    assert c.put(url, content=b"payload").status_code == 200
    [f] = c.get("/api/runs/files", params={"runId": run, "logName": "w"}).json()["files"]
    assert (f["fileName"], f["fileSize"], f["step"]) == ("a.bin", 7, 2)
    assert c.get(f["downloadUrl"]).content == b"payload"
    assert c.get(f["downloadUrl"].replace("/blob/", "/blob/0")).status_code == 403
    monkeypatch.setattr(_files.time, "time", lambda: time.time_ns() / 1e9 + 7200)
    assert c.get(f["downloadUrl"]).status_code == 403  # expired an hour ago
    again = c.post("/files", json={"files": [{"fileName": "a.bin", "logName": "w", "step": 2}]},
                   headers={"X-Run-Id": str(run)})
    assert again.status_code == 200  # a retried presign reuses the row: still one file
    assert len(c.get("/api/runs/files", params={"runId": run}).json()["files"]) == 1
    assert c.post("/files", json={"files": [{"fileName": "x"}]},
                  headers={"X-Run-Id": "424242"}).status_code == 404


def test_display_ids_resolve_within_their_project(c: TestClient) -> None:
    first, second = new_run(c, "deep-learning-zoo"), new_run(c, "deep-learning-zoo")
    got = c.get("/api/runs/details/by-display-id/DLZ-2",
                params={"projectName": "deep-learning-zoo"}).json()
    assert (got["id"], got["displayId"]) == (second, "DLZ-2")
    assert c.get("/api/runs/details/by-display-id/XYZ-1",
                 params={"projectName": "deep-learning-zoo"}).status_code == 404
    assert c.get(f"/api/runs/details/{first}", params={"projectName": "other"}).status_code == 404
    resumed = c.post("/api/runs/resume", json={"displayId": "DLZ-1"},
                     headers={"X-Project-Name": "deep-learning-zoo"}).json()
    assert resumed["runId"] == first
    assert c.get("/api/runs/details/" + "9" * 5000).status_code == 404


def test_a_version_1_database_gains_the_new_tables(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.executescript(_schema._BASE)
    db.execute("BEGIN IMMEDIATE")
    _schema._v1_loss_ledger(db)
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("COMMIT")
    assert _schema.migrate(db) == _schema.VERSION == 6
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"console_logs", "run_data", "run_files", "log_names", "api_keys",
            "project_tenants", "point_blocks"} <= tables
    assert _schema.migrate(db) == _schema.VERSION  # idempotent
    db.close()


def test_text_sorts_by_code_point_on_either_store(c: TestClient) -> None:
    run = new_run(c, "order")
    body = json.dumps({"step": 1, "data": {"b": 1, "B": 2, "é": 3, "a": 4, "_": 5}}) + "\n"
    assert c.post("/ingest/metrics", content=body.encode(),
                  headers={"X-Run-Id": str(run)}).status_code == 200
    names = c.get("/api/runs/metric-names", params={"projectName": "order"}).json()
    assert names["metricNames"] == ["B", "_", "a", "b", "é"]
    found = c.get("/api/runs/metric-names", params={"projectName": "order", "search": "É"})
    assert found.json()["metricNames"] == ["é"]
    data = "".join(json.dumps({"logName": n, "dataType": "TEXT", "step": 1, "data": n}) + "\n"
                   for n in ("z", "Z", "é"))
    assert c.post("/ingest/data", content=data.encode(),
                  headers={"X-Run-Id": str(run)}).status_code == 200
    got = c.get("/api/runs/data", params={"runId": run}).json()["data"]
    assert [d["logName"] for d in got] == ["Z", "z", "é"]
    stats = c.get("/api/runs/statistics", params={"runId": run, "logName": "B"}).json()
    assert [(s["count"], s["min"], s["max"]) for s in stats["statistics"]] == [(1, 2, 2)]


def test_text_a_store_cannot_hold_is_refused_with_a_reason(c: TestClient, db_url: str) -> None:
    """SQLite holds NUL and index keys of any length; PostgreSQL refuses both. Either way the
    client is answered (a 400 naming why, never a 5xx) and what was accepted reads back whole."""
    pg = db_url.startswith("postgresql")
    run = new_run(c, "odd-text")
    nul = json.dumps({"time": 1, "message": "a\x00b", "lineNumber": 1}) + "\n"
    resp = c.post("/ingest/logs", content=nul.encode(), headers={"X-Run-Id": str(run)})
    assert resp.status_code == (400 if pg else 200), resp.text
    logs = c.get("/api/runs/logs", params={"runId": run}).json()["logs"]
    assert [x["message"] for x in logs] == ([] if pg else ["a\x00b"])
    if pg:
        assert "NUL" in resp.json()["error"]
    # 4 KiB of UTF-8 that does not compress: beyond a PostgreSQL index entry (~2.7 KB)
    wide = "".join(chr(0x10000 + i * 7919 % 50000) for i in range(1024))
    files = c.post("/files", json={"files": [{"fileName": wide, "logName": wide}]},
                   headers={"X-Run-Id": str(run)})
    data = c.post("/ingest/data", headers={"X-Run-Id": str(run)}, content=(json.dumps(
        {"logName": wide, "dataType": "TEXT", "data": "x"}) + "\n").encode())
    for resp in (files, data):
        assert resp.status_code == (400 if pg else 200), resp.text
        if pg:
            assert "too long" in resp.json()["error"]
    got = c.get("/api/runs/data", params={"runId": run}).json()["data"]
    assert [d["logName"] for d in got] == ([] if pg else [wide])
