"""Operating it: ``pluto status`` as a readiness probe, and dead letters listed and replayed."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import _servers
from pluto.protocol import GROUP
from tests.conftest import ROOT, Backend, Stack
from tests.helpers import finish_rank, json_lines, scrape, start_rank, wait_until, write_script

RANK = """
import json, sys, pluto
width = int(sys.argv[2])
with pluto.init(project="ops", run_id=sys.argv[1]) as run:
    for step in range(1, 11):
        run.log({f"metric/with/a/long/name/{i:03d}": step + i for i in range(width)} if step == 5
                else {"metric/with/a/long/name/000": step})
print("RESULT " + json.dumps({"id": run.id}), flush=True)
"""


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = stack.env(PLUTO_API_URL=stack.backend.url, PLUTO_API_KEY=stack.backend.key)
    return subprocess.run([sys.executable, "-m", "pluto._cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _log(stack: Stack, tmp: Path, width: int = 1) -> tuple[str, int]:
    run_id = f"ops-{uuid.uuid4().hex[:6]}"
    code, out, err = finish_rank(start_rank(write_script(tmp, RANK, "ops.py"), stack.env(),
                                            run_id, str(width)))
    assert code == 0, err
    return run_id, int(json_lines(out)[0]["id"])


WAITING = """
import json, os, sys, time, pluto
with pluto.init(project="ops", run_id=sys.argv[1]) as run:
    for step in range(1, (20 if run.rank == 0 else 5) + 1):
        run.log({"loss": 1 / step})
    print("RESULT " + json.dumps({"id": run.id}), flush=True)
    while not os.path.exists(sys.argv[2]):  # the test says when to finish
        time.sleep(0.05)
