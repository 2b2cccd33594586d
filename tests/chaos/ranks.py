"""Training ranks for the chaos tests, and checking what the backend holds against them.

A rank logs ``m/rank{r}`` = ``value(r, step)`` (exact in binary) at steps 1, 2, ... in chunks,
until its stop file exists (or it has logged ``steps``), then finishes and prints one RESULT
line: what it logged, what ``finish()`` reported lost, and how long ``log()`` took at worst.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, write_script

RANK = r"""
import json, os, sys, time, warnings
warnings.simplefilter("always")
import pluto
opts = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
stop, marker = opts.get("stop_file"), opts.get("marker")
with warnings.catch_warnings(record=True) as caught:
    run = pluto.init(project=opts.get("project", "chaos"), run_id=opts["run_id"])
    q = run._producer.queue
    from pluto.protocol import entry_width
    width = entry_width(("m",))  # the flat deque: step, time, names, one value
    step, worst, total, max_q = opts.get("first_step", 1) - 1, 0.0, 0.0, 0
    logged = 0
    while True:
        for _ in range(opts.get("chunk", 10)):
            step += 1
            t0 = time.perf_counter()
            run.log({f"m/rank{rank}": rank + step / 4}, step=step)
            dt = time.perf_counter() - t0
            total += dt
            worst = dt if dt > worst else worst
            logged += 1
        max_q = max(max_q, len(q) // width)
        if marker and logged == opts.get("flush_after", -1):
            ok = run._producer.flush(30)  # everything so far is in Redis
            with open(marker + ".tmp", "w") as f:
                f.write(str(step) if ok else "-1")
            os.replace(marker + ".tmp", marker)
        if logged >= opts.get("steps", 10**12) or (stop and os.path.exists(stop)):
            break
        time.sleep(opts.get("pace", 0.01))
    lost = run.finish()
print("RESULT " + json.dumps({
    "id": run.id, "rank": rank, "resumed": run.resumed, "first": opts.get("first_step", 1),
    "last": step, "logged": logged, "lost": lost, "max_log_ms": worst * 1000,
    "mean_log_us": total / max(logged, 1) * 1e6, "max_queue": max_q,
    "warnings": [str(w.message) for w in caught]}), flush=True)
"""


def value(rank: int, step: int) -> float:
    return rank + step / 4


STARTED: list[subprocess.Popen[str]] = []
"""Every rank started here; the chaos conftest ends those still running after each test."""


def start(stack: Stack, tmp: Path, rank: int, env: dict[str, str] | None = None,
          **opts: Any) -> subprocess.Popen[str]:
    script = write_script(tmp, RANK, "chaos_rank.py")
    proc = start_rank(script, stack.env(RANK=str(rank), **(env or {})), json.dumps(opts))
    STARTED.append(proc)
    return proc


def end_leftovers() -> None:
    """After a failed test: SIGKILL the ranks it left running (by pid) and reap them."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()


def results(procs: list[subprocess.Popen[str]], timeout: float = 90) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in procs:
        code, stdout, err = finish_rank(p, timeout)
        assert code == 0, err[-3000:]
        got = json_lines(stdout)
        assert got, f"rank {p.pid} printed no result (exit {code}):\n{stdout[-2000:]}\n{err[-3000:]}"
        got[0]["stderr"] = err
        out += got
    return out


def points(backend: Backend, run: int, rank: int) -> list[list[Any]]:
    return backend.points(run, f"m/rank{rank}")


def stored_count(backend: Backend, run: int, ranks: range | list[int]) -> int:
    return sum(len(points(backend, run, r)) for r in ranks)


def wait_stored(backend: Backend, run: int, expected: dict[int, int], timeout: float = 60,
                what: str = "all points stored") -> float:
    """Wait until rank r has ``expected[r]`` points; returns the seconds it took."""
    import pytest

    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            have = {r: len(points(backend, run, r)) for r in expected}
        except Exception:
            have = {}
        if have == expected:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}: have {have}, "
                        f"want {expected}")
        time.sleep(0.2)


def check_rank(backend: Backend, run: int, rank: int, steps: list[int]) -> dict[str, int]:
    """Exactly ``steps`` stored for ``rank``, each once, each with its exact value."""
    got = points(backend, run, rank)
    seen = [p[0] for p in got]
    dups = len(seen) - len(set(seen))
    missing = sorted(set(steps) - set(seen))
    extra = sorted(set(seen) - set(steps))
    wrong = [(s, v) for s, v, _ in got if v != value(rank, s)]
    assert not dups and not missing and not extra and not wrong, (
        f"rank {rank}: {dups} duplicates, missing {missing[:10]} ({len(missing)}), "
        f"unexpected {extra[:10]} ({len(extra)}), wrong values {wrong[:5]}")
    return {"stored": len(seen), "duplicates": dups}


def stop_ranks(backend: Backend, run: int, procs: list[subprocess.Popen[str]],
               stop: Path) -> list[dict[str, Any]]:
    """Tell the ranks to finish (their stop file); their results, once the backend holds
    every entry each says it logged and did not lose."""
    stop.touch()
    got = results(procs)
    wait_stored(backend, run, {x["rank"]: x["logged"] - x["lost"] for x in got})
    return got


def check_ranks(backend: Backend, run: int, got: list[dict[str, Any]]) -> tuple[int, int]:
    """:func:`check_rank` for every rank's steps 1..last; returns (stored, duplicates)."""
    checks = [check_rank(backend, run, x["rank"], list(range(1, x["last"] + 1))) for x in got]
    return sum(c["stored"] for c in checks), sum(c["duplicates"] for c in checks)


def row(scenario: str, logged: int, stored: int, duplicates: int, recover_s: float | None,
        **extra: Any) -> dict[str, Any]:
    return {"scenario": scenario, "logged": logged, "stored": stored, "duplicates": duplicates,
            "recover_s": None if recover_s is None else round(recover_s, 2), **extra}


def stream_dups(r: Any, stream: str, logged: int) -> int:
    """Entries the stream received beyond what was logged: resends after a half-written
    pipeline (absorbed by the backend's upsert, so never a duplicate point)."""
    return int(r.xinfo_stream(stream)["entries-added"]) - logged
