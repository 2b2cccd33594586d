"""Both Prometheus endpoints, scraped during and after a real run: the counters agree with
what the backend stored."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pluto import _servers
from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, start_rank, wait_until, write_script

RANK = """
import sys, pluto
with pluto.init(project="prom", run_id=sys.argv[1]) as run:
    for step in range(1, 301):
        run.log({f"loss/rank{run.rank}": 1 / step, "lr": 0.1})
"""


def _scrape(url: str) -> dict[str, float]:
    """Samples by ``name{label=value,...}``, summed over nothing: each sample as it is."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_scraped_counters_agree_with_what_the_backend_stored(
        redis_url: str, prefix: str, private_backend: Backend, tmp_path: Path) -> None:
    port = _servers.free_port()
    stack = Stack(redis_url, prefix, private_backend, tmp_path / "logs")
    try:
        stack.start_worker(PLUTO_METRICS_PORT=str(port))
        run_id = f"prom-{uuid.uuid4().hex[:6]}"
        script = write_script(tmp_path, RANK, "prom.py")
        procs = [start_rank(script, stack.env(RANK=str(k)), run_id) for k in range(2)]
        wait_until(lambda: _servers.port_open("127.0.0.1", port), 20, "the metrics port")
        live = _scrape(f"http://127.0.0.1:{port}/metrics")  # mid-run: it answers
        assert 'pluto_worker_info{name=' in "".join(live) or any(
            k.startswith("pluto_worker_info") for k in live), sorted(live)[:10]
        for p in procs:
            code, _, err = finish_rank(p)
            assert code == 0, err
        [run] = [r for r in private_backend.runs("prom") if r["externalId"] == run_id]
        wait_until(lambda: private_backend.run(run["id"])["status"] == "COMPLETED", 30,
                   "COMPLETED")
        stored = sum(len(private_backend.points(run["id"], n))
                     for n in ("loss/rank0", "loss/rank1", "lr"))
        assert stored == 900  # lr: one point per step, the two ranks' writes upserted
        worker: dict[str, Any] = {}

        def settled() -> bool:
            worker.update(_scrape(f"http://127.0.0.1:{port}/metrics"))
            return worker.get("pluto_worker_entries_persisted_total") == 600

        wait_until(settled, 20, "the worker's counters to settle")
        assert worker["pluto_worker_points_persisted_total"] == 1200  # 600 entries x 2 metrics
        assert worker["pluto_worker_entries_read_total{stream=metrics}"] >= 600
        assert worker.get("pluto_worker_dead_letters_total{stream=metrics}", 0) == 0
        assert worker["pluto_worker_batch_entries_count"] >= 1
        assert worker["pluto_worker_last_persist_timestamp_seconds"] > 0
        assert "pluto_stream_group_messages_pending{group=workers,stream=control}" in worker
        assert "pluto_stream_group_oldest_pending_age_seconds{group=workers,stream=metrics}" \
            in worker
        backend = _scrape(f"{private_backend.url}/metrics")
        assert backend["pluto_backend_points_ingested_total"] == 1200
        assert backend["pluto_backend_runs{status=COMPLETED}"] >= 1
        assert backend["pluto_backend_requests_total{method=POST,route=/ingest/metrics,"
                       "status=200}"] >= 1
        assert not any("prom-" in k for k in list(worker) + list(backend))  # no run ids
    finally:
        stack.stop_workers()
