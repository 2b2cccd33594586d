"""The Pluto server's read API (what ``pluto.query`` of ``pluto-ml`` 0.0.29 calls), on our store.

Shapes, as the official client reads them (``pluto/query.py`` of its wheel):

* ``GET /api/runs/projects`` -> ``{"projects": [{id, name, runCount, createdAt, updatedAt}]}``
* ``GET /api/runs/list?projectName&search&tags&filter&sort&limit&offset`` -> ``{"runs": [run]}``
  with run = ``{id, name, displayId, status, tags, config, createdAt, updatedAt, url,
  externalId, projectName}`` (``_runfilter`` has the filter and sort language)
* ``GET /api/runs/details/{id}`` and ``/details/by-display-id/{MMP-3}`` -> run plus
  ``systemMetadata`` (null: not kept) and ``logNames`` ``[{logName, logType}]``
* ``GET /api/runs/metric-names?projectName&runIds&search&limit`` -> ``{"metricNames": [...]}``
* ``GET /api/runs/metrics?runId&logName&limit&stepMin&stepMax`` -> ``{"metrics": [{logName,
  step, value, time}]}``; at most ``limit`` points per metric, chosen by M4 (each bucket's
  first, last, minimum and maximum), so a spike is never sampled away
* ``GET /api/runs/statistics?runId&logName`` -> ``{"runId", "statistics": [{logName, count,
  min, max, mean, stddev, ..., anomalies}]}``
* ``GET /api/runs/compare?runIds&logName`` -> ``{"logName", "runs": [...], "bestRun"}``
* ``GET /api/runs/leaderboard?logName&aggregation&direction&limit&offset`` -> ``[entry]``
* served by ``_lines``: ``GET /api/runs/logs?runId&logType&limit&offset`` (ours too:
  ``rank``, ``afterId``) -> ``{"logs": [{message, logType, time, lineNumber, step, rank}]}``,
  and ours ``GET /api/runs/data?runId&logName&dataType`` -> ``{"data": [{logName, dataType,
  step, time, data}]}`` (histograms, tables and other structured values); by ``_files``:
  ``GET /api/runs/files?runId&logName`` -> ``{"files": [{fileName, ..., downloadUrl}]}``

Times are ISO 8601 UTC text (``2026-12-02T07:00:00.000Z``), as the official server gives
them; metric values are numbers or ``"NaN"``/``"Infinity"``/``"-Infinity"``. A display id is
``PREFIX-N``: the project's initials (``my-mnist-project`` -> ``MMP``) and the run's position
in its project. Every bad parameter is a 400 naming it; an unknown run or project a 404.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _openapi, _rows, _runfilter
from . import _store_extra as extra
from ._http import in_thread, int64_of, store_of
from ._json import Problem, loads
from ._rows import BrokenRow
from ._store import Store, Stored, loaded

_DISPLAY = re.compile(r"([A-Z0-9]{1,4})-([0-9]{1,18})\Z")
MAX_OFFSET = 100_000


# -- small conversions -------------------------------------------------------------------------

def iso(ms: Any) -> Any:
    """Epoch milliseconds as ISO 8601 UTC text; a value no date can hold stays a number."""
    try:
        when = datetime.fromtimestamp(ms / 1000, timezone.utc)
    except (OverflowError, OSError, ValueError, TypeError):
        return ms
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def number(value: Stored) -> int | float | str:
    v = loaded(value)
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def prefix(project: str) -> str:
    """1-4 upper-case letters or digits from ``project``: initials of its words, else its
    first three characters (``llm`` -> ``LLM``, ``my-mnist-project`` -> ``MMP``)."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", project) if w]
    text = "".join(w[0] for w in words) if len(words) > 1 else (words[0][:3] if words else "")
    return (text.upper()[:4] or "R") if text.isascii() else "R"


def param(request: Request, name: str, default: Any = None) -> Any:
    value = request.query_params.get(name)
    return default if value is None or value == "" else value


def int_param(request: Request, name: str, default: int | None, low: int = 0,
              high: int = 2**63 - 1) -> int | None:
    raw = param(request, name)
    if raw is None:
        return default
    value = int64_of(raw, f"query parameter {name}", low)
    if value > high:
        raise HTTPException(400, f"query parameter {name} must be at most {high}")
    return value


def text_param(request: Request, name: str, required: bool = False) -> str | None:
    value = param(request, name)
    if value is None and required:
        raise HTTPException(400, f"query parameter {name} is required")
    if value is not None and len(value) > 1024:
        raise HTTPException(400, f"query parameter {name} is longer than 1024 characters")
    return value


# -- runs as the Pluto API shows them ------------------------------------------------------------

