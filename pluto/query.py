"""Read runs back from scripts: the same functions and return shapes as ``pluto.query`` of the
official Pluto SDK (``pluto-ml``), so an analysis script runs unchanged with either SDK
against our backend (or the official server)::

    import pluto.query as pq

    runs = pq.list_runs("llm", filters={"config.lr": {"$lt": 1e-3}}, sort="-summary_metrics.loss")
    df = pq.get_metrics("llm", runs[0]["id"], metric_names=["train/loss"], limit=2000)

Settings: ``PLUTO_API_KEY`` (the backend's key), and the server from ``host=``, else
``PLUTO_URL_API``, else our ``PLUTO_API_URL`` (default ``http://127.0.0.1:8080``). Run ids are
numbers (``run.id``) or display ids such as ``"MMP-3"``. ``get_metrics`` returns a pandas
DataFrame (columns ``metric, step, value, time``) when pandas is importable, else a list of
dicts; values the backend spells ``"NaN"``/``"Infinity"`` come back as floats. Beyond the
official module: :func:`get_data` (histograms, tables) and ``rank=`` in :func:`get_logs`.

Client errors (4xx) raise :class:`QueryError` at once with the server's reason; connection
errors and 5xx are retried with back-off a few times first.
"""

from __future__ import annotations

import json
import mimetypes
import time
from pathlib import Path
from typing import Any

import httpx

from ._settings import QuerySettings
from .protocol import DEFAULT_API_URL

__all__ = [
    "Client",
    "QueryError",
    "compare_runs",
    "download_file",
    "get_data",
    "get_files",
    "get_logs",
    "get_metric_names",
    "get_metrics",
    "get_run",
    "get_statistics",
    "leaderboard",
    "list_projects",
    "list_runs",
    "upload_file",
]

