"""Metrics from many ranks reach the backend exactly once, bit-identical; run status follows."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import redis

from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

TRICKY = [0.1 + 0.2, 1e-300, 5e-324, -0.0, 1.7976931348623157e308, 2**53 + 1, -(2**62), 0, 1 / 3]


def value(rank: int, step: int, metric: int) -> float | int:
    """The value rank ``rank`` logs at ``step`` for metric ``metric`` (the test recomputes it)."""
    if step % 97 == 0:
        return TRICKY[(step // 97 + metric + rank) % len(TRICKY)]
    rng = random.Random(rank * 1_000_003 + step * 7 + metric)
    return struct.unpack("<d", struct.pack("<Q", rng.getrandbits(62)))[0] if metric == 2 else rng.random()


RANK = """
import json, os, sys
sys.path.insert(0, os.environ["TESTS_ROOT"])
import pluto
from tests.e2e.test_metrics import value
rank, steps = int(os.environ["RANK"]), int(sys.argv[2])
with pluto.init(project="bulk", run_id=sys.argv[1]) as run:
    for step in range(1, steps + 1):
        run.log({f"train/loss/rank{rank}": value(rank, step, 0),
                 f"train/acc/rank{rank}": value(rank, step, 1),
                 f"weird/bits/rank{rank}": value(rank, step, 2)})
print("RESULT " + json.dumps({"id": run.id, "rank": rank}), flush=True)
"""


def _run_ranks(stack: Stack, tmp: Path, run_id: str, ranks: int, steps: int) -> int:
    from tests.conftest import ROOT

    script = write_script(tmp, RANK, "bulk.py")
    procs = [start_rank(script, stack.env(RANK=str(r), TESTS_ROOT=str(ROOT)), run_id, str(steps))
             for r in range(ranks)]
    ids = set()
    for p in procs:
        code, out, err = finish_rank(p, 120)
        assert code == 0, err
        ids |= {x["id"] for x in json_lines(out)}
    assert len(ids) == 1
    return ids.pop()


def assert_all_points(stack: Stack, run: int, ranks: int, steps: int) -> None:
    for rank in range(ranks):
        for metric, name in enumerate((f"train/loss/rank{rank}", f"train/acc/rank{rank}",
                                       f"weird/bits/rank{rank}")):
            points = stack.backend.points(run, name)
            assert [p[0] for p in points] == list(range(1, steps + 1)), name
            for step, got, _ in points:
                want = value(rank, step, metric)
                assert type(got) is type(want) and repr(got) == repr(want), (name, step, got, want)


def test_4_ranks_2000_steps_every_point_exactly_once(stack: Stack, tmp_path: Path,
                                                    r: redis.Redis) -> None:
    ranks, steps = 4, 2000
    run = _run_ranks(stack, tmp_path, f"bulk-{uuid.uuid4().hex[:6]}", ranks, steps)
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 60, "run COMPLETED")
    names = stack.backend.get(f"/api/runs/{run}/metrics")["names"]
    assert len(names) == ranks * 3
    assert_all_points(stack, run, ranks, steps)
    assert r.xlen(stack.keys.metrics(run)) == ranks * steps  # one entry per log() call
    members = stack.backend.run(run)["members"]
    assert sorted(m["rank"] for m in members) == list(range(ranks))
    assert {m["state"] for m in members} == {"finished"}


def test_stream_is_readable_with_redis_cli(stack: Stack, tmp_path: Path, redis_url: str) -> None:
    run = _run_ranks(stack, tmp_path, f"cli-{uuid.uuid4().hex[:6]}", 1, 3)
    stream = stack.keys.metrics(run)
    cli = shutil.which("redis-cli")
    if cli:
        out = subprocess.run([cli, "-u", redis_url, "XREAD", "COUNT", "1", "STREAMS", stream, "0"],
                             capture_output=True, text=True, check=True).stdout
    else:  # the same reply, read with a plain client
        reply = redis.Redis.from_url(redis_url, decode_responses=True).xread({stream: 0}, count=1)
        out = "\n".join(str(x) for x in reply[0][1][0][1].items())
    for text in ("_rank", "_step", "_time", "train/loss/rank0", repr(value(0, 1, 0))):
        assert text in out, out
    assert out.index("_rank") < out.index("_step") < out.index("_time") < out.index("train/")


FAILING = """
import os, sys, pluto
with pluto.init(project="status", run_id=sys.argv[1]) as run:
    run.log({"x": 1.0})
    if os.environ["RANK"] == sys.argv[2]:
        raise RuntimeError("boom")
