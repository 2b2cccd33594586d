"""The official Pluto SDK's other endpoints (``pluto-ml`` 0.0.29, ``pluto/sets.py``).

Its metrics, run creation, status, config and tags already go to our routes in ``_app``. What
it also calls is answered here with valid, harmless responses, shaped as its code reads them,
so it never retries or raises. Model graphs and alerts are accepted and dropped; console
lines and structured data are stored by ``_lines``, files by ``_files``, registered log
names here. Shapes, from its source:

* ``POST /api/slug`` (login) -> ``{"organization": {"slug": ...}}``
* ``POST /api/runs/resume`` ``{runId | displayId | externalId+projectName}`` -> like create,
  resumed true
* ``POST /api/runs/trigger`` (heartbeat every few s) -> ``{"status": ...}``; only "CANCELLED"
  would make the SDK kill its process, so we never send that
* ``POST /api/runs/logName/add`` ``{runId, logType, logName: str | [str]}`` -> ok
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _lines
from . import _store_extra as extra
from ._http import in_thread, json_body, read_body, run_id_of, store_of
from ._query import prefix, resolve_run


async def _body(request: Request) -> dict[str, Any]:
    body = await json_body(request, request.app.state.settings.max_body)
    if not isinstance(body, dict):
        raise HTTPException(400, "body must be a JSON object")
    return body


async def login(request: Request) -> Response:
    return JSONResponse({"organization": {"slug": "pluto", "name": "pluto"},
                         "user": {"name": "pluto"}})


async def resume(request: Request) -> Response:
    body = await _body(request)
    store = store_of(request)
    if body.get("runId") is not None:
        run: int | None = run_id_of(body["runId"])
        if not await in_thread(store.run_exists, run):
            run = None
    elif isinstance(body.get("displayId"), str):
        run = await in_thread(_by_display_id, request, body["displayId"])
    elif isinstance(body.get("externalId"), str):
        project = body.get("projectName") or "default"
        if not isinstance(project, str):
            raise HTTPException(400, "projectName must be a string")
        run = await in_thread(store.find_run, project, body["externalId"])
    else:
        raise HTTPException(400, "resume needs runId, displayId, or externalId and "
                                 "projectName")
    if run is None:
        raise HTTPException(404, "no such run to resume")
    base = str(request.base_url).rstrip("/")
    return JSONResponse({"runId": run, "resumed": True, "url": f"{base}/#run={run}"})


def _by_display_id(request: Request, display_id: str) -> int | None:
    """The run a display id names: in the ``X-Project-Name`` header's project when sent, else
    in the one project whose prefix it carries (several: ambiguous, a 409)."""
    store = store_of(request)
    project = request.headers.get("x-project-name")
    candidates = [project] if project else [
        name for name, *_ in extra.projects(store) if prefix(name) == display_id.split("-")[0]]
    found = []
    for name in candidates:
        try:
            found.append(resolve_run(store, name, display_id)[0])
        except HTTPException:
            continue
    if len(found) > 1:
        raise HTTPException(409, f"display id {display_id[:40]!r} is ambiguous: send "
                                 "X-Project-Name (or resume by externalId)")
    return found[0] if found else None


async def add_log_name(request: Request) -> Response:
    """Registered log names (their types: METRIC, HISTOGRAM, IMAGE, ...) show in the run's
    ``logNames``; an unknown run is a 404."""
    body = await _body(request)
    run = run_id_of(body.get("runId"))
    names = body.get("logName")
    names = [names] if isinstance(names, str) else names
    kind = body.get("logType") or "UNKNOWN"
    if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) <= 1024
                                              for n in names) \
            or not isinstance(kind, str) or len(kind) > 64:
        raise HTTPException(400, "logName must be a string or a list of non-empty strings "
                                 "(at most 1024 characters), logType a short string")
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    await in_thread(extra.add_log_names, store, run, [(n, kind.upper()) for n in names])
    return JSONResponse({"ok": True})


async def trigger(request: Request) -> Response:
    body = await _body(request)
    run = body.get("runId")
    status = None
    if type(run) is int:
        status = await in_thread(store_of(request).status, run)
    return JSONResponse({"status": status or "RUNNING"})


async def accepted(request: Request) -> Response:
    """Model graphs and alerts: read and dropped."""
    await read_body(request, request.app.state.settings.max_body)
    return JSONResponse({"ok": True})


def routes() -> list[Route]:
    return [
        Route("/api/slug", login, methods=["GET", "POST"]),
        Route("/api/runs/resume", resume, methods=["POST"]),
        Route("/api/runs/trigger", trigger, methods=["POST"]),
        Route("/api/runs/logName/add", add_log_name, methods=["POST"]),
        Route("/api/runs/modelGraph/create", accepted, methods=["POST"]),
        Route("/api/runs/alert", accepted, methods=["POST"]),
        Route("/ingest/logs", _lines.ingest_logs, methods=["POST"]),
        Route("/ingest/data", _lines.ingest_data, methods=["POST"]),
    ]
