"""A Redis Cluster that changes under a running job: the run's slot migrates to another master
(``CLUSTER SETSLOT … IMPORTING/MIGRATING`` + ``MIGRATE``), then that master fails over to its
replica (``CLUSTER FAILOVER``), while a rank logs and a worker persists. Nothing is lost or
duplicated: every step of every metric is stored once and the run's ledger shows no loss.
A real cluster of 3 masters + 3 replicas on loopback ports."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pluto import _servers
from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

RANK = """
import os, sys, time, redis, pluto
stop = sys.argv[1]
r = redis.RedisCluster.from_url(os.environ["PLUTO_REDIS_URL"])
run = pluto.init(project="cluster-change", run_id=sys.argv[2])
print("RESULT {\\"id\\": %d}" % run.id, flush=True)
step, deadline = 0, time.monotonic() + 90
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


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Ports of 6 nodes: ``redis-cli --cluster create`` with one replica per master."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("redis-cli is needed to create the cluster (apt-get install redis-tools)")
    ports = [_servers.free_port() for _ in range(6)]
    children = []
    try:
        for port in ports:
            d = tmp_path / f"n{port}"
            d.mkdir()
            children.append(_servers.spawn(f"redis-{port}", [
                _servers.redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-port", str(_servers.free_port()),  # not port + 10000: may be > 65535
                "--cluster-node-timeout", "3000", "--dir", str(d), "--save", "",
                "--appendonly", "no"], tmp_path))
        for port in ports:
            _servers.wait_for(lambda p=port: _servers.port_open("127.0.0.1", p), 20, "node")
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "1", "--cluster-yes"], check=True,
                       capture_output=True, timeout=60)
        for port in ports:
            wait_until(lambda p=port: b"cluster_state:ok" in _node(p).execute_command(
                "CLUSTER", "INFO"), 30, f"cluster state ok on {port}")
        yield ports
    finally:
        for child in children:
            child.stop()


def _nodes(port: int) -> list[dict[str, str]]:
    """``CLUSTER NODES`` of the node at ``port``: id, port, role flags, master id."""
    out = []
    for line in _node(port).execute_command("CLUSTER", "NODES").decode().splitlines():
        f = line.split()
        out.append({"id": f[0], "port": f[1].split("@")[0].split(":")[1], "flags": f[2],
                    "master": f[3]})
    return out


def _owner(ports: list[int], slot: int) -> int:
    """The port of the master serving ``slot``, as the (first live) node's slot map says."""
    for lo, hi, master, *_ in _node(ports[0]).execute_command("CLUSTER", "SLOTS"):
        if lo <= slot <= hi:
            return int(master[1])
    raise AssertionError(f"no owner for slot {slot}")


def migrate_slot(ports: list[int], slot: int) -> int:
    """Move ``slot`` to another master, key by key; returns the new owner's port."""
    src = _owner(ports, slot)
    masters = [int(n["port"]) for n in _nodes(src) if "master" in n["flags"]]
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


def fail_over(ports: list[int], master: int) -> int:
    """``CLUSTER FAILOVER`` on a replica of ``master``; returns the replica's port."""
    mid = next(n["id"] for n in _nodes(master) if int(n["port"]) == master)
    replica = next(int(n["port"]) for n in _nodes(master) if n["master"] == mid)
    _node(replica).execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: _node(replica).execute_command("ROLE")[0] == b"master", 30,
               "the replica promoted")
    return replica


def last_step(backend: Backend, run: int) -> int:
    with backend.client() as c:
        resp = c.get(f"/api/runs/{run}/metrics/a", params={"max_points": 1})
    pts = resp.json().get("points") if resp.status_code == 200 else None
    return int(pts[-1][0]) if pts else 0


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
        wait_until(lambda: last_step(backend, run) > 200, 30, "points stored")

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
        try:
            got = wait_until(lambda: (g := backend.run(run))["status"] == "COMPLETED" and g, 90,
                             "the run COMPLETED")
        except BaseException:
            print(backend.run(run), s.worker_logs()[-5000:])  # shown with the failure
            raise
        assert "error" not in s.worker_logs().lower(), s.worker_logs()[-3000:]
        steps = done["steps"]
        assert [p[:2] for p in backend.points(run, "a")] == [[i, i] for i in range(1, steps + 1)]
        assert [p[1] for p in backend.points(run, "b")] == [i * 0.25 for i in range(1, steps + 1)]
        assert got["ledger"]["lost"] == 0 and got["ledger"]["sent"] == steps
        client.close()
    finally:
        if rank is not None and rank.poll() is None:
            rank.kill()
            rank.communicate()
        s.stop_workers()
