"""The Starlette application: our API (DESIGN.md §6), the compat routes and the dashboard.

``create_app`` composes everything; the store opens and closes in ``lifespan`` only.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import _compat, _faults, _files, _json, _lines, _query
from ._http import (
    BearerAuth,
    PathIds,
    broken_row,
    error,
    http_error,
    in_thread,
    int64_of,
    json_body,
    path_run_id,
    read_body,
    run_id_of,
    store_of,
)
from ._ingest import (
    COLUMNS_TYPE,
    MSGPACK_TYPES,
    TEXT_TYPES,
    BadBody,
    BadLines,
    columns,
    decode,
    shown,
)
from ._settings import ServerSettings, db_path
from ._store import STATUSES, BrokenRow, Store, loaded

STATIC = Path(__file__).parent / "static"


MAX_TEXT = 1024
"""Longest project, run, tag, member, host or state name accepted (in characters)."""


def parse_config(raw: Any) -> dict[str, Any] | None:
    """A config given as a JSON string, an object or null; 400 for anything else. A string is
    checked like a body (``_json.loads``): NaN/Infinity spelled, no lone surrogates, depth."""
    if isinstance(raw, str):
        try:
            raw = _json.loads(raw, "config") if raw.strip() else None
        except _json.Problem as exc:
            raise HTTPException(400, str(exc)) from None
    if raw is None or isinstance(raw, dict):
        return raw
    raise HTTPException(400, f"config must be a JSON object, got {type(raw).__name__}")


def text_of(value: Any, what: str, empty: bool = True) -> str:
    """A string field of a body (already checked to be UTF-8 by ``json_body``); 400 else."""
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not empty and not value):
        raise HTTPException(400, f"{what} must be a{'' if empty else ' non-empty'} string of "
                                 f"at most {MAX_TEXT} characters, got {shown(value)}")
    return value


def parse_tags(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise HTTPException(400, "tags must be a list of strings")
    return list(dict.fromkeys(text_of(t, f"tags[{i}]") for i, t in enumerate(raw)))


def run_url(request: Request, run: int) -> str:
    return f"{str(request.base_url).rstrip('/')}/#run={run}"


async def _object(request: Request) -> dict[str, Any]:
    body = await json_body(request, request.app.state.settings.max_body)
    if not isinstance(body, dict):
        raise HTTPException(400, "body must be a JSON object")
    return body


# -- write side ------------------------------------------------------------------------------

async def create_run(request: Request) -> Response:
    body = await _object(request)
    project = text_of(body.get("projectName") or "default", "projectName")
    name = text_of(body.get("runName") or "", "runName")
    external_id = body.get("externalId")
    if external_id is not None:
        external_id = text_of(external_id, "externalId")
    config, tags = parse_config(body.get("config")), parse_tags(body.get("tags"))
    run, resumed = await in_thread(store_of(request).create_run, project, external_id or None,
                                   name, config, tags)
    return JSONResponse({"runId": run, "resumed": resumed, "url": run_url(request, run)})


async def update_status(request: Request) -> Response:
    body = await _object(request)
    status = body.get("status")
    if status not in STATUSES:
        raise HTTPException(400, f"status must be one of {', '.join(STATUSES)}; got {status!r}")
    return await _updated(request, store_of(request).set_status, body, status)


async def update_config(request: Request) -> Response:
    body = await _object(request)
    return await _updated(request, store_of(request).merge_config, body,
                          parse_config(body.get("config")))


async def update_tags(request: Request) -> Response:
    body = await _object(request)
    return await _updated(request, store_of(request).set_tags, body,
                          parse_tags(body.get("tags")) or [])


async def _updated(request: Request, change: Any, body: dict[str, Any], value: Any) -> Response:
    run = run_id_of(body.get("runId"))
    if not await in_thread(change, run, value):
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse({"ok": True})


_MEMBER_INTS = ("rank", "local_rank", "pid")
_MEMBER_TEXTS = ("host", "state")
_COUNTS = ("logged", "sent", "dropped")
MAX_DROP_REASONS = 64


def _items(body: Any, what: str) -> list[dict[str, Any]]:
    items = body if isinstance(body, list) else [body]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HTTPException(400, f"{what}[{i}] must be an object, got "
                                     f"{type(item).__name__}")
    return items


def _optional_int(item: dict[str, Any], key: str, what: str, low: int = -(2**63)) -> None:
    """400 unless ``item[key]`` is absent, null, or a JSON integer from ``low`` to 2**63-1."""
    value = item.get(key)
    if value is not None and (type(value) is not int or isinstance(value, bool)):
        raise HTTPException(400, f"{what}.{key} must be an integer, got {shown(value)}")
    if value is not None:
        int64_of(value, f"{what}.{key}", low)


def _drops(value: Any, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_DROP_REASONS:
        raise HTTPException(400, f"{what}.drops must be an object of at most "
                                 f"{MAX_DROP_REASONS} reason -> count")
    for reason in value:
        text_of(reason, f"{what}.drops key", empty=False)
        _optional_int(value, reason, f"{what}.drops", 0)


def _check_member(m: dict[str, Any], what: str) -> None:
    text_of(m.get("member"), f"{what}.member", empty=False)
    for key in _MEMBER_INTS:
        _optional_int(m, key, what)
    for key in _COUNTS:
        _optional_int(m, key, what, 0)
    for key in _MEMBER_TEXTS:
        if m.get(key) is not None:
            text_of(m[key], f"{what}.{key}")
    _drops(m.get("drops"), what)


async def upsert_members(request: Request) -> Response:
    """``[{member, rank, local_rank, host, pid, state, logged, sent, dropped, drops}]``: an
    upsert by member name; every field but ``member`` optional (null keeps the stored one)."""
    run = path_run_id(request)
    members = _items(await json_body(request, request.app.state.settings.max_body), "members")
    for i, m in enumerate(members):
        _check_member(m, f"members[{i}]")
    if not await in_thread(store_of(request).upsert_members, run, members):
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse({"ok": True})


async def upsert_ledger(request: Request) -> Response:
    """``[{rank, stored, dead, last_step, last_time}]`` from the worker (ledger.md §2):
    absolute counts per rank (rank null: entries whose rank was unreadable)."""
    run = path_run_id(request)
    ranks = _items(await json_body(request, request.app.state.settings.max_body), "ledger")
    for i, r in enumerate(ranks):
        what = f"ledger[{i}]"
        for key in ("stored", "dead"):
            if r.get(key) is None:
                raise HTTPException(400, f"{what}.{key} is required (an integer >= 0)")
            _optional_int(r, key, what, 0)
        for key in ("rank", "last_step", "last_time"):
            _optional_int(r, key, what)
    if not await in_thread(store_of(request).upsert_ledger, run, ranks):
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse({"ok": True})


async def ingest_metrics(request: Request) -> Response:
    """Upsert points; 200 ``{"stored": n}``, or 422 ``{"stored": n, "bad_lines": [...]}``."""
    faults = request.app.state.settings.faults_file
    if faults and (injected := await _faults.inject(faults)) is not None:  # test hook only
        return injected
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in MSGPACK_TYPES and media_type not in TEXT_TYPES \
            and media_type != COLUMNS_TYPE:
        return error(415, f"unsupported Content-Type {media_type!r}: send application/x-ndjson"
                          " or application/msgpack")
    run = run_id_of(request.headers.get("x-run-id"), "X-Run-Id header")
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        return error(404, f"no run with id {run}")
    body = await read_body(request, request.app.state.settings.max_body)
    try:
        stored, bad = await in_thread(_ingest, store, run, body, media_type)
    except BadBody as exc:
        return error(400, str(exc))
    offer = {"X-Pluto-Ingest": INGEST_FORMATS}  # our worker switches to columns on seeing it
    if not bad:
        return JSONResponse({"stored": stored}, headers=offer)
    chunks = bad.json_chunks(stored)
    if len(bad) <= 4096:
        return Response(b"".join(chunks), 422, headers=offer, media_type="application/json")
    # Many bad lines: stream the answer, so it never sits in memory whole.
    return StreamingResponse(chunks, 422, headers=offer, media_type="application/json")


def _ingest(store: Store, run: int, body: bytes, media_type: str) -> tuple[int, BadLines]:
    if media_type == COLUMNS_TYPE:
        try:
            return store.write_columns(run, *columns(body)), BadLines()
        except OverflowError:
            raise BadBody("a value is an integer beyond 64 bits") from None
    entries, bad = decode(body, media_type)
    return store.write_points(run, entries), bad


# -- read side -------------------------------------------------------------------------------

def _query_int(request: Request, name: str, low: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"query parameter {name} must be an integer, got {raw!r}"
                            ) from None
    if low is not None and value < low:
        raise HTTPException(400, f"query parameter {name} must be at least {low}")
    return value


async def list_runs(request: Request) -> Response:
    project = request.query_params.get("project") or None
    return JSONResponse({"runs": await in_thread(store_of(request).list_runs, project)})


async def get_run(request: Request) -> Response:
    run = int(request.path_params["run_id"])
    found = await in_thread(store_of(request).get_run, run)
    if found is None:
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse(found)


async def metric_names(request: Request) -> Response:
    run = int(request.path_params["run_id"])
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse({"names": await in_thread(store.metric_names, run)})


def json_number(value: float) -> float | str:
    if type(value) is float and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def downsample(rows: list[Any], max_points: int | None) -> list[Any]:
    """At most ``max_points`` rows evenly spread over ``rows``, always keeping the last."""
    if max_points is None or len(rows) <= max_points:
        return rows
    if max_points == 1:
        return rows[-1:]
    last = len(rows) - 1
    picks = sorted({(2 * i * last + max_points - 1) // (2 * (max_points - 1))
                    for i in range(max_points)})  # round half up, in integers
    return [rows[i] for i in picks]


async def metric_points(request: Request) -> Response:
    run = int(request.path_params["run_id"])
    name = request.path_params["name"]
    since, max_points = _query_int(request, "since_step"), _query_int(request, "max_points", 1)
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    rows = downsample(await in_thread(store.points, run, name, since, max_points == 1), max_points)
    points = [[s, json_number(loaded(v)), t] for s, v, t in rows]
    return JSONResponse({"name": name, "points": points})


INGEST_FORMATS = f"{COLUMNS_TYPE}, application/msgpack, application/x-ndjson"


async def healthz(request: Request) -> Response:
    """``{"ok": true}``; the ``X-Pluto-Ingest`` header tells the worker msgpack is welcome
    (the official Pluto server has no such header, so a worker falls back to NDJSON there).
    """
    return JSONResponse({"ok": True}, headers={"X-Pluto-Ingest": INGEST_FORMATS})


async def dashboard(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


def routes() -> list[Route]:
    return [
        Route("/", dashboard),
        Route("/healthz", healthz),
        Route("/api/runs", list_runs),
        Route("/api/runs/create", create_run, methods=["POST"]),
        Route("/api/runs/status/update", update_status, methods=["POST"]),
        Route("/api/runs/config/update", update_config, methods=["POST"]),
        Route("/api/runs/tags/update", update_tags, methods=["POST"]),
        Route("/api/runs/{run_id:int}", get_run),
        Route("/api/runs/{run_id:int}/members", upsert_members, methods=["POST"]),
        Route("/api/runs/{run_id:int}/ledger", upsert_ledger, methods=["POST"]),
        Route("/api/runs/{run_id:int}/metrics", metric_names),
        Route("/api/runs/{run_id:int}/metrics/{name:path}", metric_points),
        Route("/ingest/metrics", ingest_metrics, methods=["POST"]),
        *_compat.routes(),
        *_query.routes(),  # the Pluto read API (pluto.query of either SDK)
        *_files.routes(),
        *_lines.routes(),
    ]


def create_app(settings: ServerSettings | None = None) -> Starlette:
    """The backend as an ASGI app.

    >>> app = create_app(ServerSettings(api_keys=("secret",), db_url="sqlite:///:memory:"))
    """
    settings = settings or ServerSettings.from_env()
    if not settings.api_keys:
        raise ValueError("no API key: set PLUTO_API_KEY (or PLUTO_API_KEY_FILE) for the backend")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.store = Store(db_path(settings.db_url))
        try:
            yield
        finally:
            app.state.store.close()

    app = Starlette(routes=routes(), lifespan=lifespan,
                    middleware=[Middleware(BearerAuth, keys=settings.api_keys),
                                Middleware(PathIds)],
                    exception_handlers={HTTPException: http_error, BrokenRow: broken_row})
    app.state.settings = settings
    return app
