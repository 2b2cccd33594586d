"""Running the backend in the foreground: `python -m pluto_server` and `pluto server` call these.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 beyond
``limit_concurrency``, but a connection whose request headers never finish (slowloris) has
no timer at all: it would hold a descriptor for ever, and a few hundred of them exhaust the
open-files limit. :func:`guarded_protocol` adds that timer: a connection that is not inside a
request must complete its headers within ``PLUTO_HEADER_TIMEOUT`` seconds or be closed.
Bodies are bounded by ``_headers.BodyTimeout`` (408).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from pluto.errors import PlutoError

from ._settings import ServerSettings


def guarded_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a header deadline per connection."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    base: Any = AutoHTTPProtocol

    class Guarded(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def _in_request(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is not None and not cycle.response_complete

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()
            else:
                self._arm()  # bytes of a next request's headers: they get a deadline too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one (returns both, as now), so that a few
    hundred idle connections cannot exhaust descriptors (EMFILE) before their header deadline
    closes them; a flood beyond the hard limit needs a proxy or firewall in front."""
    try:
        import resource
    except ImportError:  # not on this platform
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft, hard


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """What ``uvicorn.run`` gets besides the app: address, limits, timeouts, TLS."""
    host, port = settings.host_port()
    options: dict[str, Any] = dict(
        host=host, port=port, log_level="warning", access_log=False, lifespan="on",
        http=guarded_protocol(settings.header_timeout),
        timeout_keep_alive=settings.keepalive_timeout,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers at most 64 KiB
        server_header=False,
    )
    if settings.tls_cert:
        options.update(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    return options


def serve(settings: ServerSettings | None = None) -> None:
    """Run the backend in the foreground until SIGINT/SIGTERM.

    >>> serve(ServerSettings(api_keys=("secret",)))  # doctest: +SKIP
    """
    import uvicorn

    from ._app import create_app

    settings = settings or ServerSettings.from_env()
    raise_open_files_limit()
    uvicorn.run(create_app(settings), **uvicorn_options(settings))


def main() -> int:
    try:
        serve()
    except (PlutoError, ValueError) as exc:
        print(f"pluto server: {exc}", file=sys.stderr)
        return 2
    return 0
