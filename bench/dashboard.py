"""How long the dashboard takes to open a big run: 64 ranks x 100,000 steps x 3 metrics.

The run is written straight into a temporary SQLite file with ``Store.write_columns`` (the
backend's own columnar write path, without HTTP, so building 19.2M points takes about a minute),
then the real backend serves it and headless Chromium (the system's ``/usr/bin/chromium``,
driven by Playwright) opens ``/#run=<id>``. "Open" is the page's navigation start until its
first chart is drawn (``body[data-first-chart]``, set right after uPlot drew it); all charts
drawn is reported too, and how many API requests the page made by then.
Target (issue 16): first charts drawn in under 2 s.

    python bench/dashboard.py            # 64 x 100,000 x 3
    python bench/dashboard.py --tiny     # 4 x 2,000 x 3, for the smoke test
    python bench/dashboard.py --ranks 8 --steps 3000 --screenshot docs/dashboard.png
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, median, report

from pluto import _servers
from pluto_server._store import Store

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
METRICS = ("train/loss", "train/grad_norm", "sys/gpu_util")
T0 = 1_764_000_000_000


def value(metric: int, rank: int, step: int, steps: int) -> float:
    x = step / steps
    if metric == 0:
        spike = 3.0 if (rank == 1 and step == steps // 3) else 0.0
        return 2.0 * math.exp(-3 * x) + 0.02 * rank + 0.05 * math.sin(step * 0.37 + rank) + spike
    if metric == 1:
        return float("nan") if (rank == 2 and step == steps // 2) else \
            1.0 + 0.5 * math.cos(step * 0.01 + rank) * math.exp(-x)
    return 60 + 30 * math.sin(step / 500 + rank / 3)


def build(path: str, ranks: int, steps: int) -> tuple[int, int]:
    """A RUNNING-then-COMPLETED run with ``ranks`` members; the last rank trails by 3%."""
    store = Store(path)
    try:
        run, _ = store.create_run("bench", f"dashboard-{ranks}x{steps}", "dashboard-bench",
                                  {"ranks": ranks, "steps": steps, "lr": 3e-4}, ["bench"])
        names = [f"{m}/rank{r}" for r in range(ranks) for m in METRICS]
        written, chunk = 0, max(1, 200_000 // ranks)
        for lo in range(1, steps + 1, chunk):
            hi = min(steps, lo + chunk - 1)
            name_idx: list[int] = []
            values: list[float] = []
            step_col: list[int] = []
            time_col: list[int] = []
            for r in range(ranks):
                last = steps - (steps * 3 // 100 if r == ranks - 1 else 0)
                for step in range(lo, min(hi, last) + 1):
                    base = len(METRICS) * r
                    name_idx += [base, base + 1, base + 2]
                    values += [value(m, r, step, steps) for m in range(len(METRICS))]
                    step_col.append(step)
                    time_col.append(T0 + step * 100 + r)
            n = len(step_col)
            written += store.write_columns(run, names, name_idx, values, [3] * n, step_col,
                                           time_col, [0] * n, list(range(n)))
        store.upsert_members(run, [{"member": f"node{r // 8}:{1000 + r}", "rank": r,
                                    "local_rank": r % 8, "host": f"node{r // 8}",
                                    "pid": 1000 + r, "state": "finished"} for r in range(ranks)])
        store.set_status(run, "COMPLETED")
        return run, written
    finally:
        store.close()


def measure(url: str, key: str, run: int, repeats: int, screenshot: str) -> dict[str, Any]:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("PLUTO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    firsts, alls, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            for i in range(repeats):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.add_init_script(f"localStorage.setItem('pluto_key', {key!r})")
                page = context.new_page()
                api: list[str] = []
                page.on("request",
                        lambda r, api=api: api.append(r.url) if "/api/" in r.url else None)
                page.goto(f"{url}/#run={run}")
                page.wait_for_selector("body[data-first-chart]", timeout=120_000)
                firsts.append(int(page.evaluate("Number(document.body.dataset.firstChart)")))
                try:  # every chart is on the first screen in this layout
                    page.wait_for_function(
                        "() => [...document.querySelectorAll('.chart')]"
                        ".every(c => c.dataset.drawn)",
                        timeout=60_000)
                    alls.append(int(page.evaluate("performance.now()")))
                except PlaywrightTimeout:
                    alls.append(-1)
                requests.append(len(api))
                if screenshot and i == repeats - 1:
                    page.wait_for_timeout(500)
                    page.screenshot(path=screenshot, full_page=False)
                context.close()
        finally:
            browser.close()
    return {"first_chart_ms": firsts[0], "first_chart_ms_runs": firsts,
            "first_chart_ms_median": median([float(x) for x in firsts]),
            "all_charts_ms": alls[0], "requests": requests[0]}


def main() -> None:
    from _common import args

    a = args(ranks=64, steps=100_000, repeats=3, screenshot="")
    ranks, steps = (4, 2000) if a.tiny else (a.ranks, a.steps)
    with tempfile.TemporaryDirectory(prefix="pluto-dash-") as tmp:
        start = time.perf_counter()
        run, points = build(str(Path(tmp) / "pluto.db"), ranks, steps)
        built = time.perf_counter() - start
        key = "bench-dashboard"
        url = f"http://127.0.0.1:{_servers.free_port()}"
        backend = _servers.start_backend(url, f"sqlite:///{Path(tmp) / 'pluto.db'}", key,
                                         Path(tmp))
        try:
            found = measure(url, key, run, 1 if a.tiny else a.repeats,
                            str(ROOT / a.screenshot) if a.screenshot else "")
        finally:
            backend.stop()
    result = {"ranks": ranks, "steps": steps, "metrics": len(METRICS), "points": points,
              "build_s": round(built, 1), **found, "met": found["first_chart_ms"] <= 2000}
    report("dashboard", result,
           f"{ranks} ranks x {steps:,} steps x {len(METRICS)} metrics ({points:,} points): first "
           f"chart drawn {found['first_chart_ms']} ms after navigation (runs "
           f"{found['first_chart_ms_runs']}), all {found['all_charts_ms']} ms, "
           f"{found['requests']} API requests")


if __name__ == "__main__":
    main()
