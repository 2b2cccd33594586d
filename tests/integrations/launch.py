"""Shared pieces of the integration tests: launching torchrun agents as real process trees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pluto import _servers
from tests.conftest import Stack


def torchrun(script: Path, env: dict[str, str], *, nproc: int = 2, nnodes: int = 1,
             node: int = 0, port: int | None = None, extra: tuple[str, ...] = (),
             log: Path | None = None) -> subprocess.Popen[str]:
    """One torchrun agent; with ``nnodes > 1`` it meets the others at the c10d store on
    127.0.0.1:``port``, which agent ``node`` 0 hosts (``is_host`` makes that explicit, since
    every agent on one machine would otherwise claim the loopback endpoint)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--nnodes={nnodes}", *extra]
    if nnodes > 1:
        assert port is not None
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-conf=is_host={1 if node == 0 else 0},join_timeout=60",
                "--local-addr=127.0.0.1"]
    cmd.append(str(script))
    if log is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def reap(procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    """Wait for the agents; kill the process group of one that hangs (only what we started)."""
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            pytest.fail(f"torchrun agent {p.pid} hung for {timeout} s")


def free_port() -> int:
    return _servers.free_port()


def rank_env(stack: Stack, **extra: str) -> dict[str, str]:
    """Env for torchrun and its ranks: the stack's, without any launcher variables of ours."""
    env = stack.env(**extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID"):
        env.pop(name, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
