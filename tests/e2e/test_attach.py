"""Ranks attach to one run: creator election, resume, id precedence, name and config rules.

Every rank is a real OS process running the SDK against the real Redis, worker and backend.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import Stack
from tests.helpers import PYTHON, finish_rank, json_lines, start_rank, wait_until, write_script

RACER = """
import json, sys, warnings, redis, pluto
rounds, ready_key, go_key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
r = redis.Redis.from_url(__import__("os").environ["PLUTO_REDIS_URL"])
for n in range(rounds):
    r.incr(f"{ready_key}:{n}")
    r.blpop([f"{go_key}:{n}"], timeout=60)
    run = pluto.init(project="race", run_id=f"{sys.argv[4]}-{n}", name="racer")
    print("RESULT " + json.dumps({"round": n, "id": run.id, "resumed": run.resumed}), flush=True)
    run.finish()
"""


def _release(r: redis.Redis, ready_key: str, go_key: str, n: int, count: int) -> None:
    """Let ``count`` waiting processes call init at the same moment."""
    wait_until(lambda: int(r.get(f"{ready_key}:{n}") or 0) >= count, 60, f"{count} racers ready")
    r.rpush(f"{go_key}:{n}", *range(count))


def test_16_processes_race_20_times_one_creator_one_run(stack: Stack, r: redis.Redis,
                                                        tmp_path: Path) -> None:
    procs_n, rounds = 16, 20
    script = write_script(tmp_path, RACER)
    base = f"race-{uuid.uuid4().hex[:8]}"
    ready, go = f"{stack.prefix}:test:ready", f"{stack.prefix}:test:go"
    procs = [start_rank(script, stack.env(), str(rounds), ready, go, base) for _ in range(procs_n)]
    for n in range(rounds):
        _release(r, ready, go, n, procs_n)
    results = []
    for p in procs:
        code, out, err = finish_rank(p, 120)
        assert code == 0, err
        results += json_lines(out)
    assert len(results) == procs_n * rounds
    runs = {run["externalId"]: run for run in stack.backend.runs("race")
            if run["externalId"].startswith(base)}
    for n in range(rounds):
        got = [x for x in results if x["round"] == n]
        assert sum(not x["resumed"] for x in got) == 1, got
        assert len({x["id"] for x in got}) == 1
        assert runs[f"{base}-{n}"]["id"] == got[0]["id"]
    assert len(runs) == rounds  # exactly one backend run per run id


ATTACH = """
import json, os, sys, warnings, pluto
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    kwargs = json.loads(sys.argv[1])
    run = pluto.init(**kwargs)
run.finish()
print("RESULT " + json.dumps({"id": run.id, "run_id": run.run_id, "resumed": run.resumed,
      "name": run.name, "warnings": [str(w.message) for w in caught]}), flush=True)
