"""The read API: since_step, step bounds, M4 max_points, many series at once, bad parameters."""

from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pluto_server import _store
from pluto_server._read import downsample, read_series
from pluto_server._store import Store
from tests.conftest import Backend

from .conftest import create, ingest, ndjson, points


def test_since_step_and_max_points(api: httpx.Client, project: str) -> None:
    run = create(api, project, "read")["runId"]
    body = ndjson([{"time": 10 * s, "step": s, "data": {"a/b/c": s * 0.5}} for s in range(100)])
    assert ingest(api, run, body).status_code == 200
    full = points(api, run, "a/b/c")
    assert full == [[s, s * 0.5, 10 * s] for s in range(100)]
    assert points(api, run, "a/b/c", since_step=95) == full[95:]
    assert points(api, run, "a/b/c", since_step=1000) == []
    assert points(api, run, "a/b/c", step_min=10, step_max=19) == full[10:20]
    assert points(api, run, "a/b/c", since_step=15, step_min=10, step_max=19) == full[15:20]
    assert points(api, run, "a/b/c", step_min=30, step_max=20) == []
    sampled = points(api, run, "a/b/c", max_points=10)  # 2 buckets of a straight line
    assert sampled == [full[0], full[49], full[50], full[99]]
    assert points(api, run, "a/b/c", max_points=1) == [full[-1]]
    assert points(api, run, "a/b/c", max_points=2) == [full[0], full[-1]]
    assert points(api, run, "a/b/c", since_step=90, max_points=3) == [full[90], full[99]]
    assert points(api, run, "a/b/c", max_points=500) == full
    assert points(api, run, "never/logged") == []


def test_m4_keeps_both_spikes_of_5000_steps(api: httpx.Client, project: str) -> None:
    run = create(api, project, "spikes")["runId"]
    rng = random.Random(7)
    values = {s: rng.uniform(0, 1) for s in range(5000)}
    values[1234], values[4321] = -5.0, 9.0
    body = ndjson([{"time": s, "step": s, "data": {"loss": v}} for s, v in values.items()])
    assert ingest(api, run, body).status_code == 200
    sampled = points(api, run, "loss", max_points=200)
    assert 100 <= len(sampled) <= 200
    assert [1234, -5.0, 1234] in sampled and [4321, 9.0, 4321] in sampled
    assert sampled[0][0] == 0 and sampled[-1][0] == 4999
    assert all(values[s] == v for s, v, _ in sampled)  # real points, not averages
    assert sampled == downsample([[s, v, s] for s, v in values.items()], 200)  # SQL == Python
    zoomed = points(api, run, "loss", step_min=1000, step_max=1399, max_points=1000)
    assert [p[0] for p in zoomed] == list(range(1000, 1400))  # full resolution in the zoom


def test_m4_of_100k_steps_over_http_reads_block_summaries(api: httpx.Client,
                                                          project: str) -> None:
    """The dashboard's case: 100,000 steps to about 1,000 points, so every bucket is whole
    64-step blocks and SQLite answers from ``point_blocks``; the spikes, the NaN and the ends
    are there, and the picks are the rule's."""
    run = create(api, project, "blocks")["runId"]
    rng = random.Random(100)
    values: dict[int, float] = {s: rng.uniform(0, 1) for s in range(1, 100_001)}
    values[12_345], values[43_210], values[77_777] = -5.0, 9.0, math.nan
    rows = [{"time": s, "step": s, "data": {"loss": v}} for s, v in values.items()]
    for i in range(0, len(rows), 20_000):
        assert ingest(api, run, ndjson(rows[i:i + 20_000])).status_code == 200
    sampled = points(api, run, "loss", max_points=1000)
    assert 800 <= len(sampled) <= 1000
    assert [12_345, -5.0, 12_345] in sampled and [43_210, 9.0, 43_210] in sampled
    assert [77_777, "NaN", 77_777] in sampled
    assert sampled[0][0] == 1 and sampled[-1][0] == 100_000
    want = downsample([[s, v, s] for s, v in values.items()], 1000)
    assert [p[0] for p in sampled] == [p[0] for p in want]


