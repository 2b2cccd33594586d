"""A Redis Cluster that changes under a running job: the run's slot migrates to another master
(``CLUSTER SETSLOT … IMPORTING/MIGRATING`` + ``MIGRATE``), then that master fails over to its
replica (``CLUSTER FAILOVER``), while a rank logs and a worker persists; and, in a cluster
with a short node timeout, the master owning the run's slot is SIGKILLed and the cluster
promotes its replica by itself. Nothing is lost or duplicated: every step of every metric is
stored once and the run's ledger shows no loss. A real cluster of 3 masters + 3 replicas on
loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import RedisClusterException

from pluto import _servers
from pluto._producer import Producer, Target
from pluto.protocol import Keys, decode_entry
from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

RANK = """
import os, sys, time, redis, pluto
stop = sys.argv[1]
r = redis.RedisCluster.from_url(os.environ["PLUTO_REDIS_URL"])
run = pluto.init(project="cluster-change", run_id=sys.argv[2])
print("RESULT {\\"id\\": %d}" % run.id, flush=True)
step, deadline = 0, time.monotonic() + 150
while time.monotonic() < deadline and not r.exists(stop):
    for _ in range(10):
        step += 1
        run.log({"a": step, "b": step * 0.25}, step=step)
    time.sleep(0.01)
lost = run.finish(timeout=60)
print("RESULT {\\"steps\\": %d, \\"lost\\": %d}" % (step, lost), flush=True)
"""


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=10)


@contextmanager
def running_cluster(tmp_path: Path, node_timeout_ms: int) -> Iterator[dict[int, _servers.Child]]:
    """6 nodes made into a cluster by ``redis-cli --cluster create`` with one replica per
    master, by port; each node a process started here (a test may SIGKILL one by its pid)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is needed to create the cluster (apt-get install redis-tools)")
    ports = [_servers.free_port() for _ in range(6)]
    children: dict[int, _servers.Child] = {}
    try:
        for port in ports:
            d = tmp_path / f"n{port}"
            d.mkdir()
            children[port] = _servers.spawn(f"redis-{port}", [
                _servers.redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-port", str(_servers.free_port()),  # not port + 10000: may be > 65535
                "--cluster-node-timeout", str(node_timeout_ms), "--dir", str(d), "--save", "",
                "--appendonly", "no"], tmp_path)
        for port in ports:
            _servers.wait_for(lambda p=port: _servers.port_open("127.0.0.1", p), 20, "node")
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "1", "--cluster-yes"], check=True,
                       capture_output=True, timeout=60)
        for port in ports:
            wait_until(lambda p=port: b"cluster_state:ok" in _node(p).execute_command(
                "CLUSTER", "INFO"), 30, f"cluster state ok on {port}")
        wait_until(lambda: len(_masters(ports)) == 3 and all(
            _replica_of(ports, m) for m in _masters(ports)), 30, "three masters, each replicated")
        yield children
    finally:
        for child in children.values():
            child.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Ports of 6 nodes (3 masters, 3 replicas) that fail a silent node after 3 s."""
    with running_cluster(tmp_path, 3000) as children:
        yield list(children)


def _nodes(port: int) -> list[dict[str, str]]:
    """``CLUSTER NODES`` of the node at ``port``: id, port, role flags, master id."""
    out = []
    for line in _node(port).execute_command("CLUSTER", "NODES").decode().splitlines():
        f = line.split()
        out.append({"id": f[0], "port": f[1].split("@")[0].split(":")[1], "flags": f[2],
                    "master": f[3]})
    return out


def _masters(ports: list[int]) -> list[int]:
    """The nodes that say they are masters (``ROLE``: not the gossip, which may lag)."""
    return [p for p in ports if _node(p).execute_command("ROLE")[0] == b"master"]


def _owner(ports: list[int], slot: int) -> int:
    """The port of the master serving ``slot``, as the (first live) node's slot map says."""
    for lo, hi, master, *_ in _node(ports[0]).execute_command("CLUSTER", "SLOTS"):
        if lo <= slot <= hi:
            return int(master[1])
    raise AssertionError(f"no owner for slot {slot}")


def migrate_slot(ports: list[int], slot: int) -> int:
    """Move ``slot`` to another master, key by key; returns the new owner's port."""
    src = _owner(ports, slot)
    masters = _masters(ports)
    dst = next(p for p in masters if p != src)
    ids = {int(n["port"]): n["id"] for n in _nodes(src)}
    _node(dst).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
    _node(src).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
    while keys := _node(src).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        _node(src).execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 10000, "KEYS", *keys)
        time.sleep(0.05)  # the rank keeps writing meanwhile (ASK for keys already moved)
    for port in masters:
        _node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
    return dst


