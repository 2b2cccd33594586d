"""The backend validates at the door and reads back whatever it accepted (issue 14).

In-process first (the real app over a real SQLite file, through Starlette's TestClient), then
the same mistakes against the real backend process. Every refusal is a 4xx JSON ``{"error"}``
that names the field; after each, the read routes still answer.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgpack
import pytest

from tests.conftest import Backend

from . import inproc
from .conftest import create, ingest, ndjson
from .inproc import TestClient

SURROGATE = "\\udc80"  # the JSON escape: json.loads turns it into a lone surrogate


@pytest.fixture
def c(tmp_path: Path) -> Iterator[TestClient]:
    with inproc.client(tmp_path / "pluto.db") as client:
        yield client


def fill(template: str, run: int = 0) -> str:
    """JSON text with ``<S>`` the surrogate escape and ``<RUN>`` the run id."""
    return template.replace("<S>", SURROGATE).replace("<RUN>", str(run))


def refused(resp: Any, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text
    message = resp.json()["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, (word, message)
    return message


def readable(c: TestClient, run: int | None = None) -> None:
    """The read routes still answer 200 for everyone."""
    assert c.get("/api/runs").status_code == 200
    if run is not None:
        assert c.get(f"/api/runs/{run}").status_code == 200
        assert c.get(f"/api/runs/{run}/metrics").status_code == 200


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


# -- 1. non-finite numbers in configs ----------------------------------------------------------

def test_non_finite_config_values_read_back_spelled(c: TestClient) -> None:
    # the worker's and the official SDK's json.dumps write bare tokens, inside a JSON string
    config = '{"lr": NaN, "hi": Infinity, "lo": -Infinity, "deep": [1e999, {"x": NaN}]}'
    run = inproc.new_run(c, config=config)
    spelled = {"lr": "NaN", "hi": "Infinity", "lo": "-Infinity",
               "deep": ["Infinity", {"x": "NaN"}]}
    assert c.get(f"/api/runs/{run}").json()["config"] == spelled
    # ... and as a config object in a body that itself holds the bare tokens
    body = fill('{"runId": <RUN>, "config": {"lr": Infinity, "new": NaN}}', run)
    assert inproc.raw_json(c, "/api/runs/config/update", body).status_code == 200
    again = inproc.raw_json(c, "/api/runs/create",
                            '{"projectName": "p", "externalId": "e", "config": {"z": NaN}}')
    assert again.status_code == 200
    [listed] = [r for r in c.get("/api/runs").json()["runs"] if r["id"] == run]
    assert listed["config"] == dict(spelled, lr="Infinity", new="NaN")
    assert c.get(f"/api/runs/{again.json()['runId']}").json()["config"] == {"z": "NaN"}


# -- 2. unencodable strings ----------------------------------------------------------------------

@pytest.mark.parametrize(("field", "body"), [
    ("runName", '{"runName": "a<S>"}'),
    ("projectName", '{"projectName": "<S>"}'),
    ("externalId", '{"externalId": "<S>"}'),
    ("tags[1]", '{"tags": ["ok", "<S>"]}'),
    ("config.a", '{"config": {"a": "<S>"}}'),
    ("config", '{"config": {"<S>": 1}}'),
])
def test_lone_surrogates_in_create_are_400_naming_the_field(c: TestClient, field: str,
                                                            body: str) -> None:
    refused(inproc.raw_json(c, "/api/runs/create", fill(body)), 400, field, "UTF-8")
    readable(c)
    assert c.get("/api/runs").json()["runs"] == []  # nothing was created


def test_lone_surrogates_in_updates_members_and_config_strings(c: TestClient) -> None:
    run = inproc.new_run(c)
    config_text = json.dumps(json.dumps({"a": ["x", "\udc80"]}))  # a JSON string of JSON
    for path, body, field in [
        ("/api/runs/config/update", '{"runId": <RUN>, "config": ' + config_text + "}",
         "config.a[1]"),
        ("/api/runs/config/update", '{"runId": <RUN>, "config": {"b": {"<S>": 1}}}',
         "config.b"),
        ("/api/runs/tags/update", '{"runId": <RUN>, "tags": ["<S>"]}', "tags"),
        ("/api/runs/<RUN>/members", '[{"member": "h:<S>"}]', "[0].member"),
        ("/api/runs/<RUN>/members", '[{"member": "h:1", "host": "<S>"}]', "[0].host"),
        ("/api/runs/<RUN>/members", '[{"member": "h:1", "drops": {"<S>": 1}}]', "[0].drops"),
        ("/api/runs/resume", '{"externalId": "<S>"}', "externalId"),
        ("/files", '{"files": [{"fileName": "<S>"}]}', "fileName"),
    ]:
        refused(inproc.raw_json(c, fill(path, run), fill(body, run)), 400, field)
    readable(c, run)
    got = c.get(f"/api/runs/{run}").json()
    assert got["config"] == {} and got["tags"] == [] and got["members"] == []


def test_lone_surrogate_metric_name_is_a_bad_line(c: TestClient) -> None:
    run = inproc.new_run(c)
    body = fill('{"step": 1, "data": {"ok": 1}}\n{"step": 2, "data": {"bad<S>": 2}}\n')
    resp = inproc.ingest(c, run, body.encode())
    assert resp.status_code == 422, resp.text
    assert resp.json()["stored"] == 1
    [bad] = resp.json()["bad_lines"]
    assert bad["index"] == 1 and "UTF-8" in bad["error"]
    assert c.get(f"/api/runs/{run}/metrics").json()["names"] == ["ok"]
    # msgpack and columns cannot carry a surrogate but can carry its bytes, which are not UTF-8
    not_utf8 = b"\x91\x82\xa4step\x01\xa4data\x81\xa3b\xed\xb2\x80\x01"
    refused(inproc.ingest(c, run, not_utf8, "application/msgpack"), 400, "entry 0")
    columns = msgpack.packb({"names": ["x"], "name": [0], "value": [1.0], "count": [1],
                             "step": [1], "time": [1], "seq_ms": [1], "seq_n": [0]})
    columns = columns.replace(b"\xa1x", b"\xa3\xed\xb2\x80")
    refused(inproc.ingest(c, run, columns, "application/x-pluto-columns"), 400, "msgpack")
    readable(c, run)


# -- 3. nesting --------------------------------------------------------------------------------

def test_nesting_beyond_64_is_400_and_64_reads_back(c: TestClient) -> None:
    ok = nested(63)  # the config object sits one level inside the body
    run = inproc.new_run(c, config=ok)
    assert c.get(f"/api/runs/{run}").json()["config"] == ok
    refused(c.post("/api/runs/create", json={"config": nested(64)}), 400, "deeper than 64")
    as_text = json.dumps(nested(65))
    refused(c.post("/api/runs/create", json={"config": as_text}), 400, "config", "64")
    for depth in (1000, 100_000):  # json.loads raises RecursionError somewhere in here
        text = '{"config": ' + "[" * depth + "]" * depth + "}"
        refused(inproc.raw_json(c, "/api/runs/create", text), 400, "deeper")
        refused(inproc.raw_json(c, f"/api/runs/{run}/members", "[" * depth + "]" * depth),
                400, "deeper")
    deep_line = b'{"step": 0, "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    resp = inproc.ingest(c, run, deep_line + ndjson([{"step": 1, "data": {"a": 1}}]))
    assert resp.status_code == 422 and resp.json()["stored"] == 1
    assert resp.json()["bad_lines"][0]["index"] == 0
    refused(inproc.ingest(c, run, b"[" * 100_000, "application/json"), 400)
    deep_msgpack = b"\x91" + b"\x81\xa1k" * 5000 + b"\x01"
    refused(inproc.ingest(c, run, deep_msgpack, "application/msgpack"), 400, "entry 0")
    readable(c, run)


# -- 4. ids outside int64 ------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["--5", "\u00b2", "99999999999999999999", "9223372036854775808",
                                    "", "1.5", "0x10", " ", "1e3"])
def test_bad_run_id_headers_are_400(c: TestClient, header: str) -> None:
    inproc.new_run(c)
    body = ndjson([{"step": 1, "data": {"a": 1}}])
    resp = c.post("/ingest/metrics", content=body,
                  headers={"X-Run-Id": header.encode("latin-1"),  # "²" arrives as itself
                           "Content-Type": "application/x-ndjson"})
    refused(resp, 400, "X-Run-Id")


def test_ids_beyond_int64(c: TestClient) -> None:
    run = inproc.new_run(c)
    big = 2**63
    for path, body, field in [
        ("/api/runs/status/update", {"runId": big, "status": "FAILED"}, "runId"),
        ("/api/runs/status/update", {"runId": "99999999999999999999", "status": "FAILED"},
         "runId"),
        ("/api/runs/status/update", {"runId": True, "status": "FAILED"}, "runId"),
        ("/api/runs/config/update", {"runId": -(2**63) - 1, "config": "{}"}, "runId"),
        ("/api/runs/tags/update", {"runId": 1.5, "tags": []}, "runId"),
        ("/api/runs/resume", {"runId": big}, "runId"),
        (f"/api/runs/{run}/members", [{"member": "h:1", "pid": big}], "members[0].pid"),
        (f"/api/runs/{run}/members", [{"member": "h:1", "rank": -(2**63) - 1}], "rank"),
        (f"/api/runs/{run}/members", [{"member": "h:1", "local_rank": "3"}], "local_rank"),
        (f"/api/runs/{run}/members", [{"member": "h:1", "sent": -1}], "sent"),
        (f"/api/runs/{run}/ledger", [{"rank": big, "stored": 1, "dead": 0}], "ledger[0].rank"),
        (f"/api/runs/{run}/ledger", [{"rank": 0, "stored": big, "dead": 0}], "stored"),
    ]:
        refused(c.post(path, json=body), 400, field)
    for path in (f"/api/runs/{big}/members", f"/api/runs/{10**30}/ledger"):
        refused(c.post(path, json=[{"member": "m", "stored": 0, "dead": 0}]), 404, "no run")
    for path in (f"/api/runs/{big}", f"/api/runs/{big}/metrics", f"/api/runs/{big}/metrics/a",
                 f"/api/runs/{'9' * 5000}", f"/api/runs/{'9' * 5000}/metrics/a",
                 f"/api/runs/{'0' * 30}{big}"):
        refused(c.get(path), 404)
    refused(c.post(f"/api/runs/{'9' * 5000}/members", json=[]), 404)
    assert c.get(f"/api/runs/{'0' * 30}{run}").status_code == 200
    refused(c.get(f"/api/runs/{run}/metrics/a", params={"since_step": str(10**30)}), 400,
            "since_step")  # a bound beyond int64 is a 400 naming it (the read routes' rule)
    assert c.post("/api/runs/trigger", json={"runId": big}).json() == {"status": "RUNNING"}
    # the edges themselves are fine
    edge = [{"member": "h:1", "rank": 2**63 - 1, "pid": 0, "local_rank": -(2**63)}]
    assert c.post(f"/api/runs/{run}/members", json=edge).status_code == 200
    member = c.get(f"/api/runs/{run}").json()["members"][0]
    assert (member["rank"], member["pid"], member["local_rank"]) == (2**63 - 1, 0, -(2**63))


# -- 5. every mistake is a 4xx naming it --------------------------------------------------------

WRONG_BODIES: list[tuple[str, Any]] = [
    ("/api/runs/create", []), ("/api/runs/create", {"projectName": 5}),
    ("/api/runs/create", {"runName": ["x"]}), ("/api/runs/create", {"externalId": {}}),
    ("/api/runs/create", {"config": 5}), ("/api/runs/create", {"config": "[1]"}),
    ("/api/runs/create", {"config": "{bad"}), ("/api/runs/create", {"tags": [1]}),
    ("/api/runs/create", {"tags": {"a": 1}}), ("/api/runs/create", {"runName": "x" * 5000}),
    ("/api/runs/status/update", {"runId": "{run}", "status": None}),
    ("/api/runs/status/update", {"status": "RUNNING"}),
    ("/api/runs/config/update", {"runId": "{run}", "config": []}),
    ("/api/runs/tags/update", {"runId": "{run}", "tags": 3}),
    ("/api/runs/{run}/members", None), ("/api/runs/{run}/members", [3]),
    ("/api/runs/{run}/members", [{"member": ""}]), ("/api/runs/{run}/members", [{"rank": 0}]),
    ("/api/runs/{run}/members", [{"member": "m", "host": 5}]),
    ("/api/runs/{run}/members", [{"member": "m", "state": ["x"]}]),
    ("/api/runs/{run}/members", [{"member": "m", "drops": [1]}]),
    ("/api/runs/{run}/members", [{"member": "m", "drops": {"overflow": -1}}]),
    ("/api/runs/{run}/members", [{"member": "m", "drops": {"overflow": 1.5}}]),
    ("/api/runs/{run}/members", [{"member": "m", "logged": True}]),
    ("/api/runs/{run}/ledger", [{"rank": 0}]), ("/api/runs/{run}/ledger", ["x"]),
    ("/api/runs/{run}/ledger", [{"rank": "0", "stored": 1, "dead": 1}]),
    ("/api/runs/{run}/ledger", [{"rank": 0, "stored": 1, "dead": 1, "last_step": 1.5}]),
    ("/api/runs/resume", {"externalId": "x", "projectName": 3}),
    ("/api/runs/resume", {}), ("/files", {"files": 3}),
]


def test_wrong_types_everywhere_are_4xx_json(c: TestClient) -> None:
    run = inproc.new_run(c)
    for path, body in WRONG_BODIES:
        if isinstance(body, dict) and body.get("runId") == "{run}":
            body = dict(body, runId=run)
        resp = c.post(path.replace("{run}", str(run)), json=body)
        assert 400 <= resp.status_code < 500, (path, body, resp.text)
        assert resp.json()["error"], (path, body)
    for path, body in [("/api/runs/create", b"{"), ("/api/runs/create", b"\xff\xfe"),
                       (f"/api/runs/{run}/ledger", b"[1, 2"), ("/api/runs/trigger", b"[]")]:
        refused(c.post(path, content=body), 400)
    readable(c, run)
    assert c.get(f"/api/runs/{run}").json()["members"] == []


def test_msgpack_oddities_are_400(c: TestClient) -> None:
    run = inproc.new_run(c)
    list_key = b"\x91\x82\xa4step\x01\x91\x01\x02"  # [{"step": 1, [1]: 2}]
    unhashable = b"\x91\x81\x80\x01"  # [{{}: 1}]
    empty_maps = msgpack.packb([{"step": 1, "data": {i: {} for i in range(10_000)}}])
    for body in (list_key, unhashable, b"\xc1", b"", b"\x92\x80", b"\x91\x80\x80",
                 b"\xdd\xff\xff\xff\xff\xc0", empty_maps):
        refused(inproc.ingest(c, run, body, "application/msgpack"), 400)
    assert "more maps" in inproc.ingest(c, run, empty_maps, "application/msgpack").text
    small = msgpack.packb([{"step": s, "data": {"m": s}} for s in range(1000)])  # 2 maps/~18 B
    assert inproc.ingest(c, run, small, "application/msgpack").json() == {"stored": 1000}
    for body in (msgpack.packb([{"a": 1}]), msgpack.packb({"names": [[]] * 20}),
                 msgpack.packb({"names": [{}] * 3}), msgpack.packb({"names": [[]]})):
        refused(inproc.ingest(c, run, body, "application/x-pluto-columns"), 400)
    readable(c, run)


def test_many_bad_lines_answer_every_index_briefly(c: TestClient) -> None:
    run = inproc.new_run(c)
    count = 300_000
    body = msgpack.packb([None] * count + [{"step": 1, "data": {"a": 1.5}}])
    resp = inproc.ingest(c, run, body, "application/msgpack")
    assert resp.status_code == 422
    answer = resp.json()
    assert answer["stored"] == 1 and answer["bad_count"] == count
    assert [b["index"] for b in answer["bad_lines"]] == list(range(count))
    assert all("JSON object" in b["error"] for b in answer["bad_lines"][:20])
    assert all(b.keys() == {"index"} for b in answer["bad_lines"][20:])
    assert len(resp.content) <= 20 * count + 2000  # ~18 bytes per bad line beyond the first 20
    assert c.get(f"/api/runs/{run}/metrics/a").json()["points"][0][:2] == [1, 1.5]
    small = inproc.ingest(c, run, b"1\n" * 30 + ndjson([{"step": 2, "data": {"a": 2}}]))
    assert small.status_code == 422 and small.json()["bad_count"] == 30
    assert len(small.json()["bad_lines"]) == 30


# -- a stored row that is broken is an error item, never a 500 ------------------------------------

def test_broken_stored_rows_are_error_items(tmp_path: Path) -> None:
    db = tmp_path / "pluto.db"
    with inproc.client(db) as c:
        good = inproc.new_run(c)
        broken = [inproc.new_run(c, externalId=f"b{i}") for i in range(5)]
    # rows as older versions wrote them: json.dumps escaped surrogates, deep nesting, junk
    rows = ['{"a": "\\udc80"}', "[" * 990 + "]" * 990, "{not json", '{"x": NaN}', "{}"]
    with sqlite3.connect(db) as sql:
        for run, config in zip(broken, rows):
            sql.execute("UPDATE runs SET config = ? WHERE id = ?", (config, run))
        sql.execute("UPDATE runs SET tags = ? WHERE id = ?", ('["\\ud800"]', broken[4]))
        # bytes that are not UTF-8, as another tool could write them
        sql.execute("UPDATE runs SET name = CAST(x'66ff' AS TEXT) WHERE id = ?", (good,))
    with inproc.client(db) as c:
        listed = {r["id"]: r for r in c.get("/api/runs").json()["runs"]}
        assert listed[good]["config"] == {} and listed[good]["name"] == "f\ufffd"
        assert listed[broken[3]]["config"] == {"x": "NaN"}  # bare NaN of old rows: spelled
        for run in (broken[0], broken[1], broken[2], broken[4]):
            assert listed[run].keys() == {"id", "error"} and str(run) in listed[run]["error"]
            refused(c.get(f"/api/runs/{run}"), 409, f"run {run}")
        assert c.get(f"/api/runs/{broken[3]}").status_code == 200
        # a merge that replaces the offending key repairs the row; one that does not is a 409
        refused(c.post("/api/runs/config/update", json={"runId": broken[0], "config": {"b": 1}}),
                409, "config")
        fix = {"runId": broken[0], "config": {"a": "fixed"}}
        assert c.post("/api/runs/config/update", json=fix).status_code == 200
        assert c.get(f"/api/runs/{broken[0]}").json()["config"] == {"a": "fixed"}
        assert c.post("/api/runs/trigger", json={"runId": broken[2]}).status_code == 200


# -- the same, against the real backend process ---------------------------------------------------

def test_process_level_door(backend: Backend, api: httpx.Client, project: str) -> None:
    run = create(api, project, "door", config='{"lr": NaN, "x": -Infinity}')["runId"]
    assert backend.run(run)["config"] == {"lr": "NaN", "x": "-Infinity"}
    assert any(r["id"] == run for r in backend.runs(project))
    text = fill('{"runName": "<S>", "projectName": "<P>"}').replace("<P>", project)
    refused(api.post("/api/runs/create", content=text.encode()), 400, "runName")
    for header in (b"--5", b"99999999999999999999", "\u00b2".encode("latin-1")):
        refused(api.post("/ingest/metrics", content=b"{}\n", headers={"X-Run-Id": header}),
                400, "X-Run-Id")  # b"\xb2" arrives as "\u00b2", which str.isdigit() takes
    refused(api.post(f"/api/runs/{2**64}/members", json=[{"member": "m"}]), 404)
    refused(api.post(f"/api/runs/{run}/members", json=[{"member": "m", "pid": 2**63}]), 400,
            "pid")
    refused(ingest(api, run, b"\x91\x82\xa4step\x01\x91\x01\x02", "application/msgpack"), 400)
    text = ('{"runName": "r", "projectName": "<P>", "config": <C>}'.replace("<P>", project)
            .replace("<C>", "[" * 100_000 + "]" * 100_000))
    refused(api.post("/api/runs/create", content=text.encode()), 400, "deeper")
    assert api.get("/api/runs").status_code == 200
    assert backend.run(run)["config"] == {"lr": "NaN", "x": "-Infinity"}


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_memory_per_request_is_bounded(private_backend: Backend) -> None:
    """A 3 MB msgpack body of nils once cost +1 GB and a 212 MB answer; now a few MB per MB
    (README "Limits" states the measured worst case, ~30 MB per MB)."""
    assert private_backend.child is not None
    pid = private_backend.child.pid
    with private_backend.client() as api:
        api.timeout = httpx.Timeout(120)
        run = create(api, "mem")["runId"]
        assert ingest(api, run, ndjson([{"step": 0, "data": {"warm": 1}}])).status_code == 200
        before = _peak_rss_mb(pid)
        body = msgpack.packb([None] * (3 << 20))
        resp = ingest(api, run, body, "application/msgpack")
        assert resp.status_code == 422 and resp.json()["bad_count"] == 3 << 20
        assert len(resp.content) < 20 * (3 << 20)
        nils = _peak_rss_mb(pid) - before
        lines = ingest(api, run, b"1\n" * (3 << 19))
        assert lines.status_code == 422 and lines.json()["bad_count"] == 3 << 19
        both = _peak_rss_mb(pid) - before
    assert nils < 3 * 40, f"+{nils:.0f} MB of peak RSS for a 3 MB body of nils"
    assert both < 3 * 40, f"+{both:.0f} MB of peak RSS for 3 MB bodies"


def test_a_wrong_method_is_405_json_naming_the_allowed_ones(c: TestClient) -> None:
    resp = c.delete("/api/runs")
    assert resp.status_code == 405
    assert "error" in resp.json()
    assert "GET" in resp.headers["allow"]  # the exception's headers are kept (RFC 9110)


def test_a_client_gone_mid_body_is_no_traceback(private_backend: Backend) -> None:
    """A client that hangs up before its declared body arrived (a killed rank, a proxy's
    timeout) is not the server's error: no traceback in the log, and the server goes on."""
    assert private_backend.child is not None
    where = urlsplit(private_backend.url)
    for path in ("/api/runs/trigger", "/ingest/metrics", "/api/runs/create"):
        with socket.create_connection((where.hostname, where.port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                      f"Authorization: Bearer {private_backend.key}\r\nX-Run-Id: 1\r\n"
                      "Content-Type: application/json\r\n\r\n{\"runId\": ".encode())
            time.sleep(0.3)
    time.sleep(1.0)
    with private_backend.client() as c:
        assert c.get("/api/runs").status_code == 200
        assert 'status="400"' in c.get("/metrics").text  # counted, as a client's error
    log = private_backend.child.log()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