def test_m4_reread_after_a_write_sees_it(api: httpx.Client, project: str) -> None:
    """Downsampled reads of a quiet run are cached; a later write must show all the same."""
    run = create(api, project, "cache")["runId"]
    body = ndjson([{"time": s, "step": s, "data": {"c": 1.0}} for s in range(2000)])
    assert ingest(api, run, body).status_code == 200
    time.sleep(1.1)  # quiet for a second: the M4 result may be cached now
    for _ in range(2):
        assert [777, 5.0, 777] not in points(api, run, "c", max_points=100)
    assert ingest(api, run, ndjson([{"time": 777, "step": 777, "data": {"c": 5.0}}])
                  ).status_code == 200
    assert [777, 5.0, 777] in points(api, run, "c", max_points=100)


def test_m4_shows_nan_and_inf(api: httpx.Client, project: str) -> None:
    run = create(api, project, "nan")["runId"]
    data = [{"time": s, "step": s, "data": {"x": 1.0}} for s in range(1000)]
    data[300]["data"]["x"], data[700]["data"]["x"] = "NaN", "-Infinity"
    assert ingest(api, run, ndjson(data)).status_code == 200
    sampled = points(api, run, "x", max_points=40)
    assert [300, "NaN", 300] in sampled and [700, "-Infinity", 700] in sampled
    rows = [[s, math.nan if s == 300 else (-math.inf if s == 700 else 1.0), s]
            for s in range(1000)]
    assert [p[0] for p in sampled] == [p[0] for p in downsample(rows, 40)]


def test_series_answers_many_names_at_once(api: httpx.Client, project: str) -> None:
    run = create(api, project, "many")["runId"]
    names = [f"train/loss/rank{r}" for r in range(8)] + ["a/./b", "a/../b", "x,y"]
    body = ndjson([{"time": s, "step": s, "data": {n: s + i for i, n in enumerate(names)}}
                   for s in range(50)])
    assert ingest(api, run, body).status_code == 200
    resp = api.get(f"/api/runs/{run}/series", params={"prefix": "train/loss/rank"})
    got = resp.json()["series"]
    assert [s["name"] for s in got] == sorted(names[:8])
    assert got[0]["points"][:2] == [[0, 0, 0], [1, 1, 1]]
    two = api.get(f"/api/runs/{run}/series", params=[("prefix", "a/"), ("prefix", "x,")])
    assert [s["name"] for s in two.json()["series"]] == ["a/../b", "a/./b", "x,y"]
    resp = api.get(f"/api/runs/{run}/series", params=[("name", "a/../b"), ("name", "x,y"),
                                                     ("names", "a/./b,nope"),
                                                     ("since_step", "48")])
    assert resp.json()["series"] == [
        {"name": "a/../b", "points": [[48, 57, 48], [49, 58, 49]]},
        {"name": "x,y", "points": [[48, 58, 48], [49, 59, 49]]},
        {"name": "a/./b", "points": [[48, 56, 48], [49, 57, 49]]},
        {"name": "nope", "points": []}]
    one = api.get(f"/api/runs/{run}/metric", params={"name": "a/../b", "step_max": "1"}).json()
    assert one == {"name": "a/../b", "points": [[0, 9, 0], [1, 10, 1]]}
    runs = api.get("/api/runs", params={"project": project}).json()["runs"]
    assert runs[0]["lastStep"] == 49 and api.get(f"/api/runs/{run}").json()["lastStep"] == 49
    assert runs[0]["members"] == 0
    assert api.post(f"/api/runs/{run}/members", json=[{"member": "h:1", "rank": 0},
                                                      {"member": "h:2", "rank": 1}]).status_code == 200
    assert api.get("/api/runs", params={"project": project}).json()["runs"][0]["members"] == 2


