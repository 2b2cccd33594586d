"""Operating it: ``pluto status`` as a readiness probe, and dead letters listed and replayed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import _servers
from tests.conftest import ROOT, Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

RANK = """
import json, sys, pluto
width = int(sys.argv[2])
with pluto.init(project="ops", run_id=sys.argv[1]) as run:
    for step in range(1, 11):
        run.log({f"metric/with/a/long/name/{i:03d}": step + i for i in range(width)} if step == 5
                else {"metric/with/a/long/name/000": step})
print("RESULT " + json.dumps({"id": run.id}), flush=True)
"""


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = stack.env(PLUTO_API_URL=stack.backend.url, PLUTO_API_KEY=stack.backend.key)
    return subprocess.run([sys.executable, "-m", "pluto._cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _log(stack: Stack, tmp: Path, width: int = 1) -> tuple[str, int]:
    run_id = f"ops-{uuid.uuid4().hex[:6]}"
    code, out, err = finish_rank(start_rank(write_script(tmp, RANK, "ops.py"), stack.env(),
                                            run_id, str(width)))
    assert code == 0, err
    return run_id, int(json_lines(out)[0]["id"])


def test_status_is_healthy_then_names_what_is_down(bare_stack: Stack, tmp_path: Path) -> None:
    stack = bare_stack
    stack.start_worker()
    _, run = _log(stack, tmp_path)
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
    ok = _cli(stack, "status", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["healthy"] and report["redis"]["ok"] and report["backend"]["ok"]
    assert any(w["alive"] for w in report["workers"]), report["workers"]
    # The last worker stops while a rank's entries wait for it: unhealthy, saying what to start.
    stack.stop_workers()
    r = redis.Redis.from_url(stack.redis_url)
    r.delete(stack.keys.workers)  # (a stopped worker deregisters itself anyway)
    r.xadd(stack.keys.control, {"op": "noop"})
    bad = _cli(stack, "status")
    assert bad.returncode == 1 and "no worker is alive" in bad.stdout, bad.stdout
    assert "UNHEALTHY" in bad.stdout


def test_status_names_an_unreachable_backend(bare_stack: Stack) -> None:
    env = bare_stack.env(PLUTO_API_URL=f"http://127.0.0.1:{_servers.free_port()}")
    out = subprocess.run([sys.executable, "-m", "pluto._cli", "status"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "backend unreachable" in out.stdout, out.stdout


def _points(stack: Stack, run: int, i: int) -> list[list[Any]]:
    return stack.backend.points(run, f"metric/with/a/long/name/{i:03d}")


def _backend(tmp: Path, key: str, url: str, max_body: int) -> _servers.Child:
    env = dict(os.environ, PLUTO_MAX_BODY=str(max_body), PYTHONPATH=str(ROOT))
    return _servers.start_backend(url, f"sqlite:///{tmp / 'ops.db'}", key, tmp, env,
                                  name=f"backend-{max_body}")


@pytest.mark.e2e
def test_a_dead_letter_replayed_after_its_cause_is_fixed_is_stored_once(
        redis_url: str, prefix: str, tmp_path: Path) -> None:
    url, key = f"http://127.0.0.1:{_servers.free_port()}", "test-" + secrets.token_hex(8)
    child = _backend(tmp_path, key, url, 6000)  # one entry of 600 metrics is larger than this
    stack = Stack(redis_url, prefix, Backend(url, key, child), tmp_path / "logs")
    try:
        stack.start_worker()
        _, run = _log(stack, tmp_path, width=600)
        r = redis.Redis.from_url(redis_url)
        wait_until(lambda: r.xlen(stack.keys.dead(run)) >= 1, 30, "a dead letter")
        listed = _cli(stack, "dead", "list", str(run))
        assert listed.returncode == 0 and "413" in listed.stdout + listed.stderr, listed
        child.stop()  # the fix: a larger PLUTO_MAX_BODY
        stack.backend.child = child = _backend(tmp_path, key, url, 64 << 20)
        replayed = _cli(stack, "dead", "replay", str(run))
        assert replayed.returncode == 0 and "replayed" in replayed.stdout, replayed
        want = [[5, 5 + 7]]
        wait_until(lambda: [p[:2] for p in _points(stack, run, 7)] == want, 30,
                   "the replayed entry stored")
        wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
        assert [p[0] for p in _points(stack, run, 0)] == list(range(1, 11))
        assert r.xlen(stack.keys.dead(run)) == 0
        again = _cli(stack, "dead", "replay", str(run))
        assert "replayed 0" in again.stdout
        assert _points(stack, run, 7)[0][:2] == [5, 12]  # once, not twice
    finally:
        stack.stop_workers()
        child.stop()
