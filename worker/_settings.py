"""The worker's settings: one frozen dataclass, read from the environment once at start.

Explicit keyword arguments to :meth:`WorkerSettings.from_env` win over the environment; nothing
else in ``worker`` reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pluto.env import RedisTarget, env_tenants, redis_tls_files
from pluto.env import env_flag as _flag
from pluto.env import env_number as _num
from pluto.protocol import DEFAULT_API_URL, DEFAULT_REDIS_URL


@dataclass(frozen=True)
class WorkerSettings(RedisTarget):
    """What one worker replica needs; DESIGN.md §2 lists the shared variables.

    >>> WorkerSettings.from_env({"PLUTO_PREFIX": "demo"}).prefix
    'demo'
    """

    cluster: bool = False
    prefix: str = "pluto"
    tenants: tuple[str, ...] = ("",)
    """Tenants this worker serves (``PLUTO_TENANTS=a,b``, or ``PLUTO_TENANT``; ``pluto worker
    --tenant``): one :class:`Worker` each, on keys under ``<prefix>@<tenant>:``. ``("",)``:
    no tenant, the keys under ``<prefix>:`` as before tenancy."""
    api_url: str = DEFAULT_API_URL
    api_key: str = ""
    name: str = ""
    """Consumer name in the group; ``<host>:<pid>`` unless ``PLUTO_WORKER_NAME`` is set."""
    batch: int = 5000
    """Entries read per stream per iteration (XREADGROUP COUNT), split over the active runs."""
    batch_bytes: int = 8 << 20
    """Raw entry bytes per POST at most (``PLUTO_WORKER_BATCH_BYTES``): a run's share of one
    read is posted in parts this large, well below the backend's body limit (64 MiB by
    default); a backend answering 413 anyway gets the part split in halves until it fits."""
    posters: int = 4
    """Threads posting to the backend, one run each at a time (``PLUTO_WORKER_POSTERS``)."""
    http_attempts: int = 3
    """Quick attempts per backend call before the run (or control entry) is parked and retried
    with back-off (``PLUTO_WORKER_HTTP_ATTEMPTS``)."""
    block_ms: int = 200
    claim_idle_ms: int = 15_000
    """Entries pending this long on another consumer are taken over (XAUTOCLAIM)."""
    heartbeat_timeout: float = 30.0
    """Seconds without a producer heartbeat after which a running member counts as dead."""
    retention: int = 10_000
    """Acknowledged entries kept at the tail of each stream for live viewing."""
    trim_interval: float = 5.0
    check_interval: float = 0.25
    """Seconds between completion / dead-member checks of the active runs."""
    heartbeat_interval: float = 1.0
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    retry_max: float = 5.0
    """Longest pause between two attempts against the backend or Redis."""
    log_level: str = "INFO"
    metrics_port: int = 0
    """``PLUTO_METRICS_PORT``: serve Prometheus metrics there (``/metrics``); 0 = off."""
    metrics_interval: float = 5.0
    """Seconds between two samples of the stream-group gauges (a few commands per run)."""
    api_ca: str = ""
    """CA file to verify an ``https://`` backend with (``PLUTO_API_CA``; else the system's)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, tenants: Sequence[str] | None = None,
                 **overrides: Any) -> WorkerSettings:
        """Settings from ``env`` (default ``os.environ``), ``overrides`` winning. ``tenants``
        (``pluto worker --tenant``) win over ``PLUTO_TENANTS``, yet those are still checked,
        so a bad variable is reported rather than left for the next start without the flag."""
        env = os.environ if env is None else env
        chosen = env_tenants(env, tenants)  # a bad --tenant is the first error
        env_tenants(env)  # then a bad PLUTO_TENANTS (or PLUTO_TENANT), even when --tenant wins
        values: dict[str, Any] = dict(
            redis_url=env.get("PLUTO_REDIS_URL") or DEFAULT_REDIS_URL,
            cluster=_flag(env, "PLUTO_REDIS_CLUSTER"),
            prefix=env.get("PLUTO_PREFIX") or "pluto",
            tenants=chosen,
            api_url=(env.get("PLUTO_API_URL") or DEFAULT_API_URL).rstrip("/"),
            api_key=env.get("PLUTO_API_KEY") or "",
            name=env.get("PLUTO_WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}",
            batch=int(_num(env, "PLUTO_WORKER_BATCH", 5000, low=0.5)),
            batch_bytes=int(_num(env, "PLUTO_WORKER_BATCH_BYTES", 8 << 20, low=1024)),
            posters=int(_num(env, "PLUTO_WORKER_POSTERS", 4, low=0.5)),
            http_attempts=int(_num(env, "PLUTO_WORKER_HTTP_ATTEMPTS", 3, low=0.5)),
            block_ms=int(_num(env, "PLUTO_WORKER_BLOCK_MS", 200, low=0.5)),
            claim_idle_ms=int(_num(env, "PLUTO_CLAIM_IDLE_MS", 15_000, low=0.5)),
            heartbeat_timeout=_num(env, "PLUTO_HEARTBEAT_TIMEOUT", 30.0),
            retention=int(_num(env, "PLUTO_RETENTION", 10_000, low=-0.5)),
            trim_interval=_num(env, "PLUTO_TRIM_INTERVAL", 5.0),
            connect_timeout=_num(env, "PLUTO_HTTP_CONNECT_TIMEOUT", 3.0),
            read_timeout=_num(env, "PLUTO_HTTP_READ_TIMEOUT", 10.0),
            log_level=(env.get("PLUTO_LOG_LEVEL") or "INFO").strip().upper(),
            metrics_port=int(_num(env, "PLUTO_METRICS_PORT", 0, low=-0.5)),
            **redis_tls_files(env),
            api_ca=env.get("PLUTO_API_CA", "").strip(),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def tenant(self) -> str:
        """The one tenant a :class:`Worker` with these settings serves (see :meth:`each`)."""
        return self.tenants[0] if self.tenants else ""

    def each(self) -> list[WorkerSettings]:
        """One settings object per tenant served; with several, names get ``@<tenant>``."""
        if len(self.tenants) <= 1:
            return [self]
        return [self.replace(tenants=(t,), name=f"{self.name}@{t}") for t in self.tenants]

    def replace(self, **changes: Any) -> WorkerSettings:
        return dataclasses.replace(self, **changes)

