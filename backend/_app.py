"""The Starlette application: our API (DESIGN.md §6), the compat routes and the dashboard.

``create_app`` composes everything; the store opens and closes in ``lifespan`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pluto.protocol import (
    COLUMNS_TYPE,
    MSGPACK_TYPE,
    NDJSON_TYPE,
    REFUSED_HEADER,
    STATUSES,
    tenant_problem,
)

from . import _compat, _faults, _files, _json, _lines, _query, _read
from ._auth import ScopedAuth
from ._headers import BodyTimeout, CreateRate, SecurityHeaders
from ._http import (
    PathIds,
    broken_row,
    client_gone,
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
    MSGPACK_TYPES,
    TEXT_TYPES,
    BadBody,
    BadLines,
    columns,
    decode,
    shown,
)
from ._metrics import BackendMetrics, CountRequests, metrics_endpoint
from ._rows import BrokenRow, ForeignProject
from ._settings import ServerSettings, db_path, is_postgres
from ._store import Store, Unstorable, open_store

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
    tenant = text_of(body.get("tenant") or "", "tenant")
    problem = tenant_problem(tenant)
    if problem:
        raise HTTPException(400, problem)
    try:
        run, resumed = await in_thread(request.app.state.metrics.timed_write, "create",
                                       store_of(request).create_run, project,
                                       external_id or None, name, config, tags, tenant)
    except ForeignProject as exc:  # final: the worker does not retry it like a key refusal
        refused = error(403, str(exc))
        refused.headers[REFUSED_HEADER] = "tenant"
        return refused
    return JSONResponse({"runId": run, "resumed": resumed, "url": run_url(request, run)})


async def update_status(request: Request) -> Response:
    body = await _object(request)
    status = body.get("status")
    if status not in STATUSES:
        raise HTTPException(400, f"status must be one of {', '.join(STATUSES)}; "
                                 f"got {shown(status)}")
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
    if not await in_thread(request.app.state.metrics.timed_write, "update", change, run, value):
        raise HTTPException(404, f"no run with id {run}")
    return JSONResponse({"ok": True})


_MEMBER_INTS = ("rank", "local_rank", "node", "attempt", "pid")
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
    if value is None:
        return
    if type(value) is not int:  # not a bool, not decimal text: JSON bodies carry numbers
        raise HTTPException(400, f"{what}.{key} must be an integer, got {shown(value)}")
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
        return error(415, f"unsupported Content-Type {shown(media_type)}: send "
                          "application/x-ndjson or application/msgpack")
    run = run_id_of(request.headers.get("x-run-id"), "X-Run-Id header")
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        return error(404, f"no run with id {run}")
    body = await read_body(request, request.app.state.settings.max_body)
    try:
        metrics = request.app.state.metrics
        stored, bad = await in_thread(metrics.timed_write, "ingest", _ingest, store, run, body,
                                      media_type)
        metrics.points.inc(stored)
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


INGEST_FORMATS = f"{COLUMNS_TYPE}, {MSGPACK_TYPE}, {NDJSON_TYPE}"


async def healthz(request: Request) -> Response:
    """``{"ok": true}``; the ``X-Pluto-Ingest`` header tells the worker msgpack is welcome
    (the official Pluto server has no such header, so a worker falls back to NDJSON there).
    """
    return JSONResponse({"ok": True}, headers={"X-Pluto-Ingest": INGEST_FORMATS})


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/api/runs/create", create_run, methods=["POST"]),
        Route("/api/runs/status/update", update_status, methods=["POST"]),
        Route("/api/runs/config/update", update_config, methods=["POST"]),
        Route("/api/runs/tags/update", update_tags, methods=["POST"]),
        Route("/api/runs/{run_id:int}/members", upsert_members, methods=["POST"]),
        Route("/api/runs/{run_id:int}/ledger", upsert_ledger, methods=["POST"]),
        Route("/ingest/metrics", ingest_metrics, methods=["POST"]),
        *_read.routes(),
        *_compat.routes(),
        *_query.routes(),  # the Pluto read API (pluto.query of either SDK)
        *_files.routes(),
        *_lines.routes(),
    ]


async def unstorable(request: Request, exc: Exception) -> Response:
    """A value the store cannot hold (PostgreSQL refuses NUL in text): the client's 400."""
    return error(400, str(exc))


def create_app(settings: ServerSettings | None = None) -> Starlette:
    """The backend as an ASGI app.

    >>> app = create_app(ServerSettings(api_keys=("secret",), db_url="sqlite:///:memory:"))
    """
    settings = settings or ServerSettings.from_env()
    if not settings.api_keys:
        raise ValueError("no API key: set PLUTO_API_KEY (or PLUTO_API_KEY_FILE) for the backend")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.store = store = open_store(settings.db_url)
        app.state.metrics = BackendMetrics(store.count_by_status)
        try:
            yield
        finally:
            app.state.store.close()

    keys_db = None if is_postgres(settings.db_url) else db_path(settings.db_url)
    state: dict[str, Any] = {}

    def metrics() -> Any:
        app = state.get("app")
        return getattr(app.state, "metrics", None) if app is not None else None

    app = Starlette(routes=routes(), lifespan=lifespan,
                    middleware=[Middleware(CountRequests,
                                           metrics=metrics),
                                Middleware(SecurityHeaders),
                                Middleware(ScopedAuth, keys=settings.api_keys, db_path=keys_db),
                                Middleware(CreateRate, rate=settings.create_rate,
                                           burst=settings.create_burst),
                                Middleware(BodyTimeout, timeout=settings.body_timeout),
                                Middleware(PathIds)],
                    exception_handlers={HTTPException: http_error, BrokenRow: broken_row,
                                        Unstorable: unstorable, ClientDisconnect: client_gone})
    app.state.settings = settings
    state["app"] = app
    return app
