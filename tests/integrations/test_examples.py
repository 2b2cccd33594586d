"""The examples run as documented (few steps) and land as one run each in the backend."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Stack
from tests.helpers import wait_until

from .launch import rank_env, reap, torchrun

pytestmark = pytest.mark.frameworks


def _one_run(stack: Stack, project: str, members: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        runs = stack.backend.runs(project)
        if len(runs) == 1:
            run = stack.backend.run(runs[0]["id"])
            if len(run["members"]) == members and run["status"] == "COMPLETED":
                return run
        return None
    return wait_until(check, 90, f"one COMPLETED run of {project} with {members} members")


def test_ddp_train_under_torchrun(stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    project = f"ex-ddp-{uuid.uuid4().hex[:6]}"
    env = rank_env(stack, PLUTO_PROJECT=project, DEMO_STEPS="5")
    reap([torchrun(ROOT / "examples" / "ddp_train.py", env, nproc=2, extra=("--standalone",),
                   log=tmp_path / "agent.log")])
    run = _one_run(stack, project, 2)
    assert run["config"]["backend"] == "gloo" and run["config"]["world_size"] == 2
    for rank in (0, 1):
        assert len(stack.backend.points(run["id"], f"train/loss/rank{rank}")) == 5


def test_two_nodes_script(stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed")
    project = f"ex-2n-{uuid.uuid4().hex[:6]}"
    env = rank_env(stack, PLUTO_PROJECT=project, DEMO_STEPS="3", PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "two_nodes.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = proc.communicate(timeout=170)
    run = _one_run(stack, project, 4)
    assert run["externalId"].startswith("training-")
    assert out.count("differs from rank 0's") == 2, out[-3000:]


@pytest.mark.parametrize(("script", "module", "metric"), [
    ("lightning_train.py", "lightning", "train_loss/rank0"),
    ("transformers_train.py", "transformers", "train/loss/rank0"),
])
def test_framework_example(stack: Stack, script: str, module: str, metric: str) -> None:
    pytest.importorskip(module)
    project = f"ex-{module}-{uuid.uuid4().hex[:6]}"
    env = rank_env(stack, PLUTO_PROJECT=project)
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], env=env,
                          capture_output=True, text=True, timeout=170, cwd=os.fspath(ROOT),
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _one_run(stack, project, 1)
    assert len(stack.backend.points(run["id"], metric)) >= 5
