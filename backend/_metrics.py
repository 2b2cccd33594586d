"""The backend's Prometheus metrics at ``/metrics``: requests by route and status, points
ingested, store write latency, runs by status.

The route label is the route's path template (``/api/runs/{run_id}``), never the raw path, so
run ids and metric names never become label values. One registry per app, so several apps can
live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BackendMetrics:
    def __init__(self, runs_by_status: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pluto_backend_requests_total", "HTTP requests, by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.points = Counter("pluto_backend_points_ingested_total",
                              "Metric points written to the store", registry=self.registry)
        self.write_seconds = Histogram("pluto_backend_store_write_duration_seconds",
                                       "Time of one store write, by op: ingest (a batch), create, update",
                                       ["op"], buckets=WRITE_BUCKETS, registry=self.registry)
        self.registry.register(_RunsCollector(runs_by_status))

    def timed_write(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its duration observed as a store write of kind ``op``."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.write_seconds.labels(op).observe(time.perf_counter() - start)


class _RunsCollector:
    """``pluto_backend_runs{status=...}``, counted in the store when Prometheus scrapes."""

    def __init__(self, count: Callable[[], dict[str, int]]) -> None:
        self._count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("pluto_backend_runs", "Runs in the store, by status",
                                   labels=["status"])
        try:
            counts = self._count()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is busy
            counts = {}
        for status, n in sorted(counts.items()):
            family.add_metric([status], n)
        yield family


class CountRequests:
    """ASGI middleware: one ``pluto_backend_requests_total`` increment per response."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], BackendMetrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                metrics.requests.labels(_route(scope), scope.get("method", ""),
                                        str(status[0])).inc()


def _route(scope: Scope) -> str:
    app = scope.get("app")
    try:
        for route in getattr(getattr(app, "router", None), "routes", []):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "?"))
    except ValueError:  # a path id of 5,000 digits: PathIds answered it, it matches nothing
        pass
    return "unmatched"


async def metrics_endpoint(request: Request) -> Response:
    metrics: BackendMetrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
