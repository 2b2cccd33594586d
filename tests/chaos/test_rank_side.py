"""Nothing lost on the rank side (issue 13): one bad entry, a Redis that restarts into several
seconds of ``LOADING``, or a SIGTERM at any moment of a rank's life never costs the run its
data, and every loss is counted in the member's ledger (the members hash in Redis, which the
worker forwards to the backend).

Each rank here is a real process; what it logged is read back from the backend and from the
ledger it wrote, never taken from the rank's own say-so alone.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pluto import _servers
from pluto import protocol as proto
from tests.chaos import ranks
from tests.chaos.conftest import OwnRedis
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

RANK = r"""
import json, os, sys, time, warnings
warnings.simplefilter("always")
import pluto
caught = []
def show(message, category, filename, lineno, file=None, line=None):
    caught.append(str(message))  # kept for RESULT, and on stderr for a rank that dies of a signal
    print(f"WARNING {message}", file=sys.stderr, flush=True)
warnings.showwarning = show
opts = json.loads(sys.argv[1])
go, marker = opts.get("go_file"), opts.get("marker")
run = pluto.init(project=opts.get("project", "rankside"), run_id=opts["run_id"])
with open(opts["ready_file"] + ".tmp", "w") as f:
    f.write(str(run.id))
os.replace(opts["ready_file"] + ".tmp", opts["ready_file"])
if go:
    while not os.path.exists(go):
        time.sleep(0.01)
t0 = time.monotonic()
bad = {"surrogate": {"bad\udc80": 1.0}, "bigint": {"huge": 10**5000}}.get(opts.get("bad"))
for i in range(1, opts.get("total", 200) + 1):  # step i logs good=i
    run.log({**bad, "good": i} if bad and i == 101 else {"good": i})
    if opts.get("pace") and i % 10 == 0:
        time.sleep(opts["pace"] * 10)
if marker:
    open(marker, "w").write("finishing")
lost = run.finish(timeout=opts.get("finish_timeout", 30))
took = time.monotonic() - t0
if opts.get("linger"):
    time.sleep(opts["linger"])
print("RESULT " + json.dumps({"id": run.id, "lost": lost, "took": took, "warnings": caught}),
      flush=True)
