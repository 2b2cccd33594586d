"""The official Pluto SDK's other endpoints (``pluto-ml`` 0.0.29, ``pluto/sets.py``).

Its metrics, run creation, status, config and tags already go to our routes in ``_app``. What
it also calls is answered here with valid, harmless responses, shaped as its code reads them,
so it never retries or raises. We keep no console logs, structured data, graphs, alerts or
files: those are accepted and dropped. Shapes, from its source:

* ``POST /api/slug`` (login) -> ``{"organization": {"slug": ...}}``
* ``POST /api/runs/resume`` ``{runId | externalId+projectName}`` -> like create, resumed true
* ``POST /api/runs/trigger`` (heartbeat every few s) -> ``{"status": ...}``; only "CANCELLED"
  would make the SDK kill its process, so we never send that
* ``POST /files`` ``{"files": [{fileName, ...}]}`` -> ``{"<kind>": [{fileName: put_url}]}``;
  the SDK then PUTs each file to that URL without the bearer header, as to S3, so the URL
  carries an HMAC signature instead
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._http import UNSIGNED_UPLOADS, in_thread, json_body, read_body, run_id_of, store_of


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
    elif isinstance(body.get("externalId"), str):
        project = body.get("projectName") or "default"
        if not isinstance(project, str):
            raise HTTPException(400, "projectName must be a string")
        run = await in_thread(store.find_run, project, body["externalId"])
    else:
        raise HTTPException(400, "resume needs runId, or externalId and projectName "
                                 "(display ids are not supported by this backend)")
    if run is None:
        raise HTTPException(404, "no such run to resume")
    base = str(request.base_url).rstrip("/")
    return JSONResponse({"runId": run, "resumed": True, "url": f"{base}/#run={run}"})


async def trigger(request: Request) -> Response:
    body = await _body(request)
    run = body.get("runId")
    status = None
    if type(run) is int:
        status = await in_thread(store_of(request).status, run)
    return JSONResponse({"status": status or "RUNNING"})


async def accepted(request: Request) -> Response:
    """Log names, model graphs, alerts, console logs, structured data: read and dropped."""
    await read_body(request, request.app.state.settings.max_body)
    return JSONResponse({"ok": True})


def _signature(request: Request, path: str) -> str:
    key = request.app.state.settings.api_keys[0].encode()
    return hmac.new(key, path.encode(), hashlib.sha256).hexdigest()[:32]


async def presign(request: Request) -> Response:
    body = await _body(request)
    files = body.get("files")
    if not isinstance(files, list):
        raise HTTPException(400, "expected {\"files\": [{\"fileName\": ...}, ...]}")
    base = str(request.base_url).rstrip("/")
    run = request.headers.get("x-run-id", "0")
    urls = []
    for f in files:
        name = f.get("fileName", "") if isinstance(f, dict) else ""
        name = name if isinstance(name, str) else ""
        path = f"{quote(run, safe='')}/{quote(name, safe='')}"
        urls.append({name: f"{base}{UNSIGNED_UPLOADS}{_signature(request, path)}/{path}"})
    return JSONResponse({"files": urls})


async def upload(request: Request) -> Response:
    """The PUT target of :func:`presign`; the content is dropped (we keep no files)."""
    token, path = request.path_params["token"], request.path_params["path"]
    path = "/".join(quote(part, safe="") for part in path.split("/", 1))
    if not hmac.compare_digest(token, _signature(request, path)):
        raise HTTPException(403, "bad upload signature")
    await read_body(request, request.app.state.settings.max_body)
    return Response(status_code=200)


def routes() -> list[Route]:
    return [
        Route("/api/slug", login, methods=["GET", "POST"]),
        Route("/api/runs/resume", resume, methods=["POST"]),
        Route("/api/runs/trigger", trigger, methods=["POST"]),
        Route("/api/runs/logName/add", accepted, methods=["POST"]),
        Route("/api/runs/modelGraph/create", accepted, methods=["POST"]),
        Route("/api/runs/alert", accepted, methods=["POST"]),
        Route("/ingest/logs", accepted, methods=["POST"]),
        Route("/ingest/data", accepted, methods=["POST"]),
        Route("/files", presign, methods=["POST"]),
        Route(UNSIGNED_UPLOADS + "{token}/{path:path}", upload, methods=["PUT"]),
    ]
