"""The worker's columnar ingest body (``application/x-pluto-columns``): same upsert, exact
values and seq tie-breaks as the per-line formats; a malformed batch is refused as a whole."""

from __future__ import annotations

import math
import struct
from typing import Any

import httpx
import msgpack
import pytest

from .conftest import create, ingest, points

COLUMNS = "application/x-pluto-columns"


@pytest.fixture
def run(api: httpx.Client, project: str) -> int:
    return int(create(api, project, "columns")["runId"])


def body(entries: list[tuple[int, int, str, dict[str, Any]]]) -> bytes:
    """``[(step, time, seq, {name: value})]`` as the worker packs it."""
    index: dict[str, int] = {}
    cols: dict[str, list[Any]] = {k: [] for k in
                                  ("name", "value", "count", "step", "time", "seq_ms", "seq_n")}
    for step, time_ms, seq, data in entries:
        cols["name"] += [index.setdefault(n, len(index)) for n in data]
        cols["value"] += data.values()
        ms, _, n = seq.partition("-")
        for key, value in (("count", len(data)), ("step", step), ("time", time_ms),
                           ("seq_ms", int(ms)), ("seq_n", int(n))):
            cols[key].append(value)
    return msgpack.packb({"names": list(index), **cols})


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_columns_store_exact_values_and_offer_the_format(api: httpx.Client, run: int) -> None:
    values = [0.1, -0.0, 1e-310, 2.0**60 + 1, math.inf, -math.inf, 3, -(2**63), 2**63 - 1]
    resp = ingest(api, run, body([(s, 1000 + s, f"5-{s}", {"a": v, "b": s})
                                  for s, v in enumerate(values, 1)]), COLUMNS)
    assert resp.status_code == 200 and resp.json() == {"stored": 2 * len(values)}
    assert COLUMNS in resp.headers["x-pluto-ingest"]
    got = points(api, run, "a")
    assert [p[0] for p in got] == list(range(1, len(values) + 1))
    assert [p[2] for p in got] == [1000 + s for s in range(1, len(values) + 1)]
    for (_, stored, _), sent in zip(got, values):
        if isinstance(sent, int):
            assert stored == sent and type(stored) is int
        elif math.isinf(sent):
            assert stored == ("Infinity" if sent > 0 else "-Infinity")
        else:
            assert bits(stored) == bits(sent)
    assert [p[1] for p in points(api, run, "b")] == list(range(1, len(values) + 1))
    assert api.get(f"/api/runs/{run}/metrics").json() == {"names": ["a", "b"]}


def test_nan_and_seq_tie_breaks(api: httpx.Client, run: int) -> None:
    assert ingest(api, run, body([(1, 1, "9-0", {"m": math.nan})]), COLUMNS).status_code == 200
    assert points(api, run, "m") == [[1, "NaN", 1]]
    ingest(api, run, body([(1, 2, "8-0", {"m": 1.0})]), COLUMNS)  # older: ignored
    assert points(api, run, "m") == [[1, "NaN", 1]]
    ingest(api, run, body([(1, 3, "9-1", {"m": 2.0})]), COLUMNS)  # newer: wins
    assert points(api, run, "m") == [[1, 2.0, 3]]
    # Within one body too: the worker groups entries by names, so a newer point may come first.
    ingest(api, run, body([(2, 5, "9-5", {"m": 5.0}), (2, 4, "9-4", {"m": 4.0})]), COLUMNS)
    assert points(api, run, "m")[-1] == [2, 5.0, 5]


@pytest.mark.parametrize("bad", [
    {"names": ["a"], "name": [0], "value": ["x"], "count": [1], "step": [1], "time": [1],
     "seq_ms": [1], "seq_n": [0]},
    {"names": ["a"], "name": [1], "value": [1.0], "count": [1], "step": [1], "time": [1],
     "seq_ms": [1], "seq_n": [0]},
    {"names": ["a"], "name": [0, 0], "value": [1.0, 2.0], "count": [1], "step": [1],
     "time": [1], "seq_ms": [1], "seq_n": [0]},
    {"names": ["a"], "name": [0], "value": [2**64 - 1], "count": [1], "step": [1], "time": [1],
     "seq_ms": [1], "seq_n": [0]},
    {"names": ["a\n"], "name": [0], "value": [1.0], "count": [1], "step": [1], "time": [1],
     "seq_ms": [1], "seq_n": [0]},
    {"names": ["a"], "name": [0], "value": [1.0]},
    [1, 2],
])
def test_a_malformed_batch_is_refused_whole(api: httpx.Client, run: int, bad: Any) -> None:
    resp = ingest(api, run, msgpack.packb(bad), COLUMNS)
    assert resp.status_code == 400, resp.text
    assert points(api, run, "a") == []
