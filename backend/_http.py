"""Request plumbing shared by the route modules: auth, JSON errors, bounded bodies.

Auth is a pure ASGI middleware rather than a per-route check so no route under ``/api``,
``/ingest`` or ``/files`` can forget it; it answers 401 before the body is read, so a request
with a wrong key changes nothing.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._store import Store

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


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (404 no route, 405, ours) as JSON ``{"error": ...}``."""
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, str(exc.detail))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds PLUTO_MAX_BODY={limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds PLUTO_MAX_BODY={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> Any:
    raw = await read_body(request, limit)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise HTTPException(400, f"body is not valid JSON: {exc}") from None


def store_of(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def run_id_of(value: Any, what: str = "runId") -> int:
    """A run id from JSON or a header; 400 if it is not an integer."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if type(value) is not int:
        raise HTTPException(400, f"{what} must be an integer run id, got {value!r}")
    return value


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking store work off the event loop (SQLite calls and batch decoding)."""
    return await run_in_threadpool(fn, *args)

