"""The Pluto read API with the official client, and ``pluto.query`` of our SDK, against one
real backend process holding the same data.

The official SDK (its own virtualenv) logs a run with a spike, console lines, a histogram and
two files; three more runs are written through our HTTP API. Then ``analysis.py`` runs twice,
unchanged: with the official SDK's interpreter (its ``pluto.query``) and with ours. Both must
give the expected answers, and the same ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from pluto_server._query import prefix
from tests.conftest import Backend

from .conftest import HERE, run_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROJECT = "my-query-project"
STEPS = 1000


def loss_a(i: int) -> float:
    return 1 - 0.5 * i / (STEPS - 1)


def loss_b(i: int) -> float:
    return 1 - 0.8 * i / (STEPS - 1)


def _seed(api: httpx.Client, name: str, config: dict[str, Any], tags: list[str],
          status: str, loss: Any) -> int:
    resp = api.post("/api/runs/create", json={"projectName": PROJECT, "runName": name,
                                              "config": json.dumps(config), "tags": tags})
    assert resp.status_code == 200, resp.text
    run = int(resp.json()["runId"])
    if loss is not None:
        body = "".join(json.dumps({"step": i, "time": 1_764_000_000_000 + i,
                                   "data": {"loss": loss(i)}}) + "\n" for i in range(STEPS))
        resp = api.post("/ingest/metrics", content=body.encode(),
                        headers={"X-Run-Id": str(run), "Content-Type": "application/x-ndjson"})
        assert resp.status_code == 200, resp.text
    assert api.post("/api/runs/status/update",
                    json={"runId": run, "status": status}).status_code == 200
    return run


@pytest.fixture(scope="module")
def seeded(query_backend: Backend, official: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("official-logs")
    [result] = run_script(official, HERE / "official_logs.py", query_backend, tmp, PROJECT,
                          "official-ext")
    with query_backend.client() as api:
        ids = {"official-run": result["id"],
               "a": _seed(api, "a", {"lr": 0.01, "opt": {"name": "adam"}, "layers": 2},
                          ["baseline"], "COMPLETED", loss_a),
               "b": _seed(api, "b", {"lr": 0.001, "layers": 8}, ["baseline", "big"],
                          "FAILED", loss_b),
               "c": _seed(api, "c", {"lr": "auto"}, [], "RUNNING", None)}
    return ids


def analysis(python: Path | str, backend: Backend, ids: dict[str, Any], label: str,
             tmp: Path) -> dict[str, Any]:
    display = f"{prefix(PROJECT)}-1"
    [out] = run_script(python, HERE / "analysis.py", backend, tmp, PROJECT,
                       str(ids["official-run"]), display, label, str(tmp))
    return dict(out)


def check(out: dict[str, Any], ids: dict[str, Any], label: str) -> None:
    """Every answer of ``analysis.py`` as the data seeded above implies."""
    official = "official-run"
    assert out["module"] is True
    assert out["projects"] == [PROJECT]
    assert out["all"] == ["c", "b", "a", official]
    assert out["run_keys"] == sorted(["id", "name", "displayId", "status", "tags", "config",
                                      "createdAt", "updatedAt", "url"])
    assert out["search"] == [official]
    assert out["tags"] == ["b"]
    assert out["page"] == ["b", "a"]
    assert out["sorts"] == {
        "name": ["a", "b", "c", official], "-name": [official, "c", "b", "a"],
        "-config.lr.value": [official, "a", "b", "c"],
        "config.lr.value": ["b", "a", official, "c"],
        "summary_metrics.loss": ["b", "a", "c", official],
        "-summary_metrics.loss": ["a", "b", "c", official],
        "createdAt": [official, "a", "b", "c"], "-createdAt": ["c", "b", "a", official],
        "+status": ["a", official, "b", "c"]}
    assert out["filters"] == {
        "lr_lt": ["a", "b"], "or": ["b", official], "not_in": ["c", official],
        "regex": ["a", "b"], "summary": ["b"], "nested": ["a"], "state": ["a", official],
        "created": ["a", "b", "c", official], "in": ["a", "b"], "nin": ["a", "c", official],
        "stale": ["b", "c"], "gt_eq": ["b", official], "eq_string": ["c"],
        "ne": ["b", "c", official]}
    assert out["filter_and_search"] == ["a"]
    assert out["run"] == {"id": ids[official], "name": official,
                          "displayId": f"{prefix(PROJECT)}-1", "status": "COMPLETED",
                          "tags": ["official", "compat"], "config": {"lr": 0.1, "layers": 4}}
    assert out["same_by_display"] is True
    assert out["log_names"] == ["acc", "blob", "notes", "train/loss", "weights"]
    assert out["metric_names"] == ["acc", "loss", "train/loss"]
    assert out["metric_names_run"] == ["acc", "train/loss"]
    assert out["metric_names_search"] == ["loss", "train/loss"]
    assert out["sampled_count_ok"] is True
    assert out["spike_kept"] == [{"metric": "train/loss", "step": 777, "value": 100.0}]
    assert out["sampled_ends"] == [1, STEPS]
    assert out["window_steps"] == list(range(770, 781))
    assert out["both_counts"] == {"train/loss": STEPS, "acc": STEPS}
    assert out["all_metrics_count"] == 2 * STEPS
    assert out["stats"] == {"logName": "train/loss", "count": STEPS, "min": 1 / STEPS,
                            "max": 100.0, "lastStep": STEPS}
    assert out["stats_anomaly_steps"] == [777]
    last = STEPS - 1
    assert out["compare"] == {"best": "b", "runs": [["a", STEPS, loss_a(last)],
                                                   ["b", STEPS, loss_b(last)], ["c", 0, None]]}
    assert out["leaderboard"] == {"MIN": [["b", loss_b(last)], ["a", loss_a(last)]],
                                  "MAX": [["a", 1.0], ["b", 1.0]],
                                  "LAST": [["b", loss_b(last)], ["a", loss_a(last)]]}
    assert out["leaderboard_desc"] == ["a", "b"]
    assert [(f[0], f[2], f[3]) for f in out["files"]] == [("blob", 8, 7), ("notes", 10, 6)]
    assert out["files"][1][1] == "txt"
    assert out["downloaded"] == "some notes"
    size = len(f"uploaded by {label}")
    assert out["uploaded"] == [[f"{label}.txt", size, 3]] and out["uploaded_back"] is True
    assert {("hello from the official sdk", "INFO"),
            ("an error line", "ERROR")} <= {tuple(x) for x in out["logs"]}
    assert out["error_logs"] == ["an error line"]
    assert out["logs_page"] == 1
    assert out["errors"] == {
        "missing_run": {"QueryError": 404}, "missing_display": {"QueryError": 404},
        "bad_operator": {"ValueError": None}, "bad_field": {"ValueError": None},
        "bad_sort": {"QueryError": 400}, "bad_range": {"ValueError": None},
        "bad_aggregation": {"QueryError": 400}, "bad_regex": {"QueryError": 400}}


def test_official_client_and_ours_read_the_same(query_backend: Backend, official: Path,
                                                seeded: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "official").mkdir()
    (tmp_path / "ours").mkdir()
    theirs = analysis(official, query_backend, seeded, "official", tmp_path / "official")
    check(theirs, seeded, "official")
    ours = analysis(sys.executable, query_backend, seeded, "ours", tmp_path / "ours")
    check(ours, seeded, "ours")
    for out in (theirs, ours):
        out.pop("uploaded")
    assert ours == theirs


def test_histogram_and_console_lines_of_the_official_sdk(query_backend: Backend,
                                                         seeded: dict[str, Any]) -> None:
    run = seeded["official-run"]
    data = query_backend.get("/api/runs/data", runId=run)["data"]
    [hist] = data
    assert (hist["logName"], hist["dataType"], hist["step"]) == ("weights", "HISTOGRAM", 5)
    assert hist["data"]["freq"] == [1, 2, 3] and hist["data"]["type"] == "Histogram"
    logs = query_backend.get("/api/runs/logs", runId=run)["logs"]
    assert [line["message"] for line in logs if line["logType"] == "ERROR"] == ["an error line"]
