"""Small helpers the tests share: polling, running rank scripts as real OS processes, and a
``pluto up`` of a test's own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pluto import _servers

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def write_script(tmp: Path, code: str, name: str = "rank.py") -> Path:
    """Write a rank script atomically: tests start rank after rank with the same file, and a
    rank whose interpreter opened it mid-rewrite (truncated, not yet written) would run an
    empty script and exit 0 having done nothing (seen in CI: a rank with no result, exit 0)."""
    path = tmp / name
    text = textwrap.dedent(code)
    if path.exists() and path.read_text() == text:
        return path
    part = path.with_name(f".{name}.{os.getpid()}.tmp")
    part.write_text(text)
    os.replace(part, path)
    return path


_started: list[subprocess.Popen[str]] = []


def start_rank(script: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([PYTHON, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _started.append(proc)
    return proc


def reap_ranks() -> None:
    """Kill and reap the ranks a test started and left running (it failed half-way): otherwise
    their pipes are closed by the garbage collector during some later test, which then fails
    on the ResourceWarning."""
    while _started:
        proc = _started.pop()
        if proc.returncode is None and proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish_rank(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"rank {proc.pid} hung for {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def json_lines(out: str) -> list[dict[str, Any]]:
    """Rank scripts print one JSON object per line (prefixed RESULT) for the test to read."""
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]


def up_env(tmp_path: Path, userinfo: str = "", **extra: str) -> dict[str, str]:
    """The environment of a ``pluto up`` of a test's own: free ports, its own home, database and
    prefix, no ``PLUTO_``/``MLOP_`` variable of the caller's; ``userinfo`` goes into the Redis URL."""
    redis_port, api_port = _servers.free_port(), _servers.free_port()
    home = tmp_path / "home"
    at = f"{userinfo}@" if userinfo else ""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLUTO_", "MLOP_"))}
    env.update(PLUTO_REDIS_URL=f"redis://{at}127.0.0.1:{redis_port}/0",
               PLUTO_API_URL=f"http://127.0.0.1:{api_port}", PLUTO_HOME=str(home),
               PLUTO_DB_URL=f"sqlite:///{home / 'db.sqlite'}", PYTHONPATH=str(ROOT),
               PLUTO_PREFIX=f"up{uuid.uuid4().hex[:6]}", PLUTO_INIT_TIMEOUT="60", **extra)
    return env


class PlutoUp:
    """``pluto up`` as a child process of the test; a thread collects what it prints, so the
    test can wait for a line while up keeps running. ``with`` stops it with Ctrl-C (SIGINT)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.redis_port, self.api_port = (urlsplit(env[name]).port or 0
                                          for name in ("PLUTO_REDIS_URL", "PLUTO_API_URL"))
        self.proc = subprocess.Popen([PYTHON, "-m", "pluto._cli", "up"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or []),
                                        daemon=True)
        self._reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 60) -> str:
        """Until up says ``ready`` (or exits: then the test fails with what it printed)."""
        wait_until(lambda: "ready" in self.text() or self.proc.poll() is not None, timeout,
                   "pluto up ready")
        assert "ready" in self.text(), self.text()
        return self.text()

    def stop(self) -> int:
        """Ctrl-C, then its exit code once it and its children are gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> PlutoUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prometheus_samples(url: str) -> list[Any]:
    return [sample for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
            for sample in family.samples]


def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples by ``name{label=value,...}`` (labels sorted), each as it is."""
    out: dict[str, float] = {}
    for sample in prometheus_samples(url):
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
