"""How many entries/s one producer process gets into its run's stream, against this Redis's ceiling.

The ceiling is ``redis-benchmark -P 64`` sending the same XADD (same fields) in the same run.
Target (issue 3): >= 250,000 entries/s and >= 0.2 of the ceiling.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from urllib.parse import urlsplit

from _common import args, log_flat_out, report, servers


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
    with servers(backend=True, worker=True) as s:
        rounds = log_flat_out(s, n, 1 if a.tiny else a.repeats, "tp")
        top = ceiling(s.redis_url, 20_000 if a.tiny else 1_000_000)
    for r in rounds:  # the rate counts only entries that reached Redis by finish()
        assert r["in_redis"] == n and r["lost"] == 0, r
    rates = [n / (r["log_s"] + r["finish_s"]) for r in rounds]
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
