"""The dashboard in a real browser, against the real backend (and real rank processes)."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Backend, Stack
from tests.helpers import finish_rank, json_lines, start_rank, wait_until, write_script
from tests.ui.conftest import Page

RANK = """
import json, os, pathlib, sys, time
import pluto
rank, steps, gate = int(os.environ["RANK"]), int(sys.argv[2]), sys.argv[3]
with pluto.init(project=sys.argv[4], name="ui-run", run_id=sys.argv[1], config={"lr": 0.1},
                tags=["ui", "four-ranks"]) as run:
    for step in range(1, steps + 1):
        if gate != "-" and step == steps // 2 + 1:
            while not pathlib.Path(gate).exists():
                time.sleep(0.05)
        run.log({f"train/loss/rank{rank}": 1.0 / step + rank * 0.01,
                 f"train/acc/rank{rank}": step / steps})
print("RESULT " + json.dumps({"id": run.id, "rank": rank}), flush=True)
"""


def _ranks(stack: Stack, tmp: Path, project: str, ranks: int, steps: int,
           gate: Path | None = None) -> list[Any]:
    script = write_script(tmp, RANK, "ui_rank.py")
    run_id = f"ui-{uuid.uuid4().hex[:6]}"
    return [start_rank(script, stack.env(RANK=str(r), LOCAL_RANK=str(r)), run_id, str(steps),
                       str(gate) if gate else "-", project) for r in range(ranks)]


def _joined(procs: list[Any]) -> int:
    ids = set()
    for p in procs:
        code, out, err = finish_rank(p, 120)
        assert code == 0, err
        ids |= {x["id"] for x in json_lines(out)}
    assert len(ids) == 1, ids
    return int(ids.pop())


def _create(backend: Backend, project: str, name: str) -> int:
    with backend.client() as c:
        resp = c.post("/api/runs/create", json={"runName": name, "projectName": project,
                                                "externalId": uuid.uuid4().hex[:8]})
        assert resp.status_code == 200, resp.text
        return int(resp.json()["runId"])


def _ingest(backend: Backend, run: int, lines: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(line) + "\n" for line in lines)
    with backend.client() as c:
        resp = c.post("/ingest/metrics", content=body.encode(), headers={
            "X-Run-Id": str(run), "X-Project-Name": "ui", "Content-Type": "application/x-ndjson"})
        assert resp.status_code == 200, resp.text


def _finish(backend: Backend, run: int) -> None:
    with backend.client() as c:
        assert c.post("/api/runs/status/update",
                      json={"runId": run, "status": "COMPLETED"}).status_code == 200


def test_runs_list_and_run_page_of_4_rank_processes(stack: Stack, tmp_path: Path,
                                                    ui: Page) -> None:
    project = f"ui-{uuid.uuid4().hex[:6]}"
    run = _joined(_ranks(stack, tmp_path, project, 4, 300))
    wait_until(lambda: stack.backend.run(run)["status"] == "COMPLETED", 60, "run COMPLETED")
    listed = stack.backend.runs(project)[0]
    page = ui.open(f"project={project}")
    row = page.locator(f'.run-row[data-run="{run}"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == str(run) and cells[1] == project and "ui-run" in cells[2]
    assert cells[3] == "COMPLETED" and cells[5] == "300"
    assert cells[4] == str(listed["members"]) == "4"
    assert cells[7] == (f"{listed['lost']:,}" if "lost" in listed else "–")
    page.locator("#f-status").select_option("RUNNING")  # the status filter hides it
    assert page.locator(f'.run-row[data-run="{run}"]').count() == 0
    page.locator("#f-status").select_option("")
    page.locator("#f-name").fill("no-such-run")
    assert page.locator(f'.run-row[data-run="{run}"]').count() == 0
    page.locator("#f-name").fill("ui-r")
    ui.shot("runs-list")
    row.locator("a").click()

    chart = ui.chart("train/loss")
    chart.locator("canvas").first.wait_for()
    wait_until(lambda: ui.data("train/loss").get("points") == "1200", 30, "4 x 300 points")
    assert page.locator('.chart[data-title="train/loss"]').count() == 1  # one chart, 4 lines
    data = ui.data("train/loss")
    assert data["lines"] == "4" and data["band"] == "on" and data["key"] == "group:train/loss/rank*"
    labels = chart.locator(".u-legend .u-label").all_inner_texts()
    assert [f"rank {r}" for r in range(4)] + ["mean", "max", "min"] == labels[1:]
    box = chart.locator(".u-over").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    values = chart.locator(".u-legend .u-value").all_inner_texts()  # hover: every line's value
    assert len(values) == 8 and all(v not in ("", "–") for v in values), values
    members = page.locator(".members-table tbody tr")
    assert members.count() == 4
    assert sorted(members.evaluate_all("rows => rows.map(r => r.dataset.rank)")) == ["0", "1", "2", "3"]
    assert "external id" in page.locator(".run-header").inner_text()
    assert page.locator(".tag").all_inner_texts() == ["ui", "four-ranks"]
    assert page.locator("#live").inner_text() == "finished: not updating"
    page.locator("#show-band").uncheck()  # the band is switchable
    wait_until(lambda: ui.data("train/loss")["band"] == "off", 10, "band off")
    page.locator("#search").fill("acc$")  # regex filter: only train/acc stays
    assert ui.chart("train/loss").is_hidden() and ui.chart("train/acc").is_visible()
    page.locator("#search").fill("")
    rank0 = "plutoPage.charts.get('group:train/loss/rank*').u.data[1][1]"
    assert page.evaluate(rank0) == 0.5  # rank 0's loss at step 2, as logged
    page.locator("#smoothing").fill("0.9")  # EMA: 0.9 * 1.0 + 0.1 * 0.5
    wait_until(lambda: abs(page.evaluate(rank0) - 0.95) < 1e-9, 10, "EMA applied")
    page.locator("#xmode").select_option("rel")
    chart.locator("canvas").first.wait_for()
    ui.shot("run-page-4-ranks")


def test_points_appear_while_the_page_is_open(stack: Stack, tmp_path: Path, ui: Page) -> None:
    project = f"ui-{uuid.uuid4().hex[:6]}"
    gate = tmp_path / "go"
    procs = _ranks(stack, tmp_path, project, 2, 200, gate)
    run = wait_until(lambda: (stack.backend.runs(project) or [{}])[0].get("id"), 60, "run")
    for r in range(2):
        wait_until(lambda r=r: len(stack.backend.points(run, f"train/loss/rank{r}")) == 100,
                   60, f"rank {r} at its gate")
    page = ui.open(f"run={run}")
    wait_until(lambda: ui.data("train/loss").get("points") == "200", 30, "first half shown")
    assert page.locator("#live").inner_text().startswith("live")
    before = len(ui.requests)
    gate.write_text("go")
    assert _joined(procs) == run
    wait_until(lambda: ui.data("train/loss").get("points") == "400", 30, "second half shown")
    rows = page.locator(".members-table tbody tr")
    wait_until(lambda: [r.locator("td").nth(4).inner_text() for r in rows.all()] == ["200"] * 2,
               30, "each rank's last step in the members table")
    polls = [u for u in ui.requests[before:] if "/series?" in u]
    assert polls and all("since_step=" in u for u in polls)  # only what is new is asked for
    wait_until(lambda: page.locator("#live").inner_text() == "finished: not updating", 30,
               "page shows the run finished")
    page.locator("body[data-live=stopped]").wait_for()
    settled = len(ui.requests)
    page.wait_for_timeout(1500)
    assert len(ui.requests) == settled  # a finished run is not polled any more
    assert ui.data("train/loss")["points"] == "400"
    ui.shot("live-run")


def test_hostile_metric_name_is_text_and_nan_is_a_marked_gap(backend: Backend, ui: Page) -> None:
    hostile = "<img src=x onerror=alert(1)>"
    run = _create(backend, "ui-hostile", "<script>alert(2)</script>")
    lines = [{"time": 1000 * s, "step": s, "data": {hostile: s * 1.0, "loss": 1.0 / s}}
             for s in range(1, 101)]
    lines[49]["data"]["loss"] = "NaN"
    lines[59]["data"]["loss"] = "Infinity"
    _ingest(backend, run, lines)
    _finish(backend, run)
    page = ui.open(f"run={run}")
    chart = ui.chart(hostile)
    chart.locator("canvas").first.wait_for()
    assert chart.locator(".chart-title").inner_text() == hostile
    assert page.locator(".run-header h2").inner_text() == "<script>alert(2)</script>"
    assert page.locator("img").count() == 0 and page.locator("main script").count() == 0
    loss = ui.data("loss")
    assert loss["nonfinite"] == "2" and loss["points"] == "100"
    notes = ui.chart("loss").locator(".notes").inner_text()
    assert "NaN at step 50" in notes and "+Inf at step 60" in notes
    ui.shot("hostile-run-page")
    page.locator("#search").fill("<img")
    assert chart.is_visible() and ui.chart("loss").is_hidden()
    page.goto(f"{backend.url}/#project=ui-hostile")
    page.locator(f'.run-row[data-run="{run}"]').wait_for()
    page.wait_for_timeout(300)
    assert not ui.dialogs
    ui.shot("hostile-names")


def test_drag_zoom_refetches_the_range_at_full_resolution(backend: Backend, ui: Page) -> None:
    run = _create(backend, "ui-zoom", "zoom")
    rng = random.Random(3)
    lines = [{"time": 1000 * s, "step": s,
              "data": {f"train/loss/rank{r}": rng.random() for r in range(4)}}
             for s in range(5000)]
    lines[2345]["data"]["train/loss/rank2"] = 25.0
    for i in range(0, 5000, 1000):
        _ingest(backend, run, lines[i:i + 1000])
    _finish(backend, run)
    page = ui.open(f"run={run}")
    chart = ui.chart("train/loss")
    chart.locator("canvas").first.wait_for()
    wait_until(lambda: ui.data("train/loss").get("points") not in (None, "0"), 30, "overview")
    overview = int(ui.data("train/loss")["points"])
    assert overview <= 4 * 1000  # M4 to about 1,000 points per line
    box = chart.locator(".u-over").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.45, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.50, y, steps=5)
    with page.expect_response(lambda r: "/series?" in r.url and "step_min=" in r.url) as info:
        page.mouse.up()
    asked = info.value.json()["series"]
    wait_until(lambda: ui.data("train/loss")["zoomed"] == "1", 10, "zoomed")
    steps = [p[0] for p in asked[0]["points"]]
    assert steps == list(range(steps[0], steps[-1] + 1)) and len(steps) > 100  # every step
    zoomed = ui.data("train/loss")
    assert int(zoomed["points"]) == 4 * len(steps) and zoomed["fetches"] == "2"
    assert overview < 4 * 5000  # the overview had fewer points per step than the zoom
    ui.shot("zoomed")
    chart.locator(".u-over").dblclick()
    wait_until(lambda: ui.data("train/loss")["zoomed"] == "0", 10, "zoom reset")
    assert ui.data("train/loss")["points"] == str(overview)


def test_the_page_asks_for_the_key_once(backend: Backend, keyless_ui: Page) -> None:
    page = keyless_ui.open("")
    page.locator("#key").fill("wrong-key")
    page.locator("#key-save").click()
    page.locator(".key-form .bad").wait_for()  # refused: asked again, with the reason
    page.locator("#key").fill(backend.key)
    page.locator("#key-save").click()
    page.locator(".runs-table").wait_for()
    assert page.evaluate("localStorage.getItem('pluto_key')") == backend.key
    page.reload()
    page.locator(".runs-table").wait_for()
    assert page.locator("#key").count() == 0
    with httpx.Client(base_url=backend.url) as c:
        assert "script-src 'self'" in c.get("/").headers["content-security-policy"]


LOSSY = """
import json, os, sys
import pluto
rank = int(os.environ["RANK"])
with pluto.init(project=sys.argv[2], name="lossy", run_id=sys.argv[1]) as run:
    for step in range(1, 301):  # rank 1's step 250 is an int repr() cannot write: dropped
        run.log({f"loss/rank{rank}": 10**5000 if rank == 1 and step == 250 else step / 8})
