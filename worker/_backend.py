"""The backend's HTTP API as the worker uses it (DESIGN.md §6), over one pooled httpx client.

    BackendError
     ├── Rejected      the backend refused the request for good (4xx): do not retry
     ├── Unavailable   still failing after a few quick attempts: try again later
     └── Interrupted   the worker is shutting down while a request was still being retried

Connection errors, timeouts, 5xx and the "try again" 4xx (401/403: a key being rotated or
misconfigured, 408, 429) are retried here a few times with a short back-off (``attempts``);
then the call raises :class:`Unavailable` and the caller parks what it was doing (a run's
entries stay pending, a control entry stays unacknowledged) and retries it later with
exponential back-off — so one run the backend cannot serve never holds up the others. A
caller sees an answer, :class:`Rejected`, :class:`Unavailable` or :class:`Interrupted`; only
an answer lets the worker acknowledge an entry.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack

from pluto.protocol import COLUMNS_TYPE, REFUSED_HEADER, json_value

from ._entries import Columns, record
from ._settings import WorkerSettings
from ._streams import Entry

log = logging.getLogger("worker.backend")

RETRY_STATUS = frozenset({401, 403, 408, 425, 429})
MSGPACK = "application/msgpack"
COLUMNS = COLUMNS_TYPE
"""Ours only: a batch as one msgpack map of columns (``backend._ingest.columns``); sent once an
ingest answer's ``X-Pluto-Ingest`` header lists it, so other servers never see it."""


class BackendError(Exception):
    """Base of the errors the backend client raises."""


class Rejected(BackendError):
    """The backend answered with a 4xx that retrying will not change."""

    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: backend answered {status}: {body[:300]}")
        self.status = status
        self.body = body


class Unavailable(BackendError):
    """The request failed transiently (connection, timeout, 5xx, 429...) on every attempt."""

    def __init__(self, what: str, reason: str, attempts: int) -> None:
        super().__init__(f"{what} failed ({reason}) after {attempts} attempts")
        self.reason = reason


class Interrupted(BackendError):
    """Retrying was abandoned because the worker is stopping; nothing was confirmed."""


@dataclass
class IngestResult:
    stored: int
    bad: dict[int, str] = field(default_factory=dict)
    """Index in the posted batch -> the backend's reason, for lines it refused (HTTP 422)."""


