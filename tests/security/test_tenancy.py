"""Tenancy that Redis ACLs can express (issue 18, point 1), against real ACL users.

Every test makes its own tenants (tenant B's name starts with tenant A's, so a pattern that
matched by prefix would show), applies ``pluto acl`` to the test Redis, and runs the real
worker and real rank processes with the users' URLs. Users are server-global: each is
deleted at teardown.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from pluto import _servers
from pluto._preflight import _ever_served
from pluto._settings import Settings
from pluto.errors import ConfigError
from pluto.protocol import Keys
from pluto_server import _schema
from pluto_server._rows import ForeignProject
from pluto_server._store import open_store
from pluto_worker import WorkerSettings
from pluto_worker._metrics import Metrics, serve_metrics
from tests.conftest import ROOT, Backend, Stack
from tests.helpers import PYTHON, finish_rank, json_lines, start_rank, wait_until, write_script

from .conftest import clean_env

RANK = """
import json, sys, pluto
project, run_id = sys.argv[1], sys.argv[2]
try:
    run = pluto.init(project=project, run_id=run_id, config={"who": project})
except pluto.errors.PlutoError as exc:
    print("RESULT " + json.dumps({"error": str(exc)}), flush=True)
    sys.exit(3)
for step in range(1, 6):
    run.log({"loss": float(step) * (2 if project.startswith("victim") else 1)})
