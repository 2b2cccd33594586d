"""The read side: the JSON the dashboard and ``pluto runs`` read (DESIGN.md §6), and the
dashboard's own page and static files.

Why it is shaped this way:

* Downsampling is M4 (each step bucket's first, last, minimum and maximum point), computed by
  SQLite with range scans of the points' primary key (``Store.points_m4``), so a spike is never
  sampled away and a 100,000-step series is summarised without moving it into Python.
* ``/series`` answers many series in one request (a chart of 64 ``rank<N>`` lines is one
  request) and reads them on a few threads, since SQLite releases the GIL while it scans.
* Every query parameter is checked here: anything that is not an integer within int64 is a 400
  naming the parameter, a run id beyond int64 is a 404, so no input reaches SQLite unbound.
* The page and its files go out with a Content-Security-Policy that allows only our own
  scripts and styles (no inline script, nothing remote), on top of the page's own rule of
  setting every server string with ``textContent``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pluto.protocol import INT64_MAX, INT64_MIN

from ._http import in_thread, int64_of, store_of
from ._schema import BLOCK_SHIFT
from ._settings import DEFAULT_PAGE_SIZE as PAGE_SIZE
from ._settings import MAX_PAGE_SIZE
from ._store import Store, Stored, loaded

STATIC = Path(__file__).parent / "static"
MAX_SERIES = 1024
"""Most series one ``/series`` request may name; the dashboard asks for fewer per request."""
READERS = 4
"""Threads one ``/series`` request reads on (SQLite scans outside the GIL; 2 cores here)."""
ALL_POINTS = 10**9
"""``max_points`` beyond this means "every point" (and keeps SQLite's LIMIT within int64)."""

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
                 ".png": "image/png", ".txt": "text/plain", ".svg": "image/svg+xml"}
_PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

Row = tuple[int, Stored, int]


# -- parameters ------------------------------------------------------------------------------

def _query_int(request: Request, name: str, low: int = INT64_MIN) -> int | None:
    """An optional integer query parameter; 400 unless it is a decimal int64 of at least
    ``low`` (ASCII digits only: ``int()`` alone would take "1_000" or "١")."""
    raw = request.query_params.get(name)
    if raw is None or raw.strip() == "":
        return None
    return int64_of(raw, f"query parameter {name}", low)


def _run_id(request: Request) -> int:
    """The path's run id; one beyond int64 cannot exist, so it is a 404 like any unknown id."""
    run = int(request.path_params["run_id"])
    if run > INT64_MAX:
        raise HTTPException(404, f"no run with id {run}")
    return run


async def _existing_run(request: Request) -> int:
    run = _run_id(request)
    if not await in_thread(store_of(request).run_exists, run):
        raise HTTPException(404, f"no run with id {run}")
    return run


def _bounds(request: Request) -> tuple[int, int, int | None]:
    """``(low, high, max_points)`` from ``since_step``, ``step_min``, ``step_max``,
    ``max_points``: steps ``low <= step <= high`` are wanted."""
    since, step_min = _query_int(request, "since_step"), _query_int(request, "step_min")
    step_max = _query_int(request, "step_max")
    max_points = _query_int(request, "max_points", 1)
    low = max(x for x in (since, step_min, INT64_MIN) if x is not None)
    high = INT64_MAX if step_max is None else step_max
    if max_points is not None and max_points > ALL_POINTS:
        max_points = None
    return low, high, max_points


# -- downsampling ----------------------------------------------------------------------------

def json_number(value: float) -> float | str:
    if type(value) is float and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _key(row: Any) -> float:
    """A row's value as a float for ordering: stored (None = NaN, TEXT = big int) or JSON form."""
    value = row[1]
    if value is None:
        return math.nan
    if type(value) is str:
        if value in _SPECIAL:
            return _SPECIAL[value]
        value = int(value)
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf if value > 0 else -math.inf