def run_item(request: Request, row: tuple[Any, ...], n: int) -> dict[str, Any]:
    base = _rows.run_dict(row)  # BrokenRow if the stored config/tags cannot be returned
    return {"id": base["id"], "name": base["name"],
            "displayId": f"{prefix(base['project'])}-{n}", "status": base["status"],
            "tags": base["tags"], "config": base["config"],
            "createdAt": iso(base["createdAt"]), "updatedAt": iso(base["updatedAt"]),
            "url": f"{str(request.base_url).rstrip('/')}/#run={base['id']}",
            "externalId": base["externalId"], "projectName": base["project"]}


def _run_in(store: Store, project: str | None, run: int) -> tuple[Any, ...]:
    row = extra.run_row(store, run) if -(2**63) <= run < 2**63 else None
    if row is None or (project is not None and row[1] != project):
        where = f" in project {project[:80]!r}" if project is not None else ""
        raise HTTPException(404, f"no run with id {run}{where}")
    return row


def resolve_run(store: Store, project: str | None, given: str) -> tuple[Any, ...]:
    """The run row for a numeric id or a display id (``MMP-3``, within ``project``)."""
    text = given.strip()
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        if len(digits) > 19:
            raise HTTPException(404, f"no run with id {text[:40]}")
        return _run_in(store, project, int(digits))
    match = _DISPLAY.match(text)
    if match is None:
        raise HTTPException(400, f"run id {given[:40]!r} is neither a number nor a display id "
                                 "such as MMP-3")
    if project is None:
        raise HTTPException(400, "a display id needs projectName")
    found = extra.nth_run(store, project, int(match[2])) if int(match[2]) > 0 else None
    if found is None or prefix(project) != match[1]:
        raise HTTPException(404, f"no run {text!r} in project {project[:80]!r}")
    return _run_in(store, project, found)


def _details(request: Request, store: Store, row: tuple[Any, ...]) -> dict[str, Any]:
    item = run_item(request, row, extra.ordinal(store, row[1], row[0]))
    item["systemMetadata"] = None
    item["logNames"] = [{"logName": n, "logType": t} for n, t in extra.log_names(store, row[0])]
    return item


async def details(request: Request) -> Response:
    given = request.path_params["run"]
    project = text_param(request, "projectName")
    if not (given.isascii() and given.isdigit()):
        raise HTTPException(404, f"no run with id {given[:40]!r}")

    def work() -> dict[str, Any]:
        store = store_of(request)
        return _details(request, store, resolve_run(store, project, given))
    return JSONResponse(await in_thread(work))


async def details_by_display_id(request: Request) -> Response:
    given, project = request.path_params["display_id"], text_param(request, "projectName")

    def work() -> dict[str, Any]:
        store = store_of(request)
        if _DISPLAY.match(given) is None:
            raise HTTPException(404, f"no run {given[:40]!r}: a display id looks like MMP-3")
        return _details(request, store, resolve_run(store, project, given))
    return JSONResponse(await in_thread(work))


async def list_projects(request: Request) -> Response:
    rows = await in_thread(extra.projects, store_of(request))
    return JSONResponse({"projects": [
        {"id": first, "name": name, "runCount": count, "createdAt": iso(created),
         "updatedAt": iso(updated)} for name, first, count, created, updated in rows]})


def _filter_of(request: Request) -> dict[str, Any] | None:
    raw = param(request, "filter")
    if raw is None:
        return None
    try:
        node = loads(raw, "filter", _runfilter.MAX_DEPTH)
    except Problem as exc:
        raise HTTPException(400, str(exc)) from None
    if not isinstance(node, dict):
        raise HTTPException(400, "filter must be a JSON object")
    return node


async def list_runs(request: Request) -> Response:
    project = text_param(request, "projectName", required=True)
    search = text_param(request, "search")
    tags = [t for t in (text_param(request, "tags") or "").split(",") if t]
    limit = int_param(request, "limit", 50, 1, 200)
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET)
    node = _filter_of(request)
    try:
        used = _runfilter.metrics_used(node) if node is not None else set()
        sort = _runfilter.parse_sort(param(request, "sort", "-createdAt"))
    except _runfilter.FilterError as exc:
        raise HTTPException(400, str(exc)) from None
    metric = _runfilter.summary_name(sort[0])
    if metric is not None:
        used.add(metric)

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        rows = extra.project_runs(store, project)  # type: ignore[arg-type]
        docs = []
        for n, row in enumerate(rows, 1):
            try:
                base = _rows.run_dict(row)
            except BrokenRow:
                continue  # listed by GET /api/runs as an error item; not filterable here
            if search and search.lower() not in base["name"].lower():
                continue
            if tags and not set(tags) <= set(base["tags"]):
                continue
            docs.append({"id": base["id"], "status": base["status"], "name": base["name"],
                         "tags": base["tags"], "created": base["createdAt"],
                         "updated": base["updatedAt"], "config": base["config"],
                         "summary": {}, "row": row, "n": n})
        ids = [d["id"] for d in docs]
        for name in used:
            last = extra.last_values(store, ids, name)
            for d in docs:
                if d["id"] in last:
                    d["summary"][name] = loaded(last[d["id"]])
        if node is not None:
            docs = [d for d in docs if _runfilter.matches(node, d)]
        docs.sort(key=lambda d: d["id"], reverse=True)  # ties: newest first
        docs = _runfilter.sort_docs(docs, *sort)
        page = docs[offset:offset + limit]  # type: ignore[operator]
        return [run_item(request, d["row"], d["n"]) for d in page]
    return JSONResponse({"runs": await in_thread(work)})


