"""Workers scale in and out during a run on a PostgreSQL-backed backend: a worker that joins
takes a share of new entries while the run is still logging, and one that leaves (SIGKILL with
entries in hand, or SIGTERM) loses nothing: its pending entries are claimed by the survivor
after the claim idle time, and every point is stored once. Real processes throughout."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis

from pluto.protocol import GROUP
from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

CLAIM_IDLE_MS = 2000

RANK = """
import sys, time, redis, pluto
stop = sys.argv[1]
r = redis.Redis.from_url(__import__("os").environ["PLUTO_REDIS_URL"])
run = pluto.init(project="scale-join", run_id=sys.argv[2])
print("RESULT {\\"id\\": %d}" % run.id, flush=True)
step, deadline = 0, time.monotonic() + 60
while time.monotonic() < deadline and not r.exists(stop):
    for _ in range(20):
        step += 1
        run.log({"a": step, "b": step * 0.5}, step=step)
    time.sleep(0.01)
lost = run.finish(timeout=60)
print("RESULT {\\"steps\\": %d, \\"lost\\": %d}" % (step, lost), flush=True)
"""


def last_step(backend: Backend, run: int) -> int:
    with backend.client() as c:
        resp = c.get(f"/api/runs/{run}/metrics/a", params={"max_points": 1})
    pts = resp.json().get("points") if resp.status_code == 200 else None
    return int(pts[-1][0]) if pts else 0


def consumers(r: redis.Redis, stream: str) -> set[str]:
    try:
        return {c["name"].decode() for c in r.xinfo_consumers(stream, GROUP)}
    except redis.ResponseError:  # no group yet
        return set()


@pytest.mark.slow
@pytest.mark.parametrize("leave", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_worker_joins_mid_run_and_one_leaves_without_loss(
        redis_url: str, prefix: str, backend: Backend, tmp_path: Path, leave: int) -> None:
    s = Stack(redis_url, prefix, backend, tmp_path / "logs")
    env = {"PLUTO_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS)}
    rank = None
    try:
        first = s.start_worker(**env, PLUTO_WORKER_NAME="first")
        stop = f"{prefix}:test:stop"
        rank = start_rank(write_script(tmp_path, RANK), s.env(), stop, f"join-{leave}")
        r = redis.Redis.from_url(redis_url)
        run_id = wait_until(lambda: rank.stdout.readline(), 30, "the rank's run id")
        run = json_lines(run_id)[0]["id"]
        stream = s.keys.metrics(run)
        wait_until(lambda: last_step(backend, run) > 0, 30, "the first worker storing points")

        s.start_worker(**env, PLUTO_WORKER_NAME="joiner")
        wait_until(lambda: "joiner" in consumers(r, stream), 30, "the joiner in the group")
        # The first worker hangs (SIGSTOP) with whatever it holds: only the joiner can now
        # store the new entries, and it must do so within one claim interval.
        first.signal(signal.SIGSTOP)
        before = last_step(backend, run)
        wait_until(lambda: last_step(backend, run) > before + 100, CLAIM_IDLE_MS / 1000 + 10,
                   "the joiner storing new entries while the first worker hangs")
        assert not r.exists(stop) and rank.poll() is None  # the run was logging all along

        if leave == signal.SIGTERM:
            first.signal(signal.SIGCONT)
        first.signal(leave)  # the first worker leaves, perhaps with entries in hand
        first.proc.wait(15)
        r.set(stop, 1)
        code, out, err = finish_rank(rank)
        assert code == 0, err[-2000:]
        (done,) = json_lines(out)
        assert done["lost"] == 0

        got = wait_until(lambda: (g := backend.run(run))["status"] == "COMPLETED" and g,
                         60, "the run COMPLETED after every entry was persisted")
        steps = done["steps"]
        assert [p[:2] for p in backend.points(run, "a")] == [
            [i, i] for i in range(1, steps + 1)]
        assert [p[1] for p in backend.points(run, "b")] == [
            i * 0.5 for i in range(1, steps + 1)]
        assert got["ledger"]["missing"] == 0 and got["ledger"]["lost"] == 0
        assert got["ledger"]["sent"] == steps
    finally:
        if rank is not None and rank.poll() is None:
            rank.kill()
            rank.communicate()
        s.stop_workers()
