"""How a rank's process ends: SIGTERM from a launcher, a forgotten finish(), an uncaught error.

Whatever log() accepted before the end reaches the backend; the member's state says how it ended.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.helpers import finish_rank, start_rank, wait_until, write_script

RANK = """
import sys, time, pluto
run = pluto.init(project="exit", run_id=sys.argv[1])
how = sys.argv[2]
assert pluto.run is run
log = pluto.log if how == "forget" else run.log   # the module-level conveniences work too
for step in range(5000):
    log({"x": float(step), "y": step})
print("LOGGED", flush=True)
if how == "sigterm":
    time.sleep(60)          # the launcher's SIGTERM arrives while we 'train'
elif how == "raise":
    raise RuntimeError("diverged")
# how == "forget": exit without finish()
"""


@pytest.mark.parametrize("how,status,state,code", [
    ("sigterm", "TERMINATED", "terminated", -signal.SIGTERM),
    ("forget", "COMPLETED", "finished", 0),
    ("raise", "FAILED", "failed", 1),
])
def test_every_accepted_point_lands_however_the_rank_ends(
        stack: Stack, tmp_path: Path, how: str, status: str, state: str, code: int) -> None:
    run_id = f"exit-{uuid.uuid4().hex[:6]}"
    proc = start_rank(write_script(tmp_path, RANK, "exit.py"), stack.env(), run_id, how)
    if how == "sigterm":
        assert proc.stdout is not None and proc.stdout.readline().strip() == "LOGGED"
        proc.send_signal(signal.SIGTERM)
    rc, _, err = finish_rank(proc)
    assert rc == code, err
    [run] = [r for r in stack.backend.runs("exit") if r["externalId"] == run_id]
    wait_until(lambda: stack.backend.run(run["id"])["status"] == status, 30, status)
    assert [m["state"] for m in stack.backend.run(run["id"])["members"]] == [state]
    for name in ("x", "y"):
        points = stack.backend.points(run["id"], name)
        assert [p[0] for p in points] == list(range(1, 5001))
    assert [p[1] for p in stack.backend.points(run["id"], "y")] == list(range(5000))
