"""HTTP hardening against hostile clients: security headers on every answer, paging, a
per-key create rate limit, slowloris and trickled bodies cut off, HTTPS."""

from __future__ import annotations

import resource
import shutil
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pluto import _servers
from pluto_server._headers import CreateRate
from tests.conftest import ROOT, Backend
from tests.helpers import PYTHON

from .certs import Certs
from .conftest import clean_env
from .test_keys import db_of, new_key


def _create(c: httpx.Client, project: str, external_id: str) -> httpx.Response:
    return c.post("/api/runs/create", json={"runName": "r", "projectName": project,
                                            "externalId": external_id})


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_security_headers_on_every_answer(backend: Backend) -> None:
    with httpx.Client(base_url=backend.url, timeout=10) as anon, backend.client() as api:
        answers = [anon.get("/"), anon.get("/healthz"), anon.get("/api/runs"),  # 401
                   api.get("/api/runs"), api.get("/api/runs/999999999"), api.get("/nope"),
                   api.post("/api/runs/create", content=b"{")]
    assert [a.status_code for a in answers] == [200, 200, 401, 200, 404, 404, 400]
    for answer in answers:
        h = answer.headers
        assert h["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer"
        assert "server" not in h
    page, api_answer = answers[0], answers[3]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert api_answer.headers["content-security-policy"].startswith("default-src 'none'")


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_runs_are_paged(backend: Backend) -> None:
    project = "page-" + uuid.uuid4().hex[:6]
    with backend.client() as c:
        ids = [_create(c, project, f"e{i}").json()["runId"] for i in range(7)]
        seen, offset, pages = [], 0, 0
        while offset is not None:
            page = c.get("/api/runs", params={"project": project, "limit": 3,
                                              "offset": offset}).json()
            assert page["total"] == 7 and page["limit"] == 3 and len(page["runs"]) <= 3
            seen += [r["id"] for r in page["runs"]]
            offset, pages = page["next"], pages + 1
        assert seen == sorted(ids, reverse=True) and pages == 3  # newest first, none twice
        default = c.get("/api/runs", params={"project": project}).json()
        assert default["limit"] == 100 and default["next"] is None and len(default["runs"]) == 7
        for bad in ({"limit": 0}, {"limit": 5000}, {"offset": -1}, {"limit": "x"}):
            resp = c.get("/api/runs", params={"project": project, **bad})
            assert resp.status_code == 400 and "error" in resp.json(), bad


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_create_storm_gets_429_per_key(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(PLUTO_CREATE_RATE="0.2", PLUTO_CREATE_BURST="3")
    other = new_key(db_of(backend), "write")
    with backend.client() as c, backend.client(other) as c2:
        codes = [_create(c, "storm", f"s{i}").status_code for i in range(6)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429, 429]
        refused = _create(c, "storm", "s9")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "PLUTO_CREATE_RATE" in refused.json()["error"]
        assert _create(c2, "storm", "t0").status_code == 200  # another key is not slowed
        assert c.get("/api/runs", params={"project": "storm"}).status_code == 200  # reads go
    assert sorted(r["externalId"] for r in backend.runs("storm")) == ["s0", "s1", "s2", "t0"]


def test_bucket_refills() -> None:
    bucket = CreateRate(app=None, rate=2.0, burst=2)  # type: ignore[arg-type]
    assert [bucket.take("k", 100.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.take("k", 100.0) == 0.5
    assert bucket.take("k", 100.5) == 0.0 and bucket.take("other", 100.5) == 0.0


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_slowloris_connections_are_closed(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(PLUTO_HEADER_TIMEOUT="2", PLUTO_MAX_CONNECTIONS="200")
    port = int(backend.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finish
        socks.append(s)
    try:
        assert httpx.get(f"{backend.url}/healthz", timeout=10).json() == {"ok": True}
        start = time.monotonic()
        for s in socks:
            try:  # closed by the server: recv gives b"" (or a reset), never the 30 s timeout
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < 30  # a bound, not a speed: they were closed at all
        # A kept-alive connection that starts a second request and stalls is closed too.
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
        assert b"HTTP/1.1" not in rest
        s.close()
        assert httpx.get(f"{backend.url}/healthz", timeout=10).status_code == 200
    finally:
        for s in socks:
            s.close()


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_slowloris_at_the_open_files_limit(tmp_path: Path) -> None:
    """The issue's attack: soft open-files limit 200, 200 unfinished requests. The server
    raises its soft limit to the hard one, so /healthz keeps answering, and the 200 are closed."""
    if shutil.which("prlimit") is None:
        pytest.fail("this test needs prlimit (util-linux)")
    port = _servers.free_port()
    env = clean_env(PLUTO_API_URL=f"http://127.0.0.1:{port}", PLUTO_API_KEY="k",
                    PLUTO_DB_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
                    PLUTO_HEADER_TIMEOUT="3", PYTHONPATH=str(ROOT))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 400:
        pytest.fail(f"the hard open-files limit ({hard}) leaves no room above 200")
    child = _servers.spawn("lowfd-backend", ["prlimit", "--nofile=200:" + (
        "unlimited" if hard == resource.RLIM_INFINITY else str(hard)), PYTHON, "-m",
        "backend"], tmp_path, env)
    socks: list[socket.socket] = []
    try:
        _servers.wait_for(lambda: _servers.port_open("127.0.0.1", port), 30, "backend", child)
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /api/runs/create HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=20).json() == {"ok": True}
        for s in socks:
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        assert "Too many open files" not in child.log()
    finally:
        for s in socks:
            s.close()
        child.stop()


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_connection_limit(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(PLUTO_MAX_CONNECTIONS="5", PLUTO_HEADER_TIMEOUT="2")
    port = int(backend.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(6)]
    try:
        refused = httpx.get(f"{backend.url}/healthz", timeout=10)
        assert refused.status_code == 503  # beyond PLUTO_MAX_CONNECTIONS: refused, not queued
        for s in idle:  # the idle ones are closed at their header deadline...
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        assert httpx.get(f"{backend.url}/healthz", timeout=10).status_code == 200  # ...then ok
    finally:
        for s in idle:
            s.close()


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_trickled_body_gets_408(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(PLUTO_BODY_TIMEOUT="2")
    port = int(backend.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /api/runs/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + backend.key.encode() + b"\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"projectName\": ")  # then nothing
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := s.recv(4096)):
        answer += chunk
    s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert httpx.get(f"{backend.url}/healthz", timeout=10).status_code == 200


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_https(make_backend: Callable[..., Backend], certs: Certs) -> None:
    backend = make_backend("https", PLUTO_TLS_CERT=str(certs.server_cert),
                           PLUTO_TLS_KEY=str(certs.server_key))
    with httpx.Client(base_url=backend.url, verify=ssl.create_default_context(cafile=str(certs.ca)), timeout=10,
                      headers={"Authorization": f"Bearer {backend.key}"}) as c:
        assert c.get("/healthz").json() == {"ok": True}
        created = _create(c, "tls", "h1")
        assert created.status_code == 200 and created.json()["url"].startswith("https://")
        assert "max-age" in created.headers["strict-transport-security"]
    try:  # a client that does not trust the CA refuses it
        httpx.get(f"{backend.url}/healthz", timeout=10)
        raise AssertionError("an untrusted certificate was accepted")
    except httpx.ConnectError as exc:
        assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
    port = int(backend.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP: no answer
        try:
            assert b'"ok"' not in plain.recv(4096)
        except (ConnectionResetError, TimeoutError):
            pass
