"""Control entries applied off the loop, each inside its own error boundary.

The loop hands every control entry it reads to :meth:`Dispatcher.apply`; entries run on a
couple of helper threads, so a backend call that hangs until its timeout holds up only the
entries of its own run, never the loop or other runs. Entries with one order key (a run id,
or a create's project and run id) run one after another in stream order: an attach is applied
before its finish. An entry that cannot be decoded, or that the backend refuses for good, is
dead-lettered to ``Keys.control_dead`` with its reason and acknowledged (so no worker trips
over it again); one whose call fails transiently stays pending and is retried with back-off,
the entries behind it waiting.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pluto.protocol import Keys, decode_control

from ._acks import Acks
from ._control import DEAD, DONE, Control, order_key
from ._entries import fields_dict
from ._problems import Problems
from ._streams import Entry

Outcome = tuple[str, str, BaseException | None]
Key = tuple[Any, ...]


class Dispatcher:
    def __init__(self, control: Control, keys: Keys, problems: Problems,
                 retry_max: float = 5.0, threads: int = 2) -> None:
        self.control = control
        self.keys = keys
        self.problems = problems
        self.retry_max = retry_max
        self.queues: dict[Key, list[tuple[Entry, dict[str, Any]]]] = {}
        """Per key, the entries not yet settled, in stream order; the head runs or waits."""
        self.running: dict[Key, Future[Outcome]] = {}
        self.due: dict[Key, float] = {}  # key -> when its failed head is tried again
        self._delays: dict[Key, float] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="control")

    @property
    def held(self) -> set[bytes]:
        """Ids of the entries in hand (pending, so a re-read or a claim returns them again)."""
        return {entry[0] for queue in self.queues.values() for entry, _ in queue}

    def futures(self) -> list[Future[Outcome]]:
        return list(self.running.values())

    def apply(self, entries: list[Entry], acks: Acks) -> None:
        """Settle finished entries, retry the due ones, start ``entries`` (those not in hand)."""
        self._collect(acks)
        now = time.monotonic()
        for key in [k for k, when in self.due.items() if when <= now]:
            del self.due[key]
            self._start(key)
        held = self.held
        for entry in entries:
            if entry[0] not in held:
                self._enqueue(entry, acks)

    def _enqueue(self, entry: Entry, acks: Acks) -> None:
        entry_id, flat = entry
        if flat is None:  # deleted while pending
            acks.add(self.keys.control, entry_id)
            return
        try:
            msg = decode_control(fields_dict(flat))
        except ValueError as exc:
            return self._bury(entry, str(exc), acks)
        key = order_key(msg)
        if key in self.queues:  # an earlier entry of this key is running or waiting
            self.queues[key].append((entry, msg))
            return
        self.queues[key] = [(entry, msg)]
        self._start(key)

    def _start(self, key: Key) -> None:
        self.running[key] = self._pool.submit(self.control.call, self.queues[key][0][1])

    def _collect(self, acks: Acks) -> None:
        for key in [k for k, f in self.running.items() if f.done()]:
            outcome, reason, exc = self.running.pop(key).result()
            entry = self.queues[key][0][0]
            if outcome in (DONE, DEAD):
                if outcome == DONE:
                    acks.add(self.keys.control, entry[0])
                else:
                    self._bury(entry, reason, acks, exc)
                self._delays.pop(key, None)
                self.queues[key].pop(0)
                if self.queues[key]:
                    self._start(key)
                else:
                    del self.queues[key]
            else:
                self._defer(key, reason)

    def _defer(self, key: Key, reason: str) -> None:
        delay = min(self._delays.get(key, 0.25) * 2, self.retry_max)
        self._delays[key] = delay
        pause = delay * random.uniform(0.75, 1.0)
        self.due[key] = time.monotonic() + pause
        self.problems.report(f"control-retry:{key}", f"control {key[0]} {key[1:]}: {reason}; "
                             f"left pending, retry in {pause:.1f} s", logging.WARNING)

    def _bury(self, entry: Entry, reason: str, acks: Acks,
              exc: BaseException | None = None) -> None:
        entry_id, flat = entry
        fields = fields_dict(flat or [])
        about = fields.get(b"id") or b"/".join(
            fields.get(k, b"?") for k in (b"project", b"run_id"))
        self.problems.report(f"control:{about[:100]!r}", f"control entry {entry_id.decode()} "
                             f"(run {about[:100].decode(errors='replace')}) dead-lettered to "
                             f"{self.keys.control_dead}: {reason[:500]}", exc=exc)
        self.problems.counts["control"] += 1
        acks.bury(self.keys.control_dead, self.keys.control, entry_id, flat or [],
                  reason[:2000], count=False)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
