"""Stored rows as the read API answers them, and the loss ledger's arithmetic.

Kept apart from ``_store`` (which runs the SQL) because this is where "what was stored can be
returned" is decided: every JSON column passes ``_json`` on the way out, and a row that fails
(written by an older version) raises :class:`BrokenRow`, which ``list_runs`` turns into an error
item and ``GET /api/runs/{id}`` into a 409 — never an exception that fails the whole list.
"""

from __future__ import annotations

import json
from typing import Any

from pluto.protocol import DROPS_CONSOLE

from . import _json

FINAL = frozenset(("COMPLETED", "FAILED", "TERMINATED"))
"""Statuses after which nothing more arrives, so what is not stored is missing."""

MEMBER_FIELDS = ("rank", "local_rank", "node", "attempt", "host", "pid", "state", "logged",
                 "sent", "dropped", "drops")
"""What a member row holds besides its name; a field given as None keeps the stored value."""

RANK_FIELDS = ("rank", "stored", "dead", "last_step", "last_time")


class BrokenRow(ValueError):
    """A stored row that cannot be returned as JSON (written before the checks at the door)."""


class ForeignProject(PermissionError):
    """A create named a project that belongs to another tenant (issue 18): refused for good."""

    def __init__(self, project: str) -> None:
        super().__init__(f"project {project[:200]!r} belongs to another tenant; pick another "
                         "project name")


def merged_config(run: int, old: str, new: dict[str, Any] | None) -> str:
    """Top-level dict merge of ``new`` into the JSON object ``old``; None changes nothing.

    ``new`` was cleaned at the door. An ``old`` that cannot be returned (written by an older
    version) is healed when the merge replaces what was wrong in it, else :class:`BrokenRow`:
    no merge ever writes an unreadable row.
    """
    try:
        merged = _json.loads(old, "config", _json.READ_DEPTH)
    except _json.Problem as exc:
        try:
            merged = json.loads(old)
        except (ValueError, RecursionError):
            raise BrokenRow(f"run {run}: stored config cannot be read ({exc})") from None
        if not isinstance(merged, dict) or not new:
            raise BrokenRow(f"run {run}: stored config cannot be read ({exc})") from None
    if not isinstance(merged, dict):
        raise BrokenRow(f"run {run}: stored config is not a JSON object")
    if new:
        merged.update(new)
    try:
        _json.clean(merged, "config", _json.READ_DEPTH)
    except _json.Problem as exc:
        raise BrokenRow(f"run {run}: stored config cannot be read ({exc}); a config "
                        "update replacing that key repairs it") from None
    return _json.dumps(merged)


def run_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, project, external_id, name, status, config, tags, created, updated = row
    try:
        return {"id": rid, "externalId": external_id, "project": project, "name": name,
                "status": status, "config": _json.loads(config, "config", _json.READ_DEPTH),
                "tags": _json.loads(tags, "tags", _json.READ_DEPTH),
                "createdAt": created, "updatedAt": updated}
    except _json.Problem as exc:
        raise BrokenRow(f"run {rid}: stored row cannot be read: {exc}") from None


def members(run: int, rows: list[tuple[Any, ...]], ranks: list[tuple[Any, ...]]
             ) -> list[dict[str, Any]]:
    """Member dicts; ``stored``/``dead`` are their rank's, when the member is its rank's only
    member (two processes claiming one rank cannot be told apart in the worker's counts)."""
    per_rank = {r[0]: r for r in ranks if r[0] is not None}
    claims: dict[Any, int] = {}
    for m in rows:
        claims[m[1]] = claims.get(m[1], 0) + 1
    out = []
    for m in rows:
        member = dict(zip(("member", *MEMBER_FIELDS), m))
        if member["drops"] is not None:
            try:
                member["drops"] = _json.loads(member["drops"], "drops")
            except _json.Problem as exc:
                raise BrokenRow(f"run {run}: member {member['member']!a}: {exc}") from None
        mine = per_rank.get(member["rank"]) if claims[member["rank"]] == 1 else None
        member["stored"], member["dead"] = (mine[1], mine[2]) if mine else (None, None)
        out.append(member)
    return out


