"""Random bodies and headers against every route (Hypothesis, in-process for speed).

Two properties, for any input whatsoever (DESIGN.md §6): the answer is never a 5xx, and what
the backend accepted reads back equal — a config modulo the spelling of NaN/Infinity, a point
as the number (or NaN/Infinity spelling) it was sent as.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from . import inproc
from .inproc import TestClient

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("PLUTO_PROPERTY_EXAMPLES", "120"))
"""Examples per property; raise it (e.g. 2000) to hunt, the default keeps the suite quick."""

SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with inproc.client(tmp_path_factory.mktemp("property") / "pluto.db") as client:
        yield client


ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
TEXT = st.text(ANY_CHAR, max_size=12) | st.sampled_from(["", "NaN", "Infinity", "a/b", "x"])
NUMBER = (st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | st.sampled_from([2**63 - 1, -(2**63), 2**63, 0, -0.0, 1e308]))
SCALAR = st.none() | st.booleans() | NUMBER | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)


def ok(resp: Any) -> Any:
    """Assert the answer is JSON and not a 5xx; return it."""
    assert resp.status_code < 500, resp.text
    route = re.sub(r"/api/runs/[^/]+(/metrics/).*|/api/runs/[0-9]+", r"/api/runs/{id}\1",
                   resp.request.url.path)
    event(f"{resp.request.method} {route} {resp.status_code}")
    body = resp.json()
    if resp.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"]
    return body


def spelled(value: Any) -> Any:
    """``value`` as the backend gives it back: non-finite floats spelled, at every depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: spelled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [spelled(v) for v in value]
    return value


def as_json(value: Any) -> str:
    """JSON text as Python's json.dumps writes it: bare NaN tokens, surrogates as \\u escapes."""
    return json.dumps(value)


# -- create, config, tags ---------------------------------------------------------------------

@SETTINGS
@given(name=TEXT | JSON, project=TEXT | JSON, config=JSON, config_as_text=st.booleans(),
       tags=JSON | st.lists(TEXT, max_size=4), extra=st.dictionaries(TEXT, JSON, max_size=3))
def test_create_reads_back(c: TestClient, name: Any, project: Any, config: Any,
                           config_as_text: bool, tags: Any, extra: dict[str, Any]) -> None:
    body = {**extra, "runName": name, "projectName": project, "externalId": uuid.uuid4().hex,
            "config": as_json(config) if config_as_text else config, "tags": tags}
    answer = ok(inproc.raw_json(c, "/api/runs/create", as_json(body)))
    if "error" in answer:
        return
    run = ok(c.get(f"/api/runs/{answer['runId']}"))
    assert answer["resumed"] is False
    assert run["name"] == (name or "") and run["project"] == (project or "default")
    assert run["config"] == spelled(config or {})
    expected_tags = [] if tags is None else list(dict.fromkeys(
        [tags] if isinstance(tags, str) else tags))
    assert run["tags"] == expected_tags
    assert any(r["id"] == run["id"] for r in ok(c.get("/api/runs"))["runs"])


@SETTINGS
@given(first=st.dictionaries(TEXT, JSON, max_size=4), update=JSON | TEXT,
       as_text=st.booleans(), run_id=st.none() | NUMBER | TEXT)
def test_config_update_merges_and_reads_back(c: TestClient, first: dict[str, Any], update: Any,
                                             as_text: bool, run_id: Any) -> None:
    created = ok(inproc.raw_json(c, "/api/runs/create", as_json({"config": first})))
    if "error" in created:
        return
    run = created["runId"]
    before = ok(c.get(f"/api/runs/{run}"))["config"]
    config = as_json(update) if as_text else update
    for target in (run_id, run):
        answer = ok(inproc.raw_json(c, "/api/runs/config/update",
                                    as_json({"runId": target, "config": config})))
    after = ok(c.get(f"/api/runs/{run}"))["config"]
    if "error" in answer:
        assert after == before
    else:
        parsed = (json.loads(config) if config.strip() else None) if isinstance(config, str) \
            else config
        assert after == {**before, **spelled(parsed or {})}


# -- ingest --------------------------------------------------------------------------------------

NAME = st.text(ANY_CHAR, min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
VALUE = NUMBER | st.booleans() | st.sampled_from(["NaN", "Infinity", "-Infinity", "1", None])
ENTRY = st.fixed_dictionaries(
    {"step": st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 9), NUMBER, TEXT),
     "data": st.one_of(st.dictionaries(NAME, VALUE, max_size=4),
                       st.dictionaries(st.sampled_from("abc"), NUMBER, max_size=3), JSON)},
    optional={"time": st.integers(0, 2**63 - 1) | JSON, "seq": st.none() | TEXT})
