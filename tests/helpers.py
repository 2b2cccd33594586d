"""Small helpers the tests share: polling, and running rank scripts as real OS processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

PYTHON = sys.executable


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
    path = tmp / name
    path.write_text(textwrap.dedent(code))
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
