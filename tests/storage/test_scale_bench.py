"""bench/scale.py and bench/pg_ingest.py still run (``--tiny``, one JSON object out); no
timing is asserted, only that every point logged was persisted in each configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent.parent / "bench"


def _run(script: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--tiny"],
                          capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["bench"] == script
    return result


@pytest.mark.slow
def test_scale_bench_runs_tiny(pg_server: str) -> None:
    result = _run("scale")
    assert {"cores", "results", "best", "busiest_process", "met"} <= result.keys()
    assert [(r["workers"], r["replicas"]) for r in result["results"]] == [(1, 1), (2, 2)]
    for r in result["results"]:
        assert r["stored"] == r["points"] == 1000 and r["lost_by_producers"] == 0
        assert set(r["cpu_s"]) == {"worker", "backend", "redis", "postgres"}
    assert result["met"] is True


@pytest.mark.slow
def test_pg_ingest_bench_runs_tiny(pg_server: str) -> None:
    result = _run("pg_ingest")
    assert result["faster"] in ("copy", "unnest")
    assert result["copy_fresh_points_per_s"] > 0 and result["unnest_fresh_points_per_s"] > 0
