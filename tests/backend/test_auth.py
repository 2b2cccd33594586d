"""Every /api and /ingest request needs the bearer key; without it nothing changes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pluto_server._settings import ServerSettings
from tests.conftest import Backend

from .conftest import create, ndjson


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer", "Bearer  x"])
def test_bad_key_is_401_and_writes_nothing(backend: Backend, api: httpx.Client, project: str,
                                           header: str | None) -> None:
    run = create(api, project, "x")["runId"]
    headers = {} if header is None else {"Authorization": header}
    with httpx.Client(base_url=backend.url, headers=headers, timeout=10) as anon:
        for method, path, body in [
            ("POST", "/api/runs/create", {"projectName": project, "externalId": "y"}),
            ("POST", "/api/runs/status/update", {"runId": run, "status": "FAILED"}),
            ("POST", "/api/runs/config/update", {"runId": run, "config": '{"a": 1}'}),
            ("POST", "/api/runs/tags/update", {"runId": run, "tags": ["t"]}),
            ("POST", f"/api/runs/{run}/members", [{"member": "h:1", "rank": 0}]),
            ("GET", "/api/runs", None),
            ("GET", f"/api/runs/{run}", None),
        ]:
            resp = anon.request(method, path, json=body)
            assert resp.status_code == 401, (path, resp.text)
            assert "error" in resp.json()
        resp = anon.post("/ingest/metrics", content=ndjson([{"time": 1, "step": 1,
                                                             "data": {"m": 1}}]),
                         headers={"X-Run-Id": str(run), "Content-Type": "application/x-ndjson"})
        assert resp.status_code == 401
    runs = backend.runs(project)
    assert [r["externalId"] for r in runs] == ["x"]
    assert runs[0]["status"] == "RUNNING" and runs[0]["config"] == {} and runs[0]["tags"] == []
    assert backend.run(run)["members"] == []
    assert backend.get(f"/api/runs/{run}/metrics")["names"] == []


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated keys\nk3\n\nk4\n")
    settings = ServerSettings.from_env({"PLUTO_API_KEY": "k1, k2", "PLUTO_API_KEY_FILE":
                                        str(key_file)})
    assert settings.api_keys == ("k1", "k2", "k3", "k4")


def test_health_and_dashboard_need_no_key(backend: Backend) -> None:
    with httpx.Client(base_url=backend.url, timeout=10) as anon:
        health = anon.get("/healthz")
        assert health.json() == {"ok": True}
        assert "application/msgpack" in health.headers["x-pluto-ingest"]
        page = anon.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        # Its CSP (no inline or remote script): tests/security/test_http.py; XSS: tests/ui.
