"""Request plumbing shared by the route modules: auth, JSON errors, bounded bodies.

Auth is a pure ASGI middleware rather than a per-route check so no route under ``/api``,
``/ingest`` or ``/files`` can forget it; it answers 401 before the body is read, so a request
with a wrong key changes nothing.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _json
from ._store import INT64_MAX, INT64_MIN, Store

PROTECTED = ("/api/", "/ingest/", "/files")
"""Path prefixes that need ``Authorization: Bearer <key>``; the dashboard page does not."""

UNSIGNED_UPLOADS = "/files/blob/"
"""Presigned-style upload URLs carry their own signature instead of the bearer header."""


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class BearerAuth:
    """401 ``{"error": ...}`` unless the bearer token is one of ``keys``."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def allowed(self, header: bytes | None) -> bool:
        if not header or header[:7].lower() != b"bearer ":
            return False
        token = header[7:].strip()
        # Compare against every key, without stopping early, so timing reveals nothing.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(token, key)
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and path.startswith(PROTECTED)
                and not path.startswith(UNSIGNED_UPLOADS)):
            header = dict(scope["headers"]).get(b"authorization")
            if not self.allowed(header):
                reason = "missing" if not header else "invalid"
                response = error(401, f"{reason} API key: send 'Authorization: Bearer <key>' "
                                      "with a key from PLUTO_API_KEY of `pluto server`")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_PATH_ID = re.compile(r"/api/runs/([0-9]+)(?:/|\Z)")


class PathIds:
    """404 for ``/api/runs/<digits>...`` beyond int64, before routing: no run has such an id,
    and Starlette's ``int`` convertor would raise on a number of over 4300 digits (a 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = _PATH_ID.match(scope.get("path", ""))
            given = match[1] if match else ""
            digits = given.lstrip("0")
            if digits and (len(digits) > 19 or int(digits) > INT64_MAX):
                response = error(404, f"no run with id {given[:30]}"
                                      f"{'...' if len(given) > 30 else ''}")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404 no route, 405, ours) as JSON ``{"error": ...}``, with the
    headers the exception carries (a 405's ``Allow``)."""
    assert isinstance(exc, HTTPException)
    resp = error(exc.status_code, str(exc.detail))
    resp.headers.update(exc.headers or {})
    return resp


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up before its body arrived (a killed rank, a proxy's timeout): not
    the server's error, so no traceback; the answer is never read, 400 keeps the count
    honest in ``pluto_backend_requests_total``."""
    return error(400, "the client disconnected before sending its whole body")


async def broken_row(request: Request, exc: Exception) -> Response:
    """A stored row that cannot be returned (written before today's checks) is the row's
    fault, not the server's: 409 naming it, never a 500 (DESIGN.md §6)."""
    return error(409, str(exc))


_DECIMAL = re.compile(r"[+-]?[0-9]{1,20}\Z")  # [0-9] is ASCII only; str.isdigit() takes "²"


def int64_of(value: Any, what: str, low: int = INT64_MIN) -> int:
    """``value`` as an integer from ``low`` to 2**63-1: a JSON int (not a bool) or decimal
    text such as a header's; 400 naming ``what`` otherwise.

    >>> int64_of(" 42 ", "X-Run-Id")
    42
    """
    if type(value) is str:
        text = value.strip(" \t")
        if _DECIMAL.match(text):
            value = int(text)
    if type(value) is not int or not low <= value <= INT64_MAX:
        shown = ascii(value[:40]) if isinstance(value, str) else (
            repr(value) if type(value) in (int, float, bool) or value is None
            else type(value).__name__)
        raise HTTPException(400, f"{what} must be an integer from {low} to {INT64_MAX}, "
                                 f"got {shown[:60]}")
    return value


def path_run_id(request: Request) -> int:
    """The ``{run_id:int}`` of the path; 404 beyond int64 (no run can have that id)."""
    run: int = request.path_params["run_id"]
    if not INT64_MIN <= run <= INT64_MAX:
        raise HTTPException(404, f"no run with id {str(run)[:40]}")
    return run


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and (
            len(declared) > 18 or int(declared) > limit):
        raise HTTPException(413, f"body of {declared[:20]} bytes exceeds PLUTO_MAX_BODY={limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds PLUTO_MAX_BODY={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:
    """The JSON body (``{}`` when empty), checked by :func:`_json.loads`: 400 naming the
    place of an unencodable string or of nesting deeper than 64; NaN/Infinity spelled."""
    raw = await read_body(request, limit)
    if not raw.strip():
        return {}
    try:
        return _json.loads(raw)
    except _json.Problem as exc:
        raise HTTPException(400, str(exc)) from None


def store_of(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def run_id_of(value: Any, what: str = "runId") -> int:
    """A run id from JSON or a header; 400 unless it is an integer within int64."""
    return int64_of(value, what)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking store work off the event loop (SQLite calls and batch decoding)."""
    return await run_in_threadpool(fn, *args)

