"""Run creation (idempotent, race-safe), status, config, tags and members."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Backend

from .conftest import create


def test_repeated_create_returns_same_run_resumed(backend: Backend, api: httpx.Client,
                                                  project: str) -> None:
    first = create(api, project, "ext-1", runName="first", config='{"lr": 0.1}', tags=["a"])
    again = create(api, project, "ext-1", runName="second", config={"bs": 32}, tags=["b"])
    assert first["resumed"] is False and again["resumed"] is True
    assert again["runId"] == first["runId"] and isinstance(first["runId"], int)
    assert first["url"].startswith(backend.url)
    run = backend.run(first["runId"])
    assert run["name"] == "first" and run["tags"] == ["a"] and run["status"] == "RUNNING"
    assert run["config"] == {"lr": 0.1, "bs": 32}  # a resumed create merges its config
    create(api, project, "ext-1", config=None)
    assert backend.run(first["runId"])["config"] == {"lr": 0.1, "bs": 32}  # None never clears


def test_same_external_id_in_another_project_is_another_run(api: httpx.Client,
                                                            project: str) -> None:
    assert create(api, project, "e")["runId"] != create(api, project + "-b", "e")["runId"]


def test_no_external_id_always_creates(api: httpx.Client, project: str) -> None:
    ids = {create(api, project)["runId"] for _ in range(3)}
    ids.add(create(api, project, "")["runId"])
    assert len(ids) == 4


def test_concurrent_creates_make_one_run(backend: Backend, project: str) -> None:
    def one(_: int) -> dict[str, object]:
        with backend.client() as c:
            return create(c, project, "race", config=json.dumps({"k": _}))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len({r["runId"] for r in results}) == 1
    assert sum(not r["resumed"] for r in results) == 1
    assert len(backend.runs(project)) == 1


def test_status_config_tags_members(backend: Backend, api: httpx.Client, project: str) -> None:
    run = create(api, project, "s", config={"a": 1, "nested": {"x": 1}})["runId"]
    assert api.post("/api/runs/status/update",
                    json={"runId": run, "status": "COMPLETED"}).json() == {"ok": True}
    bad = api.post("/api/runs/status/update", json={"runId": run, "status": "DONE"})
    assert bad.status_code == 400 and "error" in bad.json()
    config = '{"b": 2, "nested": {"y": 2}}'
    assert api.post("/api/runs/config/update",
                    json={"runId": run, "config": config}).status_code == 200
    assert api.post("/api/runs/config/update",
                    json={"runId": run, "config": {"c": [1, 2]}}).status_code == 200
    tags = {"runId": run, "tags": ["x", "y"]}
    assert api.post("/api/runs/tags/update", json=tags).status_code == 200
    members = [{"member": "h1:10", "rank": 0, "local_rank": 0, "host": "h1", "pid": 10,
                "state": "running"},
               {"member": "h2:20", "rank": 1, "local_rank": 0, "host": "h2", "pid": 20,
                "state": "running"}]
    assert api.post(f"/api/runs/{run}/members", json=members).status_code == 200
    assert api.post(f"/api/runs/{run}/members",
                    json=[{"member": "h2:20", "state": "finished"}]).status_code == 200
    got = backend.run(run)
    assert got["status"] == "COMPLETED"
    assert got["config"] == {"a": 1, "nested": {"y": 2}, "b": 2, "c": [1, 2]}
    assert got["tags"] == ["x", "y"]
    assert [{k: m[k] for k in members[0]} for m in got["members"]] == [
        dict(members[0]), dict(members[1], state="finished")]
    assert isinstance(got["createdAt"], int) and got["updatedAt"] >= got["createdAt"]
    assert {"id", "externalId", "project", "name"} <= got.keys()


def test_unknown_run_is_404(api: httpx.Client) -> None:
    missing = 10**9
    for path, body in [("/api/runs/status/update", {"runId": missing, "status": "FAILED"}),
                       ("/api/runs/config/update", {"runId": missing, "config": "{}"}),
                       ("/api/runs/tags/update", {"runId": missing, "tags": []}),
                       (f"/api/runs/{missing}/members", [{"member": "m"}])]:
        resp = api.post(path, json=body)
        assert resp.status_code == 404 and "error" in resp.json(), path
    for path in (f"/api/runs/{missing}", f"/api/runs/{missing}/metrics",
                 f"/api/runs/{missing}/metrics/loss"):
        assert api.get(path).status_code == 404, path


def test_runs_listed_newest_first(backend: Backend, api: httpx.Client, project: str) -> None:
    ids = [create(api, project, f"e{i}")["runId"] for i in range(3)]
    assert [r["id"] for r in backend.runs(project)] == ids[::-1]
    everything = [r["id"] for r in backend.get("/api/runs")["runs"]]
    assert everything == sorted(everything, reverse=True) and set(ids) <= set(everything)


def test_sql_and_html_names_are_stored_verbatim(backend: Backend, api: httpx.Client) -> None:
    project = "x'); DROP TABLE runs; --<script>alert(1)</script>"
    name = '<img src=x onerror="alert(1)">\'; DELETE FROM points; --'
    run = create(api, project, "'; DROP TABLE runs; --", runName=name)["runId"]
    got = backend.run(run)
    assert (got["project"], got["name"], got["externalId"]) == (
        project, name, "'; DROP TABLE runs; --")
    assert backend.runs(project)[0]["id"] == run