def downsample(rows: list[Any], max_points: int | None) -> list[Any]:
    """M4 of ``rows`` (``(step, value, time)`` by step): at most ``max_points`` rows, the first,
    last, minimum and maximum of each of ``max_points // 4`` step buckets (a NaN counts as a
    maximum, so it stays visible; of equal values the first counts). Below 4 points: the last,
    then the first, the maximum and the minimum. ``Store.points_m4`` computes the same in SQL
    (a test holds the two equal); this one states the rule."""
    if max_points is None or len(rows) <= max_points:
        return rows
    if max_points < 8:  # one bucket: its first, last, minimum and maximum
        return _few(rows, min(max_points, 4))
    width = grid(rows[0][0], rows[-1][0], max_points)
    picked: list[Any] = []
    for _, group in groupby(rows, key=lambda row: row[0] // width):
        bucket = list(group)
        numbers = [r for r in bucket if not math.isnan(_key(r))]
        high = max(bucket, key=_high)  # the first maximum, a NaN counting as +Infinity
        extremes = [min(numbers, key=_key)] if numbers else []
        picked += sorted({id(r): r for r in (bucket[0], bucket[-1], *extremes, high)}.values(),
                         key=lambda r: r[0])
    return picked


def _high(row: Any) -> float:
    value = _key(row)
    return math.inf if math.isnan(value) else value


def grid(first: int, last: int, max_points: int) -> int:
    """The bucket width for M4 of the steps ``[first, last]`` to at most ``max_points``
    (>= 8): buckets are the multiples of the width, at most ``max_points // 4`` of them
    overlap the range, and a width of 64 or more is a multiple of 64 so that every bucket is
    whole blocks (``Store.points_m4`` then reads block summaries, not points). A fixed grid
    also keeps a bucket's picks the same while a live run grows."""
    buckets, block = max_points // 4, 1 << BLOCK_SHIFT
    even = -(-(last - first + 1) // buckets)  # the width if the range began on the grid
    for width in (even, max(1, -(-(last - first) // (buckets - 1)))):  # the second always fits
        if width >= block:
            width = -(-width // block) * block
        if last // width - first // width < buckets:
            break
    return width


def _few(rows: list[Any], k: int) -> list[Any]:
    numbers = [r for r in rows if not math.isnan(_key(r))] or rows
    order = [rows[-1], rows[0], max(rows, key=_high), min(numbers, key=_key)]
    keep = list({id(r): r for r in order}.values())[:k]
    return sorted(keep, key=lambda r: r[0])


class _M4Cache:
    """Recent M4 results per store, keyed by the run's version (``updated_at``, raised by every
    write), so reopening or zooming out of a finished run does not scan it again. Bounded by
    the rows it holds; a write to the run makes its entries unreachable (LRU evicts them)."""

    MAX_ROWS = 500_000

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[Any, ...], list[list[Any]]] = OrderedDict()
        self.rows = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> list[list[Any]] | None:
        with self.lock:
            found = self.entries.get(key)
            if found is not None:
                self.entries.move_to_end(key)
            return found

    def put(self, key: tuple[Any, ...], rows: list[list[Any]]) -> None:
        with self.lock:
            if key in self.entries:
                return
            self.entries[key] = rows
            self.rows += len(rows)
            while self.rows > self.MAX_ROWS and self.entries:
                _, old = self.entries.popitem(last=False)
                self.rows -= len(old)


_caches: weakref.WeakKeyDictionary[Store, _M4Cache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def _m4(store: Store, run: int, nid: int, first: int, last: int, width: int,
        version: int | None) -> list[list[Any]]:
    with _caches_lock:
        cache = _caches.get(store) or _caches.setdefault(store, _M4Cache())
    # Only a run quiet for a second is cached: a later write then sets a newer updated_at
    # for sure (the column has millisecond resolution).
    settled = version is not None and version < time.time() * 1000 - 1000
    key = (run, nid, first, last, width, version)
    rows = cache.get(key) if settled else None
    if rows is None:
        rows = _json_rows(store.points_m4(run, nid, first, last, width))
        if settled:
            cache.put(key, rows)
    return rows


def _json_rows(rows: list[Row]) -> list[list[Any]]:
    return [[s, json_number(loaded(v)), t] for s, v, t in rows]


def read_series(store: Store, run: int, name: str, low: int, high: int,
                max_points: int | None, version: int | None = None) -> list[list[Any]]:
    """One series's points in ``[low, high]``, M4-downsampled to ``max_points``, as JSON rows."""
    ids = store.name_ids([name])
    if name not in ids or low > high:
        return []
    nid = ids[name]
    span = store.step_span(run, nid, low, high)
    if span is None:
        return []
    first, last = span
    if max_points is None or last - first < max_points \
            or not store.more_than(run, nid, first, last, max_points):
        return _json_rows(store.points_between(run, nid, first, last, ALL_POINTS))
    if max_points <= 2:  # the last point, then the first (``_few``): two seeks, not a scan
        ends = [last] if max_points == 1 else [first, last]
        return _json_rows([row for step in ends
                           for row in store.points_between(run, nid, step, step, 1)])
    if max_points < 8:  # at most two buckets, reduced to one's first, last, minimum, maximum
        return _few(_m4(store, run, nid, first, last, last - first + 1, version),
                    min(max_points, 4))
    return _m4(store, run, nid, first, last, grid(first, last, max_points), version)


def _read_many(store: Store, run: int, names: Sequence[str], low: int, high: int,
               max_points: int | None) -> list[tuple[str, list[list[Any]]]]:
    version = store.run_version(run)
    return [(n, read_series(store, run, n, low, high, max_points, version)) for n in names]


# -- routes ----------------------------------------------------------------------------------

async def list_runs(request: Request) -> Response:
    """``{"runs": [...]}`` newest first; each run also has ``lastStep`` (null without points)
    and ``members`` (how many processes attached). Paged (issue 18): ``?limit=`` (default 100,
    at most 1000) ``&offset=``; the answer adds ``total``, ``offset``, ``limit`` and ``next``
    (the offset of the following page, null on the last), so no answer grows without bound."""
    project = request.query_params.get("project") or None
    limit = _query_int(request, "limit", 1) or PAGE_SIZE
    offset = _query_int(request, "offset", 0) or 0
    if limit > MAX_PAGE_SIZE:
        raise HTTPException(400, f"query parameter limit must be at most {MAX_PAGE_SIZE}")
    store = store_of(request)
    listed = await in_thread(store.list_runs, project)
    runs = listed[offset:offset + limit]
    paging = {"total": len(listed), "offset": offset, "limit": limit,
              "next": offset + limit if offset + limit < len(listed) else None}
    ids = [r["id"] for r in runs if "error" not in r]  # an unreadable row stays {id, error}
    last = await in_thread(store.last_steps, ids)
    members = await in_thread(store.member_counts, ids)
    for r in runs:
        if "error" in r:
            continue
        r["lastStep"] = last.get(r["id"])
        r.setdefault("members", members.get(r["id"], 0))  # the store may count them already
    return JSONResponse({"runs": runs, **paging})


async def get_run(request: Request) -> Response:
    run = _run_id(request)
    store = store_of(request)
    found = await in_thread(store.get_run, run)
    if found is None:
        raise HTTPException(404, f"no run with id {run}")
    found["lastStep"] = (await in_thread(store.last_steps, [run])).get(run)
    found["tenant"] = await in_thread(store.tenant_of, found["project"])
    return JSONResponse(found)


async def metric_names(request: Request) -> Response:
    run = await _existing_run(request)
    return JSONResponse({"names": await in_thread(store_of(request).metric_names, run)})


async def _points(request: Request, name: str) -> Response:
    low, high, max_points = _bounds(request)
    run = await _existing_run(request)
    store = store_of(request)
    points = await in_thread(read_series, store, run, name, low, high, max_points,
                             await in_thread(store.run_version, run))
    return JSONResponse({"name": name, "points": points})


async def metric_points(request: Request) -> Response:
    """``/metrics/{name}``: the name in the path (``/`` allowed, ``.``/``..`` segments not)."""
    return await _points(request, request.path_params["name"])


async def metric_query(request: Request) -> Response:
    """``/metric?name=``: any name, including ones with ``.`` or ``..`` segments."""
    name = request.query_params.get("name")
    if not name:
        raise HTTPException(400, "query parameter name is required")
    return await _points(request, name)


async def series(request: Request) -> Response:
    """Many series in one request: ``name=``, ``names=a,b`` and/or ``prefix=`` (each repeatable),
    with the bounds of ``/metric``; ``{"series": [{"name", "points"}, ...]}`` in the order
    asked (names first, then the prefix's matches by name), unknown names with no points."""
    low, high, max_points = _bounds(request)
    params = request.query_params
    wanted = list(params.getlist("name"))
    for listed in params.getlist("names"):
        wanted += [n for n in listed.split(",") if n]
    run = await _existing_run(request)
    store = store_of(request)
    prefixes = tuple(p for p in params.getlist("prefix") if p)
    if prefixes:
        wanted += [n for n in await in_thread(store.metric_names, run) if n.startswith(prefixes)]
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise HTTPException(400, "name which series: name=, names= or prefix=")
    if len(wanted) > MAX_SERIES:
        raise HTTPException(400, f"{len(wanted)} series asked for; at most {MAX_SERIES} per "
                                 "request")
    shares = [wanted[i::READERS] for i in range(min(READERS, len(wanted)))]
    parts = await asyncio.gather(*(in_thread(_read_many, store, run, h, low, high, max_points)
                                   for h in shares))
    found = dict(p for part in parts for p in part)
    return JSONResponse({"series": [{"name": n, "points": found[n]} for n in wanted]})


async def dashboard(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=_PAGE_HEADERS)


async def static_file(request: Request) -> Response:
    """A file of ``backend/static``; only known types, never outside the folder."""
    rel = request.path_params["path"]
    try:
        path = (STATIC / rel).resolve()
        found = path.is_relative_to(STATIC.resolve()) and path.is_file()
    except (ValueError, OSError):  # a NUL byte, a name too long for the file system
        found = False
    kind = _STATIC_TYPES.get(path.suffix) if found else None
    if kind is None:
        raise HTTPException(404, f"no static file {rel[:80]!r}")
    return FileResponse(path, media_type=kind, headers=_PAGE_HEADERS)


def routes() -> list[Route]:
    return [
        Route("/", dashboard),
        Route("/static/{path:path}", static_file),
        Route("/api/runs", list_runs),
        Route("/api/runs/{run_id:int}", get_run),
        Route("/api/runs/{run_id:int}/metrics", metric_names),
        Route("/api/runs/{run_id:int}/metrics/{name:path}", metric_points),
        Route("/api/runs/{run_id:int}/metric", metric_query),
        Route("/api/runs/{run_id:int}/series", series),
    ]
