"""The `pluto` command: `up` starts a whole single-machine stack, `runs` and `tail` read it back."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import httpx

from pluto import _servers
from pluto.protocol import Keys
from tests.conftest import ROOT
from tests.helpers import PYTHON, PlutoUp, finish_rank, json_lines, start_rank, up_env, wait_until


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "pluto._cli", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_pluto_up_embedded_redis_then_runs_and_tail(tmp_path: Path) -> None:
    env = up_env(tmp_path)
    with PlutoUp(env) as up:
        text = up.wait_ready()
        assert "started an embedded Redis" in text, text
        key = (tmp_path / "home" / "api_key").read_text().strip()
        assert key and oct((tmp_path / "home" / "api_key").stat().st_mode)[-3:] == "600"

        run_id = f"up-{uuid.uuid4().hex[:6]}"
        script = ROOT / "examples" / "train.py"
        procs = [start_rank(script, {**env, "PLUTO_RUN_ID": run_id, "RANK": str(r),
                                     "WORLD_SIZE": "2", "DEMO_STEPS": "50"}) for r in range(2)]
        results = []
        for p in procs:
            code, out, err = finish_rank(p)
            assert code == 0, err
            results += json_lines(out)
        run = results[0]["id"]
        headers = {"Authorization": f"Bearer {key}"}
        wait_until(lambda: httpx.get(f"{env['PLUTO_API_URL']}/api/runs/{run}", headers=headers)
                   .json()["status"] == "COMPLETED", 30, "COMPLETED")

        listed = _cli("runs", "--project", "demo", env=env)
        assert listed.returncode == 0 and run_id in listed.stdout and "COMPLETED" in listed.stdout
        shown = _cli("runs", str(run), env=env)
        assert shown.returncode == 0 and '"train/loss/rank1": 50' in shown.stdout, shown.stdout
        tail = _cli("tail", run_id, "--project", "demo", "--all", "--once", env=env)
        assert tail.returncode == 0, tail.stderr
        assert Keys(env["PLUTO_PREFIX"]).metrics(run) in tail.stdout
        assert tail.stdout.count("train/loss/rank0=") == 50
    assert up.proc.returncode == 0 and "stopped" in up.text(), up.text()
    assert not _servers.port_open("127.0.0.1", up.redis_port)  # the embedded Redis is gone too
    assert not _servers.port_open("127.0.0.1", up.api_port)


def test_runs_without_a_key_says_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUTO_")}
    env.update(PLUTO_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    out = _cli("runs", env=env)
    assert out.returncode == 1 and "PLUTO_API_KEY" in out.stderr


def test_every_command_has_help() -> None:
    for command in ("worker", "server", "up", "tail", "runs"):
        out = subprocess.run([PYTHON, "-m", "pluto._cli", command, "--help"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0 and "usage: pluto" in out.stdout
