"""Running the backend in the foreground: `python -m pluto_server` and `pluto server` call these."""

from __future__ import annotations

import sys

from pluto.errors import PlutoError

from ._settings import ServerSettings


def serve(settings: ServerSettings | None = None) -> None:
    """Run the backend in the foreground until SIGINT/SIGTERM.

    >>> serve(ServerSettings(api_keys=("secret",)))  # doctest: +SKIP
    """
    import uvicorn

    from ._app import create_app

    settings = settings or ServerSettings.from_env()
    host, port = settings.host_port()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                access_log=False, lifespan="on")


def main() -> int:
    try:
        serve()
    except (PlutoError, ValueError) as exc:
        print(f"pluto server: {exc}", file=sys.stderr)
        return 2
    return 0
