"""Hostile input through the whole system: junk stream entries (written with redis-cli, as
anyone with access to Redis could) and SQL- and HTML-looking metric names through the SDK.

Malformed requests to the backend are in tests/backend/test_ingest.py and
tests/backend/test_validation.py; a 10 kB run id in tests/sdk/test_api.py (refused in
``init``, before any write, so a rank process adds nothing there)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import redis

from pluto import protocol as K
from tests.chaos import ranks
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

BIG = 2**70  # a valid value msgpack cannot carry: it used to crash every worker that read it


def _cli(url: str, *args: str, stdin: bytes | None = None) -> None:
    """``redis-cli`` when installed (``-x``: the last argument from stdin), else redis-py."""
    parts = urlsplit(url)
    exe = shutil.which("redis-cli")
    if exe:
        cmd = [exe, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        cmd += ["-x"] if stdin is not None else []
        out = subprocess.run([*cmd, *args], input=stdin, capture_output=True, timeout=20,
                             check=False)
        assert out.returncode == 0 and b"ERR" not in out.stdout, out
    else:
        with redis.Redis.from_url(url) as r:
            r.execute_command(*args, *([stdin] if stdin is not None else []))


def test_junk_stream_entries_are_dead_lettered(bare_stack: Stack, r: redis.Redis, tmp_path: Path,
                                               report: list[dict[str, Any]]) -> None:
    stack = bare_stack
    stack.start_worker()
    run_id, stop = f"junk-{uuid.uuid4().hex[:6]}", tmp_path / "stop"
    proc = ranks.start(stack, tmp_path, 0, run_id=run_id, stop_file=str(stop), chunk=5,
                       pace=0.02)
    run = int(wait_until(lambda: (v := r.get(stack.keys.run("chaos", run_id))) and v.isdigit()
                         and v, 30, "run id"))
    stream, url = stack.keys.metrics(run), stack.redis_url
    wait_until(lambda: ranks.points(stack.backend, run, 0), 20, "rank logging")
    head = ["XADD", stream, "*", K.F_RANK, "0"]
    junk = [  # (why, argv, stdin)
        ("missing field b'_step'", [*head, K.F_TIME, "1", "m/junk", "1"], None),
        ("not a number", [*head, K.F_STEP, "7", K.F_TIME, "1", "m/junk", "abc"], None),
        ("not a number", [*head, K.F_STEP, "8", K.F_TIME, "1", "m/junk"], b"9" * (1 << 20)),
        ("characters long", [*head, K.F_STEP, "9", K.F_TIME, "1", "n" * 10_000, "1"], None),
        ("not a number", [*head, K.F_STEP, "10", K.F_TIME, "1", "m/junk"], b"\xff\xfe\x00junk"),
    ]
    for _, argv, stdin in junk:
        _cli(url, *argv, stdin=stdin)
    r.xadd(stream, {K.F_RANK: "0", K.F_STEP: "12", K.F_TIME: "1", b"\xff\xfe": b"1"})
    _cli(url, *head, K.F_STEP, "11", K.F_TIME, "1", "m/big", str(BIG))  # valid, if unusual
    dead = wait_until(lambda: (d := r.xrange(stack.keys.dead(run))) and len(d) >= 6 and d, 30,
                      "six dead letters")
    reasons = [d[1][K.F_DEAD_REASON.encode()].decode() for d in dead]
    assert len(dead) == 6, reasons
    for (why, _, _), reason in zip(junk, reasons):
        assert why in reason and reason.startswith("undecodable"), (why, reason)
    assert "utf-8" in reasons[5].lower() or "decode" in reasons[5].lower(), reasons[5]
    assert dead[2][1][b"m/junk"] == b"9" * (1 << 20)  # the original fields travel along
    wait_until(lambda: ranks.points(stack.backend, run, 0) and
               stack.backend.points(run, "m/big"), 20, "the big value stored")
    assert stack.backend.points(run, "m/big") == [[11, BIG, 1]]
    stop.touch()
    [got] = ranks.results([proc])
    ranks.wait_stored(stack.backend, run, {0: got["logged"]})
    c = ranks.check_rank(stack.backend, run, 0, list(range(1, got["last"] + 1)))
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 20, "COMPLETED")
    assert all(w.alive() for w in stack.workers)  # nothing here kills a worker
    report.append(ranks.row("9 hostile stream entries", got["logged"] + 1, c["stored"] + 1,
                            c["duplicates"], None, dead_letters=len(dead)))


NAMES = ["'; DROP TABLE metrics;--", "<script>alert(1)</script>", "Robert'); DROP TABLE runs;--",
         "a/\"quoted\"/b", "100% {braces} : colons"]

SQL_RANK = """
import json, sys, pluto
names = json.loads(sys.argv[2])
with pluto.init(project="hostile", run_id=sys.argv[1]) as run:
    for step in range(1, 4):
        run.log({name: step + i / 8 for i, name in enumerate(names)})
print("RESULT " + json.dumps({"id": run.id}), flush=True)
"""


def test_sql_and_html_names_are_stored_verbatim(stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, SQL_RANK, "sql.py")
    code, out, err = finish_rank(start_rank(script, stack.env(), uuid.uuid4().hex,
                                            json.dumps(NAMES)))
    assert code == 0, err
    run = json_lines(out)[0]["id"]
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 20, "COMPLETED")
    assert sorted(stack.backend.get(f"/api/runs/{run}/metrics")["names"]) == sorted(NAMES)
    for i, name in enumerate(NAMES):
        got = stack.backend.get(f"/api/runs/{run}/metrics/{quote(name, safe='/')}")
        assert got["name"] == name
        assert [p[:2] for p in got["points"]] == [[s, s + i / 8] for s in (1, 2, 3)]
    # The tables still work: the runs list, the run, other runs' metrics.
    assert any(x["id"] == run for x in stack.backend.runs("hostile"))
    assert stack.backend.run(run)["members"]