def lost(status: str, sent: int, dropped: int, stored: int, dead: int) -> tuple[int, int]:
    """``(missing, lost)``: entries Redis took that neither arrived nor were dead-lettered,
    counted once the run is final (before that they may be in flight); lost adds the drops."""
    missing = max(0, sent - stored - dead) if status in FINAL else 0
    return missing, dropped + dead + missing


def console_dropped(drops: Any) -> int:
    """Console lines a member lost on its rank (``drops["console"]``, ``DROPS_CONSOLE``), from
    its ``drops`` as a dict or as the stored JSON text; 0 when it has none or they cannot be
    read (``get_run`` reports an unreadable row itself)."""
    if isinstance(drops, str):
        try:
            drops = _json.loads(drops, "drops")
        except _json.Problem:
            return 0
    value = drops.get(DROPS_CONSOLE) if isinstance(drops, dict) else None
    return value if type(value) is int and value > 0 else 0


def ledger(status: str, members: list[dict[str, Any]], ranks: list[dict[str, Any]]
            ) -> dict[str, int]:
    """The run's loss ledger (ledger.md §3); a member without counts (an older SDK) adds 0.
    ``console_dropped`` counts console lines, not entries, so ``lost`` leaves it out."""
    total = {k: sum(m[k] or 0 for m in members) for k in ("logged", "sent", "dropped")}
    total |= {k: sum(r[k] or 0 for r in ranks) for k in ("stored", "dead")}
    total["missing"], total["lost"] = lost(status, total["sent"], total["dropped"],
                                            total["stored"], total["dead"])
    total["console_dropped"] = sum(console_dropped(m.get("drops")) for m in members)
    return total


def listed(rows: list[tuple[Any, ...]], members: list[tuple[Any, ...]],
           ranks: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """``list_runs`` items from run rows, ``(run, sent, dropped[, drops])`` member rows and
    ``(run, stored, dead)`` rank rows: each with ``members`` (count), ``lost`` and
    ``console_dropped`` (0 from a store whose member rows leave out ``drops``)."""
    counts: dict[int, list[int]] = {}  # run -> [members, sent, dropped, stored, dead, console]
    for run, sent, dropped, *drops in members:
        c = counts.setdefault(run, [0, 0, 0, 0, 0, 0])
        c[0] += 1
        c[1] += sent or 0
        c[2] += dropped or 0
        c[5] += console_dropped(drops[0]) if drops else 0
    for run, stored, dead in ranks:
        c = counts.setdefault(run, [0, 0, 0, 0, 0, 0])
        c[3] += stored or 0
        c[4] += dead or 0
    out: list[dict[str, Any]] = []
    for row in rows:
        try:
            item = run_dict(row)
        except BrokenRow as exc:
            out.append({"id": row[0], "error": str(exc)})
            continue
        n, sent, dropped, stored, dead, console = counts.get(row[0], (0, 0, 0, 0, 0, 0))
        item["members"] = n
        item["lost"] = lost(item["status"], sent, dropped, stored, dead)[1]
        item["console_dropped"] = console
        out.append(item)
    return out


def run_with_ledger(run: int, row: tuple[Any, ...], member_rows: list[tuple[Any, ...]],
                    ranks: list[tuple[Any, ...]]) -> dict[str, Any]:
    """``GET /api/runs/{id}``'s answer from the rows both stores read the same way."""
    out = run_dict(row)
    out["members"] = members(run, member_rows, ranks)
    out["ranks"] = [dict(zip(RANK_FIELDS, r)) for r in ranks]
    out["ledger"] = ledger(out["status"], out["members"], out["ranks"])
    return out
