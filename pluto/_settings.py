"""The SDK's settings: one frozen dataclass, read from the environment once per ``init``.

Explicit arguments win over the environment. ``Settings.from_env`` reads ``os.environ`` once
(through ``_launch`` and ``_sysmetrics``, which it hands the mapping); the CLI has
``CliSettings``; nothing else in ``pluto`` reads it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._launch import launch_fields  # issue 20 (H4): ranks from every launcher
from ._sysmetrics import sysmetrics_fields  # issue 20 (H4): PLUTO_SYSTEM_METRICS*
from .errors import ConfigError
from .protocol import DEFAULT_REDIS_URL, tenant_problem


def env_number(env: Mapping[str, str], name: str, default: float, low: float = 0.0) -> float:
    """A finite number above ``low`` from ``env[name]``, or one ``ConfigError`` naming it.

    Shared by the SDK, the worker and the backend settings, so every variable fails alike.
    """
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; unset it or give seconds") from None
    if not value > low or value != value or value == float("inf"):
        raise ConfigError(f"{name}={raw!r} must be a finite number above {low}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password:
            netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (
                f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return url


def redis_tls(url: str, env: Mapping[str, str] | None = None, ca: str = "", cert: str = "",
              key: str = "") -> dict[str, Any]:
    """redis-py keyword arguments for a ``rediss://`` URL: the CA to verify the server with
    (``PLUTO_REDIS_CA``; else the system's) and a client certificate and key
    (``PLUTO_REDIS_CERT`` / ``PLUTO_REDIS_KEY``) for servers that require one. Explicit
    arguments win over ``env``; a ``redis://`` URL gets none (plain connections reject them).

    >>> redis_tls("rediss://h:6380/0", {"PLUTO_REDIS_CA": "/ca.pem"})
    {'ssl_cert_reqs': 'required', 'ssl_ca_certs': '/ca.pem'}
    """
    env = os.environ if env is None else env
    if not url.lower().startswith("rediss://"):
        return {}
    ca = ca or env.get("PLUTO_REDIS_CA", "").strip()
    cert = cert or env.get("PLUTO_REDIS_CERT", "").strip()
    key = key or env.get("PLUTO_REDIS_KEY", "").strip()
    if bool(cert) != bool(key):
        raise ConfigError("a Redis client certificate needs both PLUTO_REDIS_CERT and "
                          "PLUTO_REDIS_KEY (PEM files)")
    for name, path in (("PLUTO_REDIS_CA", ca), ("PLUTO_REDIS_CERT", cert),
                       ("PLUTO_REDIS_KEY", key)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{name}={path!r} is not a readable file")
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if ca:
        kwargs["ssl_ca_certs"] = ca
    if cert:
        kwargs.update(ssl_certfile=cert, ssl_keyfile=key)
    return kwargs


def env_tenant(env: Mapping[str, str], name: str = "PLUTO_TENANT") -> str:
    """The tenant (team) named by ``env[name]`` (``""``: none), or one ``ConfigError``."""
    tenant = env.get(name, "").strip()
    problem = tenant_problem(tenant)
    if problem:
        raise ConfigError(f"{name}={tenant[:40]!r}: {problem}")
    return tenant


def env_tenants(env: Mapping[str, str], given: Sequence[str] | None = None) -> tuple[str, ...]:
    """The tenants a worker (or ``pluto acl``) serves: ``given`` (``--tenant``), else
    ``PLUTO_TENANTS`` (comma-separated), else ``PLUTO_TENANT``, else ``("",)`` (no tenant);
    each validated, duplicates dropped."""
    if given:
        names, source = list(given), "--tenant"
    else:
        names, source = env.get("PLUTO_TENANTS", "").split(","), "PLUTO_TENANTS"
    names = [t.strip() for t in names if t.strip()]
    if not names:
        return (env_tenant(env),)
    return tuple(dict.fromkeys(env_tenant({source: t}, source) for t in names))


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
