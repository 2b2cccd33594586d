"""The poison suite (issue 14): against a real Redis, TWO workers and the backend, every
kind of bad item is injected while a healthy run logs from 2 real rank processes.

The healthy run stores every point; no worker exits (nor restarts); each bad item is
dead-lettered with a reason, or reported and worked around. Cases are grouped so that one
pair of ranks logs through a whole group: values, keys of the wrong type, backend failures,
and Redis's own busy replies.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from pluto import protocol as K
from pluto import protocol as P
from tests.chaos import ranks
from tests.chaos.conftest import FaultBackend, OwnRedis
from tests.conftest import Backend, Stack
from tests.helpers import wait_until
from tests.worker.conftest import (
    FaultProxy,
    attach,
    create,
    dead_letters,
    entry,
    pending,
    produce,
)

RANKS = 2


class Healthy:
    """Two ranks logging one run through a stack of two workers."""

    def __init__(self, stack: Stack, r: redis.Redis, tmp: Path) -> None:
        self.stack, self.r = stack, r
        for _ in range(2):
            stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="60", PLUTO_CLAIM_IDLE_MS="3000")
        run_id = f"healthy-{uuid.uuid4().hex[:6]}"
        self.stop = tmp / "stop"
        self.procs = [ranks.start(stack, tmp, k, run_id=run_id, stop_file=str(self.stop),
                                  chunk=5, pace=0.02) for k in range(RANKS)]
        self.run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id)))
                                  and v.isdigit() and v, 30, "the healthy run's id"))
        wait_until(lambda: all(ranks.points(stack.backend, self.run, k) for k in range(RANKS)),
                   30, "both healthy ranks stored")

    def stored(self) -> int:
        return ranks.stored_count(self.stack.backend, self.run, range(RANKS))

    def flowing(self, what: str) -> None:
        """The healthy run gains points right now (while the poison sits there)."""
        before = self.stored()
        wait_until(lambda: self.stored() > before + 10, 20, f"the healthy run flowing {what}")

    def finish(self, exact: bool = True) -> list[dict[str, Any]]:
        """Every point stored (``exact``: steps 1..last each once), workers never exited."""
        got = ranks.stop_ranks(self.stack.backend, self.run, self.procs, self.stop)
        if exact:
            assert all(x["lost"] == 0 for x in got), got
            ranks.check_ranks(self.stack.backend, self.run, got)
        else:  # Redis refused some XADDs: the SDK counted each one it could not deliver
            for x in got:
                steps = [p[0] for p in ranks.points(self.stack.backend, self.run, x["rank"])]
                assert len(steps) == len(set(steps)) == x["logged"] - x["lost"], x
        wait_until(lambda: self.stack.backend.run(self.run)["status"] == "COMPLETED", 30,
                   "the healthy run COMPLETED")
        self.workers_alive()
        return got

    def workers_alive(self) -> None:
        assert all(w.alive() for w in self.stack.workers)
        assert all(w.log().count("starting") == 1 for w in self.stack.workers)


def _id_order(entry_id: bytes) -> tuple[int, ...]:
    return tuple(map(int, entry_id.split(b"-")))


@pytest.fixture
def stack(own_redis: OwnRedis, fault_backend: FaultBackend, tmp_path: Path) -> Any:
    s = Stack(own_redis.url, "chaos", fault_backend, tmp_path / "logs")
    yield s
    s.stop_workers()


def test_poison_values_and_control_entries(stack: Stack, own_redis: OwnRedis,
                                           tmp_path: Path) -> None:
    r = own_redis.client()
    h = Healthy(stack, r, tmp_path)
    keys, run = stack.keys, h.run
    victim = create(r, keys, "poison", "victim")
    attach(r, keys, victim, "h:1")
    # hashes of the healthy run itself and of another run
    r.hset(keys.members(run), "evil", b"\xc1\xc1 not msgpack")
    r.hset(keys.members(run), "list", P.pack([1, 2, 3]))
    r.hset(keys.heartbeats(victim), "h:1", "abc")
    junk = [{"op": "attach", "id": str(victim), "member": "h:2", "info": P.pack([1])},
            {"op": "finish", "id": "99999999999999999999", "member": "x"},
            {"op": "attach", "id": str(victim), "member": "h:3",
             "info": P.pack({"rank": 2**63, "pid": 2**64 - 1})},  # clamped, not a 500
            {"op": b"\xff\xfe"}, {"op": "create", "project": "p"}]
    ids = [r.xadd(keys.control, j) for j in junk]
    # stream entries outside the grammar, in the healthy run's own stream
    bad_values = ["1_000", " 7 ", "+5", "0x10", "Infinity", "NaN", "1e5 "]
    bad_ids = [r.xadd(keys.metrics(run), {**entry(10**6 + i, {}), "m/rank0": v})
               for i, v in enumerate(bad_values)]
    h.flowing("with poison values in its hashes")
    wait_until(lambda: r.xlen(keys.control_dead) == 4, 20, "4 control dead letters")
    dead = dead_letters(r, keys.control_dead)
    # two workers read the same streams, so each writes its dead letters in its own order
    assert sorted((flat[1] for _, flat in dead), key=_id_order) == [ids[0], ids[1], ids[3], ids[4]]
    assert all(flat[2] == b"reason" and flat[3] for _, flat in dead)
    assert r.xpending(keys.control, "workers")["pending"] == 0
    wait_until(lambda: r.xlen(keys.dead(run)) == len(bad_values), 20, "grammar dead letters")
    letters = dead_letters(r, keys.dead(run))
    assert sorted((flat[1] for _, flat in letters), key=_id_order) == bad_ids
    assert all(b"not a number" in flat[3] for _, flat in letters)
    wait_until(lambda: {m["member"]: m["rank"] for m in stack.backend.run(victim)["members"]}
               .get("h:3", 0) is None, 20, "the out-of-range rank stored as unknown")
    wait_until(lambda: "is not a msgpack map" in (logs := stack.worker_logs())
               and "is not epoch ms" in logs, 20, "the poison hash values reported by the run checks")
    got = h.finish()
    # the ledger counted the grammar dead letters against rank 0, once each
    assert int(r.hget(keys.ledger(run), "dead:0") or 0) == len(bad_values)
    # ... and the worker forwarded them: GET /api/runs/{id} shows them per rank and in total
    shown = wait_until(lambda: (x := stack.backend.run(run))["ledger"]["dead"] == len(bad_values)
                       and x, 30, "the dead letters in the run's ledger")
    assert {x["rank"]: x["dead"] for x in shown["ranks"]} == {0: len(bad_values), 1: 0}, shown
    per_rank: dict[bytes, int] = {}
    for _, fields in r.xrange(keys.metrics(run)):  # what the SDK sent (resends included)
        per_rank[fields[b"_rank"]] = per_rank.get(fields[b"_rank"], 0) + 1
    for x in got:
        rank = str(x["rank"]).encode()
        dead = len(bad_values) if x["rank"] == 0 else 0
        assert int(r.hget(keys.ledger(run), b"stored:" + rank)) == per_rank[rank] - dead, x
        assert per_rank[rank] - dead >= x["logged"]


def test_keys_of_the_wrong_type(stack: Stack, own_redis: OwnRedis, tmp_path: Path) -> None:
    r = own_redis.client()
    h = Healthy(stack, r, tmp_path)
    keys, run = stack.keys, h.run
    r.set(keys.metrics(999), "not a stream")  # a "run" whose stream is a string
    r.sadd(keys.runs, "999", "abc", "99999999999999999999")
    h.flowing("beside a metrics key of the wrong type")
    with r.pipeline(transaction=True) as pipe:  # at once: an empty set would mean "no runs"
        pipe.delete(keys.runs)
        pipe.set(keys.runs, "x")  # WRONGTYPE for every SMEMBERS: the runs known are still served
        pipe.execute()
    h.flowing("while the runs set is a string")
    r.set(keys.dead(run), "x")  # even its dead-letter key: a junk entry is still acked
    r.xadd(keys.metrics(run), {**entry(10**6, {}), "m/rank0": "junk"})
    h.flowing("with its dead-letter key of the wrong type")
    wait_until(lambda: pending(r, keys.metrics(run)) < 20, 20, "acknowledged anyway")
    r.delete(keys.runs, keys.dead(run))  # the operator repairs it
    r.sadd(keys.runs, str(run))
    logs = stack.worker_logs()
    assert "not a stream" in logs and "runs set failed" in logs and "WRONGTYPE" in logs
    h.finish()


def test_backend_failures_of_one_run(stack: Stack, own_redis: OwnRedis,
                                     fault_backend: FaultBackend, tmp_path: Path) -> None:
    proxy = FaultProxy(fault_backend.url)
    stack.backend = Backend(proxy.url, fault_backend.key)
    try:
        r = own_redis.client()
        h = Healthy(stack, r, tmp_path)
        keys = stack.keys
        sick = create(r, keys, "poison", "sick")
        proxy.fail = [rf"^POST /ingest/metrics run={sick}$"]  # 500 for this run only
        produce(r, keys, sick, (entry(s, {"a": s}) for s in range(1, 201)))
        # one entry larger than PLUTO_MAX_BODY (4 MiB here) on its own, in the healthy run
        huge = r.xadd(keys.metrics(h.run), entry(10**6, {f"w/{i:06d}": i / 3
                                                        for i in range(200_000)}))
        h.flowing("while another run's ingest answers 500")
        assert pending(r, keys.metrics(sick)) == 200 and fault_backend.points(sick, "a") == []
        wait_until(lambda: r.xlen(keys.dead(h.run)) == 1, 30, "the huge entry dead-lettered")
        [(_, letter)] = dead_letters(r, keys.dead(h.run))
        assert letter[1] == huge and b"too large" in letter[3]
        proxy.fail = []
        wait_until(lambda: len(fault_backend.points(sick, "a")) == 200, 30,
                   "the parked run stored once its backend calls work")
        assert "parked" in stack.worker_logs()
        h.finish()
    finally:
        proxy.close()


def _busy(url: str, seconds: float) -> threading.Thread:
    script = ("local s = tonumber(redis.call('TIME')[1]) "
              f"while tonumber(redis.call('TIME')[1]) - s < {seconds} do end return 1")

    def run() -> None:
        with redis.Redis.from_url(url, socket_timeout=seconds + 10) as c:
            c.eval(script, 0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Writer(threading.Thread):
    """A producer that retries what Redis refuses (as DESIGN §5 asks of the SDK): logs steps
    1, 2, ... to one run until stopped; :attr:`steps` is how many Redis accepted."""

    def __init__(self, url: str, keys: K.Keys, run: int) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url, socket_timeout=5)
        self.keys, self.run_id, self.steps = keys, run, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.r.xadd(self.keys.metrics(self.run_id), entry(self.steps + 1,
                                                                  {"w": self.steps + 1}))
                self.steps += 1
            except redis.RedisError:
                pass  # refused (OOM, BUSY, READONLY...): the same step again
            time.sleep(0.005)

    def finish(self) -> int:
        self.halt.set()
        self.join(10)
        self.r.close()
        return self.steps


def test_redis_busy_replies_are_weather(stack: Stack, own_redis: OwnRedis,
                                        tmp_path: Path) -> None:
    """OOM, BUSY and READONLY on the workers' own commands: waited out, reported, never an
    exit. (The healthy run's producer here is the test's own, retrying writer: what the SDK's
    ranks do in such weather is the SDK's matter, tested in its own suites.)"""
    r = own_redis.client()
    for _ in range(2):  # short blocking reads: a read blocked when a script starts waits it
        stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="60", PLUTO_CLAIM_IDLE_MS="3000",
                           PLUTO_WORKER_BLOCK_MS="1")  # out unanswered, never seeing BUSY
    run = create(r, stack.keys, "poison", "weather")
    writer = Writer(own_redis.url, stack.keys, run)
    writer.start()

    def flowing(what: str) -> None:
        before = len(stack.backend.points(run, "w"))
        wait_until(lambda: len(stack.backend.points(run, "w")) > before + 10, 20,
                   f"stored again {what}")

    flowing("at first")
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # every write that may grow memory: OOM
    time.sleep(1.5)
    r.config_set("maxmemory", "0")
    flowing("after OOM")
    r.config_set("busy-reply-threshold", "100")
    _busy(own_redis.url, 2).join(10)  # a script holding Redis: BUSY for everyone else
    flowing("after BUSY")
    with socket.socket() as silent:  # a "master" that accepts and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        r.replicaof("127.0.0.1", str(silent.getsockname()[1]))  # READONLY for writes now
        time.sleep(1.5)
        r.replicaof("NO", "ONE")
    flowing("after READONLY")
    steps = writer.finish()
    wait_until(lambda: len(stack.backend.points(run, "w")) == steps, 30, "every step stored")
    assert [p[:2] for p in stack.backend.points(run, "w")] == [[s, s] for s in
                                                                range(1, steps + 1)]
    logs = stack.worker_logs()
    for code in ("OOM", "BUSY", "READONLY"):
        assert f"redis unavailable ({code}" in logs, code
    assert all(w.alive() for w in stack.workers)
    assert all(w.log().count("starting") == 1 for w in stack.workers)
