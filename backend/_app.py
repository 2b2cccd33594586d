"""The Starlette application: our API (DESIGN.md §6), the compat routes and the dashboard.

``create_app`` composes everything; the store opens and closes in ``lifespan`` only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _compat, _faults, _read
from ._http import (
    BearerAuth,
    error,
    http_error,
    in_thread,
    json_body,
    read_body,
    run_id_of,
    store_of,
)
from ._ingest import COLUMNS_TYPE, MSGPACK_TYPES, TEXT_TYPES, BadBody, columns, decode
from ._settings import ServerSettings, db_path
from ._store import STATUSES, Store


def parse_config(raw: Any) -> dict[str, Any] | None:
    """A config given as a JSON string, an object or null; 400 for anything else."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else None
        except ValueError as exc:
            raise HTTPException(400, f"config is not valid JSON: {exc}") from None
    if raw is None or isinstance(raw, dict):
        return raw
    raise HTTPException(400, f"config must be a JSON object, got {type(raw).__name__}")


def parse_tags(raw: Any) -> list[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise HTTPException(400, "tags must be a list of strings")
    return list(dict.fromkeys(raw))


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
    project = body.get("projectName") or "default"
    external_id = body.get("externalId")
    name = body.get("runName") or ""
    if not isinstance(project, str) or not isinstance(name, str) or not (
            external_id is None or isinstance(external_id, str)):
        raise HTTPException(400, "projectName, runName and externalId must be strings")
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


_MEMBER_FIELDS = {"rank": int, "local_rank": int, "host": str, "pid": int, "state": str}


async def upsert_members(request: Request) -> Response:
    run = int(request.path_params["run_id"])
    body = await json_body(request, request.app.state.settings.max_body)
    members = body if isinstance(body, list) else [body]
    for m in members:
        if not isinstance(m, dict) or not isinstance(m.get("member"), str) or not m["member"]:
            raise HTTPException(400, "each member needs a non-empty string 'member'")
        for key, kind in _MEMBER_FIELDS.items():
            if m.get(key) is not None and (type(m[key]) is not kind):
                raise HTTPException(400, f"member field {key!r} must be {kind.__name__}")
    if not await in_thread(store_of(request).upsert_members, run, members):
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
    if bad:
        return JSONResponse({"stored": stored, "bad_lines": bad}, status_code=422, headers=offer)
    return JSONResponse({"stored": stored}, headers=offer)


def _ingest(store: Store, run: int, body: bytes, media_type: str
            ) -> tuple[int, list[dict[str, Any]]]:
    if media_type == COLUMNS_TYPE:
        try:
            return store.write_columns(run, *columns(body)), []
        except OverflowError:
            raise BadBody("a value is an integer beyond 64 bits") from None
    entries, bad = decode(body, media_type)
    return store.write_points(run, entries), bad


INGEST_FORMATS = f"{COLUMNS_TYPE}, application/msgpack, application/x-ndjson"


async def healthz(request: Request) -> Response:
    """``{"ok": true}``; the ``X-Pluto-Ingest`` header tells the worker msgpack is welcome
    (the official Pluto server has no such header, so a worker falls back to NDJSON there).
    """
    return JSONResponse({"ok": True}, headers={"X-Pluto-Ingest": INGEST_FORMATS})


def routes() -> list[Route]:
    return [
        Route("/healthz", healthz),
        Route("/api/runs/create", create_run, methods=["POST"]),
        Route("/api/runs/status/update", update_status, methods=["POST"]),
        Route("/api/runs/config/update", update_config, methods=["POST"]),
        Route("/api/runs/tags/update", update_tags, methods=["POST"]),
        Route("/api/runs/{run_id:int}/members", upsert_members, methods=["POST"]),
        Route("/ingest/metrics", ingest_metrics, methods=["POST"]),
        *_read.routes(),
        *_compat.routes(),
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
                    middleware=[Middleware(BearerAuth, keys=settings.api_keys)],
                    exception_handlers={HTTPException: http_error})
    app.state.settings = settings
    return app
