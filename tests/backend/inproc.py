"""The backend in-process (Starlette's TestClient over the real app and a real SQLite file):
the fast tier beside the process-level tests. Server exceptions are raised into the test, so
a 500 shows its traceback."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # Starlette 1.x would rather drive its TestClient with httpx2
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from pluto_server._app import create_app
from pluto_server._settings import ServerSettings

KEY = "inproc-key"


@contextmanager
def client(db: Path, max_body: int = 1 << 22) -> Iterator[TestClient]:
    """A TestClient on a fresh app over ``db``, authorised."""
    settings = ServerSettings(api_keys=(KEY,), db_url=f"sqlite:///{db}", max_body=max_body)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"},
                    raise_server_exceptions=True) as c:
        yield c


def new_run(c: TestClient, project: str = "p", **extra: Any) -> int:
    resp = c.post("/api/runs/create", json={"projectName": project, "runName": "r", **extra})
    assert resp.status_code == 200, resp.text
    return int(resp.json()["runId"])


def raw_json(c: TestClient, path: str, text: str) -> Any:
    """POST JSON text as is (so it can hold ``\\udc80`` escapes and bare NaN tokens)."""
    return c.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def ingest(c: TestClient, run: int | str, body: bytes,
           content_type: str = "application/x-ndjson") -> Any:
    return c.post("/ingest/metrics", content=body,
                  headers={"X-Run-Id": str(run), "Content-Type": content_type})
