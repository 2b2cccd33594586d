"""POST /ingest/metrics: idempotent upserts, seq tie-breaks, exact values, bad lines, limits."""

from __future__ import annotations

import math

import httpx
import msgpack
import pytest

from tests.conftest import Backend

from .conftest import SMALL_BODY, create, ingest, ndjson, points


@pytest.fixture
def run(api: httpx.Client, project: str) -> int:
    return int(create(api, project, "ingest")["runId"])


def test_same_batch_twice_makes_no_duplicates(api: httpx.Client, run: int) -> None:
    body = ndjson([{"time": 1000 + s, "step": s, "data": {"loss": 1 / s, "lr": 0.001}}
                   for s in range(1, 101)])
    for _ in range(2):
        resp = ingest(api, run, body)
        assert resp.status_code == 200 and resp.json() == {"stored": 200}
    got = points(api, run, "loss")
    assert [p[0] for p in got] == list(range(1, 101))
    assert got[0] == [1, 1.0, 1001] and got[-1] == [100, 0.01, 1100]
    assert api.get(f"/api/runs/{run}/metrics").json() == {"names": ["loss", "lr"]}


def test_older_seq_never_overwrites_newer(api: httpx.Client, run: int) -> None:
    def post(seq: str | None, value: float) -> None:
        line = {"time": 1, "step": 7, "data": {"m": value}}
        if seq is not None:
            line["seq"] = seq
        assert ingest(api, run, ndjson([line])).status_code == 200

    post("1764000000123-5", 1.0)
    post("1764000000123-4", 2.0)  # older entry redelivered late: ignored
    post("1764000000122-9", 3.0)
    assert points(api, run, "m") == [[7, 1.0, 1]]
    post("1764000000123-5", 1.0)  # the same entry again: harmless
    post("1764000000124-0", 4.0)  # newer: wins
    assert points(api, run, "m")[0][1] == 4.0
    post("1764000000200", 5.0)  # an id without "-n" means n = 0
    assert points(api, run, "m")[0][1] == 5.0
    post(None, 6.0)  # no seq (the official SDK): the later write wins
    assert points(api, run, "m")[0][1] == 6.0


def test_seq_tie_break_inside_one_batch(api: httpx.Client, run: int) -> None:
    lines = [{"time": 1, "step": 1, "seq": "5-1", "data": {"m": 1}},
             {"time": 1, "step": 1, "seq": "5-0", "data": {"m": 0}}]
    assert ingest(api, run, ndjson(lines)).status_code == 200
    assert points(api, run, "m")[0][1] == 1


