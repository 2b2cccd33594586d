"""Both Prometheus endpoints, scraped during and after a real run: the counters agree with
what the backend stored."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from pluto import __version__, _servers
from pluto.protocol import GROUP
from tests.conftest import ROOT, Backend, Stack
from tests.helpers import finish_rank, prometheus_samples, scrape, start_rank, wait_until, write_script

RANK = """
import sys, pluto
with pluto.init(project="prom", run_id=sys.argv[1]) as run:
    for step in range(1, 301):
        run.log({f"loss/rank{run.rank}": 1 / step, "lr": 0.1})
"""


def _no_run_in_labels(url: str, run: int, run_id: str) -> None:
    """No run id, external or numeric, is a label value (nor a label named after runs)."""
    for sample in prometheus_samples(url):
        assert not {"run", "run_id", "id", "external_id"} & set(sample.labels), sample
        assert sample.labels.get("stream", "control") in ("control", "metrics"), sample
        for name, value in sample.labels.items():
            assert run_id not in value, sample
            assert name == "le" or value != str(run), sample


def test_scraped_counters_agree_with_what_the_backend_stored(
        redis_url: str, prefix: str, private_backend: Backend, tmp_path: Path) -> None:
    port = _servers.free_port()
    stack = Stack(redis_url, prefix, private_backend, tmp_path / "logs")
    try:
        stack.start_worker(PLUTO_METRICS_PORT=str(port), PLUTO_WORKER_NAME="prom-worker")
        worker_url, backend_url = f"http://127.0.0.1:{port}/metrics", f"{private_backend.url}/metrics"
        run_id = f"prom-{uuid.uuid4().hex[:6]}"
        script = write_script(tmp_path, RANK, "prom.py")
        procs = [start_rank(script, stack.env(RANK=str(k)), run_id) for k in range(2)]
        wait_until(lambda: _servers.port_open("127.0.0.1", port), 20, "the metrics port")
        # Mid-run, both endpoints answer (the ranks are still running or just finished).
        live = scrape(worker_url)
        assert live[f"pluto_worker_info{{name=prom-worker,version={__version__}}}"] == 1, live
        assert "pluto_backend_points_ingested_total" in scrape(backend_url)
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
            worker.update(scrape(worker_url))
            return worker.get("pluto_worker_entries_persisted_total") == 600 \
                and "pluto_worker_active_runs" in worker

        wait_until(settled, 20, "the worker's counters to settle")
        assert worker["pluto_worker_points_persisted_total"] == 1200  # 600 entries x 2 metrics
        assert worker["pluto_worker_entries_read_total{stream=metrics}"] >= 600
        assert worker["pluto_worker_entries_read_total{stream=control}"] >= 3  # create, attaches
        assert worker.get("pluto_worker_dead_letters_total{stream=metrics}", 0) == 0
        batches = worker["pluto_worker_batches_total{outcome=stored}"]
        assert batches >= 1
        assert worker["pluto_worker_batch_entries_count"] == batches
        assert worker["pluto_worker_batch_entries_sum"] == 600
        assert worker["pluto_worker_persist_duration_seconds_count"] == batches
        assert worker["pluto_worker_persist_duration_seconds_sum"] > 0
        assert worker["pluto_worker_ingest_delay_seconds_count"] >= batches  # sampled per batch
        assert worker["pluto_worker_ingest_delay_seconds_sum"] >= 0
        for counter in ("entries_claimed", "redeliveries", "runs_parked"):  # exported, even at 0
            assert f"pluto_worker_{counter}_total" in worker, sorted(worker)
        assert time.time() - 120 < worker["pluto_worker_last_persist_timestamp_seconds"] \
            <= time.time()
        assert worker["pluto_worker_active_runs"] >= 0
        assert worker["pluto_stream_group_consumers{group=workers,stream=control}"] >= 1
        for gauge in ("lag", "messages_pending", "oldest_pending_age_seconds"):
            for kind in ("control", "metrics"):
                assert f"pluto_stream_group_{gauge}{{group={GROUP},stream={kind}}}" in worker
        assert "pluto_stream_length{stream=metrics}" in worker
        backend = scrape(backend_url)
        assert backend["pluto_backend_points_ingested_total"] == 1200 \
            == worker["pluto_worker_points_persisted_total"]
        assert backend["pluto_backend_runs{status=COMPLETED}"] == 1  # this backend's one run
        assert backend["pluto_backend_requests_total{method=POST,route=/ingest/metrics,"
                       "status=200}"] >= batches  # a batch is one post or more (split)
        assert backend["pluto_backend_requests_total{method=POST,route=/api/runs/create,"
                       "status=200}"] >= 1
        for op in ("ingest", "create", "update"):  # update: the status COMPLETED
            assert backend[f"pluto_backend_store_write_duration_seconds_count{{op={op}}}"] >= 1
        assert backend["pluto_backend_store_write_duration_seconds_count{op=ingest}"] == \
            backend["pluto_backend_requests_total{method=POST,route=/ingest/metrics,status=200}"]
        assert not any(k.startswith("pluto_backend_requests_total") and str(run["id"]) in k
                       for k in backend)  # the route template, never /api/runs/<id>
        _no_run_in_labels(worker_url, run["id"], run_id)
        _no_run_in_labels(backend_url, run["id"], run_id)
    finally:
        stack.stop_workers()


def _backend(tmp: Path, url: str, key: str) -> _servers.Child:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return _servers.start_backend(url, f"sqlite:///{tmp / 'claims.db'}", key, tmp, env)


def test_claims_redeliveries_and_parking_are_counted(
        redis_url: str, prefix: str, tmp_path: Path) -> None:
    """Entries pending on a dead consumer are claimed, the worker's own pending entries (of
    an earlier life under the same name) are read again, a run whose backend calls fail is
    parked — each counted — and every entry is then stored exactly once."""
    url, key = f"http://127.0.0.1:{_servers.free_port()}", "test-" + secrets.token_hex(8)
    child = _backend(tmp_path, url, key)
    stack = Stack(redis_url, prefix, Backend(url, key, child), tmp_path / "logs")
    port = _servers.free_port()
    try:
        stack.start_worker(PLUTO_WORKER_NAME="w-own")
        run_id = f"claim-{uuid.uuid4().hex[:6]}"
        script = write_script(tmp_path, RANK, "prom.py")
        code, _, err = finish_rank(start_rank(script, stack.env(), run_id))
        assert code == 0, err
        [run] = [r["id"] for r in stack.backend.runs("prom") if r["externalId"] == run_id]
        wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
        stack.stop_workers()
        # Six more entries of rank 0: three delivered to this worker's name, three to a
        # consumer that died; none acknowledged.
        r = redis.Redis.from_url(redis_url)
        stream = stack.keys.metrics(run)
        for step in range(301, 307):
            r.xadd(stream, {"_rank": 0, "_step": step, "_time": int(time.time() * 1000),
                            "late": step})
        assert len(r.xreadgroup(GROUP, "w-own", {stream: ">"}, count=3)[0][1]) == 3
        assert len(r.xreadgroup(GROUP, "ghost", {stream: ">"}, count=3)[0][1]) == 3
        r.sadd(stack.keys.runs, run)
        child.stop()  # and the backend is down: the redelivered batch fails, the run parks
        stack.start_worker(PLUTO_WORKER_NAME="w-own", PLUTO_METRICS_PORT=str(port),
                           PLUTO_CLAIM_IDLE_MS="500", PLUTO_WORKER_HTTP_ATTEMPTS="1")
        wait_until(lambda: _servers.port_open("127.0.0.1", port), 20, "the metrics port")
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: scrape(metrics_url).get("pluto_worker_runs_parked_total", 0) >= 1,
                   60, "the run parked while the backend is down")
        got = scrape(metrics_url)
        assert got["pluto_worker_batches_total{outcome=failed}"] >= 1, got
        assert got["pluto_worker_redeliveries_total"] >= 3, got
        stack.backend.child = child = _backend(tmp_path, url, key)  # back: it retries
        wait_until(lambda: [p[:2] for p in stack.backend.points(run, "late")]
                   == [[s, s] for s in range(301, 307)], 60, "the six entries stored once")
        wait_until(lambda: r.xpending(stream, GROUP)["pending"] == 0, 30, "all acknowledged")
        got = scrape(metrics_url)
        assert got["pluto_worker_entries_claimed_total"] >= 3, got  # the ghost's three
        assert got["pluto_worker_entries_persisted_total"] >= 6, got
        assert got.get("pluto_worker_dead_letters_total{stream=metrics}", 0) == 0, got
        assert {c["name"] for c in r.xinfo_consumers(stream, GROUP) if c["pending"]} == set()
    finally:
        stack.stop_workers()
        child.stop()
