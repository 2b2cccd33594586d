"""Console lines a rank loses are in the run's loss ledger: a real rank process writes far more
console lines than its buffer (``PLUTO_CONSOLE_BUFFER``) holds between two sends, a real worker
carries its members row to the backend, and the count the backend shows — the member's
``drops.console``, the run's ``ledger.console_dropped`` and the runs list's ``console_dropped``
— is the one the rank reported, and with the lines stored accounts for every line written."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pluto import _servers
from pluto._console import Console, _Tee
from pluto._producer import Ledger
from tests.conftest import Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script

pytestmark = pytest.mark.timeout(240)

LINES = 20_000

RANK = """
    import json, sys
    import pluto

    with pluto.init(project=sys.argv[1], name="console-drops") as run:
        for i in range(int(sys.argv[2])):
            sys.stdout.write(f"burst line {i}\\n")  # one write per line: a piece is a line
        run.log({"x": 1})
    print("RESULT " + json.dumps({"id": run.id}), flush=True)
"""


def _all_lines(stack: Stack, run: int) -> list[dict[str, Any]]:
    """Every stored line, through the dashboard's paged route (5,000 per page)."""
    got: list[dict[str, Any]] = []
    after = 0
    while True:
        page = stack.backend.get(f"/api/runs/{run}/logs", after=after, limit=5000)
        got += page["lines"]
        if not page["more"]:
            return got
        after = page["lines"][-1]["id"]


def test_console_lines_a_rank_dropped_are_in_the_ledger(stack: Stack, tmp_path: Any) -> None:
    project = "console-drops-" + tmp_path.name[-8:]
    script = write_script(tmp_path, RANK)
    proc = start_rank(script, stack.env(PLUTO_CONSOLE_BUFFER="16", RANK="0"), project,
                      str(LINES))
    code, out, err = finish_rank(proc, 180)
    assert code == 0, err[-3000:]
    [result] = json_lines(out)
    run = int(result["id"])
    reported = re.findall(r"pluto: (\d+) console lines never reached Redis", err)
    assert len(reported) == 1, err[-3000:]  # the rank says what it lost, once, at finish
    dropped = int(reported[0])
    assert 0 < dropped < LINES, dropped  # 16 pieces cannot hold a burst of 20,000 lines

    def settled() -> Any:
        got = stack.backend.run(run)
        return got["status"] == "COMPLETED" and got["ledger"]["console_dropped"] and got

    done = wait_until(settled, 90, "the run COMPLETED with its console drops")
    [member] = done["members"]
    assert member["drops"] == {"console": dropped}
    assert done["ledger"]["console_dropped"] == dropped
    assert (member["dropped"], done["ledger"]["lost"]) == (0, 0)  # entries: none lost
    [listed] = stack.backend.runs(project)
    assert listed["console_dropped"] == dropped and listed["lost"] == 0

    def stored() -> list[dict[str, Any]] | None:
        lines = _all_lines(stack, run)
        return lines if len(lines) + dropped >= LINES else None

    lines = wait_until(stored, 90, "the lines that were not dropped stored")
    assert len(lines) + dropped == LINES  # every line written is stored or counted
    numbers = [int(x["message"].rsplit(" ", 1)[1]) for x in lines]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert numbers[-1] == LINES - 1  # the oldest are dropped, the newest kept


def test_the_ledger_reads_the_consoles_final_count_and_entries_stay_apart() -> None:
    dead = redis.Redis(host="127.0.0.1", port=_servers.free_port(), socket_connect_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    console = Console(dead, "nowhere:{1}:logs", rank=0, buffer=50, interval=0.02)
    ledger = Ledger(sent=5, console=lambda: console.dropped)
    assert ledger.as_fields(0)["drops"] == {}  # nothing lost: no reason listed
    console._thread.start()
    shown = io.StringIO()
    tee = _Tee(shown, "stdout", console)
    for i in range(300):
        tee.write(f"line {i}\n")
    console.close(0.5)
    assert ledger.as_fields(0) == {"logged": 5, "sent": 5, "dropped": 0,
                                   "drops": {"console": 300}}
    tee.write("written to a stale tee after finish\n")  # still shown, no longer counted
    assert shown.getvalue().endswith("after finish\n")
    assert ledger.as_fields(0)["drops"] == {"console": 300} and console.dropped == 300