"""


def _attach(stack: Stack, tmp: Path, n: int = 1, env: dict[str, str] | None = None,
            **kwargs: object) -> list[dict[str, object]]:
    import json

    script = write_script(tmp, ATTACH, "attach.py")
    procs = [start_rank(script, stack.env(**(env or {})), json.dumps(kwargs)) for _ in range(n)]
    out: list[dict[str, object]] = []
    for p in procs:
        code, stdout, err = finish_rank(p)
        assert code == 0, err
        out += json_lines(stdout)
    return out


def test_second_job_with_same_run_id_resumes(stack: Stack, tmp_path: Path) -> None:
    run_id = f"again-{uuid.uuid4().hex[:6]}"
    first = _attach(stack, tmp_path, 4, project="jobs", run_id=run_id)
    second = _attach(stack, tmp_path, 4, project="jobs", run_id=run_id)
    assert sum(not x["resumed"] for x in first) == 1
    assert all(x["resumed"] for x in second)
    assert {x["id"] for x in first} == {x["id"] for x in second} and len({x["id"] for x in first}) == 1
    assert len([x for x in stack.backend.runs("jobs") if x["externalId"] == run_id]) == 1


def test_the_worker_announces_each_answer_to_the_waiting_ranks(stack: Stack, r: redis.Redis,
                                                              tmp_path: Path) -> None:
    """Waiting ranks block on the announce stream; the worker appends the id right after the
    run key holds it (and the entry expires with the answer)."""
    run_id = f"announce-{uuid.uuid4().hex[:6]}"
    results = _attach(stack, tmp_path, 3, project="jobs", run_id=run_id, name="shared")
    key = stack.keys.announce("jobs", run_id)
    entries = r.xrange(key)
    want = {b"id": str(results[0]["id"]).encode(), b"name": b"shared"}  # a new run's name too
    assert [fields for _, fields in entries] == [want]
    assert [x["name"] for x in results] == ["shared"] * 3
    assert 0 < r.ttl(key) <= 3600
    again = _attach(stack, tmp_path, project="jobs", run_id=run_id)  # exists: nothing announced
    assert again[0]["resumed"] and again[0]["name"] == "shared"


def test_resume_survives_an_expired_run_key(stack: Stack, tmp_path: Path) -> None:
    """Even when Redis forgot the run, the backend's idempotent create gives back the same id."""
    run_id = f"forgot-{uuid.uuid4().hex[:6]}"
    [first] = _attach(stack, tmp_path, project="jobs", run_id=run_id)
    redis.Redis.from_url(stack.redis_url).delete(stack.keys.run("jobs", run_id))
    [second] = _attach(stack, tmp_path, project="jobs", run_id=run_id)
    assert not first["resumed"] and second["resumed"] and first["id"] == second["id"]


