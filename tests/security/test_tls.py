"""TLS end to end: training ranks (whose producer writes raw RESP on the TLS socket), the
worker and the CLI speak rediss:// with a CA, a client certificate and a password to a real
redis-server listening only with --tls-port; the worker posts to the backend over HTTPS."""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from pluto import _servers
from pluto.protocol import Keys
from tests.conftest import ROOT, Backend
from tests.helpers import PYTHON, finish_rank, json_lines, start_rank, wait_until, write_script

from .certs import Certs
from .conftest import clean_env

RANK = """
import json, sys
import pluto
run = pluto.init(project="tls", run_id=sys.argv[1])
for step in range(1, 2001):
    run.log({"loss": 1.0 / step, "rank": run.rank}, step=step)
lost = run.finish()
print("RESULT " + json.dumps({"id": run.id, "lost": lost}), flush=True)
"""


@pytest.fixture
def tls_redis(tmp_path: Path, certs: Certs) -> Iterator[tuple[str, str, _servers.Child]]:
    port, password = _servers.free_port(), "pw-" + secrets.token_hex(8)
    child = _servers.start_redis(0, tmp_path / "redis", password=password,
                                 tls=_servers.RedisTLS(port, certs.server_cert,
                                                       certs.server_key, certs.ca))
    yield f"rediss://:{password}@127.0.0.1:{port}/0", password, child
    child.stop()


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_rediss_end_to_end(tls_redis: tuple[str, str, _servers.Child], certs: Certs,
                           make_backend: Callable[..., Backend], tmp_path: Path) -> None:
    url, password, server = tls_redis
    tls = dict(ssl_ca_certs=str(certs.ca), ssl_certfile=str(certs.client_cert),
               ssl_keyfile=str(certs.client_key))
    # The server really demands TLS and a client certificate.
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url.replace("rediss://", "redis://"), socket_timeout=3).ping()
    with pytest.raises((redis.ConnectionError, OSError)):
        redis.Redis.from_url(url, ssl_ca_certs=str(certs.ca), socket_timeout=3).ping()
    client = redis.Redis.from_url(url, **tls)
    assert client.ping()

    backend = make_backend("https", PLUTO_TLS_CERT=str(certs.server_cert),
                           PLUTO_TLS_KEY=str(certs.server_key))
    prefix = "tls" + uuid.uuid4().hex[:6]
    env = clean_env(PLUTO_REDIS_URL=url, PLUTO_PREFIX=prefix, PYTHONPATH=str(ROOT),
                    PLUTO_REDIS_CA=str(certs.ca), PLUTO_REDIS_CERT=str(certs.client_cert),
                    PLUTO_REDIS_KEY=str(certs.client_key), PLUTO_INIT_TIMEOUT="60")
    worker = _servers.start_worker(url, prefix, backend.url, backend.key, tmp_path / "logs",
                                   {**env, "PLUTO_API_CA": str(certs.ca)})
    try:
        script = write_script(tmp_path, RANK)
        run_id = "tls-" + uuid.uuid4().hex[:6]
        ranks = [start_rank(script, {**env, "RANK": str(r)}, run_id) for r in range(2)]
        results = []
        for proc in ranks:
            code, out, err = finish_rank(proc, 120)
            assert code == 0, err[-3000:]
            results += json_lines(out)
        assert [r["lost"] for r in results] == [0, 0] and len({r["id"] for r in results}) == 1
        run = results[0]["id"]
        # Every entry went over TLS into the run's stream, and on to the backend over HTTPS.
        assert client.xinfo_stream(Keys(prefix).metrics(run))["entries-added"] == 4000
        headers = {"Authorization": f"Bearer {backend.key}"}
        verify = ssl.create_default_context(cafile=str(certs.ca))
        with httpx.Client(base_url=backend.url, headers=headers, verify=verify,
                          timeout=10) as api:
            wait_until(lambda: api.get(f"/api/runs/{run}").json()["status"] == "COMPLETED",
                       90, "the run COMPLETED over TLS")
            points = api.get(f"/api/runs/{run}/metrics/loss").json()["points"]
            assert [p[0] for p in points] == list(range(1, 2001))
            assert api.get(f"/api/runs/{run}").json()["ledger"]["lost"] == 0

        # The CLI too: `pluto status` reads Redis over TLS.
        cli_env = {**env, "PLUTO_API_URL": backend.url, "PLUTO_API_CA": str(certs.ca),
                   "PLUTO_API_KEY": backend.key}
        status = subprocess.run([PYTHON, "-m", "pluto._cli", "status", "--json"],
                                env=cli_env, capture_output=True, text=True, timeout=60)
        report = json.loads(status.stdout)
        assert report["redis"]["ok"] is True, status.stdout + status.stderr
        assert report["backend"]["ok"] is True, status.stdout + status.stderr  # over HTTPS
        listed = subprocess.run([PYTHON, "-m", "pluto._cli", "runs", "--project", "tls"],
                                env=cli_env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and run_id in listed.stdout, listed.stderr
        assert password not in status.stdout + status.stderr
        # Nothing secret in any log.
        logs = worker.log() + (backend.child.log() if backend.child else "") + server.log()
        assert password not in logs and backend.key not in logs
    finally:
        worker.stop()
        client.close()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    from pluto._settings import Settings
    from pluto.errors import ConfigError

    env = {"PLUTO_REDIS_URL": "rediss://127.0.0.1:1/0", "PLUTO_REDIS_CERT": "/nonexistent"}
    with pytest.raises(ConfigError, match="PLUTO_REDIS_KEY"):
        Settings.from_env(env).tls()
    env["PLUTO_REDIS_KEY"] = "/nonexistent"
    with pytest.raises(ConfigError, match="PLUTO_REDIS_CERT='/nonexistent' is not a readable"):
        Settings.from_env(env).tls()
    assert Settings.from_env({**env, "PLUTO_REDIS_URL": "redis://h:1/0"}).tls() == {}


def test_acl_apply_over_tls(tls_redis: tuple[str, str, _servers.Child], certs: Certs) -> None:
    """`pluto acl --apply` to a rediss:// admin URL uses PLUTO_REDIS_CA/CERT/KEY like every
    other command (it used none of them, so a server demanding a client certificate refused
    it); the users it made are there, read back over TLS."""
    url, password, _ = tls_redis
    tenant = "tls" + uuid.uuid4().hex[:6]
    files = {"PLUTO_REDIS_CA": str(certs.ca), "PLUTO_REDIS_CERT": str(certs.client_cert),
             "PLUTO_REDIS_KEY": str(certs.client_key)}
    args = [PYTHON, "-m", "pluto._cli", "acl", "--tenant", tenant, "--generate", "--apply",
            "--redis-url", url]
    done = subprocess.run(args, env=clean_env(PYTHONPATH=str(ROOT), **files),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    with redis.Redis.from_url(url, ssl_ca_certs=files["PLUTO_REDIS_CA"],
                              ssl_certfile=files["PLUTO_REDIS_CERT"],
                              ssl_keyfile=files["PLUTO_REDIS_KEY"]) as admin:
        assert admin.acl_getuser(f"pluto-rank-{tenant}") is not None
        assert admin.acl_getuser("pluto-worker") is not None
    without = subprocess.run(args, env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True,
                             text=True, timeout=60)  # no client certificate: refused, said so
    assert without.returncode == 1 and "could not apply" in without.stderr