"""


def _member(r: redis.Redis, keys: Any, run: int) -> dict[str, Any]:
    [raw] = r.hvals(keys.members(run))
    return dict(proto.unpack(raw))


def _good_steps(stack: Stack, run: int) -> list[int]:
    return [p[0] for p in stack.backend.points(run, "good")]


def _start(stack: Stack, tmp: Path, env: dict[str, str] | None = None,
           **opts: Any) -> subprocess.Popen[str]:
    opts.setdefault("run_id", f"rs-{uuid.uuid4().hex[:8]}")
    opts.setdefault("ready_file", str(tmp / f"ready-{uuid.uuid4().hex[:6]}"))
    script = write_script(tmp, RANK, "rank_side.py")
    proc = start_rank(script, stack.env(**{"RANK": "0", **(env or {})}), json.dumps(opts))
    ranks.STARTED.append(proc)
    return proc


def _ready(proc: subprocess.Popen[str]) -> int:
    """The run id, once the rank's init returned (read from a file: reading a line of its
    stdout here would buffer what ``communicate`` must see later)."""
    path = Path(json.loads(proc.args[-1])["ready_file"])  # type: ignore[index]
    wait_until(lambda: path.exists() or proc.poll() is not None, 60, "init to return")
    assert path.exists(), proc.communicate()[1][-3000:]
    return int(path.read_text())


@pytest.mark.parametrize("bad,reason", [("surrogate", "bad_value"), ("bigint", "bad_entry")])
def test_one_bad_entry_costs_only_itself(stack: Stack, r: redis.Redis, tmp_path: Path,
                                         bad: str, reason: str,
                                         report: list[dict[str, Any]]) -> None:
    proc = _start(stack, tmp_path, bad=bad, finish_timeout=20)
    run = _ready(proc)
    code, out, err = finish_rank(proc)
    assert code == 0, err[-3000:]
    [res] = json_lines(out)
    assert res["took"] < 15, res  # finish() did not wait for its whole timeout
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
    steps = _good_steps(stack, run)
    member = _member(r, stack.keys, run)
    if reason == "bad_value":  # the bad name alone went; its entry (with "good") landed
        assert steps == list(range(1, 201)), steps[:5]
        assert res["lost"] == 0 and member["drops"] == {"bad_value": 1}
        assert sum("bad\\udc80" in w and "not valid text" in w for w in res["warnings"]) == 1
    else:  # the entry repr() cannot write is dropped alone; 199 of 200 land, 1 counted
        assert steps == [s for s in range(1, 201) if s != 101], len(steps)
        assert res["lost"] == 1 and member["drops"] == {"bad_entry": 1}
        assert "cannot be sent" in err and "huge" in err
    assert member["state"] == "finished" and member["sent"] == len(steps)
    assert member["logged"] == 200
    assert "unreachable" not in err  # a bad entry is not a Redis outage: heartbeats went on
    report.append(ranks.row(f"13.1 one bad entry ({bad})", 200, len(steps), 0, None,
                            counted_lost=member["dropped"], drops=member["drops"]))


def test_a_rank_beyond_int_range_is_one_clear_error(stack: Stack, tmp_path: Path) -> None:
    proc = _start(stack, tmp_path, env={"RANK": str(2**64)})
    code, out, err = finish_rank(proc)
    assert code != 0 and "ConfigError" in err and "RANK=18446744073709551616" in err, err[-2000:]


def _populated_redis(tmp: Path, keys: int) -> tuple[_servers.Child, int, Path]:
    """A Redis whose append-only file holds ``keys`` keys, so a restart answers LOADING for a
    while (``DEBUG POPULATE`` needs ``--enable-debug-command``)."""
    port, data = _servers.free_port(), tmp / "big-redis"
    data.mkdir()
    argv = [_servers.redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
            "--enable-debug-command", "yes", "--daemonize", "no"]
    child = _servers.spawn("big-redis", argv, data)
    _servers.wait_for(lambda: _servers.port_open("127.0.0.1", port), 15, "big redis", child)
    c = redis.Redis(port=port, socket_timeout=120)
    c.execute_command("DEBUG", "POPULATE", keys, "filler", 16)
    c.bgrewriteaof()
    wait_until(lambda: not c.info("persistence")["aof_rewrite_in_progress"]
               and not c.info("persistence")["aof_rewrite_scheduled"], 120, "AOF rewritten")
    c.close()
    return child, port, data


def _restart(argv_child: _servers.Child, port: int, data: Path) -> _servers.Child:
    argv = list(argv_child.proc.args)  # type: ignore[arg-type]
    argv_child.kill()
    return _servers.spawn("big-redis-2", [str(a) for a in argv], data)


def test_redis_restarting_into_loading_loses_nothing(private_backend: Any, tmp_path: Path,
                                                     report: list[dict[str, Any]]) -> None:
    child, port, data = _populated_redis(tmp_path, 4_000_000)
    url = f"redis://127.0.0.1:{port}/0"
    stack = Stack(url, "loading", private_backend, tmp_path / "logs")
    try:
        stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="60")
        proc = _start(stack, tmp_path, total=15_000, pace=0.001)
        run = _ready(proc)
        time.sleep(3)
        child = _restart(child, port, data)
        t0 = time.monotonic()
        probe = redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=1,
                            retry=Retry(NoBackoff(), 0))
        loading = 0.0
        while time.monotonic() - t0 < 60:
            try:
                probe.ping()
                break
            except redis.BusyLoadingError:
                loading = time.monotonic() - t0
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        answered = time.monotonic()
        assert loading > 0.5, "the restart never answered LOADING: make the dataset bigger"
        before = probe.xlen(stack.keys.metrics(run))
        wait_until(lambda: probe.xlen(stack.keys.metrics(run)) > before, 30, "entries flowing")
        recovered = time.monotonic() - answered  # Redis answers -> the rank's entries land
        code, out, err = finish_rank(proc, timeout=120)
        assert code == 0, err[-3000:]
        [res] = json_lines(out)
        assert res["lost"] == 0, err[-3000:]
        wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 60, "COMPLETED")
        steps = _good_steps(stack, run)
        assert steps == list(range(1, 15_001)), (len(steps), steps[:3])
        member = _member(probe, stack.keys, run)
        assert member["sent"] >= 15_000 and member["dropped"] == 0, member
        assert "refused" not in err and "busy" in err.lower() + "loading", err[-2000:]
        report.append(ranks.row(f"13.2 redis restart, LOADING for {loading:.1f} s", 15_000,
                                len(steps), 0, recovered, counted_lost=member["dropped"]))
        probe.close()
    finally:
        stack.stop_workers()
        child.kill()


# -- SIGTERM at five moments of a rank's life -------------------------------------------------

def _sigterm_after(proc: subprocess.Popen[str], delay: float, times: int = 1,
                   sig: int = signal.SIGTERM) -> float:
    time.sleep(delay)
    sent = time.monotonic()
    for _ in range(times):
        proc.send_signal(sig)
        time.sleep(0.2)
    return sent


def test_sigterm_before_init_returns_dies_at_once(bare_stack: Stack, tmp_path: Path) -> None:
    proc = _start(bare_stack, tmp_path)  # no worker: init waits for the run id
    sent = _sigterm_after(proc, 1.5)
    code, _, _ = finish_rank(proc, timeout=20)
    assert code == -signal.SIGTERM and time.monotonic() - sent < 10


@pytest.mark.parametrize("moment,sig", [("logging", signal.SIGTERM), ("logging", signal.SIGINT),
                                        ("idle_after_finish", signal.SIGTERM)])
def test_sigterm_while_logging_or_idle_flushes_and_dies_of_it(
        stack: Stack, r: redis.Redis, tmp_path: Path, moment: str, sig: int) -> None:
    """SIGINT goes on to Python's own handler (KeyboardInterrupt), which dies of SIGINT."""
    opts = ({"total": 100_000, "pace": 0.0005} if moment == "logging" else {"linger": 60})
    proc = _start(stack, tmp_path, **opts)
    run = _ready(proc)
    _sigterm_after(proc, 2.0, sig=sig)
    code, out, err = finish_rank(proc, timeout=40)
    assert code == -sig, err[-2000:]
    want = "terminated" if moment == "logging" else "finished"
    member = wait_until(lambda: (m := _member(r, stack.keys, run))["state"] == want and m, 20,
                        want)
    logged = member["logged"]
    assert logged > 10 and member["sent"] == logged and member["dropped"] == 0, member
    status = "TERMINATED" if moment == "logging" else "COMPLETED"
    wait_until(lambda: stack.backend.run(run)["status"] == status, 30, status)
    wait_until(lambda: len(_good_steps(stack, run)) == logged, 30, "every point stored")
    assert _good_steps(stack, run) == list(range(1, logged + 1))


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_during_finish_with_redis_paused(chaos_stack: Stack, own_redis: OwnRedis,
                                                 tmp_path: Path, signals: int,
                                                 report: list[dict[str, Any]]) -> None:
    stack = chaos_stack
    stack.start_worker(PLUTO_HEARTBEAT_TIMEOUT="60")
    go, marker = tmp_path / "go", tmp_path / "finishing"
    pause_s = 4 if signals == 1 else 25
    proc = _start(stack, tmp_path, go_file=str(go), marker=str(marker), total=20_000, env={"PLUTO_TERM_TIMEOUT": "10"}, project="chaos")
    run = _ready(proc)
    r = own_redis.client()
    r.execute_command("CLIENT", "PAUSE", str(pause_s * 1000), "WRITE")
    go.touch()
    wait_until(marker.exists, 20, "the rank calling finish()")
    sent = _sigterm_after(proc, 0.5, times=signals)
    code, _, err = finish_rank(proc, timeout=40)
    died_after = time.monotonic() - sent
    assert code == -signal.SIGTERM, err[-3000:]  # died of the signal, as the launcher expects
    if signals == 1:  # the flush finished once Redis came back: everything is there
        assert died_after < 12, died_after
        member = wait_until(lambda: (m := _member(r, stack.keys, run))["state"] == "terminated"
                            and m, 20, "terminated")
        assert member["sent"] == member["logged"] == 20_000 and member["dropped"] == 0, member
        wait_until(lambda: len(_good_steps(stack, run)) == 20_000, 30, "all stored")
        report.append(ranks.row("13.3 SIGTERM during finish(), Redis paused 4 s", 20_000,
                                20_000, 0, died_after, counted_lost=0))
    else:  # a second signal cuts the flush short: no hang, whatever was not sent is counted
        assert died_after < 10, died_after
        r.execute_command("CLIENT", "UNPAUSE")
        # Redis was paused all along, so the final ledger could not be recorded there: the
        # rank's own warning (on its stderr, as a launcher's log keeps it) is the count.
        said = re.search(r"(\d+) logged entries of run .* never reached Redis \((.*?);", err)
        assert said is not None, err[-3000:]
        lost = int(said.group(1))
        assert "finish_timeout" in said.group(2), said.group(0)
        wait_until(lambda: all(g["pending"] == 0 and g["lag"] == 0
                               for g in r.xinfo_groups(stack.keys.metrics(run))), 30,
                   "the workers through what reached Redis")
        stored = len(_good_steps(stack, run))
        assert 0 < lost and stored + lost >= 20_000, (stored, lost)  # nothing lost uncounted
        report.append(ranks.row("13.3 two SIGTERMs during finish(), Redis paused 25 s",
                                20_000, stored, 0, died_after, counted_lost=lost))
    r.close()