def test_bad_query_params_are_400(api: httpx.Client, project: str) -> None:
    run = create(api, project, "q")["runId"]
    for params in ({"since_step": "x"}, {"max_points": "0"}, {"max_points": "1.5"},
                   {"since_step": str(2**63)}, {"step_min": str(-(2**63) - 1)},
                   {"step_max": "1e3"}, {"max_points": str(2**64)}, {"since_step": " 1 2"},
                   {"since_step": "1_000"}, {"step_min": "١"}, {"step_max": "9" * 5000}):
        for path in (f"/api/runs/{run}/metrics/m", f"/api/runs/{run}/metric?name=m",
                     f"/api/runs/{run}/series?name=m"):
            resp = api.get(path, params=params)
            assert resp.status_code == 400 and "error" in resp.json(), (path, params)
    assert api.get(f"/api/runs/{run}/metric").status_code == 400  # no name
    assert api.get(f"/api/runs/{run}/series").status_code == 400  # no series named
    many = [("name", f"n{i}") for i in range(1025)]
    assert api.get(f"/api/runs/{run}/series", params=many).status_code == 400
    for path in ("", "/metrics", "/metrics/m", "/metric?name=m", "/series?name=m"):
        for bad in (str(2**63), "9" * 40, "999999"):
            resp = api.get(f"/api/runs/{bad}{path}")
            assert resp.status_code == 404 and "error" in resp.json(), (bad, path)
    # the largest int64 steps are fine
    assert points(api, run, "m", step_min=-(2**63), step_max=2**63 - 1, max_points=10) == []


def test_dashboard_files_are_served_and_nothing_beside_them(backend: Backend) -> None:
    """The files and nothing else (their headers, the CSP included: tests/security/test_http.py)."""
    with httpx.Client(base_url=backend.url) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<script" in page.text
        js = client.get("/static/js/main.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        for bad in ("/static/../_app.py", "/static/%2e%2e/_app.py", "/static/nope.js",
                    "/static/../../pyproject.toml", "/static/a%00.js", "/static/" + "x" * 5000,
                    "/static/js", "/static/vendor/README.txt/x.js"):
            assert client.get(bad).status_code == 404, bad


def test_m4_in_sql_matches_the_rule_on_random_series() -> None:
    """In-process: Store.points_m4 (SQL) against downsample (the rule, in Python)."""
    store = Store(":memory:")
    rng = random.Random(11)
    run, _ = store.create_run("p", "m4", "", None, None)
    special = [None, math.inf, -math.inf, 0.0, -0.0]
    for case in range(40):
        name = f"s{case}"
        steps = sorted(rng.sample(range(-500, 5000), rng.randint(1, 900)))
        rows = [(s, rng.choice(special) if rng.random() < 0.05 else rng.gauss(0, 1), s)
                for s in steps]
        store.write_points(run, [(s, t, None, None, {name: v}) for s, v, t in rows])
        for max_points in (1, 2, 3, 4, 7, 40, 200, 1000):
            got = read_series(store, run, name, -(2**63), 2**63 - 1, max_points)
            want = downsample([[s, math.nan if v is None else v, t] for s, v, t in rows],
                              max_points)
            assert [p[0] for p in got] == [p[0] for p in want], (case, max_points)
            assert len(got) <= max_points
    store.close()


def _series(rng: random.Random, n: int) -> list[tuple[int, Any, int]]:
    """``n`` points on random steps with gaps, ties (values rounded), NaN (None), +-inf, -0.0,
    ints and floats: what makes M4's choice of "first of equal ones" and "NaN is a maximum"
    matter."""
    steps = sorted(rng.sample(range(-3000, 3 * n), n))
    special = [None, math.inf, -math.inf, 0.0, -0.0, 7, -7]
    return [(s, rng.choice(special) if rng.random() < 0.03 else round(rng.gauss(0, 1), 1),
             1000 + s) for s in steps]


