"""The SDK's settings: one frozen dataclass, read from the environment once per ``init``.

Explicit arguments win over the environment; nothing else in ``pluto`` reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


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


MAX_RANK = 2**31 - 1


def _rank(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if not 0 <= value <= MAX_RANK:
        raise ConfigError(f"{name}={value} is not a process rank (0 to {MAX_RANK}); unset it or "
                          "let the launcher set it")
    return value


def _torch_rank() -> int:
    """The rank from torch.distributed if the user already initialised it (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # noqa: BLE001 - a half-initialised process group must not break init
        pass
    return 0


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


def env_flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """What a training process needs to know; see DESIGN.md §2 for the variables."""

    redis_url: str = DEFAULT_REDIS_URL
    cluster: bool = False
    prefix: str = "pluto"
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
            mode=mode,
            project=env.get("PLUTO_PROJECT") or "default",
            run_id=env.get("PLUTO_RUN_ID") or env.get("MLOP_RUN_ID") or None,
            init_timeout=env_number(env, "PLUTO_INIT_TIMEOUT", 60.0),
            strict=env_flag(env, "PLUTO_STRICT"),
            lease=env_number(env, "PLUTO_LEASE", 10.0),
            buffer_size=int(env_number(env, "PLUTO_BUFFER_SIZE", 1_000_000, low=0.5)),
            finish_timeout=env_number(env, "PLUTO_FINISH_TIMEOUT", 30.0),
            term_timeout=env_number(env, "PLUTO_TERM_TIMEOUT", 10.0),
            rank=_rank(env, "RANK", _torch_rank()),
            local_rank=_rank(env, "LOCAL_RANK", 0),
            capture_console=env.get("PLUTO_CAPTURE_CONSOLE", "1").strip().lower()
            not in ("0", "false", "no", "off"),
            console_buffer=int(env_number(env, "PLUTO_CONSOLE_BUFFER", 100_000, low=0.5)),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
