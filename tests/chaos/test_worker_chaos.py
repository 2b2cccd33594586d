"""Workers SIGKILLed one after another while eight ranks log: survivors claim what the dead
held, the restarted ones join in, and every point lands exactly once."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from tests.chaos import ranks
from tests.conftest import Stack
from tests.helpers import wait_until

RANKS, WORKERS, CHAOS_S, EVERY_S = 8, 3, 30.0, 2.0


def test_workers_killed_every_2s(bare_stack: Stack, tmp_path: Path,
                                 report: list[dict[str, Any]]) -> None:
    stack = bare_stack
    env = {"PLUTO_CLAIM_IDLE_MS": "1000", "PLUTO_WORKER_BATCH": "500",
           "PLUTO_HEARTBEAT_TIMEOUT": "20"}
    live = [stack.start_worker(**env) for _ in range(WORKERS)]
    run_id, stop = f"wchaos-{uuid.uuid4().hex[:6]}", tmp_path / "stop"
    procs = [ranks.start(stack, tmp_path, k, run_id=run_id, stop_file=str(stop), pace=0.02)
             for k in range(RANKS)]
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id))) and v.isdigit()
                         and v, 30, "run id"))
    kills, t_end, victim = 0, time.monotonic() + CHAOS_S, 0
    while time.monotonic() < t_end:
        time.sleep(EVERY_S)
        live[victim].kill()  # SIGKILL: its unacknowledged batch stays pending on it
        live[victim] = stack.start_worker(**env)
        kills, victim = kills + 1, (victim + 1) % WORKERS
    last_kill = time.monotonic()
    got = ranks.stop_ranks(stack.backend, run, procs, stop)
    recover = time.monotonic() - last_kill
    assert all(x["lost"] == 0 for x in got), got
    stored, dups = ranks.check_ranks(stack.backend, run, got)
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
    assert "claimed" in stack.worker_logs()  # survivors took over what the dead held
    logged = sum(x["logged"] for x in got)
    report.append(ranks.row(f"4 worker SIGKILL x{kills} (3 workers, 8 ranks)", logged, stored,
                            dups, recover, stream_dups=ranks.stream_dups(r, stack.keys.metrics(run), logged)))
