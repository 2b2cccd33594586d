"""The worker's Prometheus metrics (``PLUTO_METRICS_PORT``, path ``/metrics``).

Names follow Prometheus conventions (``_total`` counters, base units, ``_seconds``
histograms); stream-group gauges mirror ``redis_exporter``'s (length, lag, pending, consumers,
oldest pending age). No run id is ever a label value: a fleet serves thousands of runs, and
per-run detail is what ``pluto status`` is for. So stream gauges are aggregated by stream kind
(``control`` / ``metrics``): lag and pending summed over runs, the oldest pending age the max.

One :class:`Metrics` per worker, on a registry of its own (several workers may live in one test
process). Without ``prometheus-client`` installed every call is a no-op.
"""

from __future__ import annotations

import time
from typing import Any

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
    from prometheus_client.exposition import start_http_server
except ImportError:  # pragma: no cover - the worker runs without metrics then
    CollectorRegistry = None  # type: ignore[assignment,misc]

from pluto.streams import GroupReader, group_state

BATCH_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class _Nothing:
    """Stands in for every metric when prometheus-client is missing."""

    def labels(self, *args: Any, **kwargs: Any) -> _Nothing:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Metrics:
    """Every metric of one worker; the loop calls the ``on_*`` methods."""

    def __init__(self, name: str, version: str) -> None:
        self.enabled = CollectorRegistry is not None
        self.registry = CollectorRegistry() if self.enabled else None
        make = self._make
        self.entries_read = make(Counter, "pluto_worker_entries_read_total",
                                 "Stream entries read (XREADGROUP and XAUTOCLAIM)", ["stream"])
        self.points = make(Counter, "pluto_worker_points_persisted_total",
                           "Metric points the backend confirmed")
        self.entries_persisted = make(Counter, "pluto_worker_entries_persisted_total",
                                      "Stream entries the backend confirmed")
        self.batches = make(Counter, "pluto_worker_batches_total",
                            "Batches posted to the backend, by outcome", ["outcome"])
        self.batch_size = make(Histogram, "pluto_worker_batch_entries",
                               "Entries per posted batch", buckets=BATCH_BUCKETS)
        self.persist_seconds = make(Histogram, "pluto_worker_persist_duration_seconds",
                                    "Time to post one batch and get the backend's answer",
                                    buckets=DURATION_BUCKETS)
        self.ingest_delay = make(Histogram, "pluto_worker_ingest_delay_seconds",
                                 "Now minus the stream entry id's time, at persist",
                                 buckets=DELAY_BUCKETS)
        self.claimed = make(Counter, "pluto_worker_entries_claimed_total",
                            "Entries taken over from dead consumers (XAUTOCLAIM)")
        self.redelivered = make(Counter, "pluto_worker_redeliveries_total",
                                "Entries read again (own pending entries after a restart)")
        self.dead = make(Counter, "pluto_worker_dead_letters_total",
                         "Entries dead-lettered, by stream kind", ["stream"])
        self.parked = make(Counter, "pluto_worker_runs_parked_total",
                           "Times a run was parked by back-off after failing backend calls")
        self.active_runs = make(Gauge, "pluto_worker_active_runs", "Runs this worker reads")
        self.last_persist = make(Gauge, "pluto_worker_last_persist_timestamp_seconds",
                                 "When the backend last confirmed a batch (epoch seconds)")
        self.stream_length = make(Gauge, "pluto_stream_length",
                                  "Entries in the streams, summed by kind", ["stream"])
        self.group_lag = make(Gauge, "pluto_stream_group_lag",
                              "Entries not yet delivered to the group, summed by kind",
                              ["stream", "group"])
        self.group_pending = make(Gauge, "pluto_stream_group_messages_pending",
                                  "Entries delivered but not acknowledged, summed by kind",
                                  ["stream", "group"])
        self.oldest_pending = make(Gauge, "pluto_stream_group_oldest_pending_age_seconds",
                                   "Age of the oldest pending entry, max by kind",
                                   ["stream", "group"])
        self.consumers = make(Gauge, "pluto_stream_group_consumers",
                              "Consumers of the control stream's group", ["stream", "group"])
        info = make(Info, "pluto_worker", "This worker")
        info.info({"version": version, "name": name})

    def _make(self, kind: Any, name: str, doc: str, labels: list[str] | None = None,
              **kwargs: Any) -> Any:
        if not self.enabled:
            return _Nothing()
        registry: Any = self.registry
        return kind(name, doc, labels or (), registry=registry, **kwargs)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if self.enabled:
            registry: Any = self.registry
            start_http_server(port, addr=host, registry=registry)

    # -- what the loop reports ------------------------------------------------------------------
    def on_read(self, kind: str, count: int) -> None:
        if count:
            self.entries_read.labels(kind).inc(count)

    def on_persisted(self, entries: int, points: int, seconds: float,
                     ids: list[bytes]) -> None:
        self.batches.labels("stored").inc()
        self.batch_size.observe(entries)
        self.persist_seconds.observe(seconds)
        self.entries_persisted.inc(entries)
        self.points.inc(points)
        self.last_persist.set(time.time())
        now_ms = time.time() * 1000
        for entry_id in ids[:: max(1, len(ids) // 20)]:  # a sample: ~20 per batch
            self.ingest_delay.observe(max(0.0, (now_ms - _ms(entry_id)) / 1000))

    def on_failed(self, outcome: str) -> None:
        self.batches.labels(outcome).inc()

    def sample(self, r: GroupReader, control: str, streams: list[str], group: str) -> None:
        """Stream-group gauges, read from Redis (a few commands per run; call it seldom)."""
        if not self.enabled:
            return
        totals = {"control": [0, 0, 0, 0.0], "metrics": [0, 0, 0, 0.0]}
        for stream in [control, *streams]:
            kind = "control" if stream == control else "metrics"
            state = group_state(r, stream)
            t = totals[kind]
            t[0] += state["length"]
            t[1] += state["lag"] or 0
            t[2] += state["pending"]
            t[3] = max(t[3], state["oldest_pending_s"] or 0.0)
            if kind == "control":
                self.consumers.labels(kind, group).set(state["consumers"])
        for kind, (length, lag, pending, oldest) in totals.items():
            self.stream_length.labels(kind).set(length)
            self.group_lag.labels(kind, group).set(lag)
            self.group_pending.labels(kind, group).set(pending)
            self.oldest_pending.labels(kind, group).set(oldest)
        self.active_runs.set(len(streams))


def _ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0] or 0)


class _Tenants:
    """One exposition of several workers' registries, each sample labelled ``tenant`` (the
    tenants are configured, not user input, so the label's cardinality stays bounded)."""

    def __init__(self, workers: list[tuple[str, Metrics]]) -> None:
        self.workers = workers

    def collect(self) -> Any:
        families: dict[str, Any] = {}
        for tenant, metrics in self.workers:
            for family in metrics.registry.collect() if metrics.registry else ():
                merged = families.setdefault(family.name, family)
                samples = [s._replace(labels={**s.labels, "tenant": tenant})
                           for s in family.samples]
                merged.samples = (merged.samples if merged is not family else []) + samples
        return list(families.values())


def serve_metrics(workers: list[tuple[str, Metrics]], port: int, host: str = "0.0.0.0") -> None:
    """Serve one worker's metrics as before, or several (one per tenant) with a ``tenant``
    label on every sample, on ``port`` (``/metrics``)."""
    if len(workers) == 1:
        workers[0][1].serve(port, host)
    elif CollectorRegistry is not None:
        registry = CollectorRegistry()
        registry.register(_Tenants(workers))  # type: ignore[arg-type]
        start_http_server(port, addr=host, registry=registry)

