"""``POST /ingest/logs`` (console lines) and ``POST /ingest/data`` (histograms, tables, string
series, ...) as the official SDK sends them: NDJSON, one object per line, run in ``X-Run-Id``.

* logs: ``{"time": ms, "message": str, "lineNumber": int, "logType": "INFO"|...}``; ours may
  add ``"rank"`` and ``"step"`` (a rank may also come as the ``X-Rank`` header).
* data: ``{"time": ms, "data": json-text, "dataType": "HISTOGRAM"|..., "logName": str,
  "step": int}``; ``data`` is kept as (canonical) JSON text, or as given for a
  ``string-series`` or text that is not JSON.

Like ``/ingest/metrics``: good lines are stored, bad lines are refused one by one with a 422
``{"stored", "bad_count", "bad_lines": [{"index", "error"}], "error"}``, and a resent batch
stores nothing twice (``_store_extra`` keys each row by its content).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _json
from . import _store_extra as extra
from ._http import in_thread, int64_of, path_run_id, read_body, run_id_of, store_of
from ._ingest import BadLines
from ._json import READ_DEPTH, Problem, loads
from ._query import int_param, iso, run_param, text_param

MAX_MESSAGE = 1 << 20
"""Longest console line kept, in characters; a longer one is a bad line (nothing is cut)."""

MAX_KIND = 64


class _Bad(ValueError):
    pass


def _lines(body: bytes) -> Iterator[tuple[int, Any]]:
    """``(index, parsed object or _Bad)`` for each non-blank line."""
    index = -1
    for raw in body.split(b"\n"):
        if not raw.strip():
            continue
        index += 1
        try:
            yield index, _json.loads(raw, f"line {index}")
        except _json.Problem as exc:
            yield index, _Bad(str(exc))


def _int(obj: dict[str, Any], key: str, default: int | None) -> int | None:
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise _Bad(f"{key} must be an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise _Bad(f"{key} is beyond 64 bits")
    return value


def _text(obj: dict[str, Any], key: str, default: str | None, limit: int) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _Bad(f"{key} must be a string")
    if len(value) > limit:
        raise _Bad(f"{key} is longer than {limit} characters")
    return value


def log_line(obj: Any, now: int, rank: int | None) -> extra.LogLine:
    if not isinstance(obj, dict):
        raise _Bad("a line must be a JSON object")
    message = obj.get("message")
    if not isinstance(message, str):
        raise _Bad("message must be a string")
    if len(message) > MAX_MESSAGE:
        raise _Bad(f"message is longer than {MAX_MESSAGE} characters")
    return (_int(obj, "rank", rank), _int(obj, "time", now) or now,
            _int(obj, "lineNumber", 0) or 0,
            _text(obj, "logType", "INFO", MAX_KIND).upper() or "INFO",
            _int(obj, "step", None), message)


def data_item(obj: Any, now: int, rank: int | None) -> extra.DataItem:
    if not isinstance(obj, dict):
        raise _Bad("a line must be a JSON object")
    name = _text(obj, "logName", None, 1024) if "logName" in obj else ""
    if not name:
        raise _Bad("logName must be a non-empty string")
    kind = _text(obj, "dataType", "UNKNOWN", MAX_KIND) or "UNKNOWN"
    data = obj.get("data")
    if isinstance(data, str):
        if kind.lower() != "string-series":
            try:
                data = _json.dumps(_json.loads(data, "data"))
            except _json.Problem:
                pass  # not JSON: kept as the text it is
        text = data
    else:
        text = _json.dumps(data)  # already checked by _json.loads of the line
    return name, kind, _int(obj, "step", 0) or 0, _int(obj, "time", now) or now, text


async def _ingest(request: Request, parse: Callable[[Any, int, int | None], Any],
                  write: Callable[..., int]) -> Response:
    run = run_id_of(request.headers.get("x-run-id"), "X-Run-Id header")
    rank_header = request.headers.get("x-rank")
    rank = None if rank_header is None else int64_of(rank_header, "X-Rank header")
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    body = await read_body(request, request.app.state.settings.max_body)

    def work() -> tuple[int, BadLines]:
        now = int(time.time() * 1000)
        good, bad = [], BadLines()
        for index, obj in _lines(body):
            try:
                if isinstance(obj, _Bad):
                    raise obj
                good.append(parse(obj, now, rank))
            except _Bad as exc:
                bad.add(index, str(exc))
        return (write(store, run, good) if good else 0), bad

    stored, bad = await in_thread(work)
    if not bad:
        return JSONResponse({"stored": stored})
    return Response(b"".join(bad.json_chunks(stored)), 422, media_type="application/json")


async def ingest_logs(request: Request) -> Response:
    return await _ingest(request, log_line, extra.write_logs)


async def ingest_data(request: Request) -> Response:
    return await _ingest(request, data_item, extra.write_data)


# -- reading them back (the Pluto read API's /api/runs/logs, our /api/runs/data, and the
#    dashboard's /api/runs/{id}/logs) ------------------------------------------------------

async def logs(request: Request) -> Response:
    log_type = text_param(request, "logType")
    limit = int_param(request, "limit", 10000, 1, 10000) or 10000
    offset = int_param(request, "offset", 0, 0) or 0
    rank = int_param(request, "rank", None, -(2**63))
    after = int_param(request, "afterId", None)

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        run = run_param(request, store)[0]
        return [{"id": i, "rank": r, "time": iso(t), "lineNumber": n, "logType": k,
                 "step": s, "message": m}
                for i, r, t, n, k, s, m in extra.read_logs(store, run, log_type, rank, limit,
                                                           offset, after)]
    return JSONResponse({"logs": await in_thread(work)})


PAGE = 500
"""Console lines per page of the dashboard's view when ``limit`` is not given."""
MAX_PAGE = 5000


