"""What every benchmark shares: servers it starts itself, sizes, and how results are printed.

Each bench script prints one JSON object (the numbers) and a one-line summary, and exits 0 even
when a target is missed: targets are reported (``"met": false``), never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from pluto import _servers  # noqa: E402
from pluto.protocol import Keys  # noqa: E402


def args(**defaults: Any) -> argparse.Namespace:
    """``--tiny`` shrinks every size so the smoke test can run the script in seconds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser.parse_args()


@dataclass
class Servers:
    tmp: Path
    redis_url: str = ""
    prefix: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:6]}")
    api_url: str = ""
    api_key: str = field(default_factory=lambda: "bench-" + secrets.token_hex(8))
    children: list[_servers.Child] = field(default_factory=list)
    redis_child: _servers.Child | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLUTO_")}
        env.update(PLUTO_REDIS_URL=self.redis_url, PLUTO_PREFIX=self.prefix,
                   PYTHONPATH=str(ROOT), **extra)
        return env

    def start_redis(self) -> None:
        port = _servers.free_port()
        self.redis_child = _servers.start_redis(port, self.tmp / "redis")
        self.children.append(self.redis_child)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def start_backend(self) -> None:
        self.api_url = f"http://127.0.0.1:{_servers.free_port()}"
        self.children.append(_servers.start_backend(
            self.api_url, f"sqlite:///{self.tmp / 'pluto.db'}", self.api_key, self.tmp))

    def start_worker(self, **env: str) -> _servers.Child:
        child = _servers.start_worker(self.redis_url, self.prefix, self.api_url, self.api_key,
                                      self.tmp, self.env(**env), name=f"worker{len(self.children)}")
        self.children.append(child)
        return child


@contextlib.contextmanager
def servers(redis: bool = True, backend: bool = False, worker: bool = False) -> Iterator[Servers]:
    with tempfile.TemporaryDirectory(prefix="pluto-bench-") as tmp:
        s = Servers(Path(tmp))
        try:
            if redis:
                s.start_redis()
            if backend:
                s.start_backend()
            if worker:
                s.start_worker()
            yield s
        finally:
            for child in reversed(s.children):
                child.stop()


def log_flat_out(s: Servers, n: int, repeats: int, name: str) -> list[dict[str, Any]]:
    """``repeats`` fresh runs, each logging ``n`` 3-scalar entries as fast as possible, then
    ``finish()``. The worker is paused (SIGSTOP) meanwhile, so the stream's length after
    ``finish()`` proves what reached Redis and the time is the SDK's own."""
    import signal
    import time

    import redis

    import pluto

    settings = pluto.Settings.from_env(s.env())
    client = redis.Redis.from_url(s.redis_url)
    worker = s.children[-1]
    rounds = []
    for _ in range(repeats):
        run = pluto.init(project="bench", run_id=f"{name}-{time.time_ns()}", settings=settings)
        worker.signal(signal.SIGSTOP)
        try:
            start = time.perf_counter()
            for i in range(n):
                run.log({"train/loss": 0.5 + i * 1e-6, "train/acc": 0.25, "lr": 0.001})
            logged = time.perf_counter()
            lost = run.finish()
            done = time.perf_counter()
            in_redis = client.xlen(s.keys.metrics(run.id))
        finally:
            worker.signal(signal.SIGCONT)
        rounds.append({"log_s": logged - start, "finish_s": done - logged, "in_redis": in_redis,
                       "lost": lost})
        client.delete(s.keys.metrics(run.id))
    return rounds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def report(name: str, result: dict[str, Any], summary: str) -> None:
    print(json.dumps({"bench": name, **result}, sort_keys=True))
    print(f"{name}: {summary}")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
