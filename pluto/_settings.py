"""The SDK's settings: one frozen dataclass, read from the environment once per ``init``.

Explicit arguments win over the environment. ``Settings.from_env`` reads ``os.environ`` once
(through ``_launch`` and ``_sysmetrics``, which it hands the mapping); the CLI has
``CliSettings``; nothing else in ``pluto`` reads it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._launch import launch_fields  # issue 20 (H4): ranks from every launcher
from ._sysmetrics import sysmetrics_fields  # issue 20 (H4): PLUTO_SYSTEM_METRICS*
from .env import env_flag, env_number, env_tenant, redis_tls
from .errors import ConfigError
from .protocol import DEFAULT_REDIS_URL


@dataclass(frozen=True)
class Settings:
    """What a training process needs to know; see DESIGN.md §2 for the variables."""

    redis_url: str = DEFAULT_REDIS_URL
    cluster: bool = False
    prefix: str = "pluto"
    tenant: str = ""
    """``PLUTO_TENANT``: this team's keys live under ``<prefix>@<tenant>:`` (``pluto acl``)."""
    mode: str = "online"  # online | disabled
    project: str = "default"
    run_id: str | None = None
    init_timeout: float = 60.0
    strict: bool = False
    lease: float = 10.0
    """Seconds a creator's ``pending`` claim lives unless refreshed; a dead creator frees it."""
    flush_interval: float = 0.02
    """Longest an entry waits in memory before the producer sends it: short, so that a tight
    logging loop never piles up much before the first send (an idle wake costs microseconds)."""
    buffer_size: int = 1_000_000
    """Entries held in memory while Redis is unreachable; beyond it the oldest are dropped."""
    finish_timeout: float = 30.0
    term_timeout: float = 10.0
    """Seconds a SIGTERM/SIGINT leaves for flushing before the process dies of the signal:
    well under the 30 s torchrun waits before its SIGKILL."""
    heartbeat_interval: float = 2.0
    connect_timeout: float = 3.0
    rank: int = 0
    local_rank: int = 0
    node: int = 0  # issue 20 (H4): fields of pluto/_launch.py and pluto/_sysmetrics.py
    attempt: int = 0
    job_run_id: str | None = None
    system_metrics: bool = True
    system_metrics_interval: float = 5.0
    redis_ca: str = ""
    """``rediss://`` only: CA file to verify the server (``PLUTO_REDIS_CA``)."""
    redis_cert: str = ""
    """``rediss://`` only: client certificate and key (``PLUTO_REDIS_CERT`` / ``_KEY``)."""
    redis_key: str = ""
    capture_console: bool = True
    """Stream this process's stdout/stderr lines to the run (``PLUTO_CAPTURE_CONSOLE=0``: off)."""
    console_buffer: int = 100_000
    """Console pieces held while Redis is unreachable (``PLUTO_CONSOLE_BUFFER``); oldest dropped."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        mode = env.get("PLUTO_MODE", "online").strip().lower() or "online"
        if mode not in ("online", "disabled"):
            raise ConfigError(f"PLUTO_MODE={mode!r}: use 'online' or 'disabled'")
        values: dict[str, Any] = dict(
            redis_url=env.get("PLUTO_REDIS_URL") or DEFAULT_REDIS_URL,
            cluster=env_flag(env, "PLUTO_REDIS_CLUSTER"),
            prefix=env.get("PLUTO_PREFIX") or "pluto",
            tenant=env_tenant(env),
            mode=mode,
            project=env.get("PLUTO_PROJECT") or "default",
            run_id=env.get("PLUTO_RUN_ID") or env.get("MLOP_RUN_ID") or None,
            init_timeout=env_number(env, "PLUTO_INIT_TIMEOUT", 60.0),
            strict=env_flag(env, "PLUTO_STRICT"),
            lease=env_number(env, "PLUTO_LEASE", 10.0),
            buffer_size=int(env_number(env, "PLUTO_BUFFER_SIZE", 1_000_000, low=0.5)),
            finish_timeout=env_number(env, "PLUTO_FINISH_TIMEOUT", 30.0),
            term_timeout=env_number(env, "PLUTO_TERM_TIMEOUT", 10.0),
            **launch_fields(env), **sysmetrics_fields(env),  # issue 20 (H4)
            redis_ca=env.get("PLUTO_REDIS_CA", "").strip(),
            redis_cert=env.get("PLUTO_REDIS_CERT", "").strip(),
            redis_key=env.get("PLUTO_REDIS_KEY", "").strip(),
            capture_console=env.get("PLUTO_CAPTURE_CONSOLE", "1").strip().lower()
            not in ("0", "false", "no", "off"),
            console_buffer=int(env_number(env, "PLUTO_CONSOLE_BUFFER", 100_000, low=0.5)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def tls(self) -> dict[str, Any]:
        """redis-py TLS keyword arguments (none for ``redis://``); see :func:`redis_tls`."""
        return redis_tls(self.redis_url, {}, self.redis_ca, self.redis_cert, self.redis_key)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
