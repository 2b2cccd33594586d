"""``GET /api/openapi.json``: the read API's parameters and the run-filter grammar, published
as the Pluto server publishes them, so a client can check its contract against this backend
(the official SDK's ``tests/test_contract.py`` reads ``/api/runs/list``'s parameters and
``components.schemas.RunFilterGrammar``).

Built from ``_runfilter``'s own tables, so the published grammar cannot drift from the one
enforced. ``$exists`` is accepted too but left out of ``leafOperators`` (an extension of ours
the official client does not send; its contract test asks for equality).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import _runfilter

PARAMS = {  # route -> its query parameters (see ``_query``, ``_lines``, ``_files``)
    "/api/runs/projects": [],
    "/api/runs/list": ["projectName", "search", "tags", "filter", "sort", "limit", "offset"],
    "/api/runs/details/{runId}": ["runId", "projectName"],
    "/api/runs/details/by-display-id/{displayId}": ["displayId", "projectName"],
    "/api/runs/metric-names": ["projectName", "runIds", "search", "limit"],
    "/api/runs/metrics": ["projectName", "runId", "logName", "limit", "stepMin", "stepMax"],
    "/api/runs/statistics": ["projectName", "runId", "logName"],
    "/api/runs/compare": ["projectName", "runIds", "logName"],
    "/api/runs/leaderboard": ["projectName", "logName", "aggregation", "direction", "limit",
                              "offset"],
    "/api/runs/logs": ["projectName", "runId", "logType", "rank", "afterId", "limit",
                       "offset"],
    "/api/runs/data": ["projectName", "runId", "logName", "dataType", "limit", "offset"],
    "/api/runs/files": ["projectName", "runId", "logName"],
}


def _enum(values: Any) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string", "enum": sorted(values)}}


def document() -> dict[str, Any]:
    paths = {path: {"get": {"parameters": [
        {"name": p, "in": "path" if "{" + p + "}" in path else "query",
         "schema": {"type": "string"}} for p in params]}} for path, params in PARAMS.items()}
    grammar = {"type": "object", "properties": {
        "booleanOperators": _enum(["$and", "$or", "$not"]),
        "leafOperators": _enum(_runfilter._LEAF_OPS - {"$exists"}),
        "fields": _enum(_runfilter._PLAIN),
        "fieldPrefixes": _enum(["config.", "systemMetadata.", *_runfilter._SUMMARY]),
    }}
    return {"openapi": "3.0.3", "info": {"title": "pluto-stream backend", "version": "1"},
            "paths": paths, "components": {"schemas": {"RunFilterGrammar": grammar}}}


async def openapi(request: Request) -> Response:
    return JSONResponse(document())
