"""How long ``finish()`` takes right after logging 200,000 entries as fast as possible.

The worker is paused (SIGSTOP) while the entries are logged and flushed, so the stream's length
proves every entry reached Redis when ``finish()`` returned, and the time is the SDK's own.
Target (issue 3): ``finish()`` <= 1 s, with every entry in Redis when it returns.
"""

from __future__ import annotations

from _common import args, log_flat_out, report, servers


def main() -> None:
    a = args(entries=200_000, repeats=3)
    n = 5_000 if a.tiny else a.entries
    with servers(backend=True, worker=True) as s:
        rounds = log_flat_out(s, n, 1 if a.tiny else a.repeats, "finish")
    for r in rounds:
        r["log_s"], r["finish_s"] = round(r["log_s"], 3), round(r["finish_s"], 3)
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