lost = run.finish()
print("RESULT " + json.dumps({"id": run.id, "lost": lost, "resumed": run.resumed}), flush=True)
"""


@dataclass
class Tenancy:
    """Two tenants under one prefix, their ACL users applied, and one worker serving both."""

    redis_url: str
    prefix: str
    a: str
    b: str
    urls: dict[str, str]
    """User name -> its URL (with the generated password)."""
    backend: Backend
    log_dir: Path
    cli_output: str = ""
    worker: _servers.Child | None = None
    users: list[str] = field(default_factory=list)

    def project(self, name: str) -> str:
        """A project name of this test's own (the session's backend outlives the tenants)."""
        return f"{name}-{self.prefix}"

    def keys(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant)

    def rank_url(self, tenant: str) -> str:
        return self.urls[f"pluto-rank-{tenant}"]

    @property
    def worker_user(self) -> str:
        return f"pluto-worker-{self.prefix}"

    def rank_env(self, tenant: str) -> dict[str, str]:
        return clean_env(PLUTO_REDIS_URL=self.rank_url(tenant), PLUTO_PREFIX=self.prefix,
                         PLUTO_TENANT=tenant, PLUTO_INIT_TIMEOUT="40",
                         PLUTO_SYSTEM_METRICS="0", PYTHONPATH=str(ROOT))

    def run_rank(self, tmp: Path, tenant: str, project: str, run_id: str) -> dict[str, Any]:
        script = write_script(tmp, RANK, f"rank-{uuid.uuid4().hex[:6]}.py")
        code, out, err = finish_rank(start_rank(script, self.rank_env(tenant), project, run_id),
                                     timeout=120)
        results = json_lines(out)
        assert results, f"rank printed nothing (exit {code}):\n{out}\n{err}"
        return {**results[-1], "code": code, "stderr": err}

    def passwords(self) -> list[str]:
        return [httpx.URL(url).password or "" for url in self.urls.values()]

    def logs(self) -> str:
        assert self.worker is not None and self.backend.child is not None
        return self.worker.log() + self.backend.child.log()


def _acl_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "pluto._cli", "acl", *args], env=env, text=True,
                          capture_output=True, timeout=60)


@pytest.fixture
def tenancy(redis_url: str, r: redis.Redis, backend: Backend,
            tmp_path: Path) -> Iterator[Tenancy]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a = f"a{uuid.uuid4().hex[:6]}"
    t = Tenancy(redis_url, prefix, a, f"{a}-b", {}, backend, tmp_path / "logs")
    env = clean_env(PLUTO_PREFIX=prefix, PYTHONPATH=str(ROOT))
    done = _acl_cli(env, "--tenant", t.a, "--tenant", t.b, "--worker-user", t.worker_user,
                    "--generate", "--apply", "--redis-url", redis_url)
    t.users = [f"pluto-rank-{t.a}", f"pluto-rank-{t.b}", t.worker_user]
    try:
        assert done.returncode == 0, done.stderr
        t.cli_output = done.stdout + done.stderr
        for line in done.stdout.splitlines():
            if "PLUTO_REDIS_URL=" in line:
                url = line.split("PLUTO_REDIS_URL=")[1].split()[0]
                t.urls[str(httpx.URL(url).username)] = url
        assert sorted(t.urls) == sorted(t.users)
        t.worker = _servers.start_worker(
            t.urls[t.worker_user], prefix, backend.url, backend.key, t.log_dir,
            clean_env(PLUTO_TENANTS=f"{t.a},{t.b}", PYTHONPATH=str(ROOT)), name="worker")
        wait_until(lambda: all(_ever_served(r, t.keys(x)) for x in (t.a, t.b)), 60,
                   "the worker to serve both tenants")
        yield t
    finally:
        if t.worker is not None:
            t.worker.stop()
        for user in t.users:
            r.execute_command("ACL", "DELUSER", user)
        for key in r.scan_iter(match=f"{prefix}@*", count=1000):
            r.delete(key)


# -- end to end ------------------------------------------------------------------------------

def test_two_tenants_log_end_to_end_through_their_acl_users(tenancy: Tenancy, r: redis.Redis,
                                                            tmp_path: Path) -> None:
    t = tenancy
    got = {x: t.run_rank(tmp_path, x, t.project(f"proj-{x}"), "e2e") for x in (t.a, t.b)}
    for tenant, result in got.items():
        assert result["code"] == 0 and result["lost"] == 0, result
        run = wait_until(lambda result=result: (lambda run: run["status"] == "COMPLETED"
                                                and run)(t.backend.run(result["id"])),
                         60, f"tenant {tenant}'s run to complete")
        assert run["project"] == t.project(f"proj-{tenant}") and run["tenant"] == tenant
        assert [p[1] for p in t.backend.points(result["id"], "loss")] == [1.0, 2.0, 3.0, 4.0, 5.0]
        # Its entries went to its tenant's keys, and only there.
        assert r.xlen(t.keys(tenant).metrics(result["id"])) == 5
        assert not r.exists(Keys(t.prefix).metrics(result["id"]))
    secrets = t.passwords()
    assert all(len(s) >= 20 for s in secrets)
    logs = t.logs()
    assert f"tenant {t.a!r}" in logs  # the worker's start line names what it serves
    for secret in secrets:
        assert secret not in logs
        assert t.cli_output.count(secret) == 1  # shown once, by `pluto acl --generate`
        assert hashlib.sha256(secret.encode()).hexdigest() not in t.cli_output


# -- what a rank's credentials cannot do -----------------------------------------------------

def _refused(client: redis.Redis, *command: Any) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)


def test_a_rank_user_cannot_touch_what_is_not_its_own(tenancy: Tenancy, r: redis.Redis,
                                                      tmp_path: Path) -> None:
    t = tenancy
    victim = t.run_rank(tmp_path, t.b, t.project("victim"), "v1")
    assert victim["code"] == 0, victim
    own = t.run_rank(tmp_path, t.a, t.project("mine"), "m1")
    assert own["code"] == 0, own
    ka, kb = t.keys(t.a), t.keys(t.b)
    for run in (victim["id"], own["id"]):
        wait_until(lambda run=run: t.backend.run(run)["status"] == "COMPLETED", 60, "the runs")
    before = {key: r.dump(key) for key in r.scan_iter(match=f"{t.prefix}@*", count=1000)}
    rank = redis.Redis.from_url(t.rank_url(t.a), socket_timeout=10)
    # What it may do still works (the refusals below are not a dead connection).
    assert rank.set(ka.run(t.project("mine"), "fresh"), "pending:x", nx=True, px=5000)
    assert rank.xadd(ka.metrics(own["id"]), {"_rank": 0, "_step": 9, "_time": 1, "x": 1})
    own_stream, own_key = ka.metrics(own["id"]), ka.run(t.project("mine"), "m1")
    theirs, their_new = kb.run(t.project("victim"), "v1"), kb.run(t.project("victim"), "new")
    for command in [
        ("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("SCAN", "0"), ("RANDOMKEY",),
        ("CONFIG", "GET", "*"), ("ACL", "LIST"), ("SHUTDOWN", "NOSAVE"), ("MONITOR",),
        # its own tenant's streams: append only, never read, trim or delete from them
        ("XRANGE", own_stream, "-", "+"), ("XREAD", "STREAMS", own_stream, "0"),
        ("XREVRANGE", ka.control, "+", "-"), ("XREADGROUP", "GROUP", "workers", "x",
                                             "STREAMS", ka.control, ">"),
        ("XTRIM", own_stream, "MAXLEN", "0"), ("XDEL", own_stream, "0-1"),
        ("XACK", ka.control, "workers", "0-1"), ("XGROUP", "DESTROY", ka.control, "workers"),
        ("DEL", own_key), ("UNLINK", own_key), ("GETDEL", own_key), ("RENAME", own_key, "x"),
        ("SET", own_stream, "x"), ("HSET", own_stream, "a", "1"), ("XADD", own_key, "*", "a", "1"),
        ("GET", own_stream), ("XADD", ka.info(1), "*", "a", "1"), ("SET", ka.created("t"), "0"),
        ("SADD", ka.runs, "1"), ("HSET", ka.workers, "me", "1"), ("HSET", ka.info(1), "a", 1),
        ("EVAL", "return 1", "0"),
        # another tenant's keys: nothing at all
        ("GET", theirs), ("SET", theirs, "13"), ("SET", their_new, "13", "NX"),
        ("XADD", kb.control, "*", "op", "x"), ("XADD", kb.metrics(victim["id"]), "*", "_rank", "0"),
        ("XREAD", "STREAMS", kb.announce(t.project("victim"), "v1"), "0"),
        ("HSET", kb.members(victim["id"]), "m", "x"), ("HGET", kb.info(victim["id"]), "name"),
        ("HVALS", kb.workers), ("EXPIRE", theirs, "1"),
        # and the keys of a deployment without tenant
        ("XADD", Keys(t.prefix).control, "*", "op", "x"), ("GET", Keys(t.prefix).run("a", "b")),
    ]:
        _refused(rank, *command)
    # A script runs with the caller's permissions: loading one does not widen them.
    sha = rank.script_load("return redis.call('SET', KEYS[1], '13')")
    _refused(rank, "EVALSHA", sha, "1", theirs)
    _refused(rank, "EVALSHA", sha, "1", own_stream)
    rank.close()
    after = {key: r.dump(key) for key in r.scan_iter(match=f"{t.prefix}@*", count=1000)}
    changed = {k for k in before if before[k] != after.get(k)}
    # Only its own run's keys changed (the one entry it appended, which the worker stored).
    mine = f"{ka.root}:{{{own['id']}}}:".encode()
    beats = {ka.workers.encode(), kb.workers.encode()}  # the worker's own heartbeats, each second
    assert {k for k in changed if not k.startswith(mine)} - beats == set()
    assert all(k.startswith(f"{t.prefix}@{t.a}:".encode()) for k in set(after) - set(before))
    assert r.get(theirs) == str(victim["id"]).encode()


# -- what arrives on a tenant's streams names only its projects ------------------------------

def test_a_create_for_another_tenants_project_is_refused_and_init_says_why(
        tenancy: Tenancy, tmp_path: Path) -> None:
    t = tenancy
    victim = t.run_rank(tmp_path, t.b, t.project("victimproj"), "v1")
    assert victim["code"] == 0, victim
    wait_until(lambda: t.backend.run(victim["id"])["status"] == "COMPLETED", 60, "the victim run")
    points = t.backend.points(victim["id"], "loss")
    attacker = t.run_rank(tmp_path, t.a, t.project("victimproj"), "v1")  # resume B's run?
    assert attacker["code"] == 3, attacker
    assert "refused" in attacker["error"] and "belongs to another tenant" in attacker["error"]
    again = t.run_rank(tmp_path, t.a, t.project("victimproj"), "new")  # a run in B's project?
    assert again["code"] == 3 and "belongs to another tenant" in again["error"], again
    assert [run["id"] for run in t.backend.runs(t.project("victimproj"))] == [victim["id"]]
    assert t.backend.points(victim["id"], "loss") == points
    assert t.backend.run(victim["id"])["status"] == "COMPLETED"


def test_a_run_key_pointing_at_another_tenants_run_gets_nothing_in(
        tenancy: Tenancy, r: redis.Redis, tmp_path: Path) -> None:
    """The hijack of issue 18: ``SET <run key> 13`` where 13 is another team's run."""
    t = tenancy
    victim = t.run_rank(tmp_path, t.b, t.project("victimproj"), "v1")
    wait_until(lambda: t.backend.run(victim["id"])["status"] == "COMPLETED", 60, "the victim run")
    before = t.backend.run(victim["id"])
    points = t.backend.points(victim["id"], "loss")
    ka = t.keys(t.a)
    rank = redis.Redis.from_url(t.rank_url(t.a))
    assert rank.set(ka.run(t.project("mine"), "hijack"), str(victim["id"]))  # its own key
    rank.close()
    attacker = t.run_rank(tmp_path, t.a, t.project("mine"), "hijack")
    assert attacker["code"] == 0 and attacker["id"] == victim["id"], attacker

    def refusals() -> list[str]:
        dead = r.xrange(ka.control_dead)
        return [fields[b"reason"].decode() for _, fields in dead]

    reasons = wait_until(lambda: len(refusals()) >= 3 and refusals(), 60,
                         "the attach, config and finish to be dead-lettered")
    assert all("belongs to another tenant" in why for why in reasons), reasons
    assert str(victim["id"]).encode() not in r.smembers(ka.runs)
    after = t.backend.run(victim["id"])
    assert after["status"] == "COMPLETED" and after["config"] == before["config"]
    assert [m["member"] for m in after["members"]] == [m["member"] for m in before["members"]]
    assert t.backend.points(victim["id"], "loss") == points
    assert r.xlen(ka.metrics(victim["id"])) == 5  # written where nobody reads it, not lost
    # Had the id got into the tenant's runs set anyway (a rank without ACLs can add it), the
    # worker would not serve it: it checks whose run it is first, and says so.
    r.xgroup_create(ka.metrics(victim["id"]), "workers", "0")
    r.sadd(ka.runs, victim["id"])
    assert t.worker is not None
    wait_until(lambda: f"run {victim['id']} in {ka.runs} is not served" in t.worker.log(), 60,
               "the worker to refuse the run in its runs set")
    time.sleep(3)  # several reads and run checks of the worker (every 0.25 s) have passed
    after = t.backend.run(victim["id"])
    assert after["status"] == "COMPLETED" and after["members"] == before["members"]
    assert t.backend.points(victim["id"], "loss") == points
    assert r.xlen(ka.metrics(victim["id"])) == 5 and not r.exists(ka.dead(victim["id"]))
    for secret in t.passwords():
        assert secret not in t.logs()


