"""Settling what one iteration decided: dead letters, then XACK with the loss ledger.

Every metrics entry a worker acknowledges is counted once in the run's ledger hash
(``Keys.ledger``): ``stored:<rank>`` when the backend confirmed it, ``dead:<rank>`` when it was
dead-lettered. The count happens in the same Lua script as the XACK and only for ids XACK
really acknowledged (it returns 1), so an entry redelivered, claimed by a second worker or
re-read after a restart is never counted twice. The stream and the ledger share the run's hash
tag, so the script runs on one Cluster slot.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, pairwise
from operator import itemgetter, ne
from typing import Any

import redis

from pluto import protocol as K
from pluto.protocol import GROUP, INT_TEXT, Keys

from ._problems import Problems
from ._redis import RedisClient
from ._streams import is_weather

ACK_GROUP = 1000
"""Ids per XACK inside the ack script (Lua's ``unpack`` allows a few thousand values)."""

# KEYS[1] stream, KEYS[2] ledger. ARGV: group, g, then g groups (ledger field or "", k, k ids),
# then quadruples (step field, time field, step, time): the newest step stored per rank, raised
# to the max (idempotent, so it needs no XACK guard). One XACK per group (at most ACK_GROUP ids,
# within Lua's unpack limit): what it returns is exactly how many of them it acknowledged.
_ACK = """
local g = tonumber(ARGV[2])
local j = 3
for _ = 1, g do
  local f, k = ARGV[j], tonumber(ARGV[j + 1])
  local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, j + 2, j + 1 + k))
  if acked > 0 and f ~= '' then redis.call('HINCRBY', KEYS[2], f, acked) end
  j = j + 2 + k
end
while j + 3 <= #ARGV do
  local old = redis.call('HGET', KEYS[2], ARGV[j])
  if not old or tonumber(ARGV[j + 2]) > tonumber(old) then
    redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 2], ARGV[j + 1], ARGV[j + 3])
  end
  j = j + 4
end
return 1
"""


_HEAD = K.WIRE_HEAD
_RANK, _STEP, _TIME = _HEAD
_HEAD_AT, _AT_RANK, _AT_STEP, _AT_TIME = itemgetter(0, 2, 4), itemgetter(1), itemgetter(3), \
    itemgetter(5)
_SPANS = 64
"""Rank changes in a batch beyond which :meth:`Acks._stored_columns` groups by rank instead."""
_DIGITS = re.compile(rb"[0-9]+(?:\n[0-9]+)*")
"""Steps and times of the usual case: plain digits (the grammar's non-negative ints)."""


def head(flat: list[bytes] | None) -> tuple[str, int | None, int | None]:
    """``(rank text, step, time)`` of an entry: rank ``?`` when unreadable, None for the rest."""
    found: dict[bytes, bytes] = {}
    if flat:
        if flat[0:1] == [b"_rank"] and flat[2:3] == [b"_step"] and flat[4:5] == [b"_time"]:
            found = {b"_rank": flat[1], b"_step": flat[3], b"_time": flat[5]}
        else:
            it = iter(flat)
            found = {k: v for k, v in zip(it, it) if k in (b"_rank", b"_step", b"_time")}

    def num(name: str) -> int | None:
        raw = found.get(name.encode())
        return int(raw) if raw is not None and INT_TEXT.match(raw) else None

    rank = num(K.F_RANK)
    return ("?" if rank is None else str(rank)), num(K.F_STEP), num(K.F_TIME)


Fields = dict[str, list[bytes]]
"""Ids to XACK by the ledger field each is counted in (``""``: not counted)."""


@dataclass
class Acks:
    """What one iteration settled: ids to XACK per stream (by the ledger field each counts
    in), entries to dead-letter first, and the newest stored step per stream and rank."""

    ids: dict[str, Fields] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    dead: list[tuple[str, bytes, list[bytes], str]] = field(default_factory=list)
    newest: dict[str, dict[str, tuple[int, int]]] = field(
        default_factory=lambda: defaultdict(dict))

    def add(self, stream: str, entry_id: bytes) -> None:
        """Acknowledge without counting: a control entry, or one deleted while pending."""
        self.ids[stream][""].append(entry_id)

    def stored(self, stream: str, entry_id: bytes, flat: list[bytes]) -> None:
        self.stored_all(stream, [(entry_id, flat)])

    def stored_all(self, stream: str, entries: list[tuple[bytes, list[bytes] | None]]
                   ) -> None:
        """Acknowledge stored entries, each counted for its rank, and keep each rank's newest
        step. The worker's hottest loop (once per point batch): entries in the SDK's layout
        (``_rank, _step, _time`` first, as the backend's grammar already checked) take a
        short path; :func:`head` reads any other."""
        ids, newest = self.ids[stream], self.newest[stream]
        if self._stored_columns(ids, newest, entries):
            return
        ranks: dict[bytes, tuple[str, list[bytes]]] = {}  # rank as sent -> (text, its ids)
        step: int | None
        time_ms: int | None
        for entry_id, flat in entries:
            f = flat or []
            usual = len(f) >= 6 and f[0] == _RANK and f[2] == _STEP and f[4] == _TIME
            if usual and f[1] in ranks and f[3].isdigit() and f[5].isdigit():
                rank, counted = ranks[f[1]]  # (plain digits: the grammar's non-negative ints)
                step, time_ms = int(f[3]), int(f[5])
            else:
                rank, step, time_ms = head(f)
                counted = ids[f"{K.LEDGER_STORED}:{rank}"]
                if usual and rank != "?":
                    ranks[f[1]] = (rank, counted)
            counted.append(entry_id)
            if step is not None and time_ms is not None:
                best = newest.get(rank)
                if best is None or step > best[0]:
                    newest[rank] = (step, time_ms)

    @staticmethod
    def _stored_columns(ids: Fields, newest: dict[str, tuple[int, int]],
                        entries: list[tuple[bytes, list[bytes] | None]]) -> bool:
        """:meth:`stored_all` for a batch wholly in the SDK's layout with plain-digit steps and
        times (the usual case), column by column in C: a handful of passes per rank instead of
        a Python loop per entry (~2 µs an entry). False, having done nothing, for any other."""
        flats = [flat or () for _, flat in entries]
        try:
            if set(map(_HEAD_AT, flats)) != {_HEAD}:
                return False
        except IndexError:  # an entry of fewer than six fields
            return False
        steps_raw, times_raw = list(map(_AT_STEP, flats)), list(map(_AT_TIME, flats))
        if not (_DIGITS.fullmatch(b"\n".join(steps_raw))
                and _DIGITS.fullmatch(b"\n".join(times_raw))):
            return False
        steps = list(map(int, steps_raw))
        entry_ids = [entry_id for entry_id, _ in entries]
        ranks_raw = list(map(_AT_RANK, flats))
        n = len(flats)
        # Runs of one rank (a post holds a rank's entries together): cut where the rank changes.
        cuts = [0, *compress(range(1, n), map(ne, ranks_raw[1:], ranks_raw)), n]
        spans: list[tuple[bytes, list[bytes], list[int], Sequence[int]]]  # rank, ids, steps, at
        if len(cuts) <= _SPANS:
            spans = [(ranks_raw[a], entry_ids[a:b], steps[a:b], range(a, b))
                     for a, b in pairwise(cuts)]
        else:  # ranks interleaved: one pass per rank instead
            spans = []
            for raw in set(ranks_raw):
                mask = list(map(raw.__eq__, ranks_raw))
                spans.append((raw, list(compress(entry_ids, mask)), list(compress(steps, mask)),
                              list(compress(range(n), mask))))
        for raw, mine, their_steps, at in spans:
            rank = head([_RANK, raw])[0]
            ids[f"{K.LEDGER_STORED}:{rank}"] += mine
            top = max(their_steps)
            best = newest.get(rank)
            if best is None or top > best[0]:  # the time of the first of the newest steps
                newest[rank] = (top, int(times_raw[at[their_steps.index(top)]]))
        return True

    def bury(self, dead_stream: str, stream: str, entry_id: bytes, flat: list[bytes],
             reason: str, count: bool = True) -> None:
        """Dead-letter ``flat`` with ``reason`` into ``dead_stream``, then acknowledge it."""
        self.dead.append((dead_stream, entry_id, flat, reason))
        rank = head(flat)[0]
        self.ids[stream][f"{K.LEDGER_DEAD}:{rank}" if count else ""].append(entry_id)

    def count(self) -> int:
        return sum(len(ids) for fields in self.ids.values() for ids in fields.values())


class Acker:
    """Writes :class:`Acks` to Redis in one pipelined round trip."""

    def __init__(self, r: RedisClient, keys: Keys, retention: int, problems: Problems) -> None:
        self.r = r
        self.problems = problems
        self.keys = keys
        self.cap = max(retention, 1000)
        self._script = r.register_script(_ACK)

    def __call__(self, acks: Acks) -> None:
        if not acks.ids:
            return
        pipe = self.r.pipeline(transaction=False)
        scripted: list[tuple[list[str], list[Any]]] = []  # on a cluster: after the pipeline
        for dead_stream, entry_id, flat, reason in acks.dead:
            pipe.execute_command("XADD", dead_stream, "MAXLEN", "~", self.cap, "*",
                                 K.F_DEAD_ID, entry_id, K.F_DEAD_REASON, reason, *flat)
        for stream, by_field in acks.ids.items():
            run = self.keys.run_of_stream(stream)
            if run is None:
                pipe.xack(stream, GROUP, *(i for ids in by_field.values() for i in ids))
                continue
            args: list[Any] = [GROUP, 0]
            for ledger_field, ids in by_field.items():
                for i in range(0, len(ids), ACK_GROUP):
                    part = ids[i:i + ACK_GROUP]
                    args += [ledger_field, len(part), *part]
                    args[1] += 1
            for rank, (step, time_ms) in acks.newest.get(stream, {}).items():
                args += [f"{K.LEDGER_STEP}:{rank}", f"{K.LEDGER_TIME}:{rank}", step, time_ms]
            if isinstance(self.r, redis.RedisCluster):  # no scripts in a cluster pipeline
                scripted.append(([stream, self.keys.ledger(run)], args))
            else:
                self._script(keys=[stream, self.keys.ledger(run)], args=args, client=pipe)
        replies = list(pipe.execute(raise_on_error=False)) if len(pipe) else []
        for keys, args in scripted:  # dead letters went first, as in one pipeline
            try:
                replies.append(self._script(keys=keys, args=args))
            except redis.ResponseError as exc:
                replies.append(exc)
        for reply in replies:
            if isinstance(reply, Exception):
                if is_weather(reply):
                    raise reply
                # e.g. WRONGTYPE: someone SET a run's dead-letter key; the rest still settles
                self.problems.report("ack", f"acknowledging: {reply}")
