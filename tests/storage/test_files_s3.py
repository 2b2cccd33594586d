"""Files in an S3-compatible bucket (``PLUTO_FILES_URL=s3://bucket/prefix``): a real
S3-compatible server process on loopback (moto's ``moto_server``), a real backend process
pointed at it, and files uploaded and read back through our SDK's ``pluto.query`` (the same
presign + PUT routes the official SDK uses). The bucket itself is read with boto3, so the test
sees where the bytes went."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pluto import _servers, query
from pluto.errors import ConfigError
from pluto_server._settings import ServerSettings
from tests.conftest import Backend

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
boto3 = pytest.importorskip("boto3", reason="pip install 'pluto-stream[test]' (boto3, moto)")

BUCKET = "pluto-files"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def _moto_server() -> str:
    found = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("no moto_server next to this interpreter: pip install 'moto[server]'")
    return found


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[tuple[str, _servers.Child]]:
    """A moto S3 server on a free loopback port with an empty bucket: its URL and process."""
    port = _servers.free_port()
    child = _servers.spawn("moto", [_moto_server(), "-H", "127.0.0.1", "-p", str(port)],
                           tmp_path, {**os.environ, **CREDENTIALS})
    url = f"http://127.0.0.1:{port}"
    _servers.wait_for(lambda: _servers.port_open("127.0.0.1", port), 60, "moto_server", child)
    _bucket(url).create_bucket(Bucket=BUCKET)
    yield url, child
    child.stop()


def _bucket(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture
def s3_backend(s3: tuple[str, _servers.Child], tmp_path: Path) -> Iterator[Backend]:
    url = f"http://127.0.0.1:{_servers.free_port()}"
    key = "test-" + secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "AWS_"))}
    env.update(CREDENTIALS, PLUTO_FILES_URL=f"s3://{BUCKET}/runs", PLUTO_S3_ENDPOINT_URL=s3[0],
               PLUTO_FILES_DIR=str(tmp_path / "spool"))
    child = _servers.start_backend(url, f"sqlite:///{tmp_path / 'pluto.db'}", key, tmp_path,
                                   env=env, name="s3-backend")
    yield Backend(url, key, child)
    child.stop()


def _run(backend: Backend, project: str) -> int:
    with backend.client() as api:
        resp = api.post("/api/runs/create", json={"projectName": project, "runName": "s3"})
        assert resp.status_code == 200, resp.text
        return int(resp.json()["runId"])


def test_files_go_to_the_bucket_and_read_back(s3: tuple[str, Any], s3_backend: Backend,
                                              tmp_path: Path) -> None:
    run = _run(s3_backend, "s3-files")
    big = tmp_path / "weights.bin"  # beyond boto3's 8 MiB multipart threshold
    big.write_bytes(secrets.token_bytes(9 << 20))
    notes = tmp_path / "notes.txt"
    notes.write_text("héllo from S3")
    client = query.Client(api_token=s3_backend.key, host=s3_backend.url)
    client.upload_file("s3-files", run, "weights", big, step=3)
    client.upload_file("s3-files", run, "notes", notes)
    files = {f["logName"]: f for f in client.get_files("s3-files", run)}
    assert {n: (f["fileName"], f["fileSize"]) for n, f in files.items()} == {
        "notes": ("notes.txt", len(notes.read_bytes())), "weights": ("weights.bin", 9 << 20)}

    keys = {o["Key"]: o["Size"] for o in
            _bucket(s3[0]).list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert keys == {f"runs/{run}/{files['weights']['id']}": 9 << 20,
                    f"runs/{run}/{files['notes']['id']}": len(notes.read_bytes())}
    stored = _bucket(s3[0]).get_object(Bucket=BUCKET, Key=f"runs/{run}/{files['notes']['id']}")
    assert stored["Body"].read() == notes.read_bytes()

    out = tmp_path / "out"
    out.mkdir()
    assert client.download_file("s3-files", run, "weights", out).read_bytes() == big.read_bytes()
    assert client.download_file("s3-files", run, "notes", out).read_text() == "héllo from S3"
    client.close()
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []  # spool emptied


def test_a_bucket_that_is_down_is_a_503_and_nothing_is_listed(
        s3: tuple[str, _servers.Child], s3_backend: Backend, tmp_path: Path) -> None:
    run = _run(s3_backend, "s3-down")
    with s3_backend.client() as api:
        first = api.post("/files", json={"files": [{"fileName": "a.txt"}]},
                         headers={"X-Run-Id": str(run)}).json()["files"][0]["a.txt"]
        assert httpx.put(first, content=b"kept").status_code == 200
        [kept] = api.get("/api/runs/files", params={"runId": run}).json()["files"]
        s3[1].stop()
        second = api.post("/files", json={"files": [{"fileName": "b.txt"}]},
                          headers={"X-Run-Id": str(run)}).json()["files"][0]["b.txt"]
        put = httpx.put(second, content=b"lost?", timeout=60)
        assert put.status_code == 503 and put.headers["retry-after"] == "5", put.text
        assert "cannot be reached" in put.json()["error"]
        listed = api.get("/api/runs/files", params={"runId": run}).json()["files"]
        assert [f["fileName"] for f in listed] == ["a.txt"]  # the failed upload is not listed
        got = httpx.get(kept["downloadUrl"], timeout=60)
        assert got.status_code == 503, got.text


def test_files_url_is_checked_at_start() -> None:
    for bad in ("http://bucket/x", "s3://", "bucket/prefix"):
        with pytest.raises(ConfigError, match="PLUTO_FILES_URL"):
            ServerSettings.from_env({"PLUTO_API_KEY": "k", "PLUTO_FILES_URL": bad})
    got = ServerSettings.from_env({"PLUTO_API_KEY": "k", "PLUTO_FILES_URL": "s3://b/p",
                                   "PLUTO_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert (got.files_url, got.s3_endpoint) == ("s3://b/p", "http://127.0.0.1:9")