SWEEP = r"""
import json, os, sys, pluto, redis
run_id, n = sys.argv[1], int(sys.argv[2])
probe = redis.Redis.from_url(os.environ["PLUTO_REDIS_URL"])
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
marks = {}
for i in range(1, n + 1):
    run = pluto.init(project="sweep", run_id=run_id, config={"i": i})
    run.log({"loss": 1.0 / i})
    assert run.finish(timeout=10) == 0
    from pluto import _init
    assert _init._active == [] and pluto.run is run  # the registry keeps no finished run
    if i in (100, n):
        import threading
        marks[i] = {"clients": probe.info("clients")["connected_clients"], "rss": rss_mb(),
                    "threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd"))}
print("RESULT " + json.dumps(marks), flush=True)
"""


def test_a_thousand_runs_in_one_process_keep_connections_and_memory_flat(
        stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, SWEEP, "sweep.py")
    code, out, err = finish_rank(start_rank(script, stack.env(), f"sweep-{uuid.uuid4().hex[:6]}",
                                            "1000"), timeout=170)
    assert code == 0, err[-3000:]
    [marks] = json_lines(out)
    early, late = marks["100"], marks["1000"]
    assert late["clients"] <= early["clients"] + 2, marks
    assert late["threads"] <= early["threads"], marks
    assert late["rss"] - early["rss"] < 15, marks
    assert late["fds"] <= early["fds"] + 2, marks  # sockets closed, not only Redis's view
    print(f"1,000 runs: {marks}")


