"""A test hook: fault injection for ``POST /ingest/metrics``, for the chaos tests only.

Active only when the backend starts with ``PLUTO_FAULTS_FILE=/path`` (``ServerSettings.faults_file``).
The file is read on every ingest request (one small read; a missing or empty file means no
fault), so a test switches faults while the backend runs:

- ``500``          answer HTTP 500 without reading the body (nothing stored)
- ``hang:<s>``     sleep ``s`` seconds first (past the worker's read timeout), then serve it
- ``delay:<s>``    the same, meant as a slow-but-working backend
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.responses import Response

from ._http import error


async def inject(path: str) -> Response | None:
    """The injected answer for this request, or None to serve it normally (maybe after a sleep)."""
    try:
        spec = Path(path).read_text().strip()
    except OSError:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "500":
        return error(500, "injected fault (PLUTO_FAULTS_FILE)")
    if kind in ("hang", "delay"):
        try:
            await asyncio.sleep(float(arg or 0))
        except ValueError:
            pass
    return None
