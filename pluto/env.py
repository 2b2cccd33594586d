"""How every deployable reads pluto's environment variables: one rule for numbers, flags,
tenants and Redis TLS files, so ``PLUTO_*`` variables fail alike in the SDK, the worker and the server.

Public because the worker (``pluto_worker``) and the server (``pluto_server``) share it with
the SDK (and the CLI: ``pluto acl`` reads the tenants as a worker does). Nothing here reads
``os.environ``: each deployable's settings module reads it once and hands the mapping in
(DESIGN.md §2).

>>> env_number({"PLUTO_LEASE": "2.5"}, "PLUTO_LEASE", 10.0)
2.5
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .protocol import DEFAULT_REDIS_URL, tenant_problem

__all__ = ["RedisTarget", "env_flag", "env_number", "env_tenant", "env_tenants", "redact",
           "redis_tls", "redis_tls_files"]


def env_number(env: Mapping[str, str], name: str, default: float, low: float = 0.0) -> float:
    """A finite number above ``low`` from ``env[name]``, or one ``ConfigError`` naming it.

    >>> env_number({"PLUTO_LEASE": "-1"}, "PLUTO_LEASE", 10.0)
    Traceback (most recent call last):
    pluto.errors.ConfigError: PLUTO_LEASE='-1' must be a finite number above 0.0
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


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """True for ``1``/``true``/``yes``/``on`` (any case); unset or anything else is False."""
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


@dataclass(frozen=True)
class RedisTarget:
    """The Redis URL and, for a ``rediss://`` one, the CA, client certificate and key files:
    the fields every settings class that connects to Redis starts with (the SDK's, the CLI's,
    ``pluto acl``'s and the worker's), so the rule for them is written once."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_ca: str = ""
    """``rediss://`` only: CA file to verify the server (``PLUTO_REDIS_CA``; else the system's)."""
    redis_cert: str = ""
    """``rediss://`` only: client certificate and key (``PLUTO_REDIS_CERT`` / ``_KEY``)."""
    redis_key: str = ""

    def tls(self, url: str | None = None) -> dict[str, Any]:
        """redis-py TLS keyword arguments for ``url`` (else :attr:`redis_url`; none for
        ``redis://``); a ``ConfigError`` naming the variable when a file is missing."""
        return redis_tls(self.redis_url if url is None else url, {}, self.redis_ca,
                         self.redis_cert, self.redis_key)


def redis_tls_files(env: Mapping[str, str]) -> dict[str, str]:
    """The ``redis_ca``, ``redis_cert`` and ``redis_key`` fields of every settings class that
    connects to Redis, from ``PLUTO_REDIS_CA`` / ``PLUTO_REDIS_CERT`` / ``PLUTO_REDIS_KEY``
    (checked by :func:`redis_tls` when a ``rediss://`` URL uses them)."""
    return {"redis_ca": env.get("PLUTO_REDIS_CA", "").strip(),
            "redis_cert": env.get("PLUTO_REDIS_CERT", "").strip(),
            "redis_key": env.get("PLUTO_REDIS_KEY", "").strip()}


def redis_tls(url: str, env: Mapping[str, str] | None = None, ca: str = "", cert: str = "",
              key: str = "") -> dict[str, Any]:
    """redis-py keyword arguments for a ``rediss://`` URL: the CA to verify the server with
    (``PLUTO_REDIS_CA``; else the system's) and a client certificate and key
    (``PLUTO_REDIS_CERT`` / ``PLUTO_REDIS_KEY``) for servers that require one. Explicit
    arguments win over ``env`` (none: only the arguments count); a ``redis://`` URL gets none
    (plain connections reject them).

    >>> redis_tls("rediss://h:6380/0", {})
    {'ssl_cert_reqs': 'required'}
    >>> redis_tls("redis://h:6379/0", {"PLUTO_REDIS_CA": "/ca.pem"})
    {}
    """
    env = {} if env is None else env
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
