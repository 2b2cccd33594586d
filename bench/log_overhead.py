"""Cost of one ``run.log({3 scalars})`` on the training thread, with Redis up and with it stopped.

Each phase runs in a fresh process so that its peak RSS is its own.
Target (issue 3): median <= 2 us, p99 <= 10 us, peak RSS <= 60 MB, and as cheap with Redis down.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from array import array

from _common import args, median, peak_rss_mb, percentile, report, servers

import pluto


def measure(run: pluto.Run, calls: int) -> tuple[array, float]:
    timings = array("q", bytes(8 * calls))  # no int objects: the instrument must not weigh much
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
    return timings, calls / (total / 1e9)


def stats(timings: array, rate: float) -> dict[str, float]:
    us = [t / 1000 for t in timings]
    return {"median_us": round(median(us), 3), "p99_us": round(percentile(us, 99), 3),
            "max_us": round(max(us), 1), "calls_per_s": round(rate)}


def phase(calls: int, down: bool) -> None:
    """One measurement in this process; Redis is stopped by the parent when ``down``."""
    run = pluto.init(project="bench", run_id=f"log-{time.time_ns()}")
    if down:
        print("READY", flush=True)
        sys.stdin.readline()  # the parent stops Redis, then says go
    timings, rate = measure(run, calls)
    lost = run.finish(timeout=0.5 if down else None)
    rss = round(peak_rss_mb(), 1)  # before the statistics allocate their own lists
    result = {**stats(timings, rate), "lost": lost, "peak_rss_mb": rss}
    print("RESULT " + json.dumps(result), flush=True)


def run_phase(env: dict[str, str], calls: int, down: bool, stop_redis: object = None) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--phase", "down" if down else "up",
                             "--calls", str(calls)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    if down:
        assert proc.stdout.readline().strip() == "READY"
        stop_redis()  # type: ignore[operator]
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, _ = proc.communicate(timeout=600)
    return json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])


def main() -> None:
    a = args(calls=200_000, phase="")
    if a.phase:
        phase(a.calls, a.phase == "down")
        return
    calls = 2_000 if a.tiny else a.calls
    with servers(backend=True, worker=True) as s:
        env = s.env()
        up = run_phase(env, calls, down=False)
        assert s.redis_child is not None
        down = run_phase(env, calls, down=True, stop_redis=s.redis_child.stop)
    met = (up["median_us"] <= 2 and up["p99_us"] <= 10 and up["peak_rss_mb"] <= 60
           and down["median_us"] <= 2 and down["p99_us"] <= 10)
    report("log_overhead", {"calls": calls, "redis_up": up, "redis_down": down, "met": met},
           f"log() median {up['median_us']} us p99 {up['p99_us']} us ({up['calls_per_s']:,} "
           f"calls/s, peak RSS {up['peak_rss_mb']} MB); Redis down: median {down['median_us']} us "
           f"p99 {down['p99_us']} us (peak RSS {down['peak_rss_mb']} MB, {down['lost']} entries "
           f"lost at finish(timeout=0.5)); target {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
