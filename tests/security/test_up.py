"""`pluto up` hardening: the embedded Redis requires the password of PLUTO_REDIS_URL (also as
an ACL user), protected mode stays on, `.pluto/` and everything in it is private from the
start, a loose key file is refused, and no secret reaches the output or the logs."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from tests.helpers import (
    PYTHON,
    PlutoUp,
    finish_rank,
    json_lines,
    start_rank,
    up_env,
    wait_until,
    write_script,
)

RANK = """
import json, sys
import pluto
run = pluto.init(project="up", run_id=sys.argv[1])
for step in range(1, 51):
    run.log({"x": step}, step=step)
print("RESULT " + json.dumps({"id": run.id, "lost": run.finish()}), flush=True)
"""

PASSWORD = "s3cret pass:word/@%"  # spaces and URL characters survive into redis.conf


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
@pytest.mark.parametrize("user", ["", "alice"])
def test_up_requires_the_url_password_and_keeps_files_private(tmp_path: Path, user: str) -> None:
    env = up_env(tmp_path, f"{user}:{_quoted(PASSWORD)}")
    home = Path(env["PLUTO_HOME"])
    with PlutoUp(env) as up:
        text, port = up.text, up.redis_port
        up.wait_ready()
        assert "requiring the password" in text() and "protected mode on" in text()

        # Without the password (or with a wrong one) Redis refuses everything.
        anon = redis.Redis(port=port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anon.set("x", 1)
        anon.close()
        with redis.Redis(port=port, username=user or None, password="wrong") as wrong, \
                pytest.raises(redis.AuthenticationError):
            wrong.ping()
        good = redis.Redis(port=port, username=user or None, password=PASSWORD, decode_responses=True)
        assert good.config_get("protected-mode") == {"protected-mode": "yes"}
        assert good.config_get("bind")["bind"] == "127.0.0.1"
        pid = int(good.info("server")["process_id"])
        assert PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        if user:  # the default user is switched off; alice has every command
            assert good.acl_whoami() == "alice"
            with redis.Redis(port=port, password=PASSWORD) as default, \
                    pytest.raises(redis.AuthenticationError):
                default.ping()

        # A rank and the worker use the URL's credentials end to end.
        script = write_script(tmp_path, RANK)
        code, out, err = finish_rank(start_rank(script, env, f"u-{uuid.uuid4().hex[:6]}"), 90)
        assert code == 0, err[-3000:]
        [result] = json_lines(out)
        assert result["lost"] == 0
        key = (home / "api_key").read_text().strip()
        api = httpx.Client(base_url=env["PLUTO_API_URL"], timeout=10,
                           headers={"Authorization": f"Bearer {key}"})
        wait_until(lambda: api.get(f"/api/runs/{result['id']}").json()["status"]
                   == "COMPLETED", 60, "the run COMPLETED")
        api.close()
        good.close()

        # .pluto is 0700 and nothing in it is open to group or others (db, AOF, logs, key).
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        found = [p for p in home.rglob("*") if p.is_file()]
        names = {p.name for p in found}
        assert {"api_key", "db.sqlite", "redis.conf", "backend.log", "worker.log"} <= names
        assert any(p.parent.name == "appendonlydir" or p.suffix == ".aof" for p in found)
        loose = [(str(p), oct(p.stat().st_mode)) for p in [home, *home.rglob("*")]
                 if p.stat().st_mode & 0o077]
        assert loose == []
    assert up.proc.returncode == 0, text()
    # No secret in what up printed or in any log.
    logs = "".join(p.read_text(errors="replace") for p in (home / "logs").glob("*.log"))
    for secret in (PASSWORD, _quoted(PASSWORD), key):
        assert secret not in text() and secret not in logs


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_up_refuses_a_loose_key_file(tmp_path: Path) -> None:
    env = up_env(tmp_path, ":pw")
    home = Path(env["PLUTO_HOME"])
    home.mkdir(mode=0o700)
    (home / "api_key").write_text("pluto_old\n")
    os.chmod(home / "api_key", 0o644)
    done = subprocess.run([PYTHON, "-m", "pluto._cli", "up"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert f"chmod 600 {home / 'api_key'}" in done.stderr and "pluto_old" not in done.stderr
    assert not (home / "logs").exists()  # nothing was started
    os.chmod(home / "api_key", 0o600)  # the fix named: then up would use it


def test_new_key_file_is_private_from_the_start(tmp_path: Path) -> None:
    from pluto._cli import _local_key, _private_home

    old = os.umask(0o022)  # even under a permissive umask
    try:
        home = tmp_path / "h"
        _private_home(home)
        key = _local_key(home)
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "api_key").stat().st_mode) == 0o600
    assert (home / "api_key").read_text().strip() == key and len(key) >= 6 + 43


@pytest.mark.e2e  # real backend, worker, Redis or CLI processes
def test_up_warns_when_a_running_redis_ignores_the_password(redis_url: str,
                                                          tmp_path: Path) -> None:
    """The URL carries a password but the Redis already running there needs none (Redis then
    accepts any AUTH): up uses it and says so, without printing the password."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    env = up_env(tmp_path, ":nope-" + uuid.uuid4().hex[:6])
    env["PLUTO_REDIS_URL"] = env["PLUTO_REDIS_URL"].rsplit("@", 1)[0] + f"@127.0.0.1:{port}/0"
    with PlutoUp(env) as up:
        up.wait_ready()
    out = up.text()
    assert "accepts connections without a password" in out, out
    assert "using the Redis at redis://:***@" in out and "nope-" not in out
