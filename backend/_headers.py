"""HTTP hardening as pure ASGI middleware (issue 18): security headers on every response, a
per-key token bucket on run creation, and a bound on the time a request body may take.

The header and connection limits that must act before a request exists (slowloris: headers
that never finish) live in ``backend/_serve.py``, at the protocol level.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""For HTML that set no policy of its own (the dashboard sets one in ``_read.py``): our own
files only, no inline script, no framing."""

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
"""For everything else (JSON): a browser that renders it anyway may load and run nothing."""


class SecurityHeaders:
    """Adds ``Content-Security-Policy``, ``X-Content-Type-Options: nosniff``,
    ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` (and HSTS over HTTPS) to every
    response, keeping any a route set itself (the dashboard may set a stricter CSP)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                html = headers.get("content-type", "").startswith("text/html")
                headers.setdefault("content-security-policy", PAGE_CSP if html else API_CSP)
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("x-frame-options", "DENY")
                headers.setdefault("referrer-policy", "no-referrer")
                if https:
                    headers.setdefault("strict-transport-security", "max-age=31536000")
            await send(message)

        await self.app(scope, receive, with_headers)


CREATE_PATHS = frozenset({"/api/runs/create"})


class CreateRate:
    """A token bucket per API key on run creation: ``rate`` creates per second, bursts of
    ``burst``; beyond it 429 with ``Retry-After`` (the worker retries 429 with back-off).

    One key's storm (a malicious rank flooding the control stream, a script in a loop) slows
    that key alone. Buckets are kept per key id (set by ``_auth.ScopedAuth``), never per token.
    """

    def __init__(self, app: ASGIApp, rate: float, burst: float) -> None:
        self.app = app
        self.rate, self.burst = rate, max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a create may go now (and counts it), else the seconds until one may."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path") in CREATE_PATHS and self.rate > 0):
            wait = self.take(str(scope.get("pluto.key", "anonymous")))
            if wait > 0:
                retry = max(1, math.ceil(wait))
                response = JSONResponse(
                    {"error": f"too many run creations with this API key: retry in {retry} s "
                              "(limit PLUTO_CREATE_RATE per second, bursts of "
                              "PLUTO_CREATE_BURST)"},
                    status_code=429, headers={"Retry-After": str(retry)})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTimeout:
    """408 when a request body has not arrived whole within ``timeout`` seconds of the
    route's first read of it, so a client trickling a body cannot hold a connection and a
    thread. (Time the request spent waiting for the server is not the client's fault.)

    Only receives of the body are bounded; once it is complete, ``receive`` (which then waits
    for the client to disconnect) passes through unchanged.
    """

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"done": False, "deadline": None}

        async def bounded() -> Message:
            if state["done"]:
                return await receive()
            if state["deadline"] is None:  # from the first read: time queued here is ours
                state["deadline"] = time.monotonic() + self.timeout
            try:
                left = max(0.1, state["deadline"] - time.monotonic())
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within "
                                         f"{self.timeout:g} s (PLUTO_BODY_TIMEOUT)") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["done"] = True
            return message

        await self.app(scope, bounded, send)