LINES = st.lists(ENTRY | JSON, max_size=6)


def expected_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return value
    return spelled(value)


def check_read_back(c: TestClient, run: int, lines: list[Any], bad: set[int]) -> None:
    """Every entry not reported bad is stored: the newest line per (name, step) wins."""
    want: dict[tuple[str, int], Any] = {}
    for index, line in enumerate(lines):
        if index in bad:
            continue
        assert isinstance(line, dict)
        for name, value in line["data"].items():
            want[(name, line["step"])] = expected_value(value)
    names = set(ok(c.get(f"/api/runs/{run}/metrics"))["names"])
    assert names == {name for name, _ in want}
    for name in names:
        got = ok(c.get(f"/api/runs/{run}/metrics/{quote(name, safe='')}"))["points"]
        assert {(name, p[0]): p[1] for p in got} == {k: v for k, v in want.items()
                                                     if k[0] == name}


def _points(resp: Any) -> set[int] | None:
    answer = ok(resp)
    if resp.status_code == 200:
        return set()
    if resp.status_code == 422:
        indexes = [b["index"] for b in answer["bad_lines"]]
        assert answer["bad_count"] == len(indexes) == len(set(indexes))
        return set(indexes)
    return None


@SETTINGS
@given(lines=LINES, as_array=st.booleans())
def test_ndjson_ingest_reads_back(c: TestClient, lines: list[Any], as_array: bool) -> None:
    run = inproc.new_run(c)
    if as_array:
        body = as_json(lines).encode("utf-8", "surrogatepass")
    else:  # a body starting with "[" is read as one JSON array (DESIGN.md §6)
        assume(not (lines and isinstance(lines[0], list)))
        body = "".join(as_json(line) + "\n" for line in lines).encode("utf-8", "surrogatepass")
    bad = _points(inproc.ingest(c, run, body))
    if bad is not None:
        check_read_back(c, run, lines, bad)


MSGPACK_LINES = st.lists(ENTRY.filter(lambda e: isinstance(e["data"], dict)) | SCALAR, max_size=6
                         ) | LINES  # mostly without arrays, which a msgpack entry may not hold


@SETTINGS
@given(lines=MSGPACK_LINES)
def test_msgpack_ingest_reads_back(c: TestClient, lines: list[Any]) -> None:
    try:
        body = msgpack.packb(lines)
    except (OverflowError, UnicodeEncodeError):  # what msgpack cannot hold, a client cannot send
        assume(False)
    run = inproc.new_run(c)
    bad = _points(inproc.ingest(c, run, body, "application/msgpack"))
    if bad is not None:
        check_read_back(c, run, lines, bad)


@SETTINGS
@given(raw=st.binary(max_size=64), media=st.sampled_from(
    ["application/msgpack", "application/x-pluto-columns", "application/x-ndjson", "",
     "application/json", "text/html", "application/msgpack; charset=x"]),
    run_header=st.text(st.characters(max_codepoint=255), max_size=25))
def test_random_bytes_and_headers(c: TestClient, raw: bytes, media: str, run_header: str) -> None:
    run = inproc.new_run(c)
    for header in (str(run), run_header):
        resp = c.post("/ingest/metrics", content=raw,
                      headers={"X-Run-Id": header.encode("latin-1"), "Content-Type": media})
        ok(resp)
    ok(c.get(f"/api/runs/{run}"))


@SETTINGS
@given(entries=st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1),
                                  st.dictionaries(NAME, st.integers(-(2**63), 2**63 - 1)
                                                  | st.floats(), max_size=3)), max_size=5),
       mutate=st.none() | st.tuples(st.sampled_from(
           ["names", "name", "value", "count", "step", "time", "seq_ms", "seq_n"]), JSON))
