"""Run every benchmark one after the other, keep their JSON lines, print one table.

    python bench/run_all.py            # full sizes (what `make bench` runs)
    python bench/run_all.py --tiny     # every script at smoke-test size

Results go to ``bench/results/latest.json`` (one object per benchmark, gitignored). A script that
fails is reported as such; the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPTS = ["log_overhead", "throughput", "finish", "e2e", "attach", "dashboard"]

TARGETS = {
    "log_overhead": "median <= 2 us, p99 <= 10 us, RSS <= 60 MB",
    "throughput": ">= 250,000 entries/s, >= 0.2 x ceiling",
    "finish": "<= 1 s, all entries in Redis",
    "e2e": ">= 300,000 points/s, lag p99 <= 1 s",
    "attach": "slowest <= 500 ms, median <= 50 ms after served",
    "dashboard": "64 x 100k x 3 run: first chart drawn < 2 s",
}


def key_numbers(result: dict[str, Any]) -> str:
    name = result.get("bench")
    if name == "log_overhead":
        up, down = result["redis_up"], result["redis_down"]
        return (f"median {up['median_us']} us, p99 {up['p99_us']} us, RSS {up['peak_rss_mb']} MB;"
                f" down: {down['median_us']}/{down['p99_us']} us")
    if name == "throughput":
        return f"{result['entries_per_s']:,} entries/s, ratio {result['ratio']}"
    if name == "finish":
        return f"{result['finish_s']} s, all in Redis: {result['all_in_redis']}"
    if name == "e2e":
        return (f"{result['points_per_s']:,} points/s, lag p50 {result['lag_p50_ms']} ms "
                f"p99 {result['lag_p99_ms']} ms")
    if name == "attach":
        return (f"slowest {result['slowest_init_ms']} ms, median {result['median_init_ms']} ms, "
                f"median after served {result['median_after_served_ms']} ms")
    if name == "dashboard":
        return (f"{result['ranks']} x {result['steps']:,}: first chart "
                f"{result['first_chart_ms']} ms, all {result['all_charts_ms']} ms, "
                f"{result['requests']} requests")
    return ""


def run(script: str, tiny: bool) -> dict[str, Any]:
    argv = [sys.executable, str(HERE / f"{script}.py")] + (["--tiny"] if tiny else [])
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    took = round(time.monotonic() - start, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        return {"bench": script, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}",
                "met": False, "wall_s": took}
    result: dict[str, Any] = json.loads(lines[0])
    result["wall_s"] = took
    return result


def main() -> int:
    tiny = "--tiny" in sys.argv[1:]
    results = []
    for script in SCRIPTS:
        print(f"running {script}{' --tiny' if tiny else ''} ...", file=sys.stderr, flush=True)
        results.append(run(script, tiny))
    out = HERE / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tiny": tiny, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "results": results}, indent=2, sort_keys=True) + "\n")
    rows = [(r["bench"], r.get("error", "")[:60] or key_numbers(r), TARGETS.get(r["bench"], ""),
             "yes" if r.get("met") else "NO") for r in results]
    head = ("benchmark", "result", "target", "met")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"(written to {out.relative_to(HERE.parent)})")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
