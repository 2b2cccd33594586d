"""Fixtures for the backend tests: a backend with a tiny body limit, and request helpers."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from pluto import _servers
from tests.conftest import Backend

SMALL_BODY = 4096


@pytest.fixture
def small_backend(tmp_path: Path) -> Iterator[Backend]:
    """A backend of its own whose PLUTO_MAX_BODY is 4 KiB, to see 413s."""
    port = _servers.free_port()
    url = f"http://127.0.0.1:{port}"
    key = "test-" + secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUTO_")}
    env["PLUTO_MAX_BODY"] = str(SMALL_BODY)
    child = _servers.start_backend(url, f"sqlite:///{tmp_path / 'pluto.db'}", key, tmp_path,
                                   env=env, name="small-backend")
    yield Backend(url, key, child)
    child.stop()


@pytest.fixture
def api(backend: Backend) -> Iterator[httpx.Client]:
    with backend.client() as client:
        yield client


@pytest.fixture
def project() -> str:
    return "p-" + uuid.uuid4().hex[:8]


def create(client: httpx.Client, project: str, external_id: str | None = None,
           **extra: Any) -> dict[str, Any]:
    body = {"runName": "r", "projectName": project, "externalId": external_id,
            "config": None, "tags": None, **extra}
    resp = client.post("/api/runs/create", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def ndjson(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def ingest(client: httpx.Client, run: int, body: bytes,
           content_type: str = "application/x-ndjson") -> httpx.Response:
    return client.post("/ingest/metrics", content=body,
                       headers={"X-Run-Id": str(run), "X-Project-Name": "p",
                                "Content-Type": content_type})


def points(client: httpx.Client, run: int, name: str, **params: Any) -> list[list[Any]]:
    resp = client.get(f"/api/runs/{run}/metrics/{quote(name, safe='/')}", params=params)
    assert resp.status_code == 200, resp.text
    assert resp.json()["name"] == name
    return list(resp.json()["points"])
