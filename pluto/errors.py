"""Exceptions raised by pluto. Each message names the setting or command that fixes it.

    PlutoError
     ├── ConfigError        a setting or argument is invalid (bad URL, bad run id, bad config)
     ├── ConnectionFailed   Redis did not answer at ``init`` (check ``PLUTO_REDIS_URL``)
     ├── InitTimeout        the run id never arrived (is ``pluto worker`` running?)
     └── RunFinished        ``log`` after ``finish`` in strict mode

``log()`` raises only ``TypeError``/``ValueError`` for the caller's own mistakes, and only in
strict mode; everything else is a warning, so a training loop never dies because of logging.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ConnectionFailed", "InitTimeout", "PlutoError", "RunFinished"]


class PlutoError(Exception):
    """Base of every error pluto raises on purpose."""


class ConfigError(PlutoError, ValueError):
    """A setting or an argument of ``init`` is invalid."""


class ConnectionFailed(PlutoError, ConnectionError):
    """Redis could not be reached when it had to be (at ``init``)."""


class InitTimeout(PlutoError, TimeoutError):
    """``init`` waited ``PLUTO_INIT_TIMEOUT`` seconds and no worker created the run."""


class RunFinished(PlutoError):
    """The run was already finished."""
