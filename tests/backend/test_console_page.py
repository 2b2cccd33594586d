"""``GET /api/runs/{id}/logs``, the dashboard's console view, in-process over a real SQLite file:
pages by id (newest first without a cursor, "load older", live polling after an id), the rank and
text filters, and bad parameters answered 400 (never 5xx)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.backend.inproc import client, new_run


def _post_lines(c: Any, run: int, lines: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    resp = c.post("/ingest/logs", content=body, headers={"X-Run-Id": str(run)})
    assert resp.status_code == 200, resp.text


def _page(c: Any, run: int, **params: Any) -> dict[str, Any]:
    resp = c.get(f"/api/runs/{run}/logs", params=params)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


@pytest.fixture
def run_with_lines(tmp_path: Path) -> Any:
    with client(tmp_path / "pluto.db") as c:
        run = new_run(c)
        _post_lines(c, run, [{"time": 1000 + i, "message": f"line {i} of rank {i % 3}",
                              "lineNumber": i, "logType": "ERROR" if i % 10 == 0 else "INFO",
                              "rank": i % 3} for i in range(1200)])
        yield c, run


def test_pages_newest_first_then_older_then_after(run_with_lines: Any) -> None:
    c, run = run_with_lines
    newest = _page(c, run)
    got = newest["lines"]
    assert len(got) == 500 and newest["more"] is True
    assert [x["message"] for x in got] == [f"line {i} of rank {i % 3}" for i in range(700, 1200)]
    assert [x["id"] for x in got] == sorted(x["id"] for x in got)  # newest last
    assert got[0] | {"id": 0} == {"id": 0, "rank": 700 % 3, "time": 1700, "lineNumber": 700,
                                  "logType": "ERROR", "step": None,
                                  "message": "line 700 of rank 1"}
    older = _page(c, run, before=got[0]["id"])
    assert older["lines"][0]["message"] == "line 200 of rank 2" and older["more"] is True
    oldest = _page(c, run, before=older["lines"][0]["id"])
    assert len(oldest["lines"]) == 200 and oldest["more"] is False
    everything = oldest["lines"] + older["lines"] + got
    assert [x["lineNumber"] for x in everything] == list(range(1200))

    assert _page(c, run, after=got[-1]["id"]) == {"lines": [], "more": False}
    _post_lines(c, run, [{"time": 5000, "message": "a new line", "rank": 1}])
    live = _page(c, run, after=got[-1]["id"])
    assert [x["message"] for x in live["lines"]] == ["a new line"] and live["more"] is False
    first = _page(c, run, after=0, limit=10)
    assert [x["lineNumber"] for x in first["lines"]] == list(range(10)) and first["more"] is True


def test_rank_and_text_filters_cover_the_whole_run(run_with_lines: Any) -> None:
    c, run = run_with_lines
    ranked = _page(c, run, rank=2, limit=5000)
    assert len(ranked["lines"]) == 400 and {x["rank"] for x in ranked["lines"]} == {2}
    text = _page(c, run, q="LINE 7 OF", limit=5000)  # case folded
    assert [x["message"] for x in text["lines"]] == ["line 7 of rank 1"]
    both = _page(c, run, rank=0, q="line 11", limit=5000)
    assert [x["lineNumber"] for x in both["lines"]] == [
        i for i in range(1200) if i % 3 == 0 and f"line {i} ".startswith("line 11")]
    assert _page(c, run, rank=7)["lines"] == []
    for literal in ("%", "_", "\\"):  # LIKE's own characters are matched as themselves
        assert _page(c, run, q=literal)["lines"] == []


def test_markup_and_odd_text_come_back_as_given(tmp_path: Path) -> None:
    odd = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "100% _done_ \\o/",
           "naïve ÉCOLE 日本", "tab\there", ""]
    with client(tmp_path / "pluto.db") as c:
        run = new_run(c)
        _post_lines(c, run, [{"time": 1, "message": m, "lineNumber": i} for i, m in enumerate(odd)])
        assert [x["message"] for x in _page(c, run)["lines"]] == odd
        assert [x["message"] for x in _page(c, run, q="% _d")["lines"]] == ["100% _done_ \\o/"]
        assert [x["message"] for x in _page(c, run, q="ÉCOLE")["lines"]] == ["naïve ÉCOLE 日本"]


@pytest.mark.parametrize("params", [
    {"after": "x"}, {"before": "-1"}, {"after": "1", "before": "5"}, {"rank": "2.5"},
    {"rank": str(2**63)}, {"limit": "0"}, {"limit": "5001"}, {"limit": "1e3"},
    {"q": "x" * 1025}, {"after": "１"}, {"before": str(2**64)},
])
def test_bad_parameters_are_a_400_naming_them(tmp_path: Path, params: dict[str, str]) -> None:
    with client(tmp_path / "pluto.db") as c:
        run = new_run(c)
        resp = c.get(f"/api/runs/{run}/logs", params=params)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert any(name in error for name in params), error


def test_unknown_runs_are_404_and_the_key_is_required(tmp_path: Path) -> None:
    with client(tmp_path / "pluto.db") as c:
        assert c.get("/api/runs/999/logs").status_code == 404
        assert c.get(f"/api/runs/{2**70}/logs").status_code == 404
        run = new_run(c)
        assert c.get(f"/api/runs/{run}/logs", headers={"Authorization": "Bearer no"}
                     ).status_code == 401
        assert _page(c, run) == {"lines": [], "more": False}
