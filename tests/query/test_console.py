"""Console lines of every rank, end to end: real rank processes print, our SDK streams the
lines through Redis, the worker persists them, and they read back per rank through the
backend, ``pluto.query.get_logs`` and ``pluto tail --logs --rank N``."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pluto import _servers, query
from pluto._console import Console, _Tee
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

pytestmark = pytest.mark.timeout(120)

RANK = """
    import json, os, sys
    import pluto

    with pluto.init(project=sys.argv[1], name="console") as run:
        rank = run.rank
        print(f"hello from rank {rank}")
        for i in range(3):
            run.log({"x": i})
            print(f"step {i} on rank {rank}", flush=True)
        print(f"NCCL error on rank {rank}" if rank == 1 else "all fine", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    print("\\nRESULT " + json.dumps({"id": run.id, "rank": rank}), flush=True)
"""


def _ranks(stack: Stack, tmp: Any, project: str, run_id: str, **env: str) -> int:
    script = write_script(tmp, RANK)
    procs = [start_rank(script, stack.env(PLUTO_RUN_ID=run_id, RANK=str(rank), **env), project)
             for rank in range(2)]
    ids = set()
    for proc in procs:
        code, out, err = finish_rank(proc)
        assert code == 0, out + err
        assert "hello from rank" in out  # the tee still writes through to the real stdout
        [result] = json_lines(out)
        ids.add(result["id"])
    [run] = ids
    return int(run)


def test_every_ranks_console_reaches_the_backend_and_tail(stack: Stack, tmp_path: Any) -> None:
    project = "console-" + tmp_path.name[-8:]
    run = _ranks(stack, tmp_path, project, "console-job")
    backend = stack.backend

    def lines() -> list[dict[str, Any]]:
        got = backend.get("/api/runs/logs", runId=run)["logs"]
        return got if len(got) >= 2 * 6 else []

    logs = wait_until(lines, 60, "console lines of both ranks in the backend")
    by_rank = {r: [(x["logType"], x["message"]) for x in logs if x["rank"] == r] for r in (0, 1)}
    for rank in (0, 1):
        mine = by_rank[rank]
        assert ("INFO", f"hello from rank {rank}") in mine
        assert [m for t, m in mine if m.startswith("step")] == [
            f"step {i} on rank {rank}" for i in range(3)]
        assert ("INFO", "no newline at the end") in mine  # a partial line is sent at finish
        assert not any("RESULT" in m for _, m in mine)  # printed after finish: not captured
    assert [m for t, m in by_rank[1] if t == "ERROR"] == ["NCCL error on rank 1"]
    assert [m for t, m in by_rank[0] if t == "ERROR"] == ["all fine"]

    client = query.Client(api_token=backend.key, host=backend.url)
    errors = client.get_logs(project, run, log_type="error", rank=1)
    assert [x["message"] for x in errors] == ["NCCL error on rank 1"]
    client.close()

    tail = subprocess.run(
        [sys.executable, "-m", "pluto._cli", "tail", str(run), "--logs", "--rank", "1", "--all",
         "--once"], env=stack.env(), capture_output=True, text=True, timeout=30, check=False)
    assert tail.returncode == 0, tail.stderr
    shown = tail.stdout.splitlines()
    assert shown and all(line.startswith("[rank 1]") for line in shown)
    assert "[rank 1] ERROR NCCL error on rank 1" in shown


def test_console_capture_is_opt_out(stack: Stack, r: Any, tmp_path: Any) -> None:
    project = "quiet-" + tmp_path.name[-8:]
    run = _ranks(stack, tmp_path, project, "quiet-job", PLUTO_CAPTURE_CONSOLE="0")
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 60, "run completed")
    assert stack.backend.get("/api/runs/logs", runId=run)["logs"] == []
    assert r.exists(stack.keys.logs(run)) == 0
    assert r.exists(stack.keys.metrics(run)) == 1  # the run itself streamed as usual


def _console(client: Any, stream: str, buffer: int) -> tuple[Any, io.StringIO, Any]:
    """A capture fed through its tee over a StringIO (sys.stdout stays pytest's)."""
    console = Console(client, stream, rank=3, buffer=buffer, interval=0.02)
    shown = io.StringIO()
    console._thread.start()
    return console, shown, _Tee(shown, "stdout", console)


def test_console_lines_arrive_in_order_with_their_rank(r: Any, keys: Any) -> None:
    stream = keys.logs(77)
    client = redis.Redis(connection_pool=r.connection_pool)
    console, shown, tee = _console(client, stream, buffer=10_000)
    for i in range(1000):
        tee.write(f"line {i}\n")
    tee.write("bad \udc80 text\n")
    console.close(5.0)
    assert shown.getvalue().count("\n") == 1001  # written through unchanged
    entries = r.xrange(stream)
    assert [e[1][b"msg"] for e in entries[:1000]] == [f"line {i}".encode() for i in range(1000)]
    assert entries[-1][1][b"msg"] == b"bad ? text"  # replaced, not an exception
    assert {e[1][b"rank"] for e in entries} == {b"3"}
    assert [int(e[1][b"n"]) for e in entries] == list(range(1, 1002))
    assert (console.sent, console.dropped) == (1001, 0)


def test_console_is_bounded_while_redis_is_down() -> None:
    dead = redis.Redis(host="127.0.0.1", port=_servers.free_port(), socket_connect_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    console, shown, tee = _console(dead, "nowhere:{1}:logs", buffer=50)
    for i in range(1000):
        tee.write(f"line {i}\n")  # never waits for Redis
    console.close(0.5)
    assert shown.getvalue().count("\n") == 1000
    assert (console.sent, console.dropped) == (0, 1000)  # every line accounted for


def test_lines_a_dead_worker_left_pending_are_claimed(bare_stack: Stack, r: Any) -> None:
    stack = bare_stack
    with stack.backend.client() as api:
        run = api.post("/api/runs/create", json={"projectName": "claims", "runName": "x"}
                       ).json()["runId"]
    stream = stack.keys.logs(run)
    r.xadd(stream, {"rank": 2, "time": 5, "type": "ERROR", "n": 1, "msg": "orphaned line"})
    r.xgroup_create(stream, "workers", id="0")
    assert r.xreadgroup("workers", "a-worker-that-died", {stream: ">"})  # pending on it
    r.sadd(stack.keys.runs, run)
    stack.start_worker(PLUTO_CLAIM_IDLE_MS="300")
    logs = wait_until(lambda: stack.backend.get("/api/runs/logs", runId=run)["logs"], 30,
                      "the orphaned line claimed and stored")
    assert [(x["rank"], x["logType"], x["message"]) for x in logs] == [
        (2, "ERROR", "orphaned line")]
    wait_until(lambda: r.xpending(stream, "workers")["pending"] == 0, 30, "acknowledged")
