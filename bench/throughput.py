"""How many entries/s one producer process gets into its run's stream, against this Redis's ceiling.

The ceiling is ``redis-benchmark -P 64`` sending the same XADD (same fields) in the same run.
Target (issue 3): >= 250,000 entries/s and >= 0.2 of the ceiling.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from urllib.parse import urlsplit

import redis
from _common import args, report, servers

import pluto


def ceiling(redis_url: str, n: int) -> float | None:
    tool = shutil.which("redis-benchmark")
    if tool is None:
        return None
    url = urlsplit(redis_url)
    out = subprocess.run([tool, "-h", url.hostname or "127.0.0.1", "-p", str(url.port), "-P", "64",
                          "-n", str(n), "-c", "4", "-q", "XADD", "bench:ceiling", "*", "_rank", "0",
                          "_step", "12", "_time", "1764000000123", "train/loss", "0.2314",
                          "train/acc", "0.25", "lr", "0.001"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"([\d.]+) requests per second", out.replace(",", ""))
    return float(match.group(1)) if match else None


def main() -> None:
    a = args(entries=500_000, repeats=3)
    n = 5_000 if a.tiny else a.entries
    rates = []
    with servers(backend=True, worker=True) as s:
        settings = pluto.Settings.from_env(s.env())
        client = redis.Redis.from_url(s.redis_url)
        for rep in range(1 if a.tiny else a.repeats):
            run = pluto.init(project="bench", run_id=f"tp-{time.time_ns()}", settings=settings)
            s.children[-1].signal(19)  # SIGSTOP the worker: measure the producer alone
            start = time.perf_counter()
            for i in range(n):
                run.log({"train/loss": 0.5 + i * 1e-6, "train/acc": 0.25, "lr": 0.001})
            run.finish()
            elapsed = time.perf_counter() - start
            s.children[-1].signal(18)  # SIGCONT
            assert client.xlen(s.keys.metrics(run.id)) == n, (client.xlen(s.keys.metrics(run.id)), run.lost, elapsed)
            rates.append(n / elapsed)
            client.delete(s.keys.metrics(run.id))
        top = ceiling(s.redis_url, 20_000 if a.tiny else 1_000_000)
    rate = sorted(rates)[len(rates) // 2]
    ratio = rate / top if top else None
    met = rate >= 250_000 and (ratio is None or ratio >= 0.2)
    report("throughput", {"entries": n, "entries_per_s": round(rate), "runs": [round(r) for r in rates],
                          "ceiling_per_s": top, "ratio": round(ratio, 3) if ratio else None,
                          "met": met},
           f"one producer: {rate:,.0f} entries/s (median of {len(rates)}), ceiling "
           f"{top or 0:,.0f}/s (redis-benchmark -P 64), ratio {ratio or 0:.2f}; target "
           f"{'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
