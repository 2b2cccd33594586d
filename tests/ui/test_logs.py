"""The run page's Console section in a real browser, against the real backend: lines of real
rank processes (through Redis and a real worker) with rank, stream and time, the rank and text
filters, markup printed by a rank shown as text (nothing runs), live lines while the run runs,
"load older" on a long run, and console drops in the runs list and on the run page."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script
from tests.ui.conftest import Page

HOSTILE = ["<script>window.pwned = 1</script>", "<img src=x onerror=\"window.pwned = 2\">",
           "<b>bold?</b> & &amp;"]

RANK = """
    import json, sys
    import pluto

    hostile = json.loads(sys.argv[2])
    with pluto.init(project=sys.argv[1], name="console-ui") as run:
        rank = run.rank
        for i in range(5):
            run.log({f"loss/rank{rank}": 1.0 / (i + 1)})
            print(f"step {i} on rank {rank}", flush=True)
        if rank == 1:
            print("NCCL error: unhandled system error on rank 1", file=sys.stderr, flush=True)
            for line in hostile:
                print(line, flush=True)
    print("RESULT " + json.dumps({"id": run.id}), flush=True)
"""


def _lines_shown(page: Any) -> list[dict[str, str]]:
    return list(page.locator("#console-lines .line").evaluate_all(
        "rows => rows.map(r => ({rank: r.dataset.rank, stream: r.dataset.stream,"
        " stderr: r.classList.contains('stderr') ? 'yes' : 'no',"
        " at: r.querySelector('.at').textContent, msg: r.querySelector('.msg').textContent}))"))


def _messages(page: Any) -> list[str]:
    return [x["msg"] for x in _lines_shown(page)]


def _create(backend: Backend, project: str) -> int:
    with backend.client() as c:
        resp = c.post("/api/runs/create", json={"runName": "console", "projectName": project,
                                                "externalId": uuid.uuid4().hex[:8]})
        assert resp.status_code == 200, resp.text
        return int(resp.json()["runId"])


def _post_lines(backend: Backend, run: int, lines: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with backend.client() as c:
        resp = c.post("/ingest/logs", content=body, headers={"X-Run-Id": str(run)})
        assert resp.status_code == 200, resp.text


def test_console_of_real_ranks_with_rank_and_text_filters(stack: Stack, tmp_path: Path,
                                                          ui: Page) -> None:
    project = f"ui-console-{uuid.uuid4().hex[:6]}"
    script = write_script(tmp_path, RANK)
    procs = [start_rank(script, stack.env(PLUTO_RUN_ID=f"job-{project}", RANK=str(r)), project,
                        json.dumps(HOSTILE)) for r in range(2)]
    ids = set()
    for proc in procs:
        code, out, err = finish_rank(proc, 120)
        assert code == 0, err[-3000:]
        ids |= {x["id"] for x in json_lines(out)}
    [run] = ids
    expected = 2 * 5 + 1 + len(HOSTILE)
    wait_until(lambda: len(stack.backend.get(f"/api/runs/{run}/logs")["lines"]) == expected, 60,
               "both ranks' lines stored")
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 60, "run COMPLETED")

    page = ui.open(f"run={run}")
    page.locator(f'.console[data-lines="{expected}"]').wait_for()
    shown = _lines_shown(page)
    by_rank = {r: [x["msg"] for x in shown if x["rank"] == str(r)] for r in (0, 1)}
    assert by_rank[0] == [f"step {i} on rank 0" for i in range(5)]
    assert by_rank[1][-len(HOSTILE):] == HOSTILE  # markup shown as the text it is
    [error] = [x for x in shown if x["stream"] == "stderr"]
    assert (error["rank"], error["stderr"], error["msg"]) == (
        "1", "yes", "NCCL error: unhandled system error on rank 1")
    assert all(x["stderr"] == "no" for x in shown if x["stream"] == "stdout")
    assert all(len(x["at"]) == len("12:34:56.789") for x in shown)
    assert page.locator("#console-lines img, #console-lines script, #console-lines b").count() == 0
    assert page.evaluate("window.pwned") is None and not ui.dialogs

    assert page.locator("#console-rank option").all_inner_texts() == [
        "all ranks", "rank 0", "rank 1"]  # from the members table
    page.locator("#console-rank").select_option("1")
    wait_until(lambda: {x["rank"] for x in _lines_shown(page)} == {"1"}, 20, "rank 1 only")
    assert len(_messages(page)) == 5 + 1 + len(HOSTILE)
    page.locator("#console-q").fill("nccl")
    wait_until(lambda: _messages(page) == ["NCCL error: unhandled system error on rank 1"], 20,
               "the NCCL line alone")
    ui.shot("console-nccl-rank-1")
    page.locator("#console-rank").select_option("0")
    wait_until(lambda: page.locator(".console").get_attribute("data-lines") == "0", 20,
               "rank 0 printed no NCCL error")
    page.locator("#console-rank").select_option("")
    page.locator("#console-q").fill("")
    page.locator(f'.console[data-lines="{expected}"]').wait_for()
    ui.shot("console-all-ranks")
    assert page.evaluate("window.pwned") is None and not ui.dialogs


def test_lines_appear_live_and_older_ones_load_on_demand(backend: Backend, ui: Page) -> None:
    run = _create(backend, f"ui-console-{uuid.uuid4().hex[:6]}")
    _post_lines(backend, run, [{"time": 1_700_000_000_000 + i, "message": f"old line {i}",
                                "lineNumber": i, "rank": i % 4} for i in range(1200)])
    page = ui.open(f"run={run}")
    console = page.locator(".console")
    page.locator('.console[data-lines="500"]').wait_for()  # only the newest page at first
    assert console.get_attribute("data-older") == "true"
    assert _messages(page)[0] == "old line 700" and _messages(page)[-1] == "old line 1199"
    page.locator("#console-older").click()
    page.locator('.console[data-lines="1000"]').wait_for()
    assert _messages(page)[0] == "old line 200"
    page.locator("#console-older").click()
    page.locator('.console[data-lines="1200"]').wait_for()
    assert console.get_attribute("data-older") == "false"
    assert page.locator("#console-older").is_disabled()
    assert _messages(page) == [f"old line {i}" for i in range(1200)]

    before = len(ui.requests)
    _post_lines(backend, run, [{"time": 1_800_000_000_000, "message": "a live <i>line</i>",
                                "logType": "ERROR", "rank": 3}])
    page.locator('.console[data-lines="1201"]').wait_for()
    last = _lines_shown(page)[-1]
    assert (last["msg"], last["rank"], last["stream"], last["stderr"]) == (
        "a live <i>line</i>", "3", "stderr", "yes")
    polls = [u for u in ui.requests[before:] if f"/api/runs/{run}/logs?" in u]
    assert polls and all("after=" in u for u in polls)  # only what is new is asked for
    with backend.client() as c:
        assert c.post("/api/runs/status/update",
                      json={"runId": run, "status": "COMPLETED"}).status_code == 200
    page.locator("body[data-live=stopped]").wait_for()
    assert console.get_attribute("data-lines") == "1201"


def test_console_drops_show_in_the_runs_list_and_run_page(backend: Backend, ui: Page) -> None:
    project = f"ui-console-{uuid.uuid4().hex[:6]}"
    run = _create(backend, project)
    members = [{"member": "h:1", "rank": 0, "host": "h", "pid": 1, "state": "finished",
                "logged": 0, "sent": 0, "dropped": 0, "drops": {"console": 37}},
               {"member": "h:2", "rank": 1, "host": "h", "pid": 2, "state": "finished",
                "logged": 0, "sent": 0, "dropped": 0, "drops": {}}]
    with backend.client() as c:
        assert c.post(f"/api/runs/{run}/members", json=members).status_code == 200
        assert c.post("/api/runs/status/update",
                      json={"runId": run, "status": "COMPLETED"}).status_code == 200
    page = ui.open(f"project={project}")
    cell = page.locator(f'.run-row[data-run="{run}"] td.lost')
    cell.wait_for()
    assert cell.get_attribute("data-console-lost") == "37"
    assert cell.inner_text() == "0 + 37 console" and "bad" in (cell.get_attribute("class") or "")
    page.locator(f'.run-row[data-run="{run}"] a').click()
    lost = page.locator("#run-console-lost")
    lost.wait_for()
    assert lost.inner_text() == "console lost 37" and "bad" in (lost.get_attribute("class") or "")
    rows = page.locator(".members-table tbody tr")
    assert [r.locator("td").last.inner_text() for r in rows.all()] == ["37", "0"]
