"""Points/s persisted to PostgreSQL with 1, 2 and 4 workers and 1 and 2 backend replicas.

Per configuration: a fresh database, ``--replicas`` backend processes on it, ``--workers``
worker processes (worker ``i`` posts to replica ``i % replicas``), and ``--runs`` producer
processes, one run each, every entry holding ``--metrics`` metrics. The producers log their
``--entries`` entries while the workers are stopped (SIGSTOP), so the streams hold the whole
backlog (Redis's CPU meanwhile is its cost of taking the entries in: XADD); then the workers
are continued and the clock runs until ``count(*)`` of the points
table reaches the total. That measures the consumers alone (workers, backends, PostgreSQL,
Redis) — producers' CPU is not in it. CPU seconds of each process kind over the drain are read
from ``/proc``, which says which process is the limit. Each configuration runs ``--repeat``
times, in rounds over all of them; the median round is reported. Prints one JSON object.

The PostgreSQL is a throwaway cluster (``tests/storage/pgcluster.py``, fsync off).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import args, servers  # noqa: E402
from pluto import _servers  # noqa: E402
from tests.storage.pgcluster import Cluster, drop_database  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def producer(ready: str, go: str, run_id: str, entries: int, metrics: int) -> None:
    """One rank: init, wait for ``go``, log ``entries`` entries of ``metrics`` metrics, finish."""
    import redis

    import pluto

    r = redis.Redis.from_url(os.environ["PLUTO_REDIS_URL"])
    run = pluto.init(project="scale", run_id=run_id)
    names = [f"train/m{i}" for i in range(metrics)]
    r.rpush(ready, run.id)
    while not r.blpop([go], timeout=1):
        pass
    for step in range(1, entries + 1):
        run.log({n: step * 0.001 + i for i, n in enumerate(names)}, step=step)
    print("RESULT " + json.dumps({"lost": run.finish(timeout=120)}), flush=True)


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def cpu_by_kind(kinds: dict[str, list[int]], pg_pid: int) -> dict[str, float]:
    out = {kind: sum(cpu_s(p) for p in pids) for kind, pids in kinds.items()}
    out["postgres"] = cpu_s(pg_pid) + sum(cpu_s(p) for p in children_of(pg_pid))
    return out


class Counter:
    """Stored points, cheaply: one metric's rows per run (index range scans) times the metrics
    per entry (an entry's points travel in one batch); ``exact()`` counts every row. Its own
    PostgreSQL process is known, so its CPU is left out of PostgreSQL's."""

    _CHEAP = ("SELECT coalesce(sum((SELECT count(*) FROM points p WHERE p.run = r.id AND"
              " p.name = (SELECT min(id) FROM names))), 0) FROM runs r")

    def __init__(self, url: str, metrics: int) -> None:
        import psycopg

        self.db = psycopg.connect(url, autocommit=True)
        self.pid = int(self.db.execute("SELECT pg_backend_pid()").fetchone()[0])
        self.metrics = metrics

    def cheap(self) -> int:
        return int(self.db.execute(self._CHEAP).fetchone()[0]) * self.metrics

    def waits(self, into: dict[str, int]) -> None:
        """One sample of what the store's connections are doing (active: on CPU or waiting)."""
        for kind, event in self.db.execute(
                "SELECT coalesce(wait_event_type, 'CPU'), coalesce(wait_event, '') FROM"
                " pg_stat_activity WHERE datname = current_database() AND state = 'active'"
                " AND pid <> pg_backend_pid()").fetchall():
            key = f"{kind}:{event}" if event else kind
            into[key] = into.get(key, 0) + 1

    def exact(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM points").fetchone()[0])


def one(s: Any, cluster: Cluster, workers: int, replicas: int, a: Any) -> dict[str, Any]:
    db_url = cluster.new_database("scale")
    tag = f"w{workers}r{replicas}-{time.time_ns()}"
    kids: list[_servers.Child] = []
    try:
        urls = [f"http://127.0.0.1:{_servers.free_port()}" for _ in range(replicas)]
        backends = [_servers.start_backend(u, db_url, s.api_key, s.tmp, s.env(), f"be{i}-{tag}")
                    for i, u in enumerate(urls)]
        kids += backends
        ws = [_servers.start_worker(s.redis_url, s.prefix, urls[i % replicas], s.api_key, s.tmp,
                                    s.env(PLUTO_WORKER_NAME=f"w{i}-{tag}"), f"w{i}-{tag}")
              for i in range(workers)]
        kids += ws
        import redis

        r = redis.Redis.from_url(s.redis_url)
        ready, go = f"{s.prefix}:scale:{tag}:ready", f"{s.prefix}:scale:{tag}:go"
        prods = [subprocess.Popen(
            [sys.executable, __file__, "--child", ready, go, f"{tag}-{i}", str(a.entries),
             str(a.metrics)], env=s.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for i in range(a.runs)]
        attached, deadline = 0, time.monotonic() + 120
        while attached < len(prods):  # short blocks: a socket timeout would retry the BLPOP
            if time.monotonic() > deadline:
                raise RuntimeError("producers did not attach: " + ws[0].log()[-2000:])
            attached += r.blpop([ready], timeout=1) is not None
        # Let the workers finish what the attaches asked (members, ledgers) before stopping them:
        # a request cut by SIGSTOP times out on SIGCONT and parks its run with back-off.
        time.sleep(2.0)
        for w in ws:
            w.signal(signal.SIGSTOP)
        redis_before = cpu_s(s.redis_child.pid)
        r.rpush(go, *["go"] * len(prods))
        lost = []
        for p in prods:
            out, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"producer failed: {err[-2000:]}")
            lost += [json.loads(line[7:])["lost"] for line in out.splitlines()
                     if line.startswith("RESULT ")]
        total = a.runs * a.entries * a.metrics
        xadd_us = (cpu_s(s.redis_child.pid) - redis_before) / (a.runs * a.entries) * 1e6
        kinds = {"worker": [w.pid for w in ws], "backend": [b.pid for b in backends],
                 "redis": [s.redis_child.pid]}
        assert cluster.child is not None
        counter = Counter(db_url, a.metrics)
        own = cpu_s(counter.pid)
        before, t0 = cpu_by_kind(kinds, cluster.child.pid), time.perf_counter()
        for w in ws:
            w.signal(signal.SIGCONT)
        stored, deadline, waits = 0, t0 + a.timeout, {}
        while stored < total and time.perf_counter() < deadline:
            time.sleep(0.1)
            counter.waits(waits)
            if counter.cheap() >= total:
                stored = counter.exact()
        wall = time.perf_counter() - t0
        after = cpu_by_kind(kinds, cluster.child.pid)
        after["postgres"] -= cpu_s(counter.pid) - own  # the counting is not the store's work
        counter.db.close()
        cpu = {k: round(after[k] - before[k], 2) for k in after}
        if stored < total:  # say why in the bench's stderr: the processes' own logs
            for k in kids:
                print(f"--- {k.name} (stored {stored} of {total}):\n{k.log()[-1500:]}",
                      file=sys.stderr)
        return {"workers": workers, "replicas": replicas, "points": total, "stored": stored,
                "lost_by_producers": sum(lost), "seconds": round(wall, 2),
                "points_per_s": round(stored / wall), "cpu_s": cpu,
                "redis_us_per_entry_logging": round(xadd_us, 2),
                "pg_active_samples": dict(sorted(waits.items(), key=lambda kv: -kv[1])),
                "cpu_share": {k: round(v / wall, 2) for k, v in cpu.items()},
                "cpu_us_per_point": {k: round(v / max(stored, 1) * 1e6, 2)
                                     for k, v in cpu.items()}}
    finally:
        for k in reversed(kids):
            k.signal(signal.SIGCONT)
            k.stop()
        drop_database(cluster.url, db_url)


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median points/s, with every round's points/s beside it."""
    ordered = sorted(rounds, key=lambda x: x["points_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["rounds_points_per_s"] = [x["points_per_s"] for x in rounds]
    out["stored"] = min(x["stored"] for x in rounds)  # every round must have stored all
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        producer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return
    a = args(runs=4, entries=10_000, metrics=20, timeout=300.0, workers="1,2,4", replicas="1,2",
             repeat=3)
    if a.tiny:
        a.runs, a.entries, a.metrics, a.timeout, a.repeat = 1, 200, 5, 60.0, 1
        a.workers, a.replicas = "1,2", "1,2"
    configs = [(w, r) for r in map(int, a.replicas.split(","))
               for w in map(int, a.workers.split(",")) if not (a.tiny and w != r)]
    rounds: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    with servers() as s, Cluster() as cluster:
        for _ in range(a.repeat):  # rounds over every configuration: noise hits them alike
            for w, r in configs:
                got = one(s, cluster, w, r, a)
                rounds[(w, r)].append(got)
                print(f"  {w} worker(s), {r} replica(s): {got['points_per_s']:,} points/s "
                      f"cpu {got['cpu_share']}", file=sys.stderr)
    results = [median_round(rs) for rs in rounds.values()]
    best = max(results, key=lambda x: x["points_per_s"])
    busiest = max(best["cpu_share"], key=best["cpu_share"].get)
    out = {"bench": "scale", "cores": os.cpu_count(), "runs": a.runs, "entries": a.entries,
           "metrics": a.metrics, "results": results, "best": {k: best[k] for k in (
               "workers", "replicas", "points_per_s")},
           "busiest_process": busiest,
           "cpu_used_of_cores": round(sum(best["cpu_share"].values()), 2),
           "met": all(x["stored"] == x["points"] for x in results)}
    print(json.dumps(out))
    print(f"scale: best {best['points_per_s']:,} points/s with {best['workers']} workers, "
          f"{best['replicas']} replicas; busiest: {busiest}", file=sys.stderr)


if __name__ == "__main__":
    main()