def test_run_id_precedence(stack: Stack, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    both = {"PLUTO_RUN_ID": f"pluto-{tag}", "MLOP_RUN_ID": f"mlop-{tag}"}
    [arg] = _attach(stack, tmp_path, env=both, project="prec", run_id=f"arg-{tag}")
    [env_pluto] = _attach(stack, tmp_path, env=both, project="prec")
    [env_mlop] = _attach(stack, tmp_path, env={"MLOP_RUN_ID": f"mlop-{tag}"}, project="prec")
    assert (arg["run_id"], env_pluto["run_id"], env_mlop["run_id"]) == (
        f"arg-{tag}", f"pluto-{tag}", f"mlop-{tag}")
    fresh = _attach(stack, tmp_path, 3, project="prec")
    assert len({x["id"] for x in fresh}) == 3 and not any(x["resumed"] for x in fresh)
    stored = {x["externalId"] for x in stack.backend.runs("prec")}
    assert {f"arg-{tag}", f"pluto-{tag}", f"mlop-{tag}"} <= stored


def test_resume_ignores_name_with_one_warning(stack: Stack, tmp_path: Path) -> None:
    run_id = f"named-{uuid.uuid4().hex[:6]}"
    [creator] = _attach(stack, tmp_path, project="names", run_id=run_id, name="original")
    [joiner] = _attach(stack, tmp_path, project="names", run_id=run_id, name="other")
    assert not creator["warnings"]
    assert len(joiner["warnings"]) == 1 and "ignored name='other'" in joiner["warnings"][0]
    assert stack.backend.run(int(creator["id"]))["name"] == "original"
    assert joiner["name"] == creator["name"] == "original"  # the run's real name, not its own
    [quiet] = _attach(stack, tmp_path, project="names", run_id=run_id)  # no name: no warning
    assert quiet["name"] == "original" and not quiet["warnings"]


CONFIG_RANK = """
import json, os, sys, pluto
rank = int(os.environ["RANK"])
config = {"lr": 0.001, "layers": 12, "nested": {"a": 1}} if rank == 0 else None
run = pluto.init(project="cfg", run_id=sys.argv[1], config=config)
run.finish()
print("RESULT " + json.dumps({"rank": rank, "id": run.id, "resumed": run.resumed}), flush=True)
"""


def test_rank0_config_lands_even_when_started_last(stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, CONFIG_RANK, "cfg.py")
    late = write_script(tmp_path, CONFIG_RANK.replace("if rank == 0 else None",
                                                      'if rank == 0 else {"late": True}'), "late.py")
    run_id = f"cfg-{uuid.uuid4().hex[:6]}"
    others = [start_rank(script, stack.env(RANK=str(k)), run_id) for k in (1, 2, 3)]
    results = []
    for p in others:
        code, out, err = finish_rank(p)
        assert code == 0, err
        results += json_lines(out)
    code, out, err = finish_rank(start_rank(script, stack.env(RANK="0"), run_id))
    assert code == 0, err
    [rank0] = json_lines(out)
    assert rank0["resumed"]  # another rank won the race
    expected = {"lr": 0.001, "layers": 12, "nested": {"a": 1}}
    wait_until(lambda: stack.backend.run(rank0["id"])["config"] == expected, 20, "rank 0's config")
    # A later rank's config is merged in: it adds, and clears nothing it does not name.
    code, _, err = finish_rank(start_rank(late, stack.env(RANK="5"), run_id))
    assert code == 0, err
    merged = {**expected, "late": True}
    wait_until(lambda: stack.backend.run(rank0["id"])["config"] == merged, 20, "merged config")


DEAD_CREATOR = """
import os, signal, sys, redis
r = redis.Redis.from_url(os.environ["PLUTO_REDIS_URL"])
assert r.set(sys.argv[1], "pending:deadbeef", nx=True, px=int(float(sys.argv[2]) * 1000))
os.kill(os.getpid(), signal.SIGKILL)  # won SET NX, died before sending the create request
"""


def test_creator_killed_after_set_nx_another_takes_over(stack: Stack, tmp_path: Path) -> None:
    lease = 2.0
    run_id = f"orphan-{uuid.uuid4().hex[:6]}"
    dead = subprocess.run([PYTHON, str(write_script(tmp_path, DEAD_CREATOR, "dead.py")),
                           stack.keys.run("orph", run_id), str(lease)], env=stack.env())
    assert dead.returncode == -signal.SIGKILL
    start = time.monotonic()
    results = _attach(stack, tmp_path, 4, env={"PLUTO_LEASE": str(lease)}, project="orph",
                      run_id=run_id)
    assert time.monotonic() - start < lease + 15  # process start-up included; nobody hangs
    assert sum(not x["resumed"] for x in results) == 1
    assert len({x["id"] for x in results}) == 1
    assert len([x for x in stack.backend.runs("orph") if x["externalId"] == run_id]) == 1


@pytest.mark.parametrize("run_id", ["with space", "a:b:c", "{curly}", "100%", "ünïcødé-ラン", "x" * 500])
def test_odd_run_ids_round_trip(stack: Stack, tmp_path: Path, run_id: str) -> None:
    results = _attach(stack, tmp_path, 2, project="odd ids", run_id=run_id)
    assert len({x["id"] for x in results}) == 1 and sum(not x["resumed"] for x in results) == 1
    stored = [x for x in stack.backend.runs("odd ids") if x["externalId"] == run_id]
    assert len(stored) == 1


def test_a_refused_create_is_reported_to_the_waiting_creator(stack: Stack, r: redis.Redis) -> None:
    """The backend refuses a create (here: tags that are not strings): init must not time out."""
    from pluto import protocol as proto

    token = uuid.uuid4().hex
    msg = proto.control_create("refused", "r1", "n", None, None, token)
    msg["tags"] = proto.pack([1, 2])
    r.xadd(stack.keys.control, msg)  # type: ignore[arg-type]
    answer = wait_until(lambda: r.get(stack.keys.created(token)), 20, "the worker's answer")
    assert answer.startswith(b"error:") and b"tags" in answer
    announced = r.xrange(stack.keys.announce("refused", "r1"))
    assert [fields for _, fields in announced] == [{b"id": b""}]  # wakes the creator to read it