def test_columns_ingest_reads_back(c: TestClient, entries: list[tuple[int, dict[str, Any]]],
                                   mutate: tuple[str, Any] | None) -> None:
    index: dict[str, int] = {}
    cols: dict[str, list[Any]] = {k: [] for k in
                                  ("name", "value", "count", "step", "time", "seq_ms", "seq_n")}
    for n, (step, data) in enumerate(entries):
        cols["name"] += [index.setdefault(k, len(index)) for k in data]
        cols["value"] += data.values()
        for key, value in (("count", len(data)), ("step", step), ("time", 1), ("seq_ms", 1),
                           ("seq_n", n)):
            cols[key].append(value)
    columns: dict[str, Any] = {"names": list(index), **cols}
    if mutate is not None:
        columns[mutate[0]] = mutate[1]
    try:
        body = msgpack.packb(columns)
    except (OverflowError, UnicodeEncodeError):
        assume(False)
    run = inproc.new_run(c)
    bad = _points(inproc.ingest(c, run, body, "application/x-pluto-columns"))
    if bad is not None:
        assert not bad
        check_read_back(c, run, [{"step": s, "data": d} for s, d in entries], set())


# -- members, ledger, reads ------------------------------------------------------------------------

COUNT = st.integers(0, 2**63 - 1)
MAYBE_INT = st.one_of(COUNT, COUNT, COUNT, st.none(), NUMBER, TEXT)  # mostly valid, often not
MEMBER = st.fixed_dictionaries({"member": TEXT}, optional=dict.fromkeys(("rank", "local_rank", "pid", "logged", "sent", "dropped"), MAYBE_INT) | {
    "host": TEXT | st.none(), "state": TEXT | st.none(),
    "drops": st.dictionaries(TEXT, COUNT, max_size=3) | st.dictionaries(TEXT, MAYBE_INT)
    | JSON})


@SETTINGS
@given(members=st.lists(MEMBER, max_size=4) | JSON)
def test_members_read_back(c: TestClient, members: Any) -> None:
    run = inproc.new_run(c)
    answer = ok(inproc.raw_json(c, f"/api/runs/{run}/members", as_json(members)))
    got = ok(c.get(f"/api/runs/{run}"))["members"]
    if "error" in answer:
        assert got == []
        return
    sent = members if isinstance(members, list) else [members]
    final: dict[str, dict[str, Any]] = {}
    for m in sent:
        row = final.setdefault(m["member"], {})
        row.update({k: v for k, v in m.items() if v is not None})
    assert {m["member"]: m for m in got}.keys() == final.keys()
    for m in got:
        assert {k: m[k] for k in final[m["member"]]} == final[m["member"]]


LEDGER_ROW = st.fixed_dictionaries(
    {"stored": MAYBE_INT, "dead": MAYBE_INT},
    optional=dict.fromkeys(("rank", "last_step", "last_time"), MAYBE_INT))


@SETTINGS
@given(rows=st.lists(LEDGER_ROW, max_size=4) | JSON)
def test_ledger_reads_back(c: TestClient, rows: Any) -> None:
    run = inproc.new_run(c)
    answer = ok(inproc.raw_json(c, f"/api/runs/{run}/ledger", as_json(rows)))
    got = ok(c.get(f"/api/runs/{run}"))
    if "error" in answer:
        assert got["ranks"] == []
        return
    final: dict[Any, dict[str, Any]] = {}
    for r in rows if isinstance(rows, list) else [rows]:
        old = final.get(r.get("rank"), {})
        final[r.get("rank")] = {"rank": r.get("rank"), "stored": r["stored"], "dead": r["dead"],
                                **{k: r.get(k) if r.get(k) is not None else old.get(k)
                                   for k in ("last_step", "last_time")}}
    assert sorted(got["ranks"], key=repr) == sorted(final.values(), key=repr)
    assert got["ledger"]["stored"] == sum(r["stored"] for r in final.values())


URL_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12) | TEXT.filter(
    lambda t: t.isascii())  # a URL cannot carry a lone surrogate at all


@SETTINGS
@given(run=st.integers(-5, 2**70) | URL_TEXT, name=URL_TEXT, since=URL_TEXT | NUMBER,
       max_points=URL_TEXT | NUMBER, project=URL_TEXT)
def test_read_routes_never_5xx(c: TestClient, run: Any, name: str, since: Any, max_points: Any,
                               project: str) -> None:
    real = inproc.new_run(c, project="reads")
    ok(inproc.ingest(c, real, b'{"step": 1, "data": {"a": 1}}\n'))
    params = {"since_step": str(since), "max_points": str(max_points)}
    quoted = quote(str(run), safe="")
    for target in (quoted, str(real)):
        for path in (f"/api/runs/{target}", f"/api/runs/{target}/metrics",
                     f"/api/runs/{target}/metrics/{quote(name, safe='')}",
                     f"/api/runs/{target}/metrics/a"):
            ok(c.get(path, params=params))
    ok(c.get("/api/runs", params={"project": project}))
