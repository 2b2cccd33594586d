"""Fixtures for the chaos tests: a Redis of the test's own (stopped, paused, SIGKILLed and
restarted from its append-only file), a backend with the fault-injection hook switched on,
a stack over both, and the session report (/tmp/chaos_report.json).

Everything here is started by the test and ended by its pid; the session Redis and the shared
backend are never touched (tests that need neither stop nor pause use them, under a prefix).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import _servers
from tests.conftest import Backend, Stack

REPORT = Path(os.environ.get("PLUTO_CHAOS_REPORT", "/tmp/chaos_report.json"))


@dataclass
class OwnRedis:
    """A redis-server on a free port with append-only persistence, ``appendfsync always``:
    a write Redis acknowledged is on disk, so a SIGKILL loses nothing acknowledged (with the
    default ``everysec`` it could lose up to a second of acknowledged writes)."""

    port: int
    dir: Path
    child: _servers.Child | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

    def start(self) -> None:
        self.starts += 1
        self.child = _servers.start_redis(self.port, self.dir, appendonly=True,
                                          name=f"redis-{self.starts}")
        c = self.client()
        for _ in range(200):  # loading the AOF answers LOADING for a moment
            try:
                c.config_set("appendfsync", "always")
                break
            except redis.BusyLoadingError:
                import time

                time.sleep(0.05)
        c.close()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(_servers.free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@dataclass
class FaultBackend(Backend):
    """The real backend with ``PLUTO_FAULTS_FILE`` set: :meth:`fault` switches ingest faults."""

    dir: Path = Path()
    faults: Path = Path()
    env: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    def fault(self, spec: str) -> None:
        part = self.faults.with_name(self.faults.name + ".tmp")
        part.write_text(spec)
        os.replace(part, self.faults)  # the backend never reads a half-written spec

    def start(self) -> None:
        self.starts += 1
        self.child = _servers.start_backend(self.url, f"sqlite:///{self.dir / 'pluto.db'}",
                                            self.key, self.dir, self.env,
                                            name=f"backend-{self.starts}")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@pytest.fixture
def fault_backend(tmp_path: Path) -> Iterator[FaultBackend]:
    d = tmp_path / "backend"
    d.mkdir()
    port = _servers.free_port()
    env = dict(os.environ, PLUTO_FAULTS_FILE=str(d / "faults"), PLUTO_MAX_BODY=str(4 << 20))
    b = FaultBackend(f"http://127.0.0.1:{port}", "test-" + secrets.token_hex(8), None, d,
                     d / "faults", env)
    b.fault("")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def chaos_stack(own_redis: OwnRedis, fault_backend: FaultBackend,
                tmp_path: Path) -> Iterator[Stack]:
    """Redis and backend both the test's own (no worker yet)."""
    s = Stack(own_redis.url, "chaos", fault_backend, tmp_path / "logs")
    yield s
    s.stop_workers()


@pytest.fixture(autouse=True)
def _end_leftover_ranks() -> Iterator[None]:
    yield
    from tests.chaos.ranks import end_leftovers

    end_leftovers()


@pytest.fixture(scope="session")
def report() -> Iterator[list[dict[str, Any]]]:
    """Rows of the chaos report; written to /tmp/chaos_report.json at the end of the session."""
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        REPORT.write_text(json.dumps(rows, indent=1))
