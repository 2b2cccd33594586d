"""Per-run back-off and body sizing, with real worker processes, real ranks and the backend.

- The issue-14 scenario: a run whose reads the backend answers with 500 (``init`` with a NaN
  in its config), a worker restarted: that run is parked with its entries pending, and an
  unrelated project's ``init`` and logging go through at once.
- A backlog far over ``PLUTO_MAX_BODY``: 413 splits the batch until it fits; only an entry
  larger than the limit on its own is dead-lettered, with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import redis

from pluto import _servers
from pluto.protocol import Keys
from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script
from tests.worker.conftest import FaultProxy, create, dead_letters, entry, pending, produce

RANK = r"""
import json, os, sys, time
import pluto
opts = json.loads(sys.argv[1])
run = pluto.init(project=opts["project"], run_id=opts["run_id"], config=opts.get("config"))
step = 0
while step < opts["steps"] and not os.path.exists(opts.get("stop", "/nonexistent")):
    step += 1
    run.log({"x": step * 0.5}, step=step)
    time.sleep(opts.get("pace", 0))
lost = run.finish()
print("RESULT " + json.dumps({"id": run.id, "logged": step, "lost": lost}), flush=True)
"""

def _rank(tmp: Path, stack: Stack, **opts: object) -> object:
    code = RANK if not opts.pop("nan", False) else RANK.replace(
        'config=opts.get("config")', 'config={"lr": float("nan")}')
    script = write_script(tmp, code, f"rank-{secrets.token_hex(3)}.py")
    return start_rank(script, stack.env(), json.dumps(opts))


def test_a_run_the_backend_cannot_read_does_not_stall_the_others(
        redis_url: str, prefix: str, backend: Backend, project: str, r: redis.Redis,
        keys: Keys, tmp_path: Path) -> None:
    proxy = FaultProxy(backend.url)
    stack = Stack(redis_url, prefix, Backend(proxy.url, backend.key), tmp_path / "logs")
    try:
        stack.start_worker()
        stop = tmp_path / "stop-sick"
        sick_proc = _rank(tmp_path, stack, nan=True, project=f"{project}-a", run_id="nan-lr",
                          steps=10**6, pace=0.01, stop=str(stop))
        sick = int(wait_until(lambda: (v := r.get(keys.run(f"{project}-a", "nan-lr")))
                              and v.isdigit() and v, 30, "the NaN run created"))
        wait_until(lambda: backend.points(sick, "x"), 30, "the NaN run logging")
        proxy.fail = [rf"^GET /api/runs/{sick} "]  # the backend cannot read this run
        stack.stop_workers()
        stack.start_worker()  # restarted: it must look the run's project up again
        wait_until(lambda: proxy.hits, 20, "the failing read tried")
        fine = _rank(tmp_path, stack, project=f"{project}-b", run_id="fine", steps=200)
        code, out, err = finish_rank(fine, 60)
        assert code == 0, err[-3000:]
        [result] = json_lines(out)
        wait_until(lambda: len(backend.points(result["id"], "x")) == 200, 30,
                   "the unrelated run stored while the other is parked")
        held = pending(r, keys.metrics(sick))
        assert held > 0 and r.xlen(keys.dead(sick)) == 0  # waiting, not lost
        wait_until(lambda: "parked" in stack.worker_logs(), 30,
                   "the worker saying the run is parked (after its quick attempts)")
        stop.touch()
        code, out, err = finish_rank(sick_proc, 60)
        assert code == 0, err[-3000:]
        [sick_result] = json_lines(out)
        proxy.fail = []
        with backend.client() as c:  # without the proxy's fault: can the backend read it?
            readable = c.get(f"/api/runs/{sick}").status_code == 200
        if readable:  # the backend reads back the NaN it accepted (issue 14, backend part)
            wait_until(lambda: len(backend.points(sick, "x")) == sick_result["logged"], 60,
                       "the parked run drained once the backend can read it")
            assert [p[0] for p in backend.points(sick, "x")] == list(
                range(1, sick_result["logged"] + 1))
        else:  # the backend itself still 500s on it: parked for as long, nothing lost
            assert pending(r, keys.metrics(sick)) >= held and r.xlen(keys.dead(sick)) == 0
        assert stack.workers[-1].alive()
    finally:
        stack.stop_workers()
        proxy.close()


def test_413_splits_the_batch_until_it_fits(redis_url: str, prefix: str, project: str,
                                            r: redis.Redis, keys: Keys, tmp_path: Path) -> None:
    port = _servers.free_port()
    home = tmp_path / "small-backend"
    key = "test-" + secrets.token_hex(8)
    child = _servers.start_backend(f"http://127.0.0.1:{port}", f"sqlite:///{home / 'db'}", key,
                                   home, dict(os.environ, PLUTO_MAX_BODY="300000"))
    small = Backend(f"http://127.0.0.1:{port}", key, child)
    stack = Stack(redis_url, prefix, small, tmp_path / "logs")
    try:
        stack.start_worker()
        run = create(r, keys, project, "wide")
        stack.stop_workers()  # the backlog builds up while no worker reads
        names = [f"m{i:03d}" for i in range(500)]
        produce(r, keys, run, (entry(s, {n: s + i / 7 for i, n in enumerate(names)})
                               for s in range(1, 301)))
        huge = r.xadd(keys.metrics(run), entry(301, {f"big/{i:05d}": i * 0.1
                                                     for i in range(30_000)}))
        stack.start_worker()
        wait_until(lambda: r.hget(keys.ledger(run), "stored:0") == b"300", 90,
                   "300 wide entries stored")
        for name in (names[0], names[250], names[-1]):
            points = small.points(run, name)
            assert [p[0] for p in points] == list(range(1, 301)), name
        [(_, letter)] = dead_letters(r, keys.dead(run))
        assert letter[:2] == [b"id", huge] and b"too large" in letter[3]
        assert r.hget(keys.ledger(run), "dead:0") == b"1"
        assert pending(r, keys.metrics(run)) == 0
        assert "split" in stack.worker_logs()
    finally:
        stack.stop_workers()
        child.stop()
