"""The whole pipeline: 8 producer processes x 3 metrics -> Redis -> one worker -> backend (SQLite).

Two phases, each with its own run; producers are started first and released together (Python
start-up excluded), every rank logs its own three metrics (``r<rank>/loss`` ...), so points
never overwrite each other and a metric's newest step is how many of its points are stored.

1. throughput: the producers log as fast as they are allowed (``--rate`` points/s in total,
   above what one worker can store); a sampler reads each rank's newest stored step from the
   backend's read API once a second. The rate is taken over the steady part (20%..80% of the
   points stored), so start-up and the final drain do not count.
2. lag: the producers log at ``--lag-fraction`` of the measured capacity; a sampler polls the
   backend for new points of some metrics and, for each point, takes the time it became readable
   minus the time it was logged (``_time``, stamped by ``log()``). The poll interval is included.

With ``--profile`` (default on unless ``--tiny``), py-spy samples the worker and the backend
during phase 1 (at 50 Hz, so that it costs the measurement little), and the top functions by own
time are part of the result.
Target (issue 3): >= 300,000 points/s with one worker; lag p99 <= 1 s below that rate.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from _common import args, median, percentile, report, servers

import pluto

PRODUCERS = 8
"""Producer processes (``--producers``; ``--tiny`` uses 2)."""


# -- producer processes ---------------------------------------------------------------------------
def producer(ready: str, go: str, run_id: str, rate: float, seconds: float) -> None:
    """Log ``rate`` entries/s (3 points each) for ``seconds``, in 2 ms slices."""
    r = redis.Redis.from_url(os.environ["PLUTO_REDIS_URL"])
    run = pluto.init(project="bench", run_id=run_id)
    rank = run.rank
    names = (f"r{rank}/loss", f"r{rank}/acc", f"r{rank}/lr")
    r.rpush(ready, os.getpid())
    while not r.blpop([go], timeout=1):  # short blocks: a socket timeout would retry the BLPOP
        pass
    log, clock = run.log, time.monotonic
    start = clock()
    end = start + seconds
    i = 0
    while True:
        now = clock()
        if now >= end:
            break
        due = int((now - start) * rate) + 1
        while i < due:
            i += 1
            log({names[0]: 0.5 + i * 1e-6, names[1]: i, names[2]: 0.001})
        time.sleep(0.002)
    lost = run.finish()
    print("RESULT " + json.dumps({"rank": rank, "entries": i, "lost": lost, "log_s": clock() - start,
                                  "cpu_s": time.process_time()}), flush=True)


class Producers:
    """``PRODUCERS`` processes at a barrier; ``go()`` releases them together."""

    def __init__(self, s: Any, run_id: str, rate: float, seconds: float) -> None:
        self.r = redis.Redis.from_url(s.redis_url)
        self.ready, self.go_key = f"{s.prefix}:bench:{run_id}:ready", f"{s.prefix}:bench:{run_id}:go"
        per = rate / 3 / PRODUCERS
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--child",
             f"{self.ready}|{self.go_key}|{run_id}|{per}|{seconds}"],
            env=s.env(RANK=str(rank)), stdout=subprocess.PIPE, text=True)
            for rank in range(PRODUCERS)]
        deadline = time.monotonic() + 120
        while self.r.llen(self.ready) < PRODUCERS:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("producers did not get ready")
            time.sleep(0.05)

    def go(self) -> float:
        self.r.rpush(self.go_key, *range(PRODUCERS))
        return time.monotonic()

    def results(self) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            text, _ = p.communicate(timeout=600)
            out += [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        return out


# -- reading back from the backend ------------------------------------------------------------------
class Reader:
    """The newest stored step of a metric through ``GET /api/runs/{id}/metrics/{name}``."""

    def __init__(self, s: Any, run: int) -> None:
        self.http = httpx.Client(base_url=s.api_url, timeout=30,
                                 headers={"Authorization": f"Bearer {s.api_key}"})
        self.run = run
        self.last: dict[str, int] = collections.defaultdict(int)

    def new_points(self, name: str, max_points: int | None = None) -> list[list[Any]]:
        params: dict[str, Any] = {"since_step": self.last[name] + 1}
        if max_points:
            params["max_points"] = max_points
        points = self.http.get(f"/api/runs/{self.run}/metrics/{name}", params=params).json()["points"]
        if points:
            self.last[name] = points[-1][0]
        return points  # type: ignore[no-any-return]

    def stored(self) -> int:
        """Points stored so far: 3 per entry, an entry's three points land in one transaction."""
        for rank in range(PRODUCERS):
            self.new_points(f"r{rank}/loss", max_points=1)
        return 3 * sum(self.last.values())


def run_id_of(s: Any, run_id: str) -> int:
    value = redis.Redis.from_url(s.redis_url).get(s.keys.run("bench", run_id))
    assert value is not None and value.isdigit(), value
    return int(value)


