"""The read API: since_step, max_points, and bad query parameters."""

from __future__ import annotations

import itertools

import httpx

from .conftest import create, ingest, ndjson, points


def test_since_step_and_max_points(api: httpx.Client, project: str) -> None:
    run = create(api, project, "read")["runId"]
    body = ndjson([{"time": 10 * s, "step": s, "data": {"a/b/c": s * 0.5}} for s in range(100)])
    assert ingest(api, run, body).status_code == 200
    full = points(api, run, "a/b/c")
    assert full == [[s, s * 0.5, 10 * s] for s in range(100)]
    assert points(api, run, "a/b/c", since_step=95) == full[95:]
    assert points(api, run, "a/b/c", since_step=1000) == []
    sampled = points(api, run, "a/b/c", max_points=10)
    assert len(sampled) == 10 and sampled[0] == full[0] and sampled[-1] == full[-1]
    steps = [p[0] for p in sampled]
    assert steps == sorted(set(steps)) and max(b - a for a, b in itertools.pairwise(steps)) <= 12
    assert points(api, run, "a/b/c", max_points=1) == [full[-1]]
    assert points(api, run, "a/b/c", since_step=90, max_points=3) == [full[90], full[95], full[99]]
    assert points(api, run, "a/b/c", max_points=500) == full
    assert points(api, run, "never/logged") == []


def test_bad_query_params_are_400(api: httpx.Client, project: str) -> None:
    run = create(api, project, "q")["runId"]
    for params in ({"since_step": "x"}, {"max_points": "0"}, {"max_points": "1.5"}):
        resp = api.get(f"/api/runs/{run}/metrics/m", params=params)
        assert resp.status_code == 400 and "error" in resp.json(), params
