"""The backend answers 500, then hangs past the worker's read timeout, then refuses
connections: the worker backs off, never acknowledges what was not stored, and drains fully
once it recovers. A line the backend rejects (a step beyond 64 bits: the stream and the
worker take it, the backend refuses it) goes to the dead-letter stream; its batch lands."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis

from pluto import protocol as K
from tests.chaos import ranks
from tests.chaos.conftest import FaultBackend
from tests.conftest import Stack
from tests.helpers import wait_until

RANKS = 2


def _acked(r: redis.Redis, stream: str) -> int:
    group = r.xinfo_groups(stream)[0]
    return int(group["entries-read"] or 0) - int(group["pending"])


def test_backend_500_hang_refuse(redis_url: str, prefix: str, fault_backend: FaultBackend,
                                 tmp_path: Path, report: list[dict[str, Any]]) -> None:
    stack = Stack(redis_url, prefix, fault_backend, tmp_path / "logs")
    stack.start_worker(PLUTO_HTTP_READ_TIMEOUT="1", PLUTO_HEARTBEAT_TIMEOUT="60")
    r = redis.Redis.from_url(redis_url)
    try:
        run_id, stop = f"bchaos-{uuid.uuid4().hex[:6]}", tmp_path / "stop"
        procs = [ranks.start(stack, tmp_path, k, run_id=run_id, stop_file=str(stop), chunk=5,
                             pace=0.02) for k in range(RANKS)]
        run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id)))
                             and v.isdigit() and v, 30, "run id"))
        stream, dead = stack.keys.metrics(run), stack.keys.dead(run)
        wait_until(lambda: all(ranks.points(fault_backend, run, k) for k in range(RANKS)), 30,
                   "every rank logging")
        # A line that decodes in the worker but the backend refuses; ranks log around it.
        bad = r.xadd(stream, {K.F_RANK: "0", K.F_STEP: str(2**70), K.F_TIME: "1",
                              "m/rank0": "0.5"})
        wait_until(lambda: r.xlen(dead) == 1, 20, "the bad line dead-lettered")
        checks = 0

        def hold(seconds: float, backend_up: bool = True) -> None:
            """Sample: whatever the group acknowledged is stored (or dead-lettered)."""
            nonlocal checks
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                acked = _acked(r, stream)
                if backend_up:
                    stored = ranks.stored_count(fault_backend, run, range(RANKS))
                    assert acked <= stored + r.xlen(dead), (acked, stored)
                    checks += 1
                time.sleep(0.25)

        recover = 0.0
        for fault in ("500", "hang:3", "refuse"):
            if fault == "refuse":
                fault_backend.stop()  # connections refused
            else:
                fault_backend.fault(fault)
            hold(3, backend_up=fault != "refuse")
            held = r.xinfo_groups(stream)[0]
            assert held["pending"] + (held["lag"] or 0) > 0, fault  # waiting, not acknowledged
            if fault == "refuse":
                fault_backend.start()
            fault_backend.fault("")
            back = time.monotonic()
            # Recovered: the backlog of the fault drains (the retry back-off was at most ~3 s).
            wait_until(lambda: (g := r.xinfo_groups(stream)[0])["pending"] + (g["lag"] or 0)
                       < 50, 15, f"drained after {fault}")
            recover = max(recover, time.monotonic() - back)
            hold(0.5)
        got = ranks.stop_ranks(fault_backend, run, procs, stop)
        assert all(x["lost"] == 0 for x in got), got
        stored, dups = ranks.check_ranks(fault_backend, run, got)
        wait_until(lambda: fault_backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
        [(_, letter)] = r.xrange(dead)
        assert letter[K.F_DEAD_ID.encode()] == bad and b"rejected" in letter[b"reason"]
        assert letter[K.F_STEP.encode()] == str(2**70).encode()
        logs = stack.worker_logs()
        retries = [line for line in logs.splitlines() if "retry" in line]
        assert any("HTTP 500" in x for x in retries) and any("Timeout" in x for x in retries)
        assert any("ConnectError" in x for x in retries)
        assert len(retries) < 100, len(retries)  # backed off, did not spin
        logged = sum(x["logged"] for x in got)
        report.append(ranks.row("5 backend 500 / hang / refused", logged, stored, dups, recover,
                                dead_letters=1, retries=len(retries), invariant_checks=checks))
    finally:
        stack.stop_workers()