EXACT = {
    "tenth_sum": 0.1 + 0.2, "tiny": 1e-300, "denormal": 5e-324, "huge": 1.7976931348623157e308,
    "neg_zero": -0.0, "int": 3, "float_int": 3.0, "big_int": 2**53 + 1, "int64_max": 2**63 - 1,
    "int64_min": -(2**63), "beyond_int64": 2**64 + 7, "third": 1 / 3, "neg": -123.456e-7,
}
SPECIAL = {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity"}


def _check_exact(api: httpx.Client, run: int) -> None:
    for name, value in EXACT.items():
        got = points(api, run, name)[0][1]
        assert type(got) is type(value) and repr(got) == repr(value), name
    for name, spelled in SPECIAL.items():
        assert points(api, run, name)[0][1] == spelled, name


def test_values_round_trip_exactly_ndjson(api: httpx.Client, run: int) -> None:
    data = {**EXACT, **SPECIAL}
    assert ingest(api, run, ndjson([{"time": 5, "step": 1, "data": data}])).json() == {
        "stored": len(data)}
    _check_exact(api, run)


def test_values_round_trip_exactly_msgpack(api: httpx.Client, run: int) -> None:
    data = {name: v for name, v in EXACT.items() if name != "beyond_int64"}  # msgpack: 64 bits
    data.update(nan=math.nan, inf=math.inf, ninf=-math.inf)
    entries = [{"time": 5, "step": 1, "seq": "10-0", "data": data},
               {"time": 6, "step": 2, "data": {"beyond_int64": "NaN"}}]
    resp = ingest(api, run, msgpack.packb(entries), "application/msgpack")
    assert resp.status_code == 200 and resp.json() == {"stored": len(data) + 1}
    for name, value in data.items():
        got = points(api, run, name)[0][1]
        if isinstance(value, float) and not math.isfinite(value):
            assert got == SPECIAL[name]
        else:
            assert type(got) is type(value) and repr(got) == repr(value), name
    assert points(api, run, "beyond_int64") == [[2, "NaN", 6]]


def test_bare_nan_tokens_from_python_json(api: httpx.Client, run: int) -> None:
    body = b'{"time": 1, "step": 1, "data": {"a": NaN, "b": Infinity, "c": -Infinity}}\n'
    assert ingest(api, run, body).status_code == 200
    assert [points(api, run, n)[0][1] for n in "abc"] == ["NaN", "Infinity", "-Infinity"]


def test_json_array_body(api: httpx.Client, run: int) -> None:
    body = b'[{"time": 1, "step": 1, "data": {"a": 1}}, {"time": 2, "step": 2, "data": {"a": 2}}]'
    assert ingest(api, run, body, "application/json").json() == {"stored": 2}


def test_bad_lines_are_422_and_good_lines_stored(api: httpx.Client, run: int) -> None:
    good = {"time": 1, "step": 1, "data": {"ok": 1.5}}
    lines = [
        ndjson([good]),
        b"{not json\n",
        b"[1, 2]\n",
        ndjson([{"time": 1, "step": "three", "data": {"ok": 1}}]),
        ndjson([{"time": 1, "step": 2.5, "data": {"ok": 1}}]),
        ndjson([{"time": 1, "step": 3, "data": {"ok": "hello"}}]),
        ndjson([{"time": 1, "step": 4, "data": {"": 1}}]),
        ndjson([{"time": 1, "step": 5, "data": {"x" * 257: 1}}]),
        ndjson([{"time": 1, "step": 6, "data": {"tab\there": 1}}]),
        ndjson([{"time": 1, "step": 7, "data": [1]}]),
        ndjson([{"time": 1, "step": 8, "seq": "yesterday", "data": {"ok": 1}}]),
        ndjson([{"time": 1, "step": 9, "data": {"ok": 9, "also": 9}}]),
    ]
    resp = ingest(api, run, b"".join(lines))
    assert resp.status_code == 422
    body = resp.json()
    assert body["stored"] == 3
    assert [b["index"] for b in body["bad_lines"]] == list(range(1, 11))
    assert all(isinstance(b["error"], str) and b["error"] for b in body["bad_lines"])
    assert [p[:2] for p in points(api, run, "ok")] == [[1, 1.5], [9, 9]]
    assert "x" * 257 not in api.get(f"/api/runs/{run}/metrics").json()["names"]


def test_msgpack_bad_entries_are_reported_by_index(api: httpx.Client, run: int) -> None:
    entries = [{"time": 1, "step": 1, "data": {"m": 1}}, "junk",
               {"time": 1, "step": 2, "data": {"m": None}},
               {"time": 1, "step": 3, "data": {"m": 3}}]
    resp = ingest(api, run, msgpack.packb(entries), "application/msgpack")
    assert resp.status_code == 422
    assert resp.json()["stored"] == 2
    assert [b["index"] for b in resp.json()["bad_lines"]] == [1, 2]


def test_undecodable_bodies_are_400(api: httpx.Client, run: int) -> None:
    assert ingest(api, run, b"\xc1\xc1", "application/msgpack").status_code == 400
    not_a_list = msgpack.packb({"not": "a list"})
    assert ingest(api, run, not_a_list, "application/msgpack").status_code == 400
    assert ingest(api, run, b"\xff\xfe", "application/x-ndjson").status_code == 400
    assert ingest(api, run, b"[1, 2", "application/x-ndjson").status_code == 400  # cut array
    assert ingest(api, run, b"\xff\xfe{", "application/x-ndjson").status_code == 400
    assert api.get(f"/api/runs/{run}/metrics").json() == {"names": []}  # nothing stored


def test_wrong_content_type_is_415(api: httpx.Client, run: int) -> None:
    resp = ingest(api, run, b"<xml/>", "application/xml")
    assert resp.status_code == 415 and "error" in resp.json()


def test_unknown_or_missing_run_id(api: httpx.Client) -> None:
    body = ndjson([{"time": 1, "step": 1, "data": {"m": 1}}])
    resp = ingest(api, 10**9, body)
    assert resp.status_code == 404 and "error" in resp.json()
    no_header = api.post("/ingest/metrics", content=body,
                         headers={"Content-Type": "application/x-ndjson"})
    assert no_header.status_code == 400


def test_body_over_the_limit_is_413(small_backend: Backend) -> None:
    with small_backend.client() as api:
        run = create(api, "limits", "big")["runId"]
        line = {"time": 1, "step": 1, "data": {"m": 1.0}}
        big = ndjson([dict(line, step=s) for s in range(1, 200)])
        assert len(big) > SMALL_BODY
        resp = ingest(api, run, big)
        assert resp.status_code == 413 and "error" in resp.json()

        def chunks() -> object:  # no Content-Length: the limit holds while streaming
            for i in range(0, len(big), 512):
                yield big[i:i + 512]

        streamed = api.post("/ingest/metrics", content=chunks(),  # type: ignore[arg-type]
                            headers={"X-Run-Id": str(run), "Content-Type": "application/x-ndjson"})
        assert streamed.status_code == 413
        assert api.get(f"/api/runs/{run}/metrics").json() == {"names": []}
        assert ingest(api, run, ndjson([line])).status_code == 200


def test_sql_and_html_metric_names_stored_verbatim(api: httpx.Client, run: int) -> None:
    names = ["'; DROP TABLE points; --", "<script>alert('x')</script>", 'a"b\\c', "ünï/cødé/✓",
             "q?x=1#frag", "100%/%2F"]
    data = {n: i for i, n in enumerate(names)}
    assert ingest(api, run, ndjson([{"time": 1, "step": 1, "data": data}])).status_code == 200
    assert api.get(f"/api/runs/{run}/metrics").json()["names"] == sorted(names)
    for i, name in enumerate(names):
        assert points(api, run, name) == [[1, i, 1]]


def test_concurrent_overlapping_batches(backend: Backend, run: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def post(worker: int) -> int:
        lines = [{"time": s, "step": s, "seq": f"{s}-{worker}", "data": {"m": s * 10 + worker}}
                 for s in range(worker * 50, worker * 50 + 200)]
        with backend.client() as c:
            resp = ingest(c, run, ndjson(lines))
            assert resp.status_code == 200, resp.text
            return int(resp.json()["stored"])

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(post, range(4))) == 800
    with backend.client() as c:
        got = points(c, run, "m")
    assert [p[0] for p in got] == list(range(350))
    for step, value, _ in got:  # the entry with the largest seq won every step
        assert value == step * 10 + min(step // 50, 3)