LEDGER_RANK = r"""
import json, os, sys, pluto
rank = int(os.environ["RANK"])
with pluto.init(project="ledger", run_id=sys.argv[1]) as run:
    for step in range(1, 501):
        bad = rank == 1 and step == 250  # one entry repr() cannot write: dropped and counted
        run.log({f"loss/rank{rank}": 10**5000 if bad else step / 8})
print("RESULT " + json.dumps({"id": run.id, "lost": run.lost}), flush=True)
"""


def test_the_ledger_read_back_from_the_api_equals_what_the_ranks_logged(
        stack: Stack, r: redis.Redis, tmp_path: Path) -> None:
    run_id = f"ledger-{uuid.uuid4().hex[:6]}"
    script = write_script(tmp_path, LEDGER_RANK, "ledger.py")
    procs = [start_rank(script, stack.env(RANK=str(k)), run_id) for k in range(4)]
    got = []
    for p in procs:
        code, out, err = finish_rank(p)
        assert code == 0, err[-2000:]
        got += json_lines(out)
    run = got[0]["id"]
    assert sorted(x["lost"] for x in got) == [0, 0, 0, 1]
    done = wait_until(lambda: (x := stack.backend.run(run))["status"] == "COMPLETED"
                      and x["ledger"]["stored"] == 1999 and x, 30, "COMPLETED with its ledger")
    assert done["ledger"] == {"logged": 2000, "sent": 1999, "dropped": 1, "stored": 1999,
                              "dead": 0, "missing": 0, "lost": 1, "console_dropped": 0
                              }, done["ledger"]
    by_rank = {m["rank"]: m for m in done["members"]}
    assert {k: (m["logged"], m["sent"], m["dropped"]) for k, m in by_rank.items()} == {
        0: (500, 500, 0), 1: (500, 499, 1), 2: (500, 500, 0), 3: (500, 500, 0)}
    assert by_rank[1]["drops"] == {"bad_entry": 1}
    assert {x["rank"]: (x["stored"], x["dead"], x["last_step"]) for x in done["ranks"]} == {
        0: (500, 0, 500), 1: (499, 0, 500), 2: (500, 0, 500), 3: (500, 0, 500)}
    stored = sum(len(stack.backend.points(run, f"loss/rank{k}")) for k in range(4))
    assert stored == done["ledger"]["stored"] == 1999
    env = stack.env(PLUTO_API_URL=stack.backend.url, PLUTO_API_KEY=stack.backend.key)
    shown = subprocess.run([sys.executable, "-m", "pluto._cli", "runs", str(run)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "LOST 1 entries (dropped: 1 bad_entry)" in shown.stderr, \
        shown.stderr
    printed = json.loads(shown.stdout)  # per member, as the API gave it
    assert {m["rank"]: (m["logged"], m["sent"], m["dropped"], m["stored"], m["dead"])
            for m in printed["members"]} == {0: (500, 500, 0, 500, 0), 1: (500, 499, 1, 499, 0),
                                             2: (500, 500, 0, 500, 0), 3: (500, 500, 0, 500, 0)}
    listed = subprocess.run([sys.executable, "-m", "pluto._cli", "runs", "--project", "ledger"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert f"{run_id}" in listed.stdout and "LOST 1" in listed.stdout, listed.stdout


CHAINED = r"""
import os, signal, sys, time, pluto
flag = sys.argv[2]
def theirs(sig, frame):  # the training script's own handler, installed before pluto's
    open(flag, "w").write(str(pluto.run.state.value))
    sys.exit(3)
signal.signal(signal.SIGTERM, theirs)
run = pluto.init(project="chained", run_id=sys.argv[1])
for step in range(1, 2001):
    run.log({"good": step})
open(flag + ".ready", "w").write(str(run.id))
time.sleep(60)
"""


def test_sigterm_chains_to_the_handler_installed_before_ours(stack: Stack, r: redis.Redis,
                                                              tmp_path: Path) -> None:
    flag = tmp_path / "theirs"
    script = write_script(tmp_path, CHAINED, "chained.py")
    proc = start_rank(script, stack.env(RANK="0"), f"chain-{uuid.uuid4().hex[:6]}", str(flag))
    ready = Path(str(flag) + ".ready")
    wait_until(ready.exists, 60, "the rank logging")
    run = int(ready.read_text())
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish_rank(proc, timeout=40)
    assert code == 3, err[-2000:]  # their handler ran after ours and chose the exit status
    assert flag.read_text() == "terminated"  # ours had flushed and recorded the state first
    member = _member(r, stack.keys, run)
    assert member["state"] == "terminated" and member["sent"] == member["logged"] == 2000
    wait_until(lambda: len(_good_steps(stack, run)) == 2000, 30, "every point stored")


def test_node_and_attempt_reach_the_members_list(stack: Stack, tmp_path: Path) -> None:
    run_id = f"node-{uuid.uuid4().hex[:6]}"
    script = write_script(tmp_path, LEDGER_RANK, "ledger.py")
    env = stack.env(RANK="0", GROUP_RANK="3", TORCHELASTIC_RESTART_COUNT="2")
    code, out, err = finish_rank(start_rank(script, env, run_id))
    assert code == 0, err[-2000:]
    run = json_lines(out)[0]["id"]
    [member] = wait_until(lambda: (m := stack.backend.run(run)["members"])
                          and m[0]["state"] == "finished" and m, 30, "the member finished")
    assert (member["node"], member["attempt"], member["rank"]) == (3, 2, 0), member
