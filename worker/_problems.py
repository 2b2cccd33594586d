"""Reporting what went wrong without drowning the log: each kind of problem is logged once
per interval (with how often it happened meanwhile) and counted for good.

The worker's error boundaries (one run's batch, one control entry, one members value, a key
of the wrong type) report here and carry on; nothing reported here stops the worker.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("worker")


class Problems:
    """``report(kind, message)``: logged at once the first time, then at most every
    ``interval`` seconds per kind; :attr:`counts` holds every occurrence."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._next: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    MAX_KINDS = 10_000
    """Kinds remembered at most (they include run ids and member names): then forgotten."""

    def report(self, kind: str, message: str, level: int = logging.ERROR,
               exc: BaseException | None = None) -> None:
        if len(self._next) > self.MAX_KINDS:
            self._next.clear()
            self._quiet.clear()
        self.counts[kind] += 1
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._quiet[kind] += 1
            return
        self._next[kind] = now + self.interval
        again = self._quiet.pop(kind, 0)
        suffix = f" (and {again} more times since the last report)" if again else ""
        log.log(level, "%s%s", message, suffix, exc_info=exc)
