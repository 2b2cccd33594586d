"""Control ops and run lifecycle against a real Redis, a real backend and a worker process."""

from __future__ import annotations

import json
from typing import Any

import redis

from pluto import protocol as P
from pluto.protocol import Keys
from tests.conftest import Stack
from tests.helpers import wait_until
from tests.worker.conftest import (
    attach,
    beat,
    create,
    entry,
    finish,
    in_process_worker,
    produce,
    request_create,
    run_id_of,
    spin,
)


def status(stack: Stack, run: int) -> str:
    return str(stack.backend.run(run)["status"])


def test_create_sets_run_key_and_duplicates_are_harmless(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    first = request_create(r, keys, project, "exp-1", name="first", config={"lr": 0.1},
                           tags=["a"])
    run = int(wait_until(lambda: run_id_of(r, keys, project, "exp-1"), 20, "run id"))
    assert r.get(keys.created(first)) == b"0"
    assert r.sismember(keys.runs, str(run))
    assert any(g["name"] == b"workers" for g in r.xinfo_groups(keys.metrics(run)))

    again = request_create(r, keys, project, "exp-1", name="second")  # a replayed request
    wait_until(lambda: r.get(keys.created(again)), 20, "answer to the duplicate create")
    assert r.get(keys.created(again)) == b"1"
    assert run_id_of(r, keys, project, "exp-1") == run
    runs = stack.backend.runs(project)
    assert [x["id"] for x in runs] == [run]
    assert runs[0]["name"] == "first" and runs[0]["config"] == {"lr": 0.1}


def test_config_op_merges(stack: Stack, project: str, r: redis.Redis, keys: Keys) -> None:
    run = create(r, keys, project, "cfg", config={"a": 1})
    r.xadd(keys.control, P.control_config(run, {"b": {"c": 2}}))
    wait_until(lambda: stack.backend.run(run)["config"] == {"a": 1, "b": {"c": 2}}, 20,
               "merged config")


def test_all_members_finished_completes_the_run(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    run = create(r, keys, project, "done")
    attach(r, keys, run, "h:1", rank=0)
    attach(r, keys, run, "h:2", rank=1)
    produce(r, keys, run, (entry(s, {"loss": 1.0 / s}, rank=0) for s in range(1, 2001)))
    finish(r, keys, run, "h:1")
    wait_until(lambda: {m["member"]: m["state"] for m in stack.backend.run(run)["members"]}
               == {"h:1": "finished", "h:2": "running"}, 20, "member states")
    assert status(stack, run) == "RUNNING"
    finish(r, keys, run, "h:2")
    wait_until(lambda: status(stack, run) == "COMPLETED", 20, "COMPLETED")
    assert len(stack.backend.points(run, "loss")) == 2000  # completion waited for the drain
    assert not r.sismember(keys.runs, str(run))


def test_a_failed_member_fails_the_run(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    run = create(r, keys, project, "boom")
    attach(r, keys, run, "h:1", rank=0)
    attach(r, keys, run, "h:2", rank=1)
    finish(r, keys, run, "h:1", "failed")
    finish(r, keys, run, "h:2", "finished")
    wait_until(lambda: status(stack, run) == "FAILED", 20, "FAILED")


def test_terminated_member_terminates_the_run(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    run = create(r, keys, project, "ctrl-c")
    attach(r, keys, run, "h:1")
    finish(r, keys, run, "h:1", "terminated")
    wait_until(lambda: status(stack, run) == "TERMINATED", 20, "TERMINATED")


def test_stale_heartbeat_fails_the_member_and_the_run(
    bare_stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    bare_stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="2")
    run = create(r, keys, project, "lost")
    attach(r, keys, run, "alive:1", rank=0)
    attach(r, keys, run, "gone:2", rank=1)
    # alive:1 keeps beating; gone:2 stops (its process was SIGKILLed, say).
    wait_until(lambda: beat(r, keys, run, "alive:1") or
               P.unpack(r.hget(keys.members(run), "gone:2"))["state"] == "failed",
               20, "gone:2 marked failed")
    assert P.unpack(r.hget(keys.members(run), "gone:2"))["reason"] == "heartbeat lost"
    assert status(bare_stack, run) == "RUNNING"  # alive:1 is still running
    finish(r, keys, run, "alive:1")
    wait_until(lambda: status(bare_stack, run) == "FAILED", 20, "FAILED")
    members = {m["member"]: m["state"] for m in bare_stack.backend.run(run)["members"]}
    assert members == {"alive:1": "finished", "gone:2": "failed"}
    assert "gone:2" in bare_stack.worker_logs() and "heartbeat lost" in bare_stack.worker_logs()


def test_reattach_after_completion_runs_again(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    run = create(r, keys, project, "again")
    attach(r, keys, run, "h:1")
    finish(r, keys, run, "h:1")
    wait_until(lambda: status(stack, run) == "COMPLETED", 20, "COMPLETED")
    attach(r, keys, run, "h:7")  # a restart under the same run id
    wait_until(lambda: status(stack, run) == "RUNNING", 20, "RUNNING again")
    assert r.sismember(keys.runs, str(run))
    produce(r, keys, run, [entry(1, {"x": 1})])
    finish(r, keys, run, "h:7")
    wait_until(lambda: status(stack, run) == "COMPLETED", 20, "COMPLETED again")
    assert stack.backend.points(run, "x") == [[1, 1, 1764000000001]]


def test_unknown_control_messages_are_dropped(
    stack: Stack, project: str, r: redis.Redis, keys: Keys
) -> None:
    r.xadd(keys.control, {"op": "explode"})
    r.xadd(keys.control, {"op": "attach", "id": "not-a-number"})
    run = create(r, keys, project, "after-junk")  # served even though junk came first
    assert stack.backend.run(run)["status"] == "RUNNING"
    wait_until(lambda: r.xpending(keys.control, "workers")["pending"] == 0, 10, "junk acked")
    reasons = [f[b"reason"].decode() for _, f in r.xrange(keys.control_dead)]
    assert len(reasons) == 2 and "unknown control op" in reasons[0], reasons
    assert "attach without member" in reasons[1], reasons
    assert "unknown control op" in stack.worker_logs()
    json.dumps(stack.backend.run(run))


def test_a_run_that_came_and_went_between_two_log_rounds_is_still_shipped(
        redis_url: str, prefix: str, backend: Any, r: redis.Redis, keys: Keys) -> None:
    """The log thread samples the active runs every 0.2 s; a rank that lives less than that
    (init, a print, finish) completes in between, and its console lines must still go."""
    w = in_process_worker(redis_url, prefix, backend)
    try:
        r.sadd(keys.runs, 41, 42)
        w._refresh_runs()
        r.srem(keys.runs, 41)
        w._refresh_runs()
        assert w.runs == [42]
        assert sorted(w._runs_for_logs()) == [41, 42, 42]  # joined since: 41 and 42
        assert w._runs_for_logs() == [42]  # each joined run is handed over once
    finally:
        w.close()


def test_a_check_between_reattach_and_its_status_update_leaves_the_run_completed(
        redis_url: str, prefix: str, backend: Any, r: redis.Redis, keys: Keys) -> None:
    """A run that completed is re-attached by a short process, which finishes before the
    next check: that check (here, forced at the worst moment: right after the attach made the
    run active again) completes the run, and nothing written by the attach may undo it (CI:
    a restarted rank's run stayed RUNNING, out of the active set, for good)."""
    w = in_process_worker(redis_url, prefix, backend)
    try:
        request_create(r, keys, f"proj-{prefix}", "reattach-race")
        run = int(spin(w, lambda: run_id_of(r, keys, f"proj-{prefix}", "reattach-race"),
                       what="the run created"))
        attach(r, keys, run, "h:1")
        finish(r, keys, run, "h:1")
        spin(w, lambda: backend.run(run)["status"] == "COMPLETED", what="COMPLETED")
        control = w.control.control
        activate = control.activate

        def activate_then_check(run_: int) -> None:
            activate(run_)
            if run_ == run:  # the process finishes, and a check runs, right now
                finish(r, keys, run, "h:7")
                w.watcher.check([run])

        control.activate = activate_then_check
        attach(r, keys, run, "h:7")
        spin(w, lambda: not r.sismember(keys.runs, str(run))
             and backend.run(run)["members"] and len(backend.run(run)["members"]) == 2
             and all(m["state"] == "finished" for m in backend.run(run)["members"]),
             what="the re-attached member applied and finished")
        for _ in range(20):  # nothing left to come: the run stays COMPLETED
            w.run_once(block_ms=10)
        assert backend.run(run)["status"] == "COMPLETED"
        assert not r.sismember(keys.runs, str(run))
    finally:
        w.close()
