"""64 processes ``init`` the same run at once; how long until each has its run id.

Python start-up is excluded: every process imports pluto, connects, says it is ready and
blocks (BLPOP) until the parent releases all of them together; only then does it call ``init``.
Finishing is excluded too: each process reports through Redis and waits until all have
returned from ``init`` before it finishes, so the first ranks' ``finish`` (console lines,
ledger, finish op) does not take the CPU from the ranks still attaching.
"Served" is the moment the worker wrote the numeric id into the run key, seen through a
keyspace notification; "after served" is each process's return time minus that moment.
Target (issue 3): slowest init <= 500 ms, median <= 50 ms after the creator's request is served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import redis
from _common import args, median, percentile, report, servers

import pluto


def child(ready: str, go: str, run_id: str) -> None:
    from pluto import _init

    elected: list[float] = []
    elect = _init.elect

    def timed_elect(*args: Any, **kwargs: Any) -> Any:  # when the id was seen, for the split
        won = elect(*args, **kwargs)
        elected.append(time.time())
        return won

    _init.elect = timed_elect
    r = redis.Redis.from_url(os.environ["PLUTO_REDIS_URL"])
    settings = pluto.Settings.from_env()
    r.rpush(ready, os.getpid())
    while not r.blpop([go], timeout=1):  # short blocks: a socket timeout would retry the BLPOP
        pass
    start, cpu = time.time(), time.process_time()
    run = pluto.init(project="bench", run_id=run_id, settings=settings)
    end, cpu = time.time(), time.process_time() - cpu
    r.rpush(f"{go}:results", json.dumps({"start": start, "end": end, "elected": elected[0],
                                         "cpu": cpu, "resumed": run.resumed, "id": run.id}))
    r.blpop([f"{go}:finish"], timeout=60)  # the ranks still in init must not share the CPU
    run.finish()  # with those finishing (each sends its console lines, its ledger, ...)


def watch_served(r: redis.Redis, key: str, out: dict[str, float], ready: threading.Event) -> None:
    """Record when ``key`` first holds a number (the creator's request served)."""
    r.config_set("notify-keyspace-events", "K$")
    pubsub = r.pubsub()
    pubsub.subscribe(f"__keyspace@0__:{key}")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    ready.set()
    while "served" not in out:
        msg = pubsub.get_message(timeout=1)
        if msg and msg["type"] == "message":
            now = time.time()
            value = r.get(key)
            if value is not None and value.isdigit():
                out["served"] = now
    pubsub.close()


def main() -> None:
    a = args(procs=64, child="")
    if a.child:
        ready, go, run_id = a.child.split("|")
        child(ready, go, run_id)
        return
    n = 8 if a.tiny else a.procs
    with servers(backend=True, worker=True) as s:
        r = redis.Redis.from_url(s.redis_url)
        run_id = f"attach-{time.time_ns()}"
        ready, go = f"{s.prefix}:bench:ready", f"{s.prefix}:bench:go"
        procs = [subprocess.Popen([sys.executable, __file__, "--child", f"{ready}|{go}|{run_id}"],
                                  env=s.env(), stdout=subprocess.DEVNULL)
                 for _ in range(n)]
        deadline = time.monotonic() + 120
        while r.llen(ready) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let every child reach its BLPOP
        served: dict[str, float] = {}
        watching = threading.Event()
        watcher = threading.Thread(target=watch_served, daemon=True,
                                   args=(r, s.keys.run("bench", run_id), served, watching))
        watcher.start()
        watching.wait(5)
        released = time.time()
        r.rpush(go, *range(n))
        results = []
        while len(results) < n and time.monotonic() < deadline + 60:
            got = r.blpop([f"{go}:results"], timeout=1)
            if got:
                results.append(json.loads(got[1]))
        r.rpush(f"{go}:finish", *range(n))
        for p in procs:
            p.communicate(timeout=60)
        watcher.join(5)
    ok = len(results) == n and len({x["id"] for x in results}) == 1 \
        and sum(not x["resumed"] for x in results) == 1
    init_ms = [(x["end"] - x["start"]) * 1000 for x in results]
    t_served = served.get("served")
    after_ms = [(x["end"] - t_served) * 1000 for x in results] if t_served else []
    slowest, med = max(init_ms), median(init_ms)
    med_after = median(after_ms) if after_ms else None
    seen_ms = [(x["elected"] - t_served) * 1000 for x in results] if t_served else []
    rest_ms = [(x["end"] - x["elected"]) * 1000 for x in results]
    met = ok and slowest <= 500 and med_after is not None and med_after <= 50
    report("attach", {
        "procs": n, "one_run_one_creator": ok, "slowest_init_ms": round(slowest, 1),
        "median_init_ms": round(med, 1), "p90_init_ms": round(percentile(init_ms, 90), 1),
        "served_after_release_ms": round((t_served - released) * 1000, 1) if t_served else None,
        "median_after_served_ms": round(med_after, 1) if med_after is not None else None,
        "slowest_after_served_ms": round(max(after_ms), 1) if after_ms else None,
        "median_id_seen_after_served_ms": round(median(seen_ms), 1) if seen_ms else None,
        "median_after_id_seen_ms": round(median(rest_ms), 1),
        "median_init_cpu_ms": round(median([x["cpu"] * 1000 for x in results]), 1), "met": met},
        f"{n} processes init one run: slowest {slowest:.0f} ms, median {med:.0f} ms; the "
        f"creator's request was served {((t_served or released) - released) * 1000:.0f} ms after "
        f"release, median return {med_after or 0:.0f} ms after that; one run, one creator: {ok}; "
        f"target {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