class Backend:
    """``create_run``, ``ingest``, ``update_status``, ``update_config``, ``upsert_members``."""

    def __init__(self, settings: WorkerSettings, stop: threading.Event | None = None,
                 on_wait: Callable[[], None] | None = None,
                 transport: httpx.BaseTransport | None = None, attempts: int = 3) -> None:
        self._stop = stop or threading.Event()
        self.attempts = attempts
        self._on_wait = on_wait
        self._retry_max = settings.retry_max
        self._msgpack = True  # until the backend answers 415 to a msgpack body
        self._columns = False  # until an ingest answer offers COLUMNS
        self.tenant = settings.tenant
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._http = httpx.Client(
            base_url=settings.api_url, headers=headers,
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            transport=transport,
            verify=ssl.create_default_context(cafile=settings.api_ca) if settings.api_ca else True,
        )

    def close(self) -> None:
        self._http.close()

    # -- the calls -------------------------------------------------------------------------

    def create_run(self, project: str, external_id: str, name: str, config: Any,
                   tags: Sequence[str]) -> tuple[int, bool]:
        body = {"runName": name or external_id, "projectName": project, "externalId": external_id,
                "config": None if config is None else json.dumps(config), "tags": list(tags)}
        if self.tenant:  # ours refuses a project of another tenant (403); others ignore it
            body["tenant"] = self.tenant
        answer = self._json("POST", "/api/runs/create", f"create run {project}/{external_id}",
                            json=body)
        return int(answer["runId"]), bool(answer.get("resumed", False))

    def update_status(self, run: int, status: str) -> None:
        self._json("POST", "/api/runs/status/update", f"status of run {run}",
                   json={"runId": run, "status": status})

    def update_config(self, run: int, config: Any) -> None:
        self._json("POST", "/api/runs/config/update", f"config of run {run}",
                   json={"runId": run, "config": json.dumps(config)})

    def upsert_members(self, run: int, members: list[dict[str, Any]]) -> None:
        self._json("POST", f"/api/runs/{run}/members", f"members of run {run}", json=members)

    def upsert_ledger(self, run: int, rows: list[dict[str, Any]]) -> bool:
        """POST the run's per-rank ledger; False when this backend has no such route (the
        official server: 404 Not Found / 405), so the caller stops sending it."""
        what = f"ledger of run {run}"
        resp = self._request("POST", f"/api/runs/{run}/ledger", what, json=rows)
        if resp.status_code == 405 or (resp.status_code == 404
                                       and "no run" not in resp.text.lower()):
            return False
        if resp.status_code >= 400:
            raise Rejected(what, resp.status_code, resp.text)
        return True

    def project_of(self, run: int) -> str | None:
        """The run's project (for ``X-Project-Name``); None if the backend has no such run;
        :class:`Rejected` (403) if it belongs to another tenant than this worker serves (our
        backend says whose it is; a backend that records no tenant cannot be checked)."""
        try:
            answer = self._json("GET", f"/api/runs/{run}", f"read run {run}")
        except Rejected:
            return None
        if "tenant" in answer and (answer["tenant"] or "") != self.tenant:
            raise Rejected(f"run {run}", 403, f"its project belongs to another tenant than "
                           f"{self.tenant or 'the default one'!r}; refused")
        return str(answer.get("project") or "") or None

    @property
    def takes_columns(self) -> bool:
        """Whether the backend offered ``COLUMNS`` in its last ingest answer."""
        return self._columns

    def ingest_columns(self, run: int, project: str | None, columns: Columns,
                       entries: list[Entry]) -> IngestResult:
        """POST a batch decoded into columns; as records (``entries`` decoded again) when it
        holds an int beyond 64 bits or the backend stopped taking columns."""
        if not columns.big:
            headers = {"X-Run-Id": str(run), "X-Project-Name": project or "",
                       "Content-Type": COLUMNS}
            what = f"ingest {len(entries)} entries into run {run}"
            resp = self._request("POST", "/ingest/metrics", what, content=columns.pack(),
                                 headers=headers)
            if resp.status_code != 415:
                return self._answer(resp, what, len(entries))
            log.info("backend no longer takes columns (415); sending records")
            self._columns = False
        return self.ingest(run, project, [record(e, f or []) for e, f in entries])

    def ingest(self, run: int, project: str | None, records: list[dict[str, Any]]) -> IngestResult:
        """POST one run's batch; 200 and 422 are answers, any other 4xx raises :class:`Rejected`."""
        headers = {"X-Run-Id": str(run), "X-Project-Name": project or ""}
        what = f"ingest {len(records)} entries into run {run}"
        resp = self._post_records(what, headers, records)
        if resp.status_code == 415 and self._msgpack:
            log.info("backend does not take msgpack (415); sending NDJSON from now on")
            self._msgpack = False
            resp = self._post_records(what, headers, records)
        return self._answer(resp, what, len(records))

    def _answer(self, resp: httpx.Response, what: str, sent: int) -> IngestResult:
        if resp.status_code in (200, 422):
            self._columns = COLUMNS in resp.headers.get("x-pluto-ingest", "")
        if resp.status_code == 200:
            return IngestResult(sent)
        if resp.status_code == 422:
            try:
                bad = {int(b["index"]): str(b.get("error", "rejected"))
                       for b in _maybe_json(resp).get("bad_lines", [])}
            except (AttributeError, KeyError, TypeError, ValueError):
                bad = {}  # an answer we cannot read: the whole batch counts as refused
            if bad and all(0 <= i < sent for i in bad):
                return IngestResult(sent - len(bad), bad)
        raise Rejected(what, resp.status_code, resp.text)

    # -- plumbing --------------------------------------------------------------------------

    def _post_records(self, what: str, headers: dict[str, str],
                      records: list[dict[str, Any]]) -> httpx.Response:
        body: bytes | None = None
        if self._msgpack:
            try:
                body = msgpack.packb(records, use_bin_type=True)
                headers = {**headers, "Content-Type": MSGPACK}
            except OverflowError:  # an int beyond 64 bits (a user may log 2**70): JSON takes it
                body = None
        if body is None:
            body = "\n".join(json.dumps(_json_record(r)) for r in records).encode()
            headers = {**headers, "Content-Type": "application/x-ndjson"}
        return self._request("POST", "/ingest/metrics", what, content=body, headers=headers)

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, what, **kwargs)
        if resp.status_code >= 400:
            raise Rejected(what, resp.status_code, resp.text)
        return _maybe_json(resp)

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """Send until the answer is final (2xx or a definite 4xx), at most ``attempts`` times
        with a short back-off between; :class:`Unavailable` if none got a final answer."""
        delay, attempt = 0.1, 0
        while True:
            if self._stop.is_set() and attempt:
                raise Interrupted(f"{what}: worker stopping")
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 500 and (resp.status_code not in RETRY_STATUS
                                               or resp.headers.get(REFUSED_HEADER) == "tenant"):
                    return resp
                reason = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code in (401, 403):
                    log.error("%s: the backend refused the API key (%s); check PLUTO_API_KEY",
                              what, resp.status_code)
            attempt += 1
            if attempt >= self.attempts:
                raise Unavailable(what, reason, attempt)
            pause = delay * random.uniform(0.5, 1.0)
            log.debug("%s failed (%s); attempt %d in %.2f s", what, reason, attempt + 1, pause)
            if self._on_wait is not None:
                self._on_wait()
            if self._stop.wait(pause):
                raise Interrupted(f"{what}: worker stopping after {attempt} attempts ({reason})")
            delay = min(delay * 2, self._retry_max)


def _maybe_json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {}


def _json_record(record: dict[str, Any]) -> dict[str, Any]:
    data = {k: json_value(v) for k, v in record["data"].items()}
    return {**record, "data": data}