# -- the pieces, each on its own -------------------------------------------------------------

def test_tenant_names_are_checked_and_keys_stay_apart() -> None:
    assert Keys("pluto").control == "pluto:control"  # no tenant: exactly as before
    assert Keys("pluto", "vision").metrics(7) == "pluto@vision:{7}:metrics"
    assert Keys("p*", "a").pattern == "p\\*@a:*"
    for bad in ("A", "a:b", "a*", "a@b", "x" * 33, " a"):
        with pytest.raises(ValueError):
            Keys("pluto", bad)
        with pytest.raises(ConfigError, match="PLUTO_TENANT"):
            Settings.from_env({"PLUTO_TENANT": bad + "?"})
    assert Settings.from_env({"PLUTO_TENANT": "team-1"}).tenant == "team-1"
    assert WorkerSettings.from_env({"PLUTO_TENANTS": "a, b,a"}).tenants == ("a", "b")
    assert WorkerSettings.from_env({}).tenants == ("",)
    with pytest.raises(ConfigError, match="PLUTO_TENANTS"):
        WorkerSettings.from_env({"PLUTO_TENANTS": "a,B"})
    each = WorkerSettings.from_env({"PLUTO_TENANTS": "a,b", "PLUTO_WORKER_NAME": "w"}).each()
    assert [(s.tenant, s.name) for s in each] == [("a", "w@a"), ("b", "w@b")]


