"""pluto's worker: consumes the Redis streams the training ranks write and persists them to the
backend exactly once in effect (DESIGN.md §5). Run any number of replicas beside one Redis.

    $ PLUTO_REDIS_URL=redis://redis:6379/0 PLUTO_API_URL=http://backend:8080 \\
      PLUTO_API_KEY=... python -m pluto_worker

>>> from pluto_worker import Worker, WorkerSettings
>>> Worker(WorkerSettings.from_env()).run()  # doctest: +SKIP
"""

from __future__ import annotations

from ._main import main
from ._settings import WorkerSettings
from ._worker import Worker

__all__ = ["Worker", "WorkerSettings", "main"]
