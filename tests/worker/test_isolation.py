"""Isolation, in process (the fast tier): the real worker loop (``Worker.run_once``) against
the real Redis and backend. Poison values in one run's hashes, junk control entries and a
runs set of the wrong type never stop it; each bad item is dead-lettered with its reason; a
run the backend cannot read is parked while the others flow; the ledger counts each
acknowledged entry exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from pluto import protocol as K
from pluto import protocol as P
from pluto.protocol import GROUP, Keys
from pluto_worker._acks import Acks
from tests.conftest import Backend
from tests.worker.conftest import (
    FaultProxy,
    attach,
    dead_letters,
    entry,
    in_process_worker,
    pending,
    produce,
    request_create,
    run_id_of,
    spin,
)

BehindProxy = Callable[..., tuple[Any, FaultProxy]]
"""``behind_proxy(**settings)`` -> (an in-process worker, the FaultProxy before its backend)."""


@pytest.fixture
def worker(redis_url: str, prefix: str, backend: Backend) -> Iterator[Any]:
    w = in_process_worker(redis_url, prefix, backend)
    yield w
    w.close()


@pytest.fixture
def behind_proxy(redis_url: str, prefix: str, backend: Backend
                 ) -> Iterator[BehindProxy]:
    """``behind_proxy(**settings)``: an in-process worker whose backend sits behind a
    :class:`FaultProxy` (which the test tells what to fail); both closed at the end."""
    made: list[tuple[Any, FaultProxy]] = []

    def make(**settings: Any) -> tuple[Any, FaultProxy]:
        proxy = FaultProxy(backend.url)
        made.append((in_process_worker(redis_url, prefix, Backend(proxy.url, backend.key),
                                       **settings), proxy))
        return made[-1]

    yield make
    for w, proxy in made:
        w.close()
        proxy.close()


def _create(w: Any, r: redis.Redis, keys: Keys, project: str, run_id: str) -> int:
    request_create(r, keys, project, run_id)
    return int(spin(w, lambda: run_id_of(r, keys, project, run_id), what=f"run {run_id}"))


def _stored(backend: Backend, run: int, name: str, n: int) -> Any:
    return lambda: len(backend.points(run, name)) >= n


def test_poison_values_are_reported_and_worked_around(worker: Any, r: redis.Redis, keys: Keys,
                                                       project: str, backend: Backend) -> None:
    good, bad = (_create(worker, r, keys, project, name) for name in ("good", "bad"))
    attach(r, keys, bad, "h:1")
    r.hset(keys.members(bad), "evil", b"\xc1\xff not msgpack")
    r.hset(keys.members(bad), "list", P.pack([1, 2]))
    r.hset(keys.heartbeats(bad), "h:1", "abc")
    junk = [
        {"op": "attach", "id": str(bad), "member": "h:2", "info": P.pack([1])},
        {"op": "attach", "id": str(bad), "member": "h:3", "info": b"\xc1"},
        {"op": "finish", "id": "99999999999999999999", "member": "x"},
        {"op": "create"},
        {"op": "explode"},
        {"op": "config", "id": str(bad), "config": P.pack("not a map")},
    ]
    junk_ids = [r.xadd(keys.control, j) for j in junk]
    produce(r, keys, good, (entry(s, {"a": s}) for s in range(1, 201)))
    spin(worker, _stored(backend, good, "a", 200), what="the good run stored")
    spin(worker, lambda: r.xlen(keys.control_dead) == len(junk),
         what="every junk control entry dead-lettered")
    dead = dead_letters(r, keys.control_dead)
    assert [flat[:2] for _, flat in dead] == [[b"id", i] for i in junk_ids]
    assert [flat[2] for _, flat in dead] == [b"reason"] * len(junk)
    reasons = [flat[3].decode() for _, flat in dead]
    assert "info is a list" in reasons[0] and "info is not msgpack" in reasons[1]
    assert "not a run id" in reasons[2] and "create without" in reasons[3]
    assert "unknown control op" in reasons[4] and "config is a str" in reasons[5]
    assert dead[0][1][4:] == [x.encode() if isinstance(x, str) else x  # the original fields
                              for kv in junk[0].items() for x in kv]
    assert r.xpending(keys.control, GROUP)["pending"] == 0
    assert worker.problems.counts["control"] == len(junk)
    spin(worker, lambda: sum(k.startswith(f"member:{bad}:") for k in worker.problems.counts)
         == 2, what="both junk members reported")
    spin(worker, lambda: f"beat:{bad}:h:1" in worker.problems.counts, what="junk heartbeat")

    r.delete(keys.runs)
    r.set(keys.runs, "x")  # WRONGTYPE for SMEMBERS: the runs already known keep being served
    produce(r, keys, good, (entry(s, {"a": s}) for s in range(201, 301)))
    spin(worker, _stored(backend, good, "a", 300), what="served with the runs set unreadable")
    assert worker.problems.counts["runs set"] > 0


@pytest.mark.parametrize("text", ["1_000", " 7 ", "+5", "0x10", "Infinity", "NaN", "1e5 ",
                                  "1.", ".5", "1E5", "-nan", "", "٣"])
def test_values_outside_the_grammar_are_dead_lettered(worker: Any, r: redis.Redis, keys: Keys,
                                                      project: str, backend: Backend,
                                                      text: str) -> None:
    run = _create(worker, r, keys, project, "grammar")
    produce(r, keys, run, [entry(1, {"a": 1.5}), {**entry(2, {}), "a": text},
                           {**entry(3, {}), K.F_STEP: f" {3}", "a": "3"},
                           {K.F_RANK: "0", K.F_TIME: "1", "a": "3"},  # no _step at all
                           entry(4, {"a": 4})])
    bad_ids = [entry_id for entry_id, _ in r.xrange(keys.metrics(run))][1:4]
    spin(worker, lambda: r.xlen(keys.dead(run)) == 3, what="three dead letters")
    dead = r.xrange(keys.dead(run))
    assert [d[1][K.F_DEAD_ID.encode()] for d in dead] == bad_ids  # each names its entry
    assert b"not a number" in dead[0][1][b"reason"] and dead[0][1][b"a"] == text.encode()
    assert b"_step is not an integer" in dead[1][1][b"reason"]
    assert b"_step" in dead[2][1][b"reason"] and dead[2][1][b"a"] == b"3"
    spin(worker, lambda: [p[:2] for p in backend.points(run, "a")] == [[1, 1.5], [4, 4]],
         what="the good neighbours stored")
    spin(worker, lambda: pending(r, keys.metrics(run)) == 0, what="every entry acknowledged")


def test_ledger_counts_each_entry_once(worker: Any, r: redis.Redis, keys: Keys, project: str,
                                       backend: Backend) -> None:
    run = _create(worker, r, keys, project, "ledger")
    produce(r, keys, run, [entry(s, {"a": s}, rank=0, time_ms=1000 + s) for s in range(1, 11)])
    produce(r, keys, run, [entry(s, {"a": s}, rank=1) for s in (5, 2)])
    produce(r, keys, run, [{**entry(11, {}, rank=0), "a": "junk"},
                           {K.F_RANK: "x", K.F_STEP: "1", K.F_TIME: "1", "a": "1"}])
    want = {b"stored:0": b"10", b"stored:1": b"2", b"dead:0": b"1", b"dead:?": b"1",
            b"step:0": b"10", b"time:0": b"1010", b"step:1": b"5", b"time:1": b"1764000000005"}
    spin(worker, lambda: r.hgetall(keys.ledger(run)) == want, what="the ledger")
    # Redelivered (another worker, a restart): XACK answers 0, nothing is counted again.
    acks = Acks()
    for entry_id, fields in r.xrange(keys.metrics(run))[:12]:  # the ones stored
        acks.stored(keys.metrics(run), entry_id, [x for kv in fields.items() for x in kv])
    worker.acker(acks)
    assert r.hgetall(keys.ledger(run)) == want
    assert pending(r, keys.metrics(run)) == 0


@pytest.mark.parametrize("status", [404, 405])
def test_a_backend_without_the_ledger_route_is_not_asked_again(
        behind_proxy: BehindProxy, r: redis.Redis, keys: Keys, project: str,
        backend: Backend, status: int) -> None:
    w, proxy = behind_proxy()
    proxy.fail = [(r"^POST /api/runs/\d+/ledger ", status)]
    run = _create(w, r, keys, project, "no-ledger")
    attach(r, keys, run, "h:1")
    produce(r, keys, run, (entry(s, {"a": s}) for s in range(1, 21)))
    spin(w, _stored(backend, run, "a", 20), what="stored")
    spin(w, lambda: not w.watcher.ledger.route, what="the ledger route given up")
    asked = len(proxy.hits)
    assert asked == 1
    produce(r, keys, run, (entry(s, {"a": s}) for s in range(21, 41)))
    spin(w, _stored(backend, run, "a", 40), what="stored")
    r.hset(keys.members(run), "h:1", P.pack({"rank": 0, "state": "finished", "logged": 40,
                                             "sent": 40, "dropped": 0, "drops": {}}))
    spin(w, lambda: backend.run(run)["status"] == "COMPLETED", what="COMPLETED")
    assert len(proxy.hits) == asked  # never again, the final one included
    assert r.hget(keys.ledger(run), "stored:0") == b"40"
    member = backend.run(run)["members"][0]
    assert member["state"] == "finished"


def test_a_run_the_backend_cannot_read_is_parked(behind_proxy: BehindProxy, r: redis.Redis,
                                                 keys: Keys, project: str,
                                                 backend: Backend) -> None:
    w, proxy = behind_proxy(retry_max=0.5)
    sick = _create(w, r, keys, project, "sick")
    well = _create(w, r, keys, project, "well")
    w.projects.clear()  # as after a restart: the project must be looked up again
    proxy.fail = [rf"^GET /api/runs/{sick} ", rf"^POST /ingest/metrics run={sick}$"]
    produce(r, keys, sick, (entry(s, {"a": s}) for s in range(1, 51)))
    produce(r, keys, well, (entry(s, {"a": s}) for s in range(1, 51)))
    spin(w, _stored(backend, well, "a", 50), what="the healthy run stored")
    other = _create(w, r, keys, f"{project}-other", "unrelated")  # a create still served
    produce(r, keys, other, (entry(s, {"b": s}) for s in range(1, 51)))
    spin(w, _stored(backend, other, "b", 50), what="the unrelated run stored")
    assert sick in {**w.flow.parked, **w.flow.flight} or sick in w.flow.recovering
    assert backend.points(sick, "a") == [] and r.xlen(keys.dead(sick)) == 0
    assert pending(r, keys.metrics(sick)) == 50  # held, not acknowledged, not lost
    assert any(h.startswith(f"GET /api/runs/{sick} ") for h in proxy.hits)
    proxy.fail = []
    spin(w, _stored(backend, sick, "a", 50), what="the parked run after recovery")
    spin(w, lambda: pending(r, keys.metrics(sick)) == 0, what="acknowledged")


def test_a_control_call_that_fails_waits_in_order_while_others_go(
        behind_proxy: BehindProxy, r: redis.Redis, keys: Keys, project: str,
        backend: Backend) -> None:
    w, proxy = behind_proxy(retry_max=0.5)
    sick = _create(w, r, keys, project, "members-500")
    proxy.fail = [rf"^POST /api/runs/{sick}/members "]
    attach(r, keys, sick, "h:1")
    spin(w, lambda: proxy.hits, what="the attach tried")
    info = P.unpack(r.hget(keys.members(sick), "h:1"))
    r.hset(keys.members(sick), "h:1", P.pack({**info, "state": "finished"}))
    r.xadd(keys.control, P.control_finish(sick, "h:1", "finished"))
    other = _create(w, r, keys, f"{project}-other", "served")
    assert other != sick  # served while the attach of the other run waits
    assert r.xpending(keys.control, GROUP)["pending"] == 2  # attach + finish, in order
    assert len(w.control.held) == 2 and r.xlen(keys.control_dead) == 0
    proxy.fail = []
    spin(w, lambda: r.xpending(keys.control, GROUP)["pending"] == 0, what="applied")
    spin(w, lambda: [(m["member"], m["state"]) for m in backend.run(sick)["members"]]
         == [("h:1", "finished")], what="attach, then finish")


def test_ledger_and_member_ledgers_are_sent_and_final_before_the_status(
        behind_proxy: BehindProxy, r: redis.Redis, keys: Keys, project: str,
        backend: Backend) -> None:
    """What the worker POSTs (seen by the proxy; this backend's ledger route is stood in for
    by the proxy answering 200), and that the final ledger goes before the final status."""
    import json

    w, proxy = behind_proxy()
    proxy.fail = [(r"^POST /api/runs/\d+/ledger ", 200)]
    run = _create(w, r, keys, project, "ledger-sent")
    attach(r, keys, run, "h:1")
    produce(r, keys, run, (entry(s, {"a": s}, time_ms=5000 + s) for s in range(1, 31)))
    produce(r, keys, run, [{**entry(31, {}), "a": "junk"}])
    spin(w, _stored(backend, run, "a", 30), what="stored")
    info = P.unpack(r.hget(keys.members(run), "h:1"))
    r.hset(keys.members(run), "h:1", P.pack({**info, "state": "finished", "logged": 33,
                                             "sent": 31, "dropped": 2,
                                             "drops": {"overflow": 2}}))
    spin(w, lambda: backend.run(run)["status"] == "COMPLETED", what="COMPLETED")
    posts = [(what.split()[1], json.loads(body)) for what, body in proxy.seen
             if what.startswith("POST /api/runs/") and body]
    ledgers = [body for path, body in posts if path.endswith("/ledger")]
    assert ledgers[-1] == [{"rank": 0, "stored": 30, "dead": 1, "last_step": 30,
                            "last_time": 5030}]
    members = [row for path, body in posts if path.endswith("/members") for row in body]
    assert {k: members[-1][k] for k in ("member", "state", "logged", "sent", "dropped",
                                        "drops")} == {
        "member": "h:1", "state": "finished", "logged": 33, "sent": 31, "dropped": 2,
        "drops": {"overflow": 2}}
    order = [path for path, body in posts if path.endswith(("/ledger", "/status/update"))]
    final = max(i for i, path in enumerate(order) if path.endswith("/status/update"))
    assert order[final - 1].endswith("/ledger")  # the final ledger, then the status
    last_members = max(i for i, (path, _) in enumerate(posts) if path.endswith("/members"))
    assert last_members < [i for i, (path, _) in enumerate(posts)
                           if path.endswith("/status/update")][-1]


def test_a_hanging_control_call_holds_up_only_its_own_run(
        behind_proxy: BehindProxy, r: redis.Redis, keys: Keys, project: str,
        backend: Backend) -> None:
    """The backend hangs past the read timeout on one run's members call: that attach waits
    (and is retried); a create of another project and the other runs' metrics go on."""
    w, proxy = behind_proxy(retry_max=0.5, read_timeout=20.0)
    slow = _create(w, r, keys, project, "slow-members")
    busy = _create(w, r, keys, project, "busy")
    proxy.hang = [(rf"^POST /api/runs/{slow}/members ", 4.0)]
    attach(r, keys, slow, "h:1")
    spin(w, lambda: ("run", slow) in w.control.running, what="the hanging call made")
    other = _create(w, r, keys, f"{project}-other", "while-hanging")
    produce(r, keys, busy, (entry(s, {"a": s}) for s in range(1, 101)))
    spin(w, _stored(backend, busy, "a", 100), what="another run's metrics stored")
    assert other not in (slow, busy)
    assert ("run", slow) in w.control.queues  # still in hand: hanging, or waiting a retry
    assert r.xpending(keys.control, GROUP)["pending"] == 1  # the attach, still in hand
    proxy.hang = []
    spin(w, lambda: r.xpending(keys.control, GROUP)["pending"] == 0, what="attach retried")
    spin(w, lambda: [m["member"] for m in backend.run(slow)["members"]] == ["h:1"],
         what="the attach applied")