DEFAULT_URL = DEFAULT_API_URL  # the server without host= or PLUTO_URL_API / PLUTO_API_URL
RETRIES = 4
_SPELLED = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class QueryError(Exception):
    """A query the server refused or could not answer; ``status_code`` when it answered."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


def _base_url(host: str | None, settings: QuerySettings) -> str:
    """The read API: ``host=`` (a bare name: the official server's port 3001), else the
    settings' (:class:`QuerySettings`: ``PLUTO_URL_API`` ...)."""
    if host:
        return host.rstrip("/") if "://" in host else f"http://{host}:3001"
    return settings.api_url


def _ingest_url(host: str | None, settings: QuerySettings) -> str:
    """Where files go: ``host=`` (a bare name: the official server's port 3003), else the
    settings' (``PLUTO_URL_INGEST`` ..., else the read API's)."""
    if host:
        return host.rstrip("/") if "://" in host else f"http://{host}:3003"
    return settings.ingest_url


def _frame(rows: list[dict[str, Any]]) -> Any:
    """A DataFrame of ``rows`` when pandas is there, else the rows themselves."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["metric", "step", "value",
                                                                 "time"])


_BOOL_OPS = ("$and", "$or", "$not")
_LEAF_OPS = {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$regex", "$exists"}
_FIELDS = {"state", "status", "heartbeat_at", "heartbeatAt", "created_at", "createdAt",
           "updated_at", "updatedAt", "name", "displayName", "display_name", "tags"}
_FIELD_PREFIXES = ("config.", "systemMetadata.", "summaryMetrics.", "summary_metrics.")


def check_filters(node: Any, depth: int = 0) -> None:
    """``ValueError`` for a filter the server would refuse (as the official client does):
    unknown operators or fields, ``$and``/``$or`` without a list, nesting beyond 50."""
    if depth > 50:
        raise ValueError("filters nested too deeply")
    if not isinstance(node, dict):
        raise ValueError(f"filters node must be a dict, got {type(node).__name__}")
    for key, value in node.items():
        if key in ("$and", "$or"):
            if not isinstance(value, list):
                raise ValueError(f"{key} expects a list")
            for child in value:
                check_filters(child, depth + 1)
        elif key == "$not":
            check_filters(value, depth + 1)
        elif key.startswith("$"):
            raise ValueError(f"unknown boolean operator: {key!r}")
        elif key not in _FIELDS and not any(key.startswith(p) and len(key) > len(p)
                                            for p in _FIELD_PREFIXES):
            raise ValueError(f"unknown filter field: {key!r}")
        elif isinstance(value, dict) and any(k.startswith("$") for k in value):
            for op in value:
                if op not in _LEAF_OPS:
                    raise ValueError(f"unknown leaf operator {op!r} on field {key!r}")


def _joined(values: list[Any]) -> str:
    return ",".join(str(v) for v in values)


class Client:
    """One connection to a backend's read API; also a context manager."""

    def __init__(self, api_token: str | None = None, host: str | None = None,
                 timeout: float = 30) -> None:
        settings = QuerySettings.from_env()  # per Client: variables set after import count
        token = api_token or settings.api_key
        if not token:
            raise QueryError("no API key: set PLUTO_API_KEY (the key of `pluto server`) or "
                             "pass api_token= to Client()")
        self._token = token
        self._url = _base_url(host, settings)
        self._url_ingest = _ingest_url(host, settings)
        self._http = httpx.Client(timeout=timeout, headers={
            "Authorization": f"Bearer {token}", "User-Agent": "pluto-stream-query"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = f"{self._url}{path}"
        for attempt in range(RETRIES + 1):
            try:
                resp = self._http.get(url, params=params)
            except (httpx.ConnectError, httpx.TimeoutException) as exc:
                if attempt == RETRIES:
                    raise QueryError(f"{url}: {type(exc).__name__}: {exc} (after {attempt} "
                                     "retries; is the backend running?)") from None
            else:
                if resp.status_code < 300:
                    return resp.json()
                if resp.status_code < 500 or attempt == RETRIES:
                    raise QueryError(f"{url} answered {resp.status_code}: {resp.text[:500]}",
                                     resp.status_code)
            time.sleep(min(0.5 * 2 ** (attempt + 1), 4.0))
        raise AssertionError("unreachable")

    def _run_id(self, project: str, run_id: int | str) -> int:
        if isinstance(run_id, int):
            return run_id
        if run_id.isdigit():
            return int(run_id)
        return int(self.get_run(project, run_id)["id"])

    # -- projects and runs ---------------------------------------------------------------------

    def list_projects(self) -> list[dict[str, Any]]:
        """``[{id, name, runCount, createdAt, updatedAt}]``."""
        return list(self._get("/api/runs/projects")["projects"])

    def list_runs(self, project: str, search: str | None = None, tags: list[str] | None = None,
                  limit: int = 50, sort: str | None = None, offset: int = 0,
                  filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Runs of ``project``: ``search`` in the name, all of ``tags``, a wandb-style
        ``filters`` query, ``sort`` as ``[+|-]field``, ``limit`` (at most 200) from
        ``offset``. Each run: ``{id, name, displayId, status, tags, config, createdAt,
        updatedAt, url}``."""
        params: dict[str, Any] = {"projectName": project, "limit": min(limit, 200)}
        if search is not None:
            params["search"] = search
        if tags is not None:
            params["tags"] = ",".join(tags)
        if filters is not None:
            check_filters(filters)
            params["filter"] = json.dumps(filters)
        if sort is not None:
            params["sort"] = sort
        if offset > 0:
            params["offset"] = min(offset, 100_000)
        return list(self._get("/api/runs/list", params)["runs"])

    def get_run(self, project: str, run_id: int | str) -> dict[str, Any]:
        """One run with ``systemMetadata`` and ``logNames``, by number or display id."""
        if isinstance(run_id, int) or run_id.isdigit():
            return dict(self._get(f"/api/runs/details/{int(run_id)}", {"projectName": project}))
        return dict(self._get(f"/api/runs/details/by-display-id/{run_id}",
                              {"projectName": project}))

    # -- metrics -------------------------------------------------------------------------------

    def get_metric_names(self, project: str, run_ids: list[int] | None = None,
                         search: str | None = None, limit: int = 500) -> list[str]:
        params: dict[str, Any] = {"projectName": project, "limit": min(limit, 500)}
        if run_ids is not None:
            params["runIds"] = _joined(run_ids)
        if search is not None:
            params["search"] = search
        return list(self._get("/api/runs/metric-names", params)["metricNames"])

    def get_metrics(self, project: str, run_id: int | str, metric_names: list[str] | None = None,
                    limit: int = 10000, step_min: int | None = None,
                    step_max: int | None = None) -> Any:
        """Points of ``metric_names`` (all when None) from ``step_min`` to ``step_max``
        (inclusive), at most ``limit`` per metric; the backend keeps every spike (M4)."""
        for name, bound in (("step_min", step_min), ("step_max", step_max)):
            if bound is not None and bound < 0:
                raise ValueError(f"{name} must be non-negative, got {bound}")
        if step_min is not None and step_max is not None and step_min > step_max:
            raise ValueError(f"step_min ({step_min}) cannot be greater than step_max "
                             f"({step_max})")
        params: dict[str, Any] = {"runId": self._run_id(project, run_id),
                                  "projectName": project, "limit": min(limit, 10000)}
        if step_min is not None:
            params["stepMin"] = step_min
        if step_max is not None:
            params["stepMax"] = step_max
        rows: list[dict[str, Any]] = []
        wanted: list[str | None] = list(metric_names) if metric_names else [None]
        for one in wanted:
            extra = {} if one is None else {"logName": one}
            rows += self._get("/api/runs/metrics", {**params, **extra})["metrics"]
        for row in rows:
            if "logName" in row and "metric" not in row:
                row["metric"] = row.pop("logName")
            value = row.get("value")
            if isinstance(value, str) and value in _SPELLED:
                row["value"] = _SPELLED[value]
        return _frame(rows)

    def get_statistics(self, project: str, run_id: int | str,
                       metric_names: list[str] | None = None) -> Any:
        """``{runId, statistics: [{logName, count, min, max, mean, stddev, ..., anomalies}]}``."""
        params: dict[str, Any] = {"runId": self._run_id(project, run_id),
                                  "projectName": project}
        if metric_names is not None and len(metric_names) == 1:
            params["logName"] = metric_names[0]
        return self._get("/api/runs/statistics", params)

    def compare_runs(self, project: str, run_ids: list[int | str],
                     metric_name: str) -> dict[str, Any]:
        """``{logName, runs: [per-run statistics], bestRun}`` for up to 100 runs."""
        resolved = [self._run_id(project, r) for r in dict.fromkeys(run_ids[:100])]
        return dict(self._get("/api/runs/compare", {"runIds": _joined(resolved),
                                                    "projectName": project,
                                                    "logName": metric_name}))

    def leaderboard(self, project: str, metric_name: str, aggregation: str = "LAST",
                    direction: str = "ASC", limit: int = 50,
                    offset: int = 0) -> list[dict[str, Any]]:
        """Runs ranked by ``aggregation`` (MIN, MAX, AVG, LAST, VARIANCE) of a metric."""
        return list(self._get("/api/runs/leaderboard", {
            "projectName": project, "logName": metric_name, "aggregation": aggregation,
            "direction": direction, "limit": min(limit, 100), "offset": offset}))

    # -- files ---------------------------------------------------------------------------------

    def get_files(self, project: str, run_id: int | str,
                  file_name: str | None = None) -> list[dict[str, Any]]:
        """``[{fileName, fileType, fileSize, logName, step, time, downloadUrl, ...}]``."""
        params: dict[str, Any] = {"runId": self._run_id(project, run_id),
                                  "projectName": project}
        if file_name is not None:
            params["logName"] = file_name
        return list(self._get("/api/runs/files", params)["files"])

    def download_file(self, project: str, run_id: int | str, file_name: str,
                      destination: str | Path = ".") -> Path:
        files = self.get_files(project, run_id, file_name=file_name)
        if not files:
            raise QueryError(f"no file {file_name!r} in run {run_id}")
        info = files[0]
        url = info.get("downloadUrl") or info.get("url")
        if not url:
            raise QueryError(f"no download URL for file {file_name!r}")
        dest = Path(destination)
        if dest.is_dir():
            dest = dest / Path(str(info.get("fileName") or file_name)).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with httpx.stream("GET", url, follow_redirects=True, timeout=120) as resp:
            if resp.status_code >= 300:
                raise QueryError(f"download of {file_name!r} answered {resp.status_code}",
                                 resp.status_code)
            with dest.open("wb") as out:
                for chunk in resp.iter_bytes():
                    out.write(chunk)
        return dest

    def upload_file(self, project: str, run_id: int | str, log_name: str, path: str | Path, *,
                    step: int | None = None, caption: str | None = None) -> None:
        """Attach a local file to an existing run (presign, then PUT the bytes)."""
        source = Path(path)
        if not source.is_file():
            raise QueryError(f"no such file: {source}")
        run = self.get_run(project, run_id)
        entry: dict[str, Any] = {
            "fileName": source.name, "fileSize": source.stat().st_size,
            "fileType": source.suffix.lstrip("."), "time": int(time.time() * 1000),
            "logName": log_name, "step": step, "sampleIndex": 0}
        if caption is not None:
            entry["caption"] = caption
        resp = self._http.post(f"{self._url_ingest}/files", json={"files": [entry]},
                               headers={"X-Run-Id": str(run["id"]),
                                        "X-Run-Name": str(run.get("name", "")),
                                        "X-Project-Name": project})
        if resp.status_code >= 300:
            raise QueryError(f"presign answered {resp.status_code}: {resp.text[:500]}",
                             resp.status_code)
        urls = {k: v for group in resp.json().values() if isinstance(group, list)
                for item in group if isinstance(item, dict) for k, v in item.items()}
        if source.name not in urls:
            raise QueryError(f"no upload URL returned for {source.name!r}")
        kind = mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        with source.open("rb") as f:
            put = httpx.put(urls[source.name], content=f, timeout=120, headers={
                "Content-Type": kind, "Content-Length": str(source.stat().st_size)})
        if put.status_code not in (200, 201):
            raise QueryError(f"upload of {source.name!r} answered {put.status_code}: "
                             f"{put.text[:200]}", put.status_code)

    # -- logs and structured data --------------------------------------------------------------

    def get_logs(self, project: str, run_id: int | str, log_type: str | None = None,
                 limit: int = 10000, offset: int = 0,
                 rank: int | None = None) -> list[dict[str, Any]]:
        """Console lines ``[{message, logType, time, lineNumber, step, rank}]``."""
        params: dict[str, Any] = {"runId": self._run_id(project, run_id),
                                  "projectName": project, "limit": min(limit, 10000),
                                  "offset": offset}
        if log_type is not None:
            params["logType"] = log_type
        if rank is not None:
            params["rank"] = rank
        return list(self._get("/api/runs/logs", params)["logs"])

    def get_data(self, project: str, run_id: int | str, log_name: str | None = None,
                 data_type: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Histograms, tables, ...: ``[{logName, dataType, step, time, data}]`` (ours)."""
        params: dict[str, Any] = {"runId": self._run_id(project, run_id),
                                  "projectName": project, "limit": limit}
        if log_name is not None:
            params["logName"] = log_name
        if data_type is not None:
            params["dataType"] = data_type
        return list(self._get("/api/runs/data", params)["data"])


_client: Client | None = None


def _default() -> Client:
    global _client
    if _client is None:
        _client = Client()
    return _client


def list_projects() -> list[dict[str, Any]]:
    return _default().list_projects()


def list_runs(project: str, search: str | None = None, tags: list[str] | None = None,
              limit: int = 50, sort: str | None = None, offset: int = 0,
              filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return _default().list_runs(project, search=search, tags=tags, limit=limit, sort=sort,
                                offset=offset, filters=filters)


def get_run(project: str, run_id: int | str) -> dict[str, Any]:
    return _default().get_run(project, run_id)


def get_metric_names(project: str, run_ids: list[int] | None = None, search: str | None = None,
                     limit: int = 500) -> list[str]:
    return _default().get_metric_names(project, run_ids=run_ids, search=search, limit=limit)


def get_metrics(project: str, run_id: int | str, metric_names: list[str] | None = None,
                limit: int = 10000, step_min: int | None = None,
                step_max: int | None = None) -> Any:
    return _default().get_metrics(project, run_id, metric_names=metric_names, limit=limit,
                                  step_min=step_min, step_max=step_max)


def get_statistics(project: str, run_id: int | str,
                   metric_names: list[str] | None = None) -> Any:
    return _default().get_statistics(project, run_id, metric_names=metric_names)


def compare_runs(project: str, run_ids: list[int | str], metric_name: str) -> dict[str, Any]:
    return _default().compare_runs(project, run_ids, metric_name)


def leaderboard(project: str, metric_name: str, aggregation: str = "LAST",
                direction: str = "ASC", limit: int = 50,
                offset: int = 0) -> list[dict[str, Any]]:
    return _default().leaderboard(project, metric_name, aggregation=aggregation,
                                  direction=direction, limit=limit, offset=offset)


def get_files(project: str, run_id: int | str,
              file_name: str | None = None) -> list[dict[str, Any]]:
    return _default().get_files(project, run_id, file_name=file_name)


def download_file(project: str, run_id: int | str, file_name: str,
                  destination: str | Path = ".") -> Path:
    return _default().download_file(project, run_id, file_name, destination)


def upload_file(project: str, run_id: int | str, log_name: str, path: str | Path, *,
                step: int | None = None, caption: str | None = None) -> None:
    return _default().upload_file(project, run_id, log_name, path, step=step, caption=caption)


def get_logs(project: str, run_id: int | str, log_type: str | None = None, limit: int = 10000,
             offset: int = 0, rank: int | None = None) -> list[dict[str, Any]]:
    return _default().get_logs(project, run_id, log_type=log_type, limit=limit, offset=offset,
                               rank=rank)


def get_data(project: str, run_id: int | str, log_name: str | None = None,
             data_type: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    return _default().get_data(project, run_id, log_name=log_name, data_type=data_type,
                               limit=limit)
