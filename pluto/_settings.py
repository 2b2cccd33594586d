"""The settings of the SDK and the CLI: frozen dataclasses, each read from the environment once.

Explicit arguments win over the environment. This is the one module of ``pluto`` that reads
``os.environ`` (issue 15; a test walks every module), each time in a ``from_env``:
``Settings`` once per ``init`` (through ``_launch`` and ``_sysmetrics``, which it hands the
mapping), ``QuerySettings`` once per ``pluto.query.Client``, ``CliSettings`` and
``AclSettings`` once per ``pluto`` command. The only other readers copy the environment for a
child process (``_servers``) or read a variable that is not ours (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._launch import launch_fields  # issue 20 (H4): ranks from every launcher
from ._sysmetrics import sysmetrics_fields  # issue 20 (H4): PLUTO_SYSTEM_METRICS*
from .env import RedisTarget, env_flag, env_number, env_tenant, env_tenants, redis_tls_files
from .errors import ConfigError
from .protocol import DEFAULT_API_URL, DEFAULT_DB_URL, DEFAULT_REDIS_URL


@dataclass(frozen=True)
class Settings(RedisTarget):
    """What a training process needs to know; see DESIGN.md §2 for the variables."""

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
            **redis_tls_files(env),
            capture_console=env.get("PLUTO_CAPTURE_CONSOLE", "1").strip().lower()
            not in ("0", "false", "no", "off"),
            console_buffer=int(env_number(env, "PLUTO_CONSOLE_BUFFER", 100_000, low=0.5)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


QUERY_API_URLS = ("PLUTO_URL_API", "MLOP_URL_API", "PLUTO_API_URL")
"""Where ``pluto.query`` finds the server, first set wins: the official SDK's variables before
ours, so that a script written for ``pluto-ml`` runs unchanged."""
QUERY_INGEST_URLS = ("PLUTO_URL_INGEST", "MLOP_URL_INGEST")
"""Where ``pluto.query`` uploads files, first set wins; none: the server of ``QUERY_API_URLS``."""


def _first_url(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The first of ``names`` set to something not blank, stripped of spaces and trailing
    ``/`` (so that paths join with one); None when none is."""
    for name in names:
        if env.get(name, "").strip():
            return env[name].strip().rstrip("/")
    return None


@dataclass(frozen=True)
class QuerySettings:
    """What ``pluto.query`` reads, once per ``Client``: read then, not at import, so that a
    script may set the variables after ``import pluto.query``.

    >>> QuerySettings.from_env({"PLUTO_API_URL": "http://b:8080/"}).ingest_url
    'http://b:8080'
    """

    api_url: str = DEFAULT_API_URL
    """``PLUTO_URL_API``, else ``MLOP_URL_API``, else ``PLUTO_API_URL``."""
    ingest_url: str = DEFAULT_API_URL
    """``PLUTO_URL_INGEST``, else ``MLOP_URL_INGEST``, else :attr:`api_url`."""
    api_key: str | None = field(default=None, repr=False)  # never in a printed settings object
    """``PLUTO_API_KEY``, else the official SDK's ``MLOP_API_TOKEN``; None: neither is set."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QuerySettings:
        env = os.environ if env is None else env
        api_url = _first_url(env, QUERY_API_URLS)
        api_url = DEFAULT_API_URL if api_url is None else api_url
        ingest_url = _first_url(env, QUERY_INGEST_URLS)
        return cls(api_url=api_url, ingest_url=api_url if ingest_url is None else ingest_url,
                   api_key=env.get("PLUTO_API_KEY") or env.get("MLOP_API_TOKEN") or None)


@dataclass(frozen=True)
class CliSettings(RedisTarget):
    """What the ``pluto`` commands ``up``, ``tail``, ``runs``, ``status``, ``dead`` and
    ``server keys`` read, once per command (``pluto acl``: :class:`AclSettings`; ``pluto
    worker`` and ``pluto server``: the settings of the worker and of the server)."""

    prefix: str = "pluto"
    tenant: str = ""
    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
    db_url: str = DEFAULT_DB_URL
    home: Path = Path(".pluto")
    project: str = "default"
    """``PLUTO_PROJECT``: the project of ``pluto tail`` without ``--project``."""
    api_ca: str = ""
    """CA file to verify an ``https://`` backend with (``PLUTO_API_CA``; else the system's)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CliSettings:
        env = os.environ if env is None else env
        return cls(redis_url=env.get("PLUTO_REDIS_URL") or DEFAULT_REDIS_URL,
                   prefix=env.get("PLUTO_PREFIX") or "pluto",
                   tenant=env_tenant(env),
                   api_url=(env.get("PLUTO_API_URL") or DEFAULT_API_URL).rstrip("/"),
                   api_key=env.get("PLUTO_API_KEY") or None,
                   db_url=env.get("PLUTO_DB_URL") or DEFAULT_DB_URL,
                   home=Path(env.get("PLUTO_HOME") or ".pluto"),
                   project=env.get("PLUTO_PROJECT") or "default",
                   api_ca=env.get("PLUTO_API_CA", "").strip(), **redis_tls_files(env))

    def key(self) -> str | None:
        """``PLUTO_API_KEY``, else the key ``pluto up`` wrote to ``.pluto/api_key``."""
        if self.api_key:
            return self.api_key
        path = self.home / "api_key"
        return path.read_text().strip() if path.exists() else None


ACL_PASSWORD = "PLUTO_ACL_PASSWORD_"
"""The start of the variables holding the passwords of ``pluto acl``'s users."""


@dataclass(frozen=True)
class AclSettings(RedisTarget):
    """What ``pluto acl`` reads, once. Apart from :class:`CliSettings` because it takes its
    tenants as a worker does: ``--tenant`` wins over ``PLUTO_TENANTS``, and then a bad
    ``PLUTO_TENANT`` (which ``CliSettings`` refuses) is not in the way.

    >>> AclSettings.from_env(["a"], {"PLUTO_TENANT": "B*"}).tenants
    ('a',)
    """

    prefix: str = "pluto"
    tenants: tuple[str, ...] = ()
    """``--tenant``, else ``PLUTO_TENANTS``, else ``PLUTO_TENANT``; ``()``: no tenant."""
    passwords: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Every ``PLUTO_ACL_PASSWORD_<USER>`` variable; never in a printed settings object."""

    @classmethod
    def from_env(cls, tenants: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None) -> AclSettings:
        env = os.environ if env is None else env
        return cls(tenants=tuple(t for t in env_tenants(env, tenants) if t),
                   redis_url=env.get("PLUTO_REDIS_URL") or DEFAULT_REDIS_URL,
                   prefix=env.get("PLUTO_PREFIX") or "pluto",
                   passwords={k: v for k, v in env.items() if k.startswith(ACL_PASSWORD)},
                   **redis_tls_files(env))