# -- metrics -----------------------------------------------------------------------------------

def m4(rows: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` of ``rows`` (ordered by step): split into buckets and keep each
    bucket's first, last, minimum and maximum value, so spikes survive. NaN counts as a
    maximum, so a NaN is never sampled away either. ``limit // 2`` buckets are tried first
    (smooth series keep ~2 points a bucket: nearly ``limit`` in all), ``limit // 4`` when
    that gives too many."""
    if len(rows) <= limit:
        return rows
    if limit < 4:
        return [rows[0], rows[-1]][-limit:] if limit < 3 else [rows[0], _peak(rows), rows[-1]]
    keys = [_key(r[1]) for r in rows]
    fine = _buckets(rows, keys, limit // 2)
    return fine if len(fine) <= limit else _buckets(rows, keys, limit // 4)


def _buckets(rows: list[Any], keys: list[float], buckets: int) -> list[Any]:
    size = -(-len(rows) // buckets)
    keep: list[Any] = []
    for start in range(0, len(rows), size):
        end = min(start + size, len(rows))
        chunk = keys[start:end]
        lo = start + chunk.index(min(chunk))
        hi = start + chunk.index(max(chunk))
        keep += [rows[i] for i in sorted({start, lo, hi, end - 1})]
    return keep


def _key(value: Stored) -> float:
    v = loaded(value)
    return math.inf if isinstance(v, float) and math.isnan(v) else float(v) \
        if not isinstance(v, int) or abs(v) < 2**1000 else math.copysign(math.inf, v)


def _peak(rows: list[Any]) -> Any:
    return max(rows, key=lambda r: abs(_key(r[1])))


def run_param(request: Request, store: Store) -> tuple[Any, ...]:
    return resolve_run(store, text_param(request, "projectName"),
                       text_param(request, "runId", required=True) or "")


async def metric_names(request: Request) -> Response:
    project = text_param(request, "projectName", required=True)
    search, limit = text_param(request, "search"), int_param(request, "limit", 500, 1, 500)
    raw_ids = text_param(request, "runIds")

    def work() -> list[str]:
        store = store_of(request)
        runs = [r[0] for r in extra.project_runs(store, project or "")]
        if raw_ids is not None:
            wanted = {int64_of(x, "runIds item") for x in raw_ids.split(",") if x.strip()}
            runs = [r for r in runs if r in wanted]
        return extra.metric_names(store, runs, search, limit or 500)
    return JSONResponse({"metricNames": await in_thread(work)})


async def metrics(request: Request) -> Response:
    name = text_param(request, "logName")
    limit = int_param(request, "limit", 10000, 1, 10000) or 10000
    step_min, step_max = int_param(request, "stepMin", None), int_param(request, "stepMax", None)

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        run = run_param(request, store)[0]
        names = [name] if name is not None else store.metric_names(run)
        out = []
        for n in names:
            rows = m4(extra.points_between(store, run, n, step_min, step_max), limit)
            out += [{"logName": n, "step": s, "value": number(v), "time": iso(t)}
                    for s, v, t in rows]
        return out
    return JSONResponse({"metrics": await in_thread(work)})


def _stats(store: Store, run: int, name: str, outliers: int = 10) -> dict[str, Any] | None:
    got = extra.statistics(store, run, name)
    if got is None:
        return None
    variance = max(got["variance"] or 0.0, 0.0) if got["variance"] is not None else None
    std = math.sqrt(variance) if variance is not None else None
    last = extra.last_values(store, [run], name).get(run)
    out = {"logName": name, "count": got["count"], "finiteCount": got["finite"],
           "nonFiniteCount": got["count"] - got["finite"],
           "min": got["min"], "max": got["max"], "mean": got["mean"], "stddev": std,
           "variance": variance, "last": None if last is None else number(last),
           "firstStep": got["firstStep"], "lastStep": got["lastStep"], "anomalies": []}
    if std and outliers:
        out["anomalies"] = [{"step": s, "value": v, "zScore": (v - got["mean"]) / std}
                            for s, v in extra.outliers(store, run, name, got["mean"],
                                                       3 * std, outliers)]
    return out


async def statistics(request: Request) -> Response:
    name = text_param(request, "logName")

    def work() -> dict[str, Any]:
        store = store_of(request)
        run = run_param(request, store)[0]
        names = [name] if name is not None else store.metric_names(run)
        stats = [s for n in names if (s := _stats(store, run, n)) is not None]
        return {"runId": run, "statistics": stats}
    return JSONResponse(await in_thread(work))


_HIGHER_IS_BETTER = re.compile(r"acc|auc|f1|precision|recall|reward|score|return|bleu|rouge|"
                               r"iou|map|throughput|tokens_per|samples_per", re.I)


def better_high(name: str) -> bool:
    """Whether a larger last value is better: names like accuracy, f1, reward; else lower
    (loss, error, perplexity, time)."""
    return bool(_HIGHER_IS_BETTER.search(name)) and not re.search(r"loss|err", name, re.I)


async def compare(request: Request) -> Response:
    project = text_param(request, "projectName")
    name = text_param(request, "logName", required=True) or ""
    raw = (text_param(request, "runIds", required=True) or "").split(",")
    given = [x.strip() for x in raw if x.strip()][:100]

    def work() -> dict[str, Any]:
        store = store_of(request)
        runs = []
        for g in dict.fromkeys(given):
            row = resolve_run(store, project, g)
            item = run_item(request, row, extra.ordinal(store, row[1], row[0]))
            stats = _stats(store, row[0], name, outliers=0) or {"count": 0, "last": None}
            stats.pop("anomalies", None)
            runs.append({"runId": row[0], "name": item["name"], "displayId": item["displayId"],
                         "status": item["status"], **stats})
        finite = [r for r in runs if isinstance(r.get("last"), (int, float))]
        high = better_high(name)
        best = (max if high else min)(finite, key=lambda r: r["last"]) if finite else None
        return {"logName": name, "runs": runs, "bestRun": None if best is None else {
            "runId": best["runId"], "name": best["name"], "displayId": best["displayId"],
            "value": best["last"], "criterion": f"{'highest' if high else 'lowest'} last value"}}
    return JSONResponse(await in_thread(work))


async def leaderboard(request: Request) -> Response:
    project = text_param(request, "projectName", required=True) or ""
    name = text_param(request, "logName", required=True) or ""
    how = (text_param(request, "aggregation") or "LAST").upper()
    direction = (text_param(request, "direction") or "ASC").upper()
    limit = int_param(request, "limit", 50, 1, 100) or 50
    offset = int_param(request, "offset", 0, 0, MAX_OFFSET) or 0
    if how not in ("MIN", "MAX", "AVG", "LAST", "VARIANCE"):
        raise HTTPException(400, "aggregation must be MIN, MAX, AVG, LAST or VARIANCE")
    if direction not in ("ASC", "DESC"):
        raise HTTPException(400, "direction must be ASC or DESC")

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        values = {run: loaded(v) for run, v in extra.aggregate(store, project, name, how).items()}
        ranked = sorted(((v, run) for run, v in values.items()
                         if isinstance(v, (int, float)) and not math.isnan(v)),
                        key=lambda p: (p[0], p[1]), reverse=direction == "DESC")
        rows = {r[0]: (n, r) for n, r in enumerate(extra.project_runs(store, project), 1)}
        out = []
        for place, (value, run) in enumerate(ranked[offset:offset + limit], offset + 1):
            n, row = rows[run]
            item = run_item(request, row, n)
            out.append({"rank": place, "runId": run, "name": item["name"],
                        "displayId": item["displayId"], "status": item["status"],
                        "tags": item["tags"], "url": item["url"], "logName": name,
                        "aggregation": how, "value": number(value)})
        return out
    return JSONResponse(await in_thread(work))


def routes() -> list[Route]:
    return [
        Route("/api/runs/projects", list_projects),
        Route("/api/runs/list", list_runs),
        Route("/api/runs/details/by-display-id/{display_id}", details_by_display_id),
        Route("/api/runs/details/{run}", details),
        Route("/api/runs/metric-names", metric_names),
        Route("/api/runs/metrics", metrics),
        Route("/api/runs/statistics", statistics),
        Route("/api/runs/compare", compare),
        Route("/api/runs/leaderboard", leaderboard),
        Route("/api/openapi.json", _openapi.openapi),
    ]