"""


@pytest.mark.parametrize("failing_rank", [None, "1"])
def test_run_status_completed_or_failed(stack: Stack, tmp_path: Path,
                                        failing_rank: str | None) -> None:
    script = write_script(tmp_path, FAILING, "status.py")
    run_id = f"status-{uuid.uuid4().hex[:6]}"
    procs = [start_rank(script, stack.env(RANK=str(k)), run_id, failing_rank or "-1")
             for k in range(3)]
    codes = [finish_rank(p)[0] for p in procs]
    assert codes.count(1) == (1 if failing_rank else 0)
    [run] = [x for x in stack.backend.runs("status") if x["externalId"] == run_id]
    want = "FAILED" if failing_rank else "COMPLETED"
    wait_until(lambda: stack.backend.run(run["id"])["status"] == want, 30, want)
    states = sorted(m["state"] for m in stack.backend.run(run["id"])["members"])
    assert states == (["failed", "finished", "finished"] if failing_rank else ["finished"] * 3)


BAD_INPUT = """
import json, math, os, sys, warnings
import numpy as np
import pluto
warnings.simplefilter("always")
caught_all = []
with pluto.init(project="bad", run_id=sys.argv[1]) as run:
    with warnings.catch_warnings(record=True) as caught:
        run.log({"ok/nan": math.nan, "ok/inf": math.inf, "ok/ninf": -math.inf,
                 "ok/np": np.float32(0.5), "ok/npint": np.int64(7), "ok/bool": True,
                 "ok/one": np.array([2.5]), "nested": {"deep": {"x": 1}},
                 "bad/str": "hello", "bad/none": None, "bad/list": [1, 2],
                 "bad/array": np.zeros(3), "": 1.0, "k" * 10_000: 1.0, "ctl\\x07": 1.0,
                 "_private": 1.0, 5: 1.0})
        run.log({"bad/str": "again"})  # warned once per key
        run.log("not a dict")
        run.log({"ok/step": 1.0}, step="seven")
    caught_all = [str(w.message) for w in caught]
    strict = pluto.init(project="bad", run_id=sys.argv[1] + "-strict", settings={"strict": True})
    try:
        strict.log({"bad/str": "x"})
        raised = None
    except TypeError as exc:
        raised = str(exc)
    strict.finish()
print("RESULT " + json.dumps({"id": run.id, "warnings": caught_all, "raised": raised}), flush=True)
"""


def test_bad_input_warns_once_and_good_keys_land(stack: Stack, tmp_path: Path) -> None:
    script = write_script(tmp_path, BAD_INPUT, "bad.py")
    code, out, err = finish_rank(start_rank(script, stack.env(), f"bad-{uuid.uuid4().hex[:6]}"))
    assert code == 0, err
    [res] = json_lines(out)
    warned = "\n".join(res["warnings"])
    for key in ("bad/str", "bad/none", "bad/list", "bad/array", "''", "kkkk", "ctl", "_private",
                "5", "takes a dict", "step"):
        assert key in warned, (key, warned)
    assert sum("bad/str" in w for w in res["warnings"]) == 1
    assert res["raised"] and "bad/str" in res["raised"] and "PLUTO_STRICT" in res["raised"]
    run = res["id"]
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 30, "COMPLETED")
    names = set(stack.backend.get(f"/api/runs/{run}/metrics")["names"])
    assert names == {"ok/nan", "ok/inf", "ok/ninf", "ok/np", "ok/npint", "ok/bool", "ok/one",
                     "nested/deep/x", "ok/step"}
    got = {n: stack.backend.points(run, n)[0][1] for n in names}
    assert got["ok/nan"] == "NaN" and got["ok/inf"] == "Infinity" and got["ok/ninf"] == "-Infinity"
    assert got["ok/np"] == 0.5 and got["ok/npint"] == 7 and got["ok/bool"] == 1
    assert got["ok/one"] == 2.5 and got["nested/deep/x"] == 1
    # Four calls: the one whose keys were all bad and the non-dict one still counted a step;
    # the bad step= was ignored, so the fourth call got previous + 1.
    assert stack.backend.points(run, "ok/step")[0][0] == 4