def test_acl_prints_placeholders_never_a_given_password() -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    env = clean_env(PLUTO_PREFIX="pluto", PYTHONPATH=str(ROOT),
                    PLUTO_ACL_PASSWORD_PLUTO_RANK_VISION=secret,
                    PLUTO_ACL_PASSWORD_PLUTO_WORKER=secret)
    done = _acl_cli(env, "--tenant", "vision")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["pluto-rank-vision", "pluto-worker"]
    assert "><password-of-pluto-rank-vision>" in lines[0]
    assert "%W~pluto@vision:control" in lines[0] and "~pluto@vision:*" in lines[1]
    assert secret not in done.stdout + done.stderr
    assert hashlib.sha256(secret.encode()).hexdigest() not in done.stdout
    refused = _acl_cli(clean_env(PYTHONPATH=str(ROOT)), "--tenant", "Bad*")
    assert refused.returncode == 1 and "--tenant" in refused.stderr


def test_acl_apply_without_passwords_names_the_fix(redis_url: str) -> None:
    admin = redis_url.replace("redis://", "redis://default:hunter2-admin@")
    done = _acl_cli(clean_env(PYTHONPATH=str(ROOT)), "--tenant", "nopw", "--apply",
                    "--redis-url", admin)
    assert done.returncode == 1
    assert "PLUTO_ACL_PASSWORD_PLUTO_RANK_NOPW" in done.stderr and "--generate" in done.stderr
    assert "hunter2-admin" not in done.stdout + done.stderr