"""


def test_status_reports_each_active_run_and_an_old_pending_entry(
        bare_stack: Stack, tmp_path: Path) -> None:
    stack = bare_stack
    stack.start_worker(PLUTO_WORKER_NAME="ops-worker", PLUTO_CLAIM_IDLE_MS="600000")
    run_id, done = f"ops-{uuid.uuid4().hex[:6]}", tmp_path / "done"
    script = write_script(tmp_path, WAITING, "waiting.py")
    procs = [start_rank(script, stack.env(RANK=str(k)), run_id, str(done)) for k in range(2)]
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        [run] = [b["id"] for b in wait_until(
            lambda: [x for x in stack.backend.runs("ops") if x["externalId"] == run_id], 60,
            "the run")]
        wait_until(lambda: r.hgetall(stack.keys.ledger(run)).get("step:0") == "20"
                   and r.hgetall(stack.keys.ledger(run)).get("step:1") == "5", 60,
                   "both ranks' entries stored")
        ok = _cli(stack, "status", "--json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        report = json.loads(ok.stdout)
        assert report["healthy"] and report["problems"] == []
        assert report["redis"]["version"] == r.info()["redis_version"]
        assert report["redis"]["used_memory"] > 0
        [worker] = [w for w in report["workers"] if w["name"] == "ops-worker"]
        assert worker["alive"] and 0 <= worker["heartbeat_age_s"] < 15, worker
        assert worker["idle_s"] is not None and worker["idle_s"] >= 0, worker
        [row] = [x for x in report["runs"] if x["id"] == run]
        assert row["members"] == {"running": 2}, row
        assert row["lag"] == 0 and row["pending"] == 0 and row["oldest_pending_s"] is None, row
        assert row["dead_letters"] == 0, row
        assert row["slowest_rank"] == {"rank": "1", "step": 5, "behind": 15}, row
        human = _cli(stack, "status")
        assert human.returncode == 0 and f"run {run:>6}" in human.stdout, human.stdout
        assert "slowest rank 1 (15 steps behind)" in human.stdout, human.stdout
        # An entry delivered to a consumer that then hung: pending, and older than a threshold.
        stream = stack.keys.metrics(run)
        with r.pipeline(transaction=True) as pipe:  # atomic: the live worker cannot read it first
            pipe.xadd(stream, {"_rank": 0, "_step": 21, "_time": int(time.time() * 1000),
                               "loss": 0})
            pipe.xreadgroup(GROUP, "hung", {stream: ">"}, count=1)
            stuck, [[_, [(read, _)]]] = pipe.execute()
        assert read == stuck
        time.sleep(1.5)
        young = _cli(stack, "status", "--json")  # under the default threshold: still healthy
        assert young.returncode == 0, young.stdout
        [row] = [x for x in json.loads(young.stdout)["runs"] if x["id"] == run]
        assert row["pending"] == 1 and row["oldest_pending_s"] >= 1, row
        old = _cli(stack, "status", "--max-pending-age", "1")
        assert old.returncode == 1 and f"run {run}: an entry has been pending" in old.stdout, \
            old.stdout
        assert "no worker is alive" not in old.stdout
        r.xack(stream, GROUP, stuck)
        r.xdel(stream, stuck)
    finally:
        done.touch()
        for p in procs:
            code, _, err = finish_rank(p)
            assert code == 0, err


def test_status_is_healthy_then_names_what_is_down(
        redis_url: str, prefix: str, private_backend: Backend, tmp_path: Path) -> None:
    stack = Stack(redis_url, prefix, private_backend, tmp_path / "logs")
    try:
        stack.start_worker()
        _, run = _log(stack, tmp_path)
        wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
        ok = _cli(stack, "status", "--json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        report = json.loads(ok.stdout)
        assert report["healthy"] and report["redis"]["ok"] and report["backend"]["ok"]
        assert any(w["alive"] for w in report["workers"]), report["workers"]
        # The last worker stops (it deregisters) while a rank's entries wait for it: unhealthy,
        # saying what to start.
        stack.stop_workers()
        r = redis.Redis.from_url(stack.redis_url)
        r.xadd(stack.keys.control, {"op": "noop"})
        bad = _cli(stack, "status")
        assert bad.returncode == 1 and "no worker is alive" in bad.stdout, bad.stdout
        assert "UNHEALTHY" in bad.stdout and "backend unreachable" not in bad.stdout
        gone = _cli(stack, "status", "--json")
        assert gone.returncode == 1
        assert not any(w["alive"] for w in json.loads(gone.stdout)["workers"]), gone.stdout
        # A worker again (it takes the waiting entry), then the backend stops.
        stack.start_worker()
        wait_until(lambda: _cli(stack, "status").returncode == 0, 60, "healthy again")
        assert private_backend.child is not None
        private_backend.child.stop()
        down = _cli(stack, "status")
        assert down.returncode == 1, down.stdout
        assert f"backend unreachable at {private_backend.url}" in down.stdout, down.stdout
        assert "no worker is alive" not in down.stdout
    finally:
        stack.stop_workers()


def test_status_names_an_unreachable_redis(bare_stack: Stack) -> None:
    env = bare_stack.env(PLUTO_API_URL=bare_stack.backend.url,
                         PLUTO_REDIS_URL=f"redis://127.0.0.1:{_servers.free_port()}/0")
    out = subprocess.run([sys.executable, "-m", "pluto._cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert not report["redis"]["ok"] and report["backend"]["ok"], report
    assert any(p.startswith("Redis unreachable") for p in report["problems"]), report


def _points(stack: Stack, run: int, i: int) -> list[list[Any]]:
    return stack.backend.points(run, f"metric/with/a/long/name/{i:03d}")


def _backend(tmp: Path, key: str, url: str, max_body: int) -> _servers.Child:
    env = dict(os.environ, PLUTO_MAX_BODY=str(max_body), PYTHONPATH=str(ROOT))
    return _servers.start_backend(url, f"sqlite:///{tmp / 'ops.db'}", key, tmp, env,
                                  name=f"backend-{max_body}")


def _ledger(stack: Stack, run: int) -> tuple[int, int]:
    members = stack.backend.run(run)["members"]
    return (sum(m.get("stored") or 0 for m in members), sum(m.get("dead") or 0 for m in members))


@pytest.mark.e2e
def test_a_dead_letter_replayed_after_its_cause_is_fixed_is_stored_once(
        redis_url: str, prefix: str, tmp_path: Path) -> None:
    url, key = f"http://127.0.0.1:{_servers.free_port()}", "test-" + secrets.token_hex(8)
    child = _backend(tmp_path, key, url, 6000)  # one entry of 600 metrics is larger than this
    stack = Stack(redis_url, prefix, Backend(url, key, child), tmp_path / "logs")
    port = _servers.free_port()
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        stack.start_worker(PLUTO_METRICS_PORT=str(port))
        _, run = _log(stack, tmp_path, width=600)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        wait_until(lambda: r.xlen(stack.keys.dead(run)) >= 1, 30, "a dead letter")
        [(dead_id, fields)] = r.xrange(stack.keys.dead(run))
        assert fields["_step"] == "5" and "413" in fields["reason"], fields
        wait_until(lambda: _ledger(stack, run) == (9, 1), 30, "the ledger: 9 stored, 1 dead")
        scraped = wait_until(lambda: (m := scrape(metrics_url)).get(
            "pluto_worker_dead_letters_total{stream=metrics}") == 1 and m, 30, "counted")
        assert scraped["pluto_worker_batches_total{outcome=rejected}"] >= 1, scraped
        listed = _cli(stack, "dead", "list", str(run))
        assert listed.returncode == 0, listed
        assert f"{dead_id}  (entry {fields['id']})  " in listed.stdout, listed.stdout
        assert "413" in listed.stdout and "_step=5" in listed.stdout, listed.stdout
        assert "1 dead letters" in listed.stderr
        child.stop()  # the fix: a larger PLUTO_MAX_BODY
        stack.backend.child = child = _backend(tmp_path, key, url, 64 << 20)
        other = _cli(stack, "dead", "replay", str(run), "--id", "1-1")  # no such dead letter
        assert other.returncode == 0 and "replayed 0" in other.stdout, other
        assert r.xlen(stack.keys.dead(run)) == 1
        replayed = _cli(stack, "dead", "replay", str(run), "--id", dead_id)
        assert replayed.returncode == 0 and "replayed 1 " in replayed.stdout, replayed
        want = [[5, 5 + 7]]
        wait_until(lambda: [p[:2] for p in _points(stack, run, 7)] == want, 30,
                   "the replayed entry stored")
        wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
        assert [p[0] for p in _points(stack, run, 0)] == list(range(1, 11))
        assert [p[:2] for p in _points(stack, run, 599)] == [[5, 5 + 599]]
        assert r.xlen(stack.keys.dead(run)) == 0
        wait_until(lambda: _ledger(stack, run) == (10, 0), 30, "the ledger: 10 stored, 0 dead")
        again = _cli(stack, "dead", "replay", str(run))
        assert "replayed 0" in again.stdout
        assert [p[:2] for p in _points(stack, run, 7)] == want  # once, not twice
        assert _ledger(stack, run) == (10, 0)
        assert scrape(metrics_url)["pluto_worker_dead_letters_total{stream=metrics}"] == 1
    finally:
        stack.stop_workers()
        child.stop()