def _check_m4(store: Store, run: int, name: str, rows: list[tuple[int, Any, int]],
              rng: random.Random) -> None:
    wanted = [[s, math.nan if v is None else v, t] for s, v, t in rows]
    ranges = [(-(2**63), 2**63 - 1)]
    ranges += [tuple(sorted(rng.sample(range(-3100, rows[-1][0] + 100), 2))) for _ in range(6)]
    for low, high in ranges:
        inside = [r for r in wanted if low <= r[0] <= high]
        for max_points in (8, 9, 40, 203, 1000):
            got = read_series(store, run, name, low, high, max_points)
            want = downsample(inside, max_points)
            assert [p[0] for p in got] == [p[0] for p in want], (name, low, high, max_points)
            assert len(got) <= max_points


def test_m4_over_block_summaries_matches_the_rule(tmp_path: Path) -> None:
    """Series long enough that buckets are whole 64-step blocks (``Store.points_m4`` then reads
    ``point_blocks``): the same picks as the rule, over the full range and random zooms, after
    writes by entries and by columns, after overwrites of single points (a block's extreme
    moved or removed) and after the summaries are rebuilt by the migration."""
    path = str(tmp_path / "blocks.db")
    store = Store(path)
    rng = random.Random(16)
    run, _ = store.create_run("p", "blocks", "", None, None)
    series = {f"s{i}": _series(rng, n) for i, n in enumerate((300, 2500, 9000, 30000))}
    for name, rows in series.items():
        half = len(rows) // 2
        store.write_points(run, [(s, t, None, None, {name: v}) for s, v, t in rows[:half]])
        rest = rows[half:]
        store.write_columns(run, [name], [0] * len(rest), [v for _, v, _ in rest],
                            [1] * len(rest), [s for s, _, _ in rest], [t for _, _, t in rest],
                            [0] * len(rest), list(range(len(rest))))
    for name, rows in series.items():
        _check_m4(store, run, name, rows, rng)
    for name, rows in series.items():  # overwrite ~2% of the points, the smallest among them
        smallest = min(range(len(rows)), key=lambda i: (rows[i][1] is None, rows[i][1] or 0))
        for i in rng.sample(range(len(rows)), len(rows) // 50) + [smallest]:
            step, _, t = rows[i]
            rows[i] = (step, rng.choice([None, 50.0, -50.0, 0.5]), t)
            store.write_points(run, [(step, t, None, None, {name: rows[i][1]})])
        _check_m4(store, run, name, rows, rng)
    store.close()
    db = sqlite3.connect(path, isolation_level=None)  # a version-5 file: no summaries yet
    db.execute("DROP TABLE point_blocks")
    db.execute("UPDATE schema_version SET version = 5")
    db.close()
    store = Store(path)
    try:
        for name, rows in series.items():
            _check_m4(store, run, name, rows, rng)
    finally:
        store.close()


_FROM_POINTS = """
SELECT name, step >> 6, min(step), max(step), min(value), max(ifnull(value, 9e999))
FROM points WHERE run = ? GROUP BY name, step >> 6 ORDER BY 1, 2
"""


def _blocks_match_points(path: str, run: int) -> None:
    db = sqlite3.connect(path)
    try:
        got = db.execute("SELECT name, block, first, last, lo, hi FROM point_blocks"
                         " WHERE run = ? ORDER BY 1, 2", (run,)).fetchall()
        assert got == db.execute(_FROM_POINTS, (run,)).fetchall()
    finally:
        db.close()


def _batch(rng: random.Random, names: list[str], tops: dict[str, int], case: int
           ) -> tuple[list[str], list[int], list[Any], list[int], list[int]]:
    """A columnar batch as the worker sends it (runs of entries of one rank's names), and now
    and then what makes a batch more than an append: a step again or an older one, a NaN, both
    infinities, a name twice, entries of every shape."""
    names_used: list[str] = []
    name_idx: list[int] = []
    values: list[Any] = []
    counts: list[int] = []
    steps: list[int] = []
    odd = case % 4 == 0
    for _ in range(rng.randint(1, 4)):
        group = rng.sample(names, rng.randint(2 if case % 8 == 0 else 1, 3)) if not (odd and rng.random() < 0.3) \
            else []
        if odd and group and rng.random() < 0.2:
            group.append(group[0])  # a name twice in one entry
        start = tops.get(group[0], -1) + 1 if group else 0
        if odd and rng.random() < 0.4:
            start = rng.randint(-100, max(start, 1))  # older steps, written again
        n = rng.randint(1, 300)
        step = start
        for _ in range(n if not (odd and rng.random() < 0.2) else 1):
            slots = []
            for name in group:
                if name not in names_used:
                    names_used.append(name)
                slots.append(names_used.index(name))
            if odd and rng.random() < (0.7 if case % 8 == 0 else 0.1):
                rng.shuffle(slots)  # entries of every shape
            name_idx += slots
            special = [math.nan, math.inf, -math.inf, 7, -0.0] if odd else [7, 3.5]
            values += [rng.choice(special) if rng.random() < 0.05 else round(rng.gauss(0, 1), 2)
                       for _ in slots]
            counts.append(len(slots))
            steps.append(step)
            step += rng.choice([1, 1, 1, 2, 70]) if not (odd and rng.random() < 0.05) else 0
        for name in group:
            tops[name] = max(tops.get(name, -1), step)
    return names_used, name_idx, values, counts, steps


def test_block_summaries_of_columnar_batches_equal_their_points(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A columnar batch that only appends merges its own points into the blocks' summaries
    (``_blocks``); anything else summarises them from the stored points. Either way every
    summary equals what its stored points give, after each batch — also after a batch rolled
    back (an int beyond 64 bits) and in a store opened afresh (nothing learnt yet)."""
    path = str(tmp_path / "cols.db")
    store = Store(path)
    rng = random.Random(21)
    run, _ = store.create_run("p", "cols", "", None, None)
    names = [f"r{i}/{m}" for i in range(3) for m in ("loss", "acc")]
    tops: dict[str, int] = {}
    ways: list[tuple[int, int]] = []  # per batch: (blocks merged, blocks read back)
    summarise = _store.summarise

    def counted(*args: Any) -> Any:
        out = summarise(*args)
        ways.append((len(out.merged), len(out.refresh)) if out else (0, -1))
        return out

    monkeypatch.setattr(_store, "summarise", counted)
    for case in range(120):
        batch = _batch(rng, names, tops, case)
        n = len(batch[3])
        if case == 60:
            store.close()
            store = Store(path)
        if case % 29 == 3:  # rolled back as a whole: nothing of it is stored or learnt
            bad = batch[2][:-1] + [2**70] if batch[2] else batch[2]
            try:
                store.write_columns(run, batch[0], batch[1], bad, batch[3], batch[4], [1] * n,
                                    [1] * n, list(range(n)))
            except OverflowError:
                pass
        store.write_columns(run, batch[0], batch[1], batch[2], batch[3], batch[4], [1] * n,
                            [case] * n, list(range(n)))
        _blocks_match_points(path, run)
    # a step twice in one run of entries: its first value (the block's maximum) is replaced
    store.write_columns(run, ["again"], [0] * 4, [0.1, 1e6, 0.2, 0.3], [1] * 4,
                        [1000, 1001, 1001, 1002], [1] * 4, [1] * 4, [0, 1, 2, 3])
    _blocks_match_points(path, run)
    store.close()
    # every way was taken (else this proves little): merged, read back, both, not summarised
    assert {(m > 0, r > 0) for m, r in ways} >= {(True, False), (False, True), (True, True)}
    assert (0, -1) in ways
