"""What the worker tests share: writing control messages and stream entries the way the SDK
does (with redis-py, through ``pluto.protocol``), and reading results back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
import redis

from pluto import protocol as K
from pluto import protocol as P
from pluto.protocol import Keys
from tests.helpers import wait_until


def entry(step: int, values: Mapping[str, int | float], rank: int = 0,
          time_ms: int | None = None) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {
        K.F_RANK: str(rank), K.F_STEP: str(step),
        K.F_TIME: str(time_ms if time_ms is not None else 1764000000000 + step)}
    fields.update({name: P.format_value(v) for name, v in values.items()})
    return fields


def produce(r: redis.Redis, keys: Keys, run: int, entries: Iterable[Mapping[str, Any]],
            chunk: int = 5000) -> int:
    """XADD ``entries`` to the run's metrics stream, pipelined like the SDK's producer."""
    pipe, n = r.pipeline(transaction=False), 0
    for fields in entries:
        pipe.xadd(keys.metrics(run), dict(fields))
        n += 1
        if n % chunk == 0:
            pipe.execute()
    pipe.execute()
    return n


def request_create(r: redis.Redis, keys: Keys, project: str, run_id: str, name: str = "run",
                   config: dict[str, Any] | None = None, tags: list[str] | None = None) -> str:
    token = uuid.uuid4().hex
    r.set(keys.run(project, run_id), K.PENDING_PREFIX + token, nx=True)
    r.xadd(keys.control, P.control_create(project, run_id, name, config, tags, token))
    return token


def run_id_of(r: redis.Redis, keys: Keys, project: str, run_id: str) -> int | None:
    raw = r.get(keys.run(project, run_id))
    return int(raw) if raw and raw.isdigit() else None


def create(r: redis.Redis, keys: Keys, project: str, run_id: str, timeout: float = 20,
           **kw: Any) -> int:
    """Ask for a run like ``pluto.init`` does and wait for the worker to answer with its id."""
    request_create(r, keys, project, run_id, **kw)
    return int(wait_until(lambda: run_id_of(r, keys, project, run_id), timeout,
                          f"run id of {project}/{run_id}"))


def attach(r: redis.Redis, keys: Keys, run: int, member: str, rank: int = 0) -> None:
    host, _, pid = member.rpartition(":")
    info = {"rank": rank, "local_rank": rank, "host": host, "pid": int(pid),
            "attached_at": int(time.time() * 1000), "state": "running"}
    r.hset(keys.members(run), member, P.pack(info))
    beat(r, keys, run, member)
    r.xadd(keys.control, P.control_attach(run, member, info))


def beat(r: redis.Redis, keys: Keys, run: int, member: str, age_s: float = 0.0) -> None:
    r.hset(keys.heartbeats(run), member, int((time.time() - age_s) * 1000))


def finish(r: redis.Redis, keys: Keys, run: int, member: str, state: str = "finished") -> None:
    info = P.unpack(r.hget(keys.members(run), member))
    r.hset(keys.members(run), member, P.pack({**info, "state": state}))
    r.xadd(keys.control, P.control_finish(run, member, state))


def pending(r: redis.Redis, stream: str) -> int:
    try:
        return int(r.xpending(stream, K.GROUP)["pending"])
    except redis.ResponseError:
        return 0


@pytest.fixture
def project(prefix: str) -> str:
    """A project of this test's own on the shared backend."""
    return f"proj-{prefix}"


def in_process_worker(redis_url: str, prefix: str, backend: Any, name: str = "w-inproc",
                      **settings: Any) -> Any:
    """A :class:`worker.Worker` in this process (the fast tier): the test drives its real loop
    with ``run_once`` against the real Redis and backend."""
    from pluto_worker import Worker, WorkerSettings

    s = WorkerSettings.from_env({}, redis_url=redis_url, prefix=prefix, api_url=backend.url,
                                api_key=backend.key, name=name, block_ms=10,
                                check_interval=0.05, **settings)
    return Worker(s)


def spin(worker: Any, until: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    """Run ``worker.run_once`` until ``until()`` is truthy (or fail naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.run_once(block_ms=10)
        got = until()
        if got:
            return got
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class FaultProxy:
    """A real HTTP server in front of the backend that answers 500 to the requests matching
    one of :attr:`fail` (regexes over ``"METHOD /path run=<X-Run-Id>"``; a ``(regex, status)``
    pair answers that status instead) and forwards everything else: a backend that cannot
    read one run, whatever the backend's own fixes make of its data."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import re
        import threading

        import httpx

        self.fail: list[str | tuple[str, int]] = []
        self.hits: list[str] = []
        self.seen: list[tuple[str, bytes]] = []  # every request: (what, body)
        self.hang: list[tuple[str, float]] = []  # (regex, seconds): sleep, then forward
        self.done: list[tuple[str, float]] = []  # (what, monotonic time it was answered)
        proxy = self
        client = httpx.Client(base_url=upstream, timeout=30)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                what = f"{self.command} {self.path} run={self.headers.get('x-run-id', '')}"
                proxy.seen.append((what, body))
                for pattern, seconds in proxy.hang:
                    if re.search(pattern, what):
                        proxy.hits.append(what)
                        time.sleep(seconds)
                for rule in proxy.fail:
                    pattern, status = rule if isinstance(rule, tuple) else (rule, 500)
                    if re.search(pattern, what):
                        proxy.hits.append(what)
                        body = b'{"error": "%s"}' % (b"Not Found" if status == 404 else
                                                      b"injected by the test proxy")
                        self.send_response(status)
                        self.send_header("content-type", "application/json")
                        self.send_header("content-length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                resp = client.request(self.command, self.path, content=body, headers=headers)
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() in ("content-type", "x-pluto-ingest"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)
                proxy.done.append((what, time.monotonic()))

            do_GET = do_POST = _serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._client = client
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._client.close()


def dead_letters(r: redis.Redis, stream: str) -> list[tuple[bytes, list[bytes]]]:
    """XRANGE as Redis sent it: a control dead letter has two ``id`` fields (first the entry's
    id, then the original entry's run id), which redis-py's dict would fold into one."""
    raw_client = redis.Redis(connection_pool=r.connection_pool)
    raw_client.set_response_callback("XRANGE", lambda response, **options: response)
    return [(entry_id, list(flat)) for entry_id, flat in raw_client.xrange(stream)]
