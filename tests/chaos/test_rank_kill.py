"""A rank SIGKILLed mid-run: what it had flushed to Redis is stored, its heartbeat stops, the
worker marks it failed (in the members list and its log) and the run FAILED once the others
finish; the rank restarted under the same run id attaches again and the run completes."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from tests.chaos import ranks
from tests.conftest import Stack
from tests.helpers import wait_until

FLUSH_AFTER = 500


def test_sigkilled_rank(bare_stack: Stack, tmp_path: Path, report: list[dict[str, Any]]) -> None:
    stack = bare_stack
    stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="3")
    r = redis.Redis.from_url(stack.redis_url)
    run_id, stop, marker = f"rkill-{uuid.uuid4().hex[:6]}", tmp_path / "stop", tmp_path / "flushed"
    healthy = [ranks.start(stack, tmp_path, k, run_id=run_id, stop_file=str(stop), pace=0.02)
               for k in (0, 1)]
    doomed = ranks.start(stack, tmp_path, 2, run_id=run_id, marker=str(marker),
                         flush_after=FLUSH_AFTER, pace=0.05)
    wait_until(marker.exists, 30, "rank 2 flushed")
    flushed = int(marker.read_text())
    assert flushed == FLUSH_AFTER
    time.sleep(0.3)  # it logs a few more (maybe unsent) entries: the only loss allowed
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=10)  # reaps it and closes its pipes
    killed_at = time.monotonic()
    run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id))) and v.isdigit()
                         and v, 10, "run id"))
    dead = wait_until(lambda: [m for m in stack.backend.run(run)["members"]
                               if m["state"] == "failed"], 20, "rank 2 marked failed")
    detected = time.monotonic() - killed_at
    assert [m["rank"] for m in dead] == [2] and dead[0]["pid"] == doomed.pid
    assert dead[0]["member"] in stack.worker_logs() and "heartbeat lost" in stack.worker_logs()
    assert stack.backend.run(run)["status"] == "RUNNING"  # ranks 0 and 1 are still going
    stop.touch()
    got = ranks.results(healthy)
    wait_until(lambda: stack.backend.run(run)["status"] == "FAILED", 20, "run FAILED")
    # Everything rank 2 flushed is stored; beyond that, a gap-free prefix of what it logged.
    have = [p[0] for p in ranks.points(stack.backend, run, 2)]
    assert have == list(range(1, len(have) + 1)) and len(have) >= flushed, (len(have), flushed)
    ranks.check_rank(stack.backend, run, 2, have)

    again = ranks.results([ranks.start(stack, tmp_path, 2, run_id=run_id, first_step=1001,
                                       steps=200, pace=0.0)])[0]
    assert again["resumed"] and again["id"] == run
    final = wait_until(lambda: (x := stack.backend.run(run))["status"] == "COMPLETED" and x, 20,
                       "COMPLETED after the restarted rank finished")
    states = sorted((m["rank"], m["state"]) for m in final["members"])
    assert states == [(0, "finished"), (1, "finished"), (2, "failed"), (2, "finished")]
    stored, dups = ranks.check_ranks(stack.backend, run, got)
    c = ranks.check_rank(stack.backend, run, 2, have + list(range(1001, 1201)))
    stored += c["stored"]
    logged = sum(x["logged"] for x in got) + len(have) + 200
    report.append(ranks.row("6 rank SIGKILL + restart", logged, stored, dups, detected,
                            killed_rank_flushed=flushed, killed_rank_stored=len(have),
                            note="recover_s = kill -> marked failed (timeout 3 s)"))