def test_acl_apply_with_wrong_admin_credentials_does_not_echo_them(redis_url: str) -> None:
    admin = redis_url.replace("redis://", "redis://nobody:hunter2-admin@")
    done = _acl_cli(clean_env(PYTHONPATH=str(ROOT)), "--tenant", "wrongadmin", "--generate",
                    "--apply", "--redis-url", admin)
    assert done.returncode == 1 and "could not apply" in done.stderr
    assert "hunter2-admin" not in done.stdout + done.stderr
    assert "PLUTO_REDIS_URL=" not in done.stdout  # nothing applied: no credentials shown


def test_backend_refuses_a_create_across_tenants_for_good(backend: Backend) -> None:
    project = f"owned-{uuid.uuid4().hex[:8]}"
    with backend.client() as c:
        first = c.post("/api/runs/create", json={"projectName": project, "externalId": "x",
                                                 "tenant": "team-a"})
        assert first.status_code == 200, first.text
        run = first.json()["runId"]
        for tenant in ("team-b", None):  # another tenant, and the default (none)
            body = {"projectName": project, "externalId": "x", "tenant": tenant}
            refused = c.post("/api/runs/create", json=body)
            assert refused.status_code == 403, refused.text
            assert refused.headers["X-Pluto-Refused"] == "tenant"
            assert "belongs to another tenant" in refused.json()["error"]
        again = c.post("/api/runs/create", json={"projectName": project, "externalId": "x",
                                                 "tenant": "team-a"})
        assert again.json() == {**first.json(), "resumed": True}
        for bad in ("Team A", 7, ["a"], "a" * 40):
            answer = c.post("/api/runs/create", json={"projectName": project, "tenant": bad})
            assert answer.status_code == 400, (bad, answer.text)
        assert c.get(f"/api/runs/{run}").json()["tenant"] == "team-a"
        assert len(backend.runs(project)) == 1
    with backend.client() as c:  # a project without tenant stays the default one's
        plain = c.post("/api/runs/create", json={"projectName": project + "-plain"}).json()
        assert c.get(f"/api/runs/{plain['runId']}").json()["tenant"] == ""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_each_store_keeps_a_project_with_the_tenant_that_made_it(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path / 'pluto.db'}" if kind == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = open_store(url)
    try:
        run, resumed = store.create_run("p", "x", "n", None, None, "team-a")
        assert (run, resumed) == (store.create_run("p", "x", "n", {"a": 1}, None, "team-a")[0],
                                  False)
        for other in ("team-b", ""):
            with pytest.raises(ForeignProject, match="belongs to another tenant"):
                store.create_run("p", "x", "n", {"evil": 1}, None, other)
            with pytest.raises(ForeignProject):
                store.create_run("p", "fresh", "n", None, None, other)
        assert store.find_run("p", "fresh") is None
        assert store.get_run(run)["config"] == {"a": 1}  # the refused config never landed
        assert (store.tenant_of("p"), store.tenant_of("q")) == ("team-a", "")
        store.create_run("q", "x", "n", None, None)
        with pytest.raises(ForeignProject):
            store.create_run("q", "y", "n", None, None, "team-a")
    finally:
        store.close()