def _replica_of(ports: list[int], master: int) -> int | None:
    """A replica in sync with ``master``, by the replicas' own ``ROLE``."""
    for p in ports:
        role = _node(p).execute_command("ROLE")
        if role[0] == b"slave" and int(role[2]) == master and role[3] == b"connected":
            return p
    return None


def fail_over(ports: list[int], master: int) -> int:
    """``CLUSTER FAILOVER`` on a replica of ``master``; returns the replica's port."""
    replica = wait_until(lambda: _replica_of(ports, master), 30, f"a replica of {master}")
    _node(replica).execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: _node(replica).execute_command("ROLE")[0] == b"master", 30,
               "the replica promoted")
    return replica


def last_step(backend: Backend, run: int, metric: str = "a") -> int:
    with backend.client() as c:
        resp = c.get(f"/api/runs/{run}/metrics/{metric}", params={"max_points": 1})
    pts = resp.json().get("points") if resp.status_code == 200 else None
    return int(pts[-1][0]) if pts else 0


def completed(backend: Backend, s: Stack, run: int) -> dict[str, Any]:
    """The run once the backend calls it COMPLETED (the worker's log shown if it never does)."""
    try:
        return dict(wait_until(lambda: (g := backend.run(run))["status"] == "COMPLETED" and g,
                               90, "the run COMPLETED"))
    except BaseException:
        print(backend.run(run), s.worker_logs()[-5000:])  # shown with the failure
        raise


def assert_every_step(backend: Backend, run: int, suffix: str, steps: int) -> None:
    """``a<suffix>`` = step and ``b<suffix>`` = step / 4 stored for steps 1..steps, once each."""
    assert [p[:2] for p in backend.points(run, f"a{suffix}")] == [
        [i, i] for i in range(1, steps + 1)]
    assert [p[1] for p in backend.points(run, f"b{suffix}")] == [
        i * 0.25 for i in range(1, steps + 1)]


