"""Which runs the loop may read right now, and what each of the others waits for.

Each run has at most one post in flight on the poster threads and one decoded post queued
behind it (so reading and decoding overlap posting, as one pipeline per run). The queued post
keeps growing with new reads up to ``queue_cap`` entries: while the backend stores one post the
worker goes on reading and decoding the next, instead of waiting with one batch in hand, and a
slower backend gets fewer, larger posts. A run whose
post failed transiently is *parked* until its back-off expires (doubling up to ``retry_max``,
with jitter); its entries stay pending in the group. A run coming back from parking, or every
run after a start or an error, is *recovering*: it is read from its pending entries (id ``0``)
one batch at a time until those are exhausted, then from new ones (``>``) again.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ._persist import Post

FIRST_DELAY = 0.5


@dataclass
class Parked:
    due: float
    delay: float
    reason: str


@dataclass
class Flow:
    retry_max: float = 5.0
    queue_cap: int = 20_000
    """Entries a run's queued post may grow to before its stream is no longer read."""
    flight: dict[int, Future[Post]] = field(default_factory=dict)
    queued: dict[int, Post] = field(default_factory=dict)
    parked: dict[int, Parked] = field(default_factory=dict)
    recovering: set[int] = field(default_factory=set)
    delays: dict[int, float] = field(default_factory=dict)
    """Back-off of runs that failed recently; forgotten once a post succeeds."""

    def free(self, run: int) -> bool:
        """Nothing of ``run`` is queued or parked: its stream may be read."""
        return run not in self.queued and run not in self.parked

    def growing(self, run: int) -> bool:
        """New entries of ``run`` may be read: it is not parked, and its queued post (if any)
        is below ``queue_cap``."""
        post = self.queued.get(run)
        return run not in self.parked and (post is None or post.entries() < self.queue_cap)

    def reads(self, runs: list[int]) -> tuple[list[int], list[int]]:
        """``(new, pending)``: runs to read new entries of (``>``), and recovering runs to
        read pending entries of (``0``: only with nothing of theirs queued or in flight, as
        a pending read starts from the oldest again)."""
        self.unpark()
        new = [r for r in runs if self.growing(r) and r not in self.recovering]
        old = [r for r in runs if self.free(r) and r in self.recovering
               and r not in self.flight]
        return new, old

    def unpark(self) -> None:
        now = time.monotonic()
        for run in [r for r, p in self.parked.items() if p.due <= now]:
            del self.parked[run]
            self.recovering.add(run)

    def park(self, run: int, reason: str) -> float:
        """Park ``run`` after a transient failure; returns the seconds until its retry."""
        delay = min(self.delays.get(run, FIRST_DELAY / 2) * 2, self.retry_max)
        self.delays[run] = delay
        pause = delay * random.uniform(0.75, 1.0)
        self.parked[run] = Parked(time.monotonic() + pause, delay, reason)
        self.queued.pop(run, None)  # its entries stay pending: re-read after the back-off
        return pause

    def succeeded(self, run: int) -> None:
        self.delays.pop(run, None)

    def recover_all(self, runs: list[int]) -> None:
        """After a start or an error mid-iteration: whatever was read may still be pending."""
        self.queued.clear()
        self.recovering.update(runs)

    def done(self) -> list[int]:
        return [run for run, f in self.flight.items() if f.done()]

    def forget(self, active: set[int]) -> None:
        """Drop the state of runs that left the active set (completed)."""
        for table in (self.parked, self.delays):
            for run in [r for r in table if r not in active]:
                del table[run]
        self.recovering &= active
