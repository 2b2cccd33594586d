"""Cost of one ``run.log({3 scalars})`` on the training thread, with Redis up and with it stopped.

Target (issue 3): median <= 2 us, p99 <= 10 us, peak RSS <= 60 MB, and as cheap with Redis down.
"""

from __future__ import annotations

import gc
import time

from _common import args, median, peak_rss_mb, percentile, report, servers

import pluto


def measure(run: pluto.Run, calls: int) -> dict[str, float]:
    timings = [0] * calls
    clock = time.perf_counter_ns
    log = run.log
    gc.disable()
    start = clock()
    for i in range(calls):
        t0 = clock()
        log({"train/loss": 0.5 + i * 1e-6, "train/acc": 0.25, "lr": 0.001})
        timings[i] = clock() - t0
    total = clock() - start
    gc.enable()
    us = [t / 1000 for t in timings]
    return {"median_us": round(median(us), 3), "p99_us": round(percentile(us, 99), 3),
            "calls_per_s": round(calls / (total / 1e9))}


def main() -> None:
    a = args(calls=200_000)
    calls = 2_000 if a.tiny else a.calls
    with servers(backend=True, worker=True) as s:
        settings = pluto.Settings.from_env(s.env())
        run = pluto.init(project="bench", run_id=f"log-{time.time_ns()}", settings=settings)
        up = measure(run, calls)
        run.finish()
        run2 = pluto.init(project="bench", run_id=f"log-down-{time.time_ns()}", settings=settings)
        assert s.redis_child is not None
        s.redis_child.stop()
        down = measure(run2, calls)
        lost = run2.finish(timeout=0.5)
    rss = round(peak_rss_mb(), 1)
    met = (up["median_us"] <= 2 and up["p99_us"] <= 10 and rss <= 60
           and down["median_us"] <= 2 and down["p99_us"] <= 10)
    report("log_overhead", {"calls": calls, "redis_up": up, "redis_down": down,
                            "lost_when_down": lost, "peak_rss_mb": rss, "met": met},
           f"log() median {up['median_us']} us p99 {up['p99_us']} us ({up['calls_per_s']:,} "
           f"calls/s), Redis down: median {down['median_us']} us p99 {down['p99_us']} us; "
           f"peak RSS {rss} MB; target {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