# -- the phases --------------------------------------------------------------------------------------
def throughput(s: Any, rate: float, seconds: float, profile: float) -> dict[str, Any]:
    run_id = f"e2e-tp-{time.time_ns()}"
    prods = Producers(s, run_id, rate, seconds)
    reader = Reader(s, run_id_of(s, run_id))
    spies = start_profile(s, profile) if profile else []
    cpu0 = cpu_seconds(s)
    t0 = prods.go()
    samples: list[tuple[float, int]] = [(t0, 0)]
    finished: list[dict[str, Any]] = []
    waiter = threading.Thread(target=lambda: finished.extend(prods.results()))
    waiter.start()
    total = None
    while True:
        time.sleep(1.0)
        samples.append((time.monotonic(), reader.stored()))
        if not waiter.is_alive():
            total = 3 * sum(x["entries"] for x in finished)
            if samples[-1][1] >= total or time.monotonic() - samples[-1][0] > 120:
                break
    waiter.join()
    cpu = {name: sec - cpu0.get(name, 0.0) for name, sec in cpu_seconds(s).items()}
    cpu["producers"] = sum(x["cpu_s"] for x in finished)  # start-up included
    profiles = stop_profile(spies)
    assert total is not None
    lo, hi = next(x for x in samples if x[1] >= 0.2 * total), next(x for x in samples if x[1] >= 0.8 * total)
    steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else samples[-1][1] / (samples[-1][0] - t0)
    logged_s = max(x["log_s"] for x in finished)
    return {"points": total, "stored": samples[-1][1], "points_per_s": round(steady),
            "logged_points_per_s": round(total / logged_s),
            "drained_s": round(samples[-1][0] - t0, 2), "lost": sum(x["lost"] for x in finished),
            "cpu_us_per_point": {k: round(v / max(total, 1) * 1e6, 2) for k, v in cpu.items()},
            "profile": profiles}


def lag(s: Any, rate: float, seconds: float) -> dict[str, Any]:
    run_id = f"e2e-lag-{time.time_ns()}"
    prods = Producers(s, run_id, rate, seconds)
    reader = Reader(s, run_id_of(s, run_id))
    watched = [f"r{rank}/loss" for rank in (0, PRODUCERS - 1)]
    prods.go()
    lags: list[float] = []
    finished: list[dict[str, Any]] = []
    waiter = threading.Thread(target=lambda: finished.extend(prods.results()))
    waiter.start()
    expected: int | None = None
    deadline = None
    while True:
        for name in watched:
            points = reader.new_points(name)
            now_ms = time.time() * 1000
            lags += [now_ms - p[2] for p in points]
        if expected is None and not waiter.is_alive():
            expected = sum(x["entries"] for x in finished if x["rank"] in (0, PRODUCERS - 1))
            deadline = time.monotonic() + 60
        if expected is not None and (sum(reader.last[n] for n in watched) >= expected
                                     or time.monotonic() > (deadline or 0)):
            break
        time.sleep(0.02)
    waiter.join()
    return {"points_per_s": round(rate), "samples": len(lags),
            "lag_p50_ms": round(median(lags), 1) if lags else None,
            "lag_p99_ms": round(percentile(lags, 99), 1) if lags else None,
            "lag_max_ms": round(max(lags), 1) if lags else None}


# -- profiling ------------------------------------------------------------------------------------
def cpu_seconds(s: Any) -> dict[str, float]:
    """CPU time (user + system) used so far by each server process we started: per point, it
    is what a busy machine cannot blur, unlike wall-clock rates."""
    out = {}
    for child in s.children:
        try:
            stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[child.name] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return out


def start_profile(s: Any, seconds: float) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return []
    spies = []
    for child in s.children:
        if child.name.startswith(("backend", "worker")):
            out = s.tmp / f"{child.name}.spy"
            spies.append((child.name, subprocess.Popen(
                [spy, "record", "-p", str(child.pid), "-d", str(int(seconds)), "-r", "50",
                 "-f", "raw", "-o", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
    return spies


def stop_profile(spies: list[tuple[str, subprocess.Popen[bytes], Path]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, proc, path in spies:
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        if path.exists():
            out[name] = summarize(path.read_text())
    return out


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    """Top functions by own samples, and idle share, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1] if "/" in leaf else leaf] += n
    return {"samples": total,
            "top_own_pct": [[f, round(100 * n / total, 1)] for f, n in own.most_common(top)]}


def main() -> None:
    global PRODUCERS
    a = args(rate=600_000.0, seconds=6.0, lag_seconds=8.0, lag_fraction=0.5, profile=1, producers=PRODUCERS,
               child="")
    if a.child:
        ready, go, run_id, per, seconds = a.child.split("|")  # one producer process
        producer(ready, go, run_id, float(per), float(seconds))
        return
    PRODUCERS = 2 if a.tiny else a.producers
    seconds, lag_seconds = (1.5, 1.5) if a.tiny else (a.seconds, a.lag_seconds)
    rate = 60_000.0 if a.tiny else a.rate
    with servers(backend=True, worker=True) as s:
        tp = throughput(s, rate, seconds, 0 if a.tiny or not a.profile else seconds)
        lag_rate = max(3_000.0, min(a.lag_fraction * tp["points_per_s"], 300_000))
        lg = lag(s, lag_rate, lag_seconds)
    met = tp["points_per_s"] >= 300_000 and (lg["lag_p99_ms"] or 1e9) <= 1000
    report("e2e", {"producers": PRODUCERS, "points_per_s": tp["points_per_s"],
                   "lag_p50_ms": lg["lag_p50_ms"], "lag_p99_ms": lg["lag_p99_ms"],
                   "throughput": tp, "lag": lg, "met": met},
           f"{PRODUCERS} producers x 3 metrics, one worker, SQLite: {tp['points_per_s']:,} points/s "
           f"persisted in steady state; at {lg['points_per_s']:,} points/s log->readable lag p50 "
           f"{lg['lag_p50_ms']} ms p99 {lg['lag_p99_ms']} ms; target {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