print("RESULT " + json.dumps({"id": run.id, "lost": run.lost}), flush=True)
"""


def test_a_completed_run_with_a_loss_shows_it_per_member_and_in_total(
        stack: Stack, tmp_path: Path, ui: Page) -> None:
    """Issue 13: a COMPLETED run that lost one entry cannot pass for a complete one — the runs
    list and the run page show the total, the members table shows whose entry it was."""
    project = f"ui-lossy-{uuid.uuid4().hex[:6]}"
    script = write_script(tmp_path, LOSSY, "lossy.py")
    run_id = f"lossy-{uuid.uuid4().hex[:6]}"
    run = _joined([start_rank(script, stack.env(RANK=str(r)), run_id, project)
                   for r in range(2)])
    wait_until(lambda: (x := stack.backend.run(run))["status"] == "COMPLETED"
               and x["ledger"]["stored"] == 599, 60, "COMPLETED with 599 stored")
    page = ui.open(f"project={project}")
    cell = page.locator(f'.run-row[data-run="{run}"] td.lost')
    cell.wait_for()
    assert cell.inner_text() == "1" and "bad" in (cell.get_attribute("class") or "")
    page.locator(f'.run-row[data-run="{run}"] a').click()
    lost = page.locator("#run-lost")
    lost.wait_for()
    assert lost.inner_text() == "lost 1" and "bad" in (lost.get_attribute("class") or "")
    header = page.locator(".run-header").inner_text()
    assert "logged 600 · sent 599 · stored 599 · dropped 1 · dead 0" in header, header
    rows = page.locator(".members-table tbody tr")
    wait_until(lambda: rows.count() == 2, 10, "two member rows")
    cells = {r.get_attribute("data-rank"): r.locator("td").all_inner_texts() for r in rows.all()}
    # logged, sent, dropped, stored, dead per member
    assert {k: v[7:12] for k, v in cells.items()} == {
        "0": ["300", "300", "0", "300", "0"], "1": ["300", "299", "1", "299", "0"]}, cells
    assert "bad" in (rows.nth(1).locator("td").nth(9).get_attribute("class") or "")
    ui.shot("run-page-with-a-loss")
