"""PostgreSQL ingest: binary COPY into a temp table + INSERT … ON CONFLICT, against one
INSERT … SELECT FROM unnest(arrays) ON CONFLICT (what ``backend/_pgstore.py`` keeps).

Both go through ``PgStore.write_columns`` in this process, one thread, on a throwaway cluster
(``tests/storage/pgcluster.py``, fsync off), batches as the worker sends them (entries of 20
metrics). ``fresh`` writes new steps (inserts); ``overwrite`` the same steps again with newer
seqs (every row an ON CONFLICT update). Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import args  # noqa: E402
from tests.storage.pgcluster import Cluster  # noqa: E402


def batches(n_batches: int, entries: int, metrics: int, seq: int) -> list[tuple]:
    names = [f"train/metric{i}" for i in range(metrics)]
    out = []
    for b in range(n_batches):
        steps = list(range(b * entries + 1, (b + 1) * entries + 1))
        values = [s * 0.001 + i for s in steps for i in range(metrics)]
        out.append((names, list(range(metrics)) * entries, values, [metrics] * entries, steps,
                    [1764000000000 + s for s in steps], [seq + s for s in steps],
                    [0] * entries))
    return out


def measure(url: str, method: str, work: list[tuple], again: list[tuple]) -> dict[str, float]:
    from pluto_server._pgstore import PgStore

    store = PgStore(url, ingest=method)
    run, _ = store.create_run("bench", method, method, None, None)
    out = {}
    for label, todo in (("fresh", work), ("overwrite", again)):
        t0 = time.perf_counter()
        n = sum(store.write_columns(run, *cols) for cols in todo)
        out[f"{label}_points_per_s"] = round(n / (time.perf_counter() - t0))
    store.close()
    return out


def main() -> None:
    a = args(batches=40, entries=500, metrics=20)
    if a.tiny:
        a.batches, a.entries = 3, 50
    work = batches(a.batches, a.entries, a.metrics, 1000)
    again = batches(a.batches, a.entries, a.metrics, 10**12)
    result: dict[str, object] = {"bench": "pg_ingest", "cores": os.cpu_count(),
                                 "points_per_batch": a.entries * a.metrics,
                                 "batches": a.batches}
    with Cluster() as cluster:
        for _ in range(2):  # two rounds, alternating, keep the better of each
            for method in ("copy", "unnest"):
                got = measure(cluster.new_database(), method, work, again)
                for k, v in got.items():
                    key = f"{method}_{k}"
                    result[key] = max(v, result.get(key, 0))  # type: ignore[call-overload]
    result["faster"] = ("unnest" if result["unnest_fresh_points_per_s"]  # type: ignore[operator]
                        >= result["copy_fresh_points_per_s"] else "copy")
    result["met"] = True
    print(json.dumps(result))
    print(f"copy {result['copy_fresh_points_per_s']:,} / unnest "
          f"{result['unnest_fresh_points_per_s']:,} points/s fresh; faster: {result['faster']}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
