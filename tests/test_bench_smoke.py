"""Every bench script still runs: ``--tiny`` sizes, one JSON object out. Never asserts timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

EXPECTED = {
    "log_overhead": {"calls", "redis_up", "redis_down", "met"},
    "throughput": {"entries", "entries_per_s", "ceiling_per_s", "ratio", "met"},
    "finish": {"entries", "finish_s", "all_in_redis", "rounds", "met"},
    "e2e": {"producers", "points_per_s", "lag_p50_ms", "lag_p99_ms", "throughput", "lag", "met"},
    "attach": {"procs", "slowest_init_ms", "median_init_ms", "median_after_served_ms",
               "one_run_one_creator", "met"},
    "dashboard": {"ranks", "steps", "points", "first_chart_ms", "all_charts_ms", "requests",
                  "met"},
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_script_runs_tiny(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--tiny"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == script
    assert EXPECTED[script] <= result.keys(), sorted(result)
    assert isinstance(result["met"], bool)