@pytest.mark.slow
def test_slot_migration_and_failover_mid_run_lose_nothing(
        cluster: list[int], backend: Backend, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{cluster[0]}/0"
    s = Stack(url, "cl", backend, tmp_path / "logs")
    env = {"PLUTO_REDIS_CLUSTER": "1", "PLUTO_CLAIM_IDLE_MS": "3000"}
    rank = None
    try:
        s.start_worker(**env)
        stop = "cl:test:stop"
        rank = start_rank(write_script(tmp_path, RANK), s.env(**env), stop, "change")
        run = json_lines(wait_until(lambda: rank.stdout.readline(), 60, "the run id"))[0]["id"]
        client = redis.RedisCluster.from_url(url)
        slot = client.keyslot(s.keys.metrics(run))
        wait_until(lambda: last_step(backend, run) > 200, 60, "points stored")

        moved_to = migrate_slot(cluster, slot)
        seen = last_step(backend, run)
        wait_until(lambda: last_step(backend, run) > seen + 200, 60,
                   "points stored after the slot moved")

        promoted = fail_over(cluster, moved_to)
        wait_until(lambda: _owner(cluster, slot) == promoted, 30, "the slot map showing it")
        seen = last_step(backend, run)
        wait_until(lambda: last_step(backend, run) > seen + 200, 60,
                   "points stored after the failover")
        assert rank.poll() is None

        client.set(stop, 1)
        code, out, err = finish_rank(rank, 120)
        assert code == 0, err[-3000:]
        (done,) = json_lines(out)
        assert done["lost"] == 0
        got = completed(backend, s, run)
        assert "error" not in s.worker_logs().lower(), s.worker_logs()[-3000:]
        steps = done["steps"]
        assert_every_step(backend, run, "", steps)
        assert got["ledger"]["lost"] == 0 and got["ledger"]["sent"] == steps
        client.close()
    finally:
        if rank is not None and rank.poll() is None:
            rank.kill()
            rank.communicate()
        s.stop_workers()



def test_a_producer_whose_node_died_asks_the_slot_map_again_until_it_answers(
        r: redis.Redis, keys: Keys) -> None:
    """The node the producer writes to refuses connections (it crashed): each retry re-resolves
    the slot's owner, and a slot map that cannot be read (every node tried was down) is weather
    like the connection error itself, never a dead producer thread. Once the map names a node
    that answers, every entry lands once, in order, and nothing is counted as dropped."""
    from pluto._init import quick_retry

    dead = redis.Redis(port=_servers.free_port(), socket_connect_timeout=0.5, retry=quick_retry())
    answers: list[redis.Redis] = [dead, r]  # the map still names the dead node, then its heir
    asked: list[int] = []

    def resolve() -> redis.Redis:
        asked.append(1)
        if len(asked) == 1:
            raise RedisClusterException("Redis Cluster cannot be connected")
        return answers.pop(0) if answers else r

    stream = keys.metrics(21)
    producer = Producer(dead, Target(stream, keys.heartbeats(21), keys.members(21), "h:1"), 0,
                        0.01, 1.0, 100_000, resolve=resolve)
    for step in range(1, 5001):
        producer.queue.extend((step, 1.0, ("a",), step))
    producer.start()
    assert producer.flush(60)
    producer.stop()
    assert len(asked) == 3 and producer.is_alive() is False
    assert [decode_entry(f)[1] for _, f in r.xrange(stream)] == list(range(1, 5001))
    assert producer.ledger.sent == 5000 and producer.ledger.drops == {}

CRASH_RANK = """
import os, sys, time, pluto
stop, rank = sys.argv[1], int(os.environ["RANK"])
run = pluto.init(project="cluster-crash", run_id=sys.argv[2])
print("RESULT {\\"id\\": %d}" % run.id, flush=True)
step, deadline = 0, time.monotonic() + 150
while time.monotonic() < deadline and not os.path.exists(stop):  # not a Redis key: it may be down
    for _ in range(10):
        step += 1
        run.log({f"a/rank{rank}": step, f"b/rank{rank}": step * 0.25}, step=step)
    time.sleep(0.01)
lost = run.finish(timeout=60)
print("RESULT {\\"steps\\": %d, \\"lost\\": %d}" % (step, lost), flush=True)
"""


@pytest.fixture
def crashable_cluster(tmp_path: Path) -> Iterator[dict[int, _servers.Child]]:
    """The cluster with a 1 s node timeout, so that it promotes a crashed master's replica by
    itself within a few seconds; its nodes by port."""
    with running_cluster(tmp_path, 1000) as children:
        yield children


@pytest.mark.slow
def test_primary_crash_mid_run_promoted_by_the_cluster_loses_nothing(
        crashable_cluster: dict[int, _servers.Child], backend: Backend, tmp_path: Path) -> None:
    """SIGKILL the master that owns the run's slot while two ranks log: the cluster promotes its
    replica after the node timeout; the producers (holding a socket to the dead node) and the
    worker re-resolve the slot's owner and carry on. Every step is stored once, nothing dropped."""
    ports = list(crashable_cluster)
    url = f"redis://127.0.0.1:{ports[0]}/0"
    s = Stack(url, "cr", backend, tmp_path / "logs")
    env = {"PLUTO_REDIS_CLUSTER": "1", "PLUTO_CLAIM_IDLE_MS": "3000"}
    stop = tmp_path / "stop"
    ranks = []
    try:
        s.start_worker(**env)
        script = write_script(tmp_path, CRASH_RANK)
        ranks = [start_rank(script, s.env(**env, RANK=str(r)), str(stop), "crash")
                 for r in range(2)]
        run = json_lines(wait_until(lambda: ranks[0].stdout.readline(), 60, "the run id"))[0]["id"]
        slot = redis.RedisCluster.from_url(url).keyslot(s.keys.metrics(run))
        wait_until(lambda: last_step(backend, run, "a/rank1") > 200, 60, "points stored")

        dead = _owner(ports, slot)
        replica = wait_until(lambda: _replica_of(ports, dead), 30, f"a replica of {dead}")
        crashable_cluster[dead].kill()  # SIGKILL, by pid: no goodbye to clients or replicas
        live = [p for p in ports if p != dead]
        wait_until(lambda: _node(replica).execute_command("ROLE")[0] == b"master", 60,
                   "the cluster promoting the replica by itself")
        wait_until(lambda: _owner(live, slot) == replica, 30, "the slot map showing it")
        seen = last_step(backend, run, "a/rank1")
        try:
            wait_until(lambda: last_step(backend, run, "a/rank1") > seen + 200, 90,
                       "points stored after the crash")
        except BaseException:
            print(s.worker_logs()[-5000:])  # shown with the failure
            raise
        assert all(rank.poll() is None for rank in ranks)

        stop.touch()
        done = []
        for rank in ranks:
            code, out, err = finish_rank(rank, 120)
            assert code == 0, err[-3000:]
            done.append(json_lines(out)[-1])
        assert [d["lost"] for d in done] == [0, 0]
        got = completed(backend, s, run)
        for r, d in enumerate(done):
            assert_every_step(backend, run, f"/rank{r}", d["steps"])
        ledger = got["ledger"]
        assert ledger["sent"] == sum(d["steps"] for d in done)
        assert (ledger["dropped"], ledger["missing"], ledger["lost"]) == (0, 0, 0), ledger
        assert "Traceback" not in s.worker_logs(), s.worker_logs()[-3000:]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.communicate()
        s.stop_workers()
