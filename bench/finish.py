"""How long ``finish()`` takes right after logging 200,000 entries as fast as possible.

The worker is paused (SIGSTOP) while the entries are logged and flushed, so the stream's length
proves every entry reached Redis when ``finish()`` returned, and the time is the SDK's own.
Target (issue 3): ``finish()`` <= 1 s, with every entry in Redis when it returns.
"""

from __future__ import annotations

import signal
import time

import redis
from _common import args, report, servers

import pluto


def main() -> None:
    a = args(entries=200_000, repeats=3)
    n = 5_000 if a.tiny else a.entries
    rounds = []
    with servers(backend=True, worker=True) as s:
        settings = pluto.Settings.from_env(s.env())
        client = redis.Redis.from_url(s.redis_url)
        worker = s.children[-1]
        for _ in range(1 if a.tiny else a.repeats):
            run = pluto.init(project="bench", run_id=f"finish-{time.time_ns()}", settings=settings)
            worker.signal(signal.SIGSTOP)
            try:
                start = time.perf_counter()
                for i in range(n):
                    run.log({"train/loss": 0.5 + i * 1e-6, "train/acc": 0.25, "lr": 0.001})
                logged = time.perf_counter()
                lost = run.finish()
                done = time.perf_counter()
                in_redis = client.xlen(s.keys.metrics(run.id))
            finally:
                worker.signal(signal.SIGCONT)
            rounds.append({"log_s": round(logged - start, 3), "finish_s": round(done - logged, 3),
                           "in_redis": in_redis, "lost": lost})
            client.delete(s.keys.metrics(run.id))
    worst = max(r["finish_s"] for r in rounds)
    complete = all(r["in_redis"] == n and r["lost"] == 0 for r in rounds)
    met = worst <= 1.0 and complete
    report("finish", {"entries": n, "finish_s": worst, "all_in_redis": complete,
                      "rounds": rounds, "met": met},
           f"finish() after logging {n:,} entries: worst {worst:.3f} s of {len(rounds)} "
           f"(logging took {rounds[0]['log_s']:.3f} s), every entry in Redis: {complete}; "
           f"target {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
