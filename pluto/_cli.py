"""The ``pluto`` command: ``worker``, ``server``, ``up``, ``tail``, ``runs``.

A thin layer over library functions; loaded only by the console script, never by ``import pluto``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import _servers
from ._keys import F_RANK, F_STEP, F_TIME, Keys
from ._settings import DEFAULT_REDIS_URL, redact
from .errors import PlutoError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class CliSettings:
    redis_url: str = DEFAULT_REDIS_URL
    prefix: str = "pluto"
    api_url: str = "http://127.0.0.1:8080"
    api_key: str | None = None
    db_url: str = "sqlite:///.pluto/pluto.db"
    home: Path = Path(".pluto")

    @classmethod
    def from_env(cls) -> CliSettings:
        env = os.environ
        return cls(redis_url=env.get("PLUTO_REDIS_URL") or DEFAULT_REDIS_URL,
                   prefix=env.get("PLUTO_PREFIX") or "pluto",
                   api_url=(env.get("PLUTO_API_URL") or "http://127.0.0.1:8080").rstrip("/"),
                   api_key=env.get("PLUTO_API_KEY") or None,
                   db_url=env.get("PLUTO_DB_URL") or "sqlite:///.pluto/pluto.db",
                   home=Path(env.get("PLUTO_HOME") or ".pluto"))

    def key(self) -> str | None:
        """``PLUTO_API_KEY``, else the key ``pluto up`` wrote to ``.pluto/api_key``."""
        if self.api_key:
            return self.api_key
        path = self.home / "api_key"
        return path.read_text().strip() if path.exists() else None


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import main as worker_main

    return int(worker_main() or 0)


def cmd_server(args: argparse.Namespace) -> int:
    from backend import serve

    serve()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Redis (reused or embedded), backend and one worker on this machine, until Ctrl-C.

    The children are supervised: one that exits is restarted with back-off and a log line,
    and the embedded Redis is stopped only by Ctrl-C / SIGTERM (worker first), never because
    another child died."""
    import redis

    s = CliSettings.from_env()
    s.home.mkdir(parents=True, exist_ok=True)
    key = s.api_key or _local_key(s.home)
    logs = s.home / "logs"
    sup = _servers.Supervisor(lambda line: print(f"pluto up: {line}", flush=True))
    stop = {"now": False}

    def on_signal(sig: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            redis.Redis.from_url(s.redis_url, socket_connect_timeout=1).ping()
            print(f"pluto up: using the Redis at {redact(s.redis_url)}", flush=True)
        except (redis.RedisError, OSError):
            sup.add("redis", lambda: _embedded_redis(s))
        api = urlsplit(s.api_url)
        if _servers.port_open(api.hostname or "127.0.0.1", api.port or 8080):
            raise PlutoError(f"something already listens on {s.api_url}: stop it or set "
                             "PLUTO_API_URL to a free port")
        sup.add("backend", lambda: _servers.start_backend(s.api_url, s.db_url, key, logs))
        worker = sup.add("worker", lambda: _servers.start_worker(s.redis_url, s.prefix,
                                                                 s.api_url, key, logs))
        print(f"pluto up: backend at {s.api_url} (dashboard: {s.api_url}/), worker pid "
              f"{worker.pid}, logs in {logs}", flush=True)
        print(f"pluto up: API key in {s.home / 'api_key'}" if not s.api_key else
              "pluto up: using PLUTO_API_KEY", flush=True)
        print("pluto up: ready (Ctrl-C stops everything)", flush=True)
        while not stop["now"]:
            sup.poll()
            time.sleep(0.2)
        return 0
    except PlutoError as exc:
        print(f"pluto up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.stop()
        if sup.slots:
            print("pluto up: stopped", flush=True)


def _embedded_redis(s: CliSettings) -> _servers.Child:
    url = urlsplit(s.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if host not in LOOPBACK:
        raise PlutoError(f"no Redis answers at {redact(s.redis_url)}, and pluto up only starts an "
                         "embedded one on loopback: start that Redis, or point PLUTO_REDIS_URL at "
                         "redis://127.0.0.1:<port>/0")
    child = _servers.start_redis(port, s.home / "redis", appendonly=True, host=host,
                                 log_dir=s.home / "logs")
    print(f"pluto up: started an embedded Redis ({Path(_servers.redis_binary()).name}) on "
          f"{host}:{port}, append-only files in {s.home / 'redis'}", flush=True)
    return child


def _local_key(home: Path) -> str:
    path = home / "api_key"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    key = "pluto_" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def cmd_tail(args: argparse.Namespace) -> int:
    """Print a run's entries as they arrive, like ``redis-cli XREAD BLOCK 0 STREAMS <key> $``."""
    import redis

    s = CliSettings.from_env()
    keys = Keys(s.prefix)
    client = redis.Redis.from_url(s.redis_url, decode_responses=True)
    run = args.run if args.run.isdigit() else client.get(keys.run(args.project, args.run))
    if run is None or not str(run).isdigit():
        print(f"pluto tail: no run {args.run!r} in project {args.project!r} at "
              f"{redact(s.redis_url)}", file=sys.stderr)
        return 1
    stream = keys.metrics(run)
    print(f"# redis-cli -u {redact(s.redis_url)} XREAD BLOCK 0 STREAMS '{stream}' '$'", flush=True)
    last = "0-0" if args.all else "$"
    try:
        while True:
            for _, entries in client.xread({stream: last}, block=1000, count=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    metrics = " ".join(f"{k}={v}" for k, v in fields.items() if not k.startswith("_"))
                    print(f"{entry_id} rank={fields.get(F_RANK)} step={fields.get(F_STEP)} "
                          f"time={fields.get(F_TIME)} {metrics}", flush=True)
            if args.once:
                return 0
    except KeyboardInterrupt:
        return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs (or show one with its metrics) from the backend's read API."""
    import httpx

    s = CliSettings.from_env()
    key = s.key()
    if not key:
        print("pluto runs: no API key: set PLUTO_API_KEY (or run `pluto up`, which writes "
              ".pluto/api_key)", file=sys.stderr)
        return 1
    with httpx.Client(base_url=s.api_url, headers={"Authorization": f"Bearer {key}"},
                      timeout=10) as client:
        try:
            if args.id is not None:
                run = client.get(f"/api/runs/{args.id}").raise_for_status().json()
                names = client.get(f"/api/runs/{args.id}/metrics").raise_for_status().json()
                run["points"] = {n: len(client.get(f"/api/runs/{args.id}/metrics/{n}")
                                        .raise_for_status().json()["points"])
                                 for n in names["names"]}
                print(json.dumps(run, indent=2))
                return 0
            params = {"project": args.project} if args.project else {}
            runs = client.get("/api/runs", params=params).raise_for_status().json()["runs"]
        except httpx.HTTPError as exc:
            print(f"pluto runs: {s.api_url}: {exc} (is `pluto server` running? PLUTO_API_URL)",
                  file=sys.stderr)
            return 1
    for run in runs:
        print(f"{run['id']:>6}  {run['status']:<10} {run['project']}/{run['externalId']}  "
              f"{run.get('name') or ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pluto", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="consume run streams from PLUTO_REDIS_URL into PLUTO_API_URL "
                   "(needs PLUTO_API_KEY); SIGTERM stops it after the batch in hand")
    sub.add_parser("server", help="the backend HTTP API and dashboard on PLUTO_API_URL, storing "
                   "in PLUTO_DB_URL, accepting the keys in PLUTO_API_KEY")
    sub.add_parser("up", help="everything one machine needs: Redis (reused or embedded), the "
                   "backend and one worker; Ctrl-C stops all of it")
    tail = sub.add_parser("tail", help="print a run's metrics entries as they arrive")
    tail.add_argument("run", help="the run id given to pluto.init (or the numeric id)")
    tail.add_argument("--project", default=os.environ.get("PLUTO_PROJECT") or "default")
    tail.add_argument("--all", action="store_true", help="start from the oldest retained entry")
    tail.add_argument("--once", action="store_true", help="print what is there and exit")
    runs = sub.add_parser("runs", help="list runs stored by the backend, or show one")
    runs.add_argument("id", nargs="?", type=int, help="numeric run id to show")
    runs.add_argument("--project", default=None)
    args = parser.parse_args(argv)
    handler = {"worker": cmd_worker, "server": cmd_server, "up": cmd_up, "tail": cmd_tail,
               "runs": cmd_runs}[args.command]
    try:
        return handler(args)
    except PlutoError as exc:
        print(f"pluto {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
