"""Fixtures of the security tests: certificates, and a backend whose settings the test picks."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pluto import _servers
from tests.conftest import Backend

from .certs import Certs, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
    env.update(extra)
    return env


@pytest.fixture
def make_backend(tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    """``make_backend(scheme="http", **env)``: a backend of this test's own with extra env."""
    started: list[_servers.Child] = []

    def make(scheme: str = "http", **env: str) -> Backend:
        port = _servers.free_port()
        url = f"{scheme}://127.0.0.1:{port}"
        key = "boot-" + secrets.token_hex(8)
        home = tmp_path / f"backend{len(started)}"
        home.mkdir()
        child = _servers.start_backend(url, f"sqlite:///{home / 'pluto.db'}", key, home,
                                       env=clean_env(**env), name="backend")
        started.append(child)
        return Backend(url, key, child)

    yield make
    for child in started:
        child.stop()
