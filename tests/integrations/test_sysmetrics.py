"""Per-rank system metrics: sampled on a background thread into the rank's own names, at the
run's current step (the user's step counter does not move), and absent when turned off."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

RANK = """
import json, os, sys, threading, time, pluto
run = pluto.init(project=os.environ["TEST_PROJECT"], name="sys")
threads = sorted(t.name for t in threading.enumerate())
for step in range(1, 4):
    run.log({f"train/loss/rank{run.rank}": 1.0 / step})
    time.sleep(0.4)   # a few sampling intervals pass while the step stays put
run.log({f"train/loss/rank{run.rank}": 0.1})
run.finish()
print("RESULT " + json.dumps({"id": run.id, "threads": threads, "step": run._step}), flush=True)
"""


def _job(stack: Stack, tmp_path: Path, ranks: int, **env: str) -> tuple[str, list[dict]]:
    project = f"sys-{uuid.uuid4().hex[:8]}"
    script = write_script(tmp_path, RANK)
    run_id = uuid.uuid4().hex
    procs = [start_rank(script, stack.env(TEST_PROJECT=project, PLUTO_RUN_ID=run_id, RANK=str(r),
                                          PLUTO_SYSTEM_METRICS_INTERVAL="0.1", **env))
             for r in range(ranks)]
    results = []
    for p in procs:
        code, out, err = finish_rank(p)
        assert code == 0, err
        results += json_lines(out)
    return project, results


def test_system_metrics_per_rank(stack: Stack, tmp_path: Path) -> None:
    _, results = _job(stack, tmp_path, 2, PLUTO_SYSTEM_METRICS="1")
    run_id = results[0]["id"]
    assert all("pluto-sysmetrics" in r["threads"] for r in results)
    assert all(r["step"] == 4 for r in results)  # sampling never advanced the user's step
    wait_until(lambda: stack.backend.run(run_id)["status"] == "COMPLETED", 60, "COMPLETED")
    names = set(stack.backend.get(f"/api/runs/{run_id}/metrics")["names"])
    for rank in (0, 1):
        assert {f"sys/cpu_percent/rank{rank}", f"sys/rss_mb/rank{rank}"} <= names, names
        rss = stack.backend.points(run_id, f"sys/rss_mb/rank{rank}")
        assert rss and all(5 < p[1] < 100_000 for p in rss)  # a Python process: MBs, not bytes
        cpu = stack.backend.points(run_id, f"sys/cpu_percent/rank{rank}")
        assert all(0 <= p[1] <= 100 * 64 for p in cpu)
        assert {p[0] for p in cpu} <= {0, 1, 2, 3}  # at the run's step, never a new one
        loss = stack.backend.points(run_id, f"train/loss/rank{rank}")
        assert [p[0] for p in loss] == [1, 2, 3, 4]


def test_system_metrics_off(stack: Stack, tmp_path: Path) -> None:
    _, results = _job(stack, tmp_path, 1, PLUTO_SYSTEM_METRICS="0")
    run_id = results[0]["id"]
    assert "pluto-sysmetrics" not in results[0]["threads"]
    wait_until(lambda: stack.backend.run(run_id)["status"] == "COMPLETED", 60, "COMPLETED")
    names = stack.backend.get(f"/api/runs/{run_id}/metrics")["names"]
    assert names == ["train/loss/rank0"]
