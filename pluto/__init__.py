"""pluto: log metrics from every rank of a distributed job into one run, through Redis.

>>> import pluto
>>> run = pluto.init(project="llm", name="baseline", config={"lr": 3e-4})
>>> run.log({"train/loss": 0.25})
>>> run.finish()

Importing this package does no I/O and pulls in neither the worker nor the backend.
"""

from __future__ import annotations

from . import env, errors, integrations, protocol, streams
from ._init import finish, init, log
from ._run import Run
from ._settings import Settings
from ._values import PlutoWarning
from .errors import ConfigError, ConnectionFailed, InitTimeout, PlutoError, RunFinished
from .protocol import State

__version__ = "0.1.0"

run: Run | None = None
"""The current run of this process (set by ``init``)."""

__all__ = [
    "ConfigError",
    "ConnectionFailed",
    "InitTimeout",
    "PlutoError",
    "PlutoWarning",
    "Run",
    "RunFinished",
    "Settings",
    "State",
    "env",
    "errors",
    "finish",
    "init",
    "integrations",
    "log",
    "protocol",
    "run",
    "streams",
]


def __getattr__(name: str) -> object:
    """``pluto.query`` without importing it first (as the official SDK allows), loaded only
    when used: training ranks never pay for it."""
    if name == "query":
        import importlib

        return importlib.import_module(".query", __name__)
    raise AttributeError(f"module 'pluto' has no attribute {name!r}")
