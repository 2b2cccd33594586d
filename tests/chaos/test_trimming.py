"""Trimming under a slow backend: the stream never holds more than its backlog (pending +
undelivered) plus the retention tail, and no entry is trimmed before it was acknowledged:
every point arrives.

The worker trims every ``PLUTO_TRIM_INTERVAL``, so between two trims the stream also holds
what was acknowledged since the last one: with the slow backend that is at most a batch or
two (bounded below); once the backend is fast again it is one trim interval of throughput, so
after recovery the test checks only that the stream comes back down to its tail."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import redis

from pluto.protocol import GROUP
from pluto_worker._streams import drained, parse_id
from tests.chaos import ranks
from tests.chaos.conftest import FaultBackend
from tests.conftest import Stack
from tests.helpers import wait_until

RETENTION, BATCH, RANKS = 200, 300, 2


def _sample(r: redis.Redis, stream: str) -> dict[str, Any] | None:
    """XLEN, the group's backlog and the stream's first id vs the oldest pending, atomically."""
    pipe = r.pipeline(transaction=True)
    pipe.xlen(stream)
    pipe.xinfo_stream(stream)
    pipe.xinfo_groups(stream)
    pipe.xpending(stream, GROUP)
    pipe.xrange(stream, count=1)
    xlen, info, groups, pending, first = pipe.execute()
    group = groups[0]
    if group["entries-read"] is None:
        return None
    lag = group.get("lag")
    undelivered = int(info["entries-added"]) - int(group["entries-read"]) if lag is None else lag
    return {"xlen": xlen, "backlog": int(group["pending"]) + undelivered,
            "first": parse_id(first[0][0]) if first else None,
            "oldest_pending": parse_id(pending["min"]) if pending["pending"] else None}


def test_trim_keeps_backlog_plus_tail(redis_url: str, prefix: str, fault_backend: FaultBackend,
                                      tmp_path: Path, report: list[dict[str, Any]]) -> None:
    stack = Stack(redis_url, prefix, fault_backend, tmp_path / "logs")
    stack.start_worker(PLUTO_RETENTION=str(RETENTION), PLUTO_TRIM_INTERVAL="0.2",
                       PLUTO_WORKER_BATCH=str(BATCH))
    fault_backend.fault("delay:0.3")  # slow: a backlog builds up while the ranks log
    r = redis.Redis.from_url(redis_url)
    try:
        run_id, stop = f"trim-{uuid.uuid4().hex[:6]}", tmp_path / "stop"
        procs = [ranks.start(stack, tmp_path, k, run_id=run_id, stop_file=str(stop), pace=0.02)
                 for k in range(RANKS)]
        run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id)))
                             and v.isdigit() and v, 30, "run id"))
        stream = stack.keys.metrics(run)
        wait_until(lambda: r.exists(stream), 10, "stream")
        bound = RETENTION + RETENTION // 10 + 2 * BATCH
        samples, worst, max_backlog, slow = 0, 0, 0, True
        t_end = time.monotonic() + 5
        while True:
            s = _sample(r, stream)
            if s is not None:
                samples += 1
                worst = max(worst, s["xlen"] - s["backlog"]) if slow else worst
                max_backlog = max(max_backlog, s["backlog"])
                if slow:  # one batch acked per iteration, a trim after each
                    assert s["xlen"] <= s["backlog"] + bound, s
                if s["oldest_pending"] is not None:  # nothing pending was trimmed
                    assert s["first"] is not None and s["first"] <= s["oldest_pending"], s
            if not slow and drained(r, stream):
                break
            if time.monotonic() > t_end:
                assert slow, "the stream did not drain within 15 s of the backend's recovery"
                stop.touch()
                got = ranks.results(procs)
                fault_backend.fault("")
                slow, t_end = False, time.monotonic() + 15
            time.sleep(0.05)
        ranks.wait_stored(fault_backend, run, {x["rank"]: x["logged"] for x in got})
        stored, dups = ranks.check_ranks(fault_backend, run, got)
        assert max_backlog > RETENTION  # the slow backend did build a backlog
        wait_until(lambda: r.xlen(stream) <= RETENTION + RETENTION // 10, 20, "trimmed to tail")
        logged = sum(x["logged"] for x in got)
        report.append(ranks.row("8 trimming (retention 200, slow backend)", logged, stored, dups,
                                None, samples=samples, max_backlog=max_backlog,
                                max_acked_in_stream=worst, allowed=bound))
    finally:
        stack.stop_workers()
