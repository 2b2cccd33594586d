"""torchrun jobs against the real stack: one run per job even when nodes disagree about the id,
or have none, and elastic restarts that resume the same run.

Ranks are real processes under real torchrun agents (two agents on one machine stand for two
nodes). torch 2.13 CPU + gloo sometimes aborts a rank at interpreter exit, after which torchrun
SIGTERMs its siblings; so each rank finishes its run before tearing down torch, and the tests
judge by what Redis and the backend stored, not by exit codes.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import protocol as proto
from tests.conftest import Stack
from tests.helpers import wait_until, write_script

from .launch import free_port, rank_env, reap, torchrun

pytest.importorskip("torch.distributed")

RANK = """
import datetime, json, os, sys, warnings
import torch.distributed as dist
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
if os.environ.get("ATTEMPT_STORE"):
    # torch 2.13's env:// reuses torchrun's agent store across restarts without a prefix, so a
    # relaunched gloo group reads the dead attempt's addresses; a prefix per attempt avoids it
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", base),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
else:
    dist.init_process_group("gloo")
import pluto
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    run = pluto.init(project=os.environ["TEST_PROJECT"], name="job")
rank = dist.get_rank()
for step in range(1, 6):
    run.log({f"train/loss/rank{rank}": 1.0 / step + attempt}, step=step)
if attempt == 0 and rank == int(os.environ.get("FAIL_RANK", "-1")):
    run.finish()  # what it logged is in; now fail the way a crashing rank does
    raise SystemExit(3)
dist.barrier()
print("RESULT " + json.dumps({"rank": rank, "id": run.id, "run_id": run.run_id,
                              "resumed": run.resumed, "attempt": attempt,
                              "warnings": [str(w.message) for w in caught]}), flush=True)
run.finish()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown (the gloo exit abort described above)
"""


def _members(r: redis.Redis, stack: Stack, run: int) -> list[dict[str, Any]]:
    return [proto.unpack(v) for v in r.hgetall(stack.keys.members(run)).values()]


def _one_run(stack: Stack, project: str, members: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        runs = stack.backend.runs(project)
        if len(runs) == 1 and len((run := stack.backend.run(runs[0]["id"]))["members"]) >= members:
            return run
        return None
    wait_until(check, 90, f"one run of {project} with {members} members")
    runs = stack.backend.runs(project)
    assert len(runs) == 1, [(x["id"], x["externalId"]) for x in runs]
    return stack.backend.run(runs[0]["id"])


def _completed(stack: Stack, run: int) -> dict[str, Any]:
    return wait_until(lambda: (x := stack.backend.run(run))["status"] == "COMPLETED" and x, 90,
                      f"run {run} COMPLETED")


def _two_nodes(stack: Stack, tmp_path: Path, envs: list[dict[str, str]]) -> list[str]:
    script = write_script(tmp_path, RANK)
    port = free_port()
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = [torchrun(script, env, nproc=2, nnodes=2, node=i, port=port, log=logs[i])
              for i, env in enumerate(envs)]
    reap(agents)
    return [log.read_text() for log in logs]


def test_two_nodes_with_different_run_ids_make_one_run_and_warn(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    project = f"nodes-{uuid.uuid4().hex[:8]}"
    ids = ["training-20261202-063001", "training-20261202-063002"]  # nodes a second apart
    envs = [rank_env(stack, TEST_PROJECT=project, PLUTO_RUN_ID=i) for i in ids]
    outs = _two_nodes(stack, tmp_path, envs)
    run = _one_run(stack, project, 4)
    assert len(run["members"]) == 4, run["members"]
    assert sorted(m["rank"] for m in run["members"]) == [0, 1, 2, 3]
    assert run["externalId"] in ids
    # the node whose id lost warns on each of its ranks, naming both ids
    loser = ids[1] if run["externalId"] == ids[0] else ids[0]
    text = "\n".join(outs)
    assert text.count(f"run id {loser!r} differs from rank 0's {run['externalId']!r}") == 2, text
    nodes = sorted(m["node"] for m in _members(r, stack, run["id"]))
    assert nodes == [0, 0, 1, 1]
    assert _completed(stack, run["id"])
    for rank in range(4):
        assert len(stack.backend.points(run["id"], f"train/loss/rank{rank}")) == 5


def test_two_nodes_without_any_run_id_share_rank_0s(stack: Stack, tmp_path: Path) -> None:
    project = f"noid-{uuid.uuid4().hex[:8]}"
    envs = [rank_env(stack, TEST_PROJECT=project) for _ in range(2)]
    outs = _two_nodes(stack, tmp_path, envs)
    run = _one_run(stack, project, 4)
    assert len(run["members"]) == 4
    assert "differs from rank 0" not in "\n".join(outs)
    assert _completed(stack, run["id"])


def test_elastic_restart_resumes_the_same_run(stack: Stack, r: redis.Redis,
                                              tmp_path: Path) -> None:
    """Rank 1 fails on attempt 0; torchrun (--max-restarts=1) relaunches both ranks, which attach
    to the same run (TORCHELASTIC_RUN_ID of --standalone), and the retry decides the status."""
    project = f"elastic-{uuid.uuid4().hex[:8]}"
    script = write_script(tmp_path, RANK)
    log = tmp_path / "agent.log"
    agent = torchrun(script, rank_env(stack, TEST_PROJECT=project, FAIL_RANK="1",
                                            ATTEMPT_STORE="1"), nproc=2,
                     extra=("--standalone", "--max-restarts=1", "--monitor-interval=0.2"), log=log)
    reap([agent])
    run = _one_run(stack, project, 4)
    members = _members(r, stack, run["id"])
    assert sorted((m["attempt"], m["rank"]) for m in members) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    run = _completed(stack, run["id"])
    by_attempt = {(m["attempt"], m["rank"]): m["state"] for m in members}
    assert by_attempt[(1, 0)] == by_attempt[(1, 1)] == "finished"
    assert "RESULT" in log.read_text()
    resumed = [line for line in log.read_text().splitlines() if '"attempt": 1' in line]
    assert resumed and all('"resumed": true' in line for line in resumed)
    # re-logged steps replace the old values: attempt 1 logged 1/step + 1
    points = stack.backend.points(run["id"], "train/loss/rank0")
    assert [p[1] for p in points] == [1.0 / s + 1 for s in range(1, 6)]
