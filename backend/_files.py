"""Files: presigned uploads as the official SDK makes them, kept on local disk, and signed
download URLs for ``GET /api/runs/files``.

The official SDK asks ``POST /files`` (headers ``X-Run-Id``; body ``{"files": [{fileName,
fileSize, fileType, time, logName, step, sampleIndex, caption?}]}``) for one URL per file and
PUTs the bytes there without its bearer header, as to S3. So each URL carries its own HMAC
signature over method, run, file id and expiry (``/files/blob/<sig>/<run>/<id>?expires=``),
and ``BearerAuth`` lets ``/files/blob/`` through. The bytes live in ``_blobs``: at
``PLUTO_FILES_DIR/<run>/<id>`` by default, or in an S3-compatible bucket
(``PLUTO_FILES_URL``); an upload streams to a spool file and becomes the file's content when
complete, so a reader never sees half a file, and is listed only once complete (a bucket that
cannot be reached is a 503, which the client retries). A second presign of the
same place (run, log name, step, sample, file name) reuses its row: a retry never duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import mimetypes
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import _store_extra as extra
from ._blobs import Blobs, Unavailable, open_blobs, spool_file
from ._http import UNSIGNED_UPLOADS, in_thread, int64_of, json_body, run_id_of, store_of
from ._query import iso, run_param, text_param

URL_LIFETIME = 3600
"""Seconds a presigned upload or download URL stays valid."""

MAX_TEXT = 1024


def blobs(request: Request) -> Blobs:
    return open_blobs(request.app.state.settings)


def _unavailable(exc: Unavailable) -> Response:
    """503 with Retry-After: the file store is down, the client retries later."""
    return JSONResponse({"error": f"{exc}; try again"}, 503, headers={"Retry-After": "5"})


def _signature(request: Request, method: str, run: int, file_id: int, expires: int) -> str:
    secret = hmac.new(request.app.state.settings.api_keys[0].encode(), b"pluto-files",
                      hashlib.sha256).digest()
    message = f"{method} {run}/{file_id} {expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:40]


def signed_url(request: Request, method: str, run: int, file_id: int) -> str:
    expires = int(time.time()) + URL_LIFETIME
    sig = _signature(request, method, run, file_id, expires)
    base = str(request.base_url).rstrip("/")
    return f"{base}{UNSIGNED_UPLOADS}{sig}/{run}/{file_id}?expires={expires}"


def _text(item: dict[str, Any], key: str, what: str, default: str | None = None) -> str | None:
    value = item.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise HTTPException(400, f"{what}.{key} must be a string of at most {MAX_TEXT} "
                                 "characters")
    return value


def _int(item: dict[str, Any], key: str, what: str, default: int | None, low: int = -(2**63)
         ) -> int | None:
    value = item.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise HTTPException(400, f"{what}.{key} must be an integer")
    return int64_of(value, f"{what}.{key}", low)


async def presign(request: Request) -> Response:
    """``{"files": [{fileName: put_url}, ...]}``; the SDK flattens the values of any keys."""
    body = await json_body(request, request.app.state.settings.max_body)
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list):
        raise HTTPException(400, "expected {\"files\": [{\"fileName\": ...}, ...]}")
    run = run_id_of(request.headers.get("x-run-id"), "X-Run-Id header")
    now = int(time.time() * 1000)
    entries = []
    for i, f in enumerate(files):
        what = f"files[{i}]"
        if not isinstance(f, dict):
            raise HTTPException(400, f"{what} must be an object")
        name = _text(f, "fileName", what)
        if not name:
            raise HTTPException(400, f"{what}.fileName must be a non-empty string")
        ext = name.rsplit(".", 1)[1] if "." in name else ""
        entries.append((name, _text(f, "logName", what, name) or name,
                        _text(f, "fileType", what, ext) or ext, _int(f, "step", what, 0),
                        _int(f, "sampleIndex", what, 0), _int(f, "time", what, now),
                        _text(f, "caption", what), _int(f, "fileSize", what, None, 0)))
    store = store_of(request)
    if not await in_thread(store.run_exists, run):
        raise HTTPException(404, f"no run with id {run}")

    def work() -> list[dict[str, str]]:
        urls = []
        for name, log_name, kind, step, sample, when, caption, size in entries:
            file_id = extra.add_file(store, run, log_name, name, kind,
                                     step, sample, when,  # type: ignore[arg-type]
                                     caption, size)
            urls.append({name: signed_url(request, "PUT", run, file_id)})
        return urls
    return JSONResponse({"files": await in_thread(work)})


def _checked(request: Request, method: str) -> tuple[int, int]:
    token, run_text, id_text = (request.path_params[k] for k in ("token", "run", "file"))
    raw = request.query_params.get("expires", "")
    if not (run_text.isascii() and run_text.isdigit() and id_text.isascii()
            and id_text.isdigit() and raw.isascii() and raw.isdigit()) \
            or max(len(run_text), len(id_text), len(raw)) > 19:
        raise HTTPException(403, "bad file URL: ask for a new one")
    run, file_id, expires = int(run_text), int(id_text), int(raw)
    if not hmac.compare_digest(token, _signature(request, method, run, file_id, expires)):
        raise HTTPException(403, "bad file URL signature: ask for a new URL")
    if expires < time.time():
        raise HTTPException(403, "file URL expired: ask for a new one")
    return run, file_id


async def upload(request: Request) -> Response:
    """The PUT target of :func:`presign`: the body streams to a spool file, then is stored."""
    run, file_id = _checked(request, "PUT")
    limit = request.app.state.settings.max_file
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"file of {declared} bytes exceeds PLUTO_MAX_FILE={limit}")
    store = blobs(request)
    folder = await in_thread(store.spool, run)
    fd, tmp = spool_file(folder, file_id)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"file exceeds PLUTO_MAX_FILE={limit} bytes")
                await in_thread(out.write, chunk)
        await in_thread(store.put, run, file_id, tmp)
    except Unavailable as exc:
        return _unavailable(exc)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not await in_thread(extra.file_uploaded, store_of(request), run, file_id, size):
        try:
            await in_thread(store.delete, run, file_id)
        except Unavailable:
            pass  # an orphan object of no file record: never listed nor served, only space
        raise HTTPException(404, "no such file record (the run's file list has none)")
    return JSONResponse({"ok": True, "size": size})


async def download(request: Request) -> Response:
    run, file_id = _checked(request, "GET")
    found = await in_thread(extra.get_file, store_of(request), run, file_id)
    chunks = None
    if found is not None and found["uploaded_at"] is not None:
        try:
            chunks = await in_thread(blobs(request).chunks, run, file_id)
        except Unavailable as exc:
            return _unavailable(exc)
    if found is None or chunks is None:
        raise HTTPException(404, "file not uploaded (or removed from the file store)")
    kind = mimetypes.guess_type(found["file_name"])[0] or "application/octet-stream"
    name = found["file_name"].rsplit("/")[-1]
    headers = {"Content-Length": str(found["size"]),
               "Content-Disposition": _disposition(name)}
    return StreamingResponse(chunks, media_type=kind, headers=headers)


def _disposition(name: str) -> str:
    """``attachment`` with the file's name, as Starlette's FileResponse spells it."""
    quoted = quote(name)
    if quoted != name:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{name}"'


def described(request: Request, run: int, f: dict[str, Any]) -> dict[str, Any]:
    """A file as ``GET /api/runs/files`` lists it, with a fresh signed download URL."""
    url = signed_url(request, "GET", run, f["id"])
    return {"id": f["id"], "fileName": f["file_name"], "fileType": f["file_type"],
            "fileSize": f["size"], "logName": f["log_name"], "step": f["step"],
            "sampleIndex": f["sample_index"], "caption": f["caption"], "time": iso(f["time"]),
            "downloadUrl": url, "url": url}


async def list_files(request: Request) -> Response:
    name = text_param(request, "logName")

    def work() -> list[dict[str, Any]]:
        store = store_of(request)
        run = run_param(request, store)[0]
        return [described(request, run, f) for f in extra.list_files(store, run, name)]
    return JSONResponse({"files": await in_thread(work)})


def routes() -> list[Route]:
    return [
        Route("/files", presign, methods=["POST"]),
        Route(UNSIGNED_UPLOADS + "{token}/{run}/{file}", upload, methods=["PUT"]),
        Route(UNSIGNED_UPLOADS + "{token}/{run}/{file}", download, methods=["GET", "HEAD"]),
        Route("/api/runs/files", list_files),
    ]
