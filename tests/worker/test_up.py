"""``pluto up`` supervises its children: a SIGKILLed worker (or embedded Redis) is restarted
with a log line while the rest keeps running, a run still completes, and Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import httpx
import redis

from pluto import _servers
from tests.helpers import PlutoUp, finish_rank, json_lines, start_rank, up_env, wait_until

RANK = """
import pluto
run = pluto.init(project="up", run_id=__import__("sys").argv[1])
for step in range(1, 101):
    run.log({"x": step}, step=step)
lost = run.finish()
print("RESULT " + __import__("json").dumps({"id": run.id, "lost": lost}), flush=True)
"""


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and " Z " in Path(f"/proc/{pid}/stat").read_text()


def test_up_restarts_a_dead_worker_and_redis_and_stops_cleanly(tmp_path: Path) -> None:
    env = up_env(tmp_path)
    pids: list[int] = []
    with PlutoUp(env) as up:
        text, redis_port = up.text, up.redis_port
        up.wait_ready()
        worker = int(re.search(r"worker pid (\d+)", text()).group(1))  # type: ignore[union-attr]
        redis_pid = int(_info_pid(redis_port) or 0)
        pids += [worker, redis_pid]

        os.kill(worker, signal.SIGKILL)
        found = wait_until(lambda: re.search(r"worker restarted \(pid (\d+)\)", text()), 30,
                           "the worker restarted")
        pids.append(int(found.group(1)))
        assert "worker exited (-9)" in text()
        assert _info_pid(redis_port) == redis_pid  # Redis was left alone

        os.kill(redis_pid, signal.SIGKILL)
        wait_until(lambda: "redis restarted" in text(), 30, "the embedded Redis restarted")
        redis_pid = int(wait_until(lambda: _info_pid(redis_port), 30, "redis answering"))
        pids.append(redis_pid)

        script = tmp_path / "rank.py"
        script.write_text(RANK)
        code, out, err = finish_rank(start_rank(script, env, f"sup-{uuid.uuid4().hex[:6]}"), 90)
        assert code == 0, err[-3000:]
        [result] = json_lines(out)
        assert result["lost"] == 0
        key = (tmp_path / "home" / "api_key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        base = env["PLUTO_API_URL"]
        wait_until(lambda: httpx.get(f"{base}/api/runs/{result['id']}", headers=headers)
                   .json()["status"] == "COMPLETED", 60, "the run COMPLETED")
        points = httpx.get(f"{base}/api/runs/{result['id']}/metrics/x", headers=headers).json()
        assert [p[0] for p in points["points"]] == list(range(1, 101))
    assert up.proc.returncode == 0 and "stopped" in text(), text()
    assert not _servers.port_open("127.0.0.1", redis_port)
    assert not _servers.port_open("127.0.0.1", up.api_port)
    assert all(_gone(pid) for pid in pids), pids


def _info_pid(port: int) -> int | None:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
