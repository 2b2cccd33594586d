"""Ranks, node and attempt from every launcher's variables; the job id each launcher shares; and
rank 0's run id across a real process group when rank 0 never calls ``init``."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pluto import Settings
from pluto._agree import agree_run_id
from pluto._launch import job_run_id, launch_fields
from pluto.errors import ConfigError
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, write_script

from .launch import free_port


@pytest.mark.parametrize(("env", "want"), [
    ({}, (0, 0, 0, 0)),
    ({"RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "2", "TORCHELASTIC_RESTART_COUNT": "1"},
     (5, 1, 2, 1)),
    ({"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NODEID": "1"}, (7, 3, 1, 0)),
    ({"SLURM_PROCID": "7", "RANK": "2", "LOCAL_RANK": "0"}, (2, 0, 0, 0)),  # torchrun in srun
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, (4, 0, 0, 0)),
    ({"PMI_RANK": "9", "MPI_LOCALRANKID": "1"}, (9, 1, 0, 0)),
    ({"SLURM_PROCID": "1", "SLURM_RESTART_COUNT": "2"}, (1, 0, 0, 2)),
])
def test_ranks_from_every_launcher(env: dict[str, str], want: tuple[int, ...]) -> None:
    got = launch_fields(env)
    assert (got["rank"], got["local_rank"], got["node"], got["attempt"]) == want
    s = Settings.from_env(env)
    assert (s.rank, s.local_rank, s.node, s.attempt) == want


@pytest.mark.parametrize("env", [{"RANK": "zero"}, {"SLURM_PROCID": "-1"}, {"PMI_RANK": "1.5"}])
def test_a_bad_launcher_variable_is_one_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        launch_fields(env)


def test_job_ids_each_launcher_shares() -> None:
    assert job_run_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert job_run_id({"TORCHELASTIC_RUN_ID": "abc", "SLURM_JOB_ID": "12"}) == "abc"
    assert job_run_id({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "12"}) == "12"
    assert job_run_id({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0"}) == "12.0"
    # without a process group: the given id, else the job id, else a fresh one
    s = Settings.from_env({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"})
    assert agree_run_id("mine", "p", s) == "mine"
    assert agree_run_id(None, "p", s) == "77.3"
    fresh = agree_run_id(None, "p", Settings.from_env({"TORCHELASTIC_RUN_ID": "none"}))
    assert len(fresh) == 32 and fresh != agree_run_id(None, "p", Settings.from_env({}))
    bad = Settings.from_env({"TORCHELASTIC_RUN_ID": "x\x00y"})
    assert agree_run_id(None, "p", bad) != "x\x00y"


def test_import_pluto_never_imports_torch(tmp_path: Path, stack: Stack) -> None:
    script = write_script(tmp_path, """
        import json, sys, pluto
        run = pluto.init(project="notorch", run_id="notorch-1")
        run.finish()
        print("RESULT " + json.dumps({"torch": "torch" in sys.modules}))
    """)
    code, out, err = finish_rank(start_rank(script, stack.env()))
    assert code == 0, err
    assert json_lines(out) == [{"torch": False}]


LONELY = """
import datetime, json, os, sys, warnings
import torch.distributed as dist
rank = int(sys.argv[1])
store = dist.TCPStore("127.0.0.1", int(os.environ["TEST_PORT"]), 2, is_master=rank == 0,
                      timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
import pluto
out = {"rank": rank}
if rank == 1:   # rank 0 never calls pluto.init
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = pluto.init(project=os.environ["TEST_PROJECT"])
            out["run_id"] = run.run_id
            run.finish()
        except pluto.InitTimeout as exc:
            out["error"] = str(exc)
    out["warnings"] = [str(w.message) for w in caught]
dist.barrier()
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
os._exit(0)
"""


@pytest.mark.parametrize("own_id", [None, "rank1-own"])
def test_rank_0_that_never_calls_init_blocks_others_only_init_timeout(
        stack: Stack, tmp_path: Path, own_id: str | None) -> None:
    pytest.importorskip("torch.distributed")
    script = write_script(tmp_path, LONELY)
    extra = {"PLUTO_RUN_ID": own_id} if own_id else {}
    env = stack.env(TEST_PORT=str(free_port()), TEST_PROJECT=f"lonely-{uuid.uuid4().hex[:6]}",
                    PLUTO_INIT_TIMEOUT="1", OMP_NUM_THREADS="1", **extra)
    procs = [start_rank(script, env, str(rank)) for rank in (0, 1)]
    results = {}
    for p in procs:
        _, out, err = finish_rank(p, 90)
        for line in json_lines(out):
            results[line["rank"]] = line
    assert set(results) == {0, 1}, err
    one = results[1]
    if own_id is None:
        assert "rank 0 published no run id within PLUTO_INIT_TIMEOUT=1 s" in one["error"]
    else:
        assert one["run_id"] == own_id
        assert any("uses its own 'rank1-own'" in w for w in one["warnings"]), one