async def page(request: Request) -> Response:
    """``GET /api/runs/{id}/logs?after=&before=&rank=&q=&limit=``: the dashboard's console view.

    Without a cursor the newest ``limit`` lines (a long run opens on its tail); ``before=<id>``
    the ``limit`` lines before it ("load older"); ``after=<id>`` the lines past it, oldest
    first (live polling). ``rank`` keeps one rank's lines, ``q`` those containing the text.
    ``{"lines": [{id, rank, time (ms), lineNumber, logType, step, message}], "more": bool}``,
    lines in id (arrival) order; ``more`` says older lines remain (no ``after``) or newer
    ones do (``after``: poll again at once). Bad parameters are a 400 naming them."""
    run = path_run_id(request)
    after, before = int_param(request, "after", None), int_param(request, "before", None)
    if after is not None and before is not None:
        raise HTTPException(400, "query parameters after and before exclude each other")
    rank = int_param(request, "rank", None, -(2**63))
    text = text_param(request, "q")
    limit = int_param(request, "limit", PAGE, 1, MAX_PAGE) or PAGE
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    rows, more = await in_thread(extra.page_logs, store, run, rank, text, after, before, limit)
    return JSONResponse({"lines": [
        {"id": i, "rank": r, "time": t, "lineNumber": n, "logType": k, "step": s, "message": m}
        for i, r, t, n, k, s, m in rows], "more": more})


def _data_value(kind: str, text: str) -> Any:
    """The stored JSON text as a value (NaN spelled); a string series, or text that is not
    JSON, as the text itself."""
    if kind.lower() == "string-series":
        return text
    try:
        return loads(text, "data", READ_DEPTH)
    except Problem:
        return text


async def data(request: Request) -> Response:
    name, kind = text_param(request, "logName"), text_param(request, "dataType")
    limit = int_param(request, "limit", 1000, 1, 10000) or 1000
    offset = int_param(request, "offset", 0, 0) or 0

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        run = run_param(request, store)[0]
        return [{"logName": n, "dataType": k, "step": s, "time": iso(t),
                 "data": _data_value(k, d)}
                for n, k, s, t, d in extra.read_data(store, run, name, kind, limit, offset)]
    return JSONResponse({"data": await in_thread(work)})


def routes() -> list[Route]:
    return [Route("/api/runs/logs", logs), Route("/api/runs/data", data),
            Route("/api/runs/{run_id:int}/logs", page)]