def test_projects_made_before_tenancy_belong_to_the_default_tenant(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    db.executescript(_schema._BASE)
    db.execute("BEGIN IMMEDIATE")
    for step in _schema._MIGRATIONS[:4]:
        step(db)
    db.execute("INSERT INTO schema_version VALUES (4)")
    db.execute("INSERT INTO runs (project, external_id, name, status, created_at, updated_at)"
               " VALUES ('old', 'r', '', 'COMPLETED', 0, 0)")
    db.execute("COMMIT")
    assert _schema.migrate(db) == _schema.VERSION
    assert db.execute("SELECT project, tenant FROM project_tenants").fetchall() == [("old", "")]
    db.close()


def test_one_worker_process_serving_two_tenants_labels_its_metrics() -> None:
    workers = [(tenant, Metrics(f"w@{tenant}", "test")) for tenant in ("a", "b")]
    workers[0][1].on_read("metrics", 3)
    workers[1][1].on_read("metrics", 5)
    port = _servers.free_port()
    serve_metrics(workers, port, host="127.0.0.1")
    text = wait_until(lambda: _scrape(port), 30, "the metrics endpoint")
    assert 'pluto_worker_entries_read_total{stream="metrics",tenant="a"} 3.0' in text
    assert 'pluto_worker_entries_read_total{stream="metrics",tenant="b"} 5.0' in text
    assert text.count("# TYPE pluto_worker_entries_read_total counter") == 1  # one family


def _scrape(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return None


def test_a_worker_without_tenant_dead_letters_entries_for_a_tenants_run(
        stack: Stack, r: redis.Redis) -> None:
    """Entries that reach a worker for a run of a tenant it does not serve are refused, each
    one dead-lettered with the reason: nothing is posted, nothing vanishes."""
    with stack.backend.client() as c:
        made = c.post("/api/runs/create", json={"projectName": f"tenanted-{stack.prefix}",
                                                "externalId": "x", "tenant": "someone"})
    run = made.json()["runId"]
    keys = stack.keys
    for step in (1, 2, 3):
        r.xadd(keys.metrics(run), {"_rank": 0, "_step": step, "_time": 1, "loss": 0.5})
    r.xgroup_create(keys.metrics(run), "workers", "0")
    r.sadd(keys.runs, run)
    dead = wait_until(lambda: len(r.xrange(keys.dead(run))) == 3 and r.xrange(keys.dead(run)),
                      60, "the entries to be dead-lettered")
    assert all(b"belongs to another tenant" in fields[b"reason"] for _, fields in dead)
    assert stack.backend.get(f"/api/runs/{run}/metrics")["names"] == []
