"""The fast tier of the key checks: the real app in-process (Starlette TestClient) over a
real SQLite file, keys made through ``KeyStore`` as ``pluto server keys`` makes them."""

from __future__ import annotations

import warnings
from pathlib import Path

from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

from pluto_server._app import create_app
from pluto_server._auth import KeyStore
from pluto_server._settings import ServerSettings


def test_scoped_keys_in_process(tmp_path: Path) -> None:
    db = tmp_path / "pluto.db"
    settings = ServerSettings(api_keys=("boot",), db_url=f"sqlite:///{db}")
    with TestClient(create_app(settings)) as c:
        keys = KeyStore(str(db))
        (rid, read), (wid, write) = keys.create("read"), keys.create("write", "w")
        auth = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
        body = {"projectName": "inproc", "externalId": "a", "runName": "r"}
        assert c.post("/api/runs/create", json=body, headers=auth(read)).status_code == 403
        made = c.post("/api/runs/create", json=body, headers=auth(write))
        assert made.status_code == 200
        assert c.get("/api/runs", headers=auth(read)).json()["total"] == 1
        assert keys.revoke(wid) and keys.revoke(wid)  # twice is fine
        assert c.get("/api/runs", headers=auth(write)).status_code == 401
        assert c.get("/api/runs", headers=auth("boot")).status_code == 200
        assert [(k.id, k.scope, k.revoked_at is not None) for k in keys.list()] == [
            (rid, "read", False), (wid, "write", True)]
        assert not keys.revoke(12345)
        keys.close()
