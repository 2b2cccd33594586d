"""The official SDK's other endpoints answer harmlessly, in the shapes its code reads."""

from __future__ import annotations

import httpx

from tests.conftest import Backend

from .conftest import create


def test_login_resume_heartbeat_and_dropped_calls(api: httpx.Client, project: str) -> None:
    assert api.post("/api/slug").json()["organization"]["slug"]
    run = create(api, project, "compat")["runId"]
    by_ext = api.post("/api/runs/resume", json={"externalId": "compat", "projectName": project})
    by_id = api.post("/api/runs/resume", json={"runId": run})
    for resp in (by_ext, by_id):
        assert resp.status_code == 200
        assert resp.json()["runId"] == run and resp.json()["resumed"] is True
        assert resp.json()["url"]
    assert api.post("/api/runs/resume", json={"runId": 10**9}).status_code == 404
    assert api.post("/api/runs/trigger", json={"runId": run}).json() == {"status": "RUNNING"}
    for path in ("/api/runs/logName/add", "/api/runs/modelGraph/create", "/api/runs/alert"):
        assert api.post(path, json={"runId": run, "logName": ["a"]}).status_code == 200, path
    for path, line in (("/ingest/logs", b'{"time": 1, "message": "hi"}\n'),
                       ("/ingest/data", b'{"time": 1, "logName": "h", "data": "{}"}\n')):
        resp = api.post(path, content=line,
                        headers={"X-Run-Id": str(run), "Content-Type": "application/x-ndjson"})
        assert resp.status_code == 200, path


def test_file_upload_urls_are_signed(backend: Backend, api: httpx.Client, project: str) -> None:
    run = create(api, project, "files")["runId"]
    resp = api.post("/files", json={"files": [{"fileName": "a b/c.txt", "fileType": "txt"}]},
                    headers={"X-Run-Id": str(run)})
    assert resp.status_code == 200
    urls = {k: v for group in resp.json().values() for m in group for k, v in m.items()}
    url = urls["a b/c.txt"]
    with httpx.Client(timeout=10) as storage:  # like S3: no bearer header
        assert storage.put(url, content=b"hello").status_code == 200
        assert storage.put(url.replace("/files/blob/", "/files/blob/0"),
                           content=b"x").status_code in (401, 403)
