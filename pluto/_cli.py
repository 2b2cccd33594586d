"""The ``pluto`` command: ``worker``, ``server``, ``up``, ``tail``, ``runs``, ``status``, ``dead``.

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
    if args.logs:
        return _tail_logs(client, keys.logs(run), args)
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


def _tail_logs(client: Any, stream: str, args: argparse.Namespace) -> int:
    """Console lines of the run's processes (``--rank N``: that rank's only), as they arrive:
    ``<rank> <INFO|ERROR> <line>``, stderr lines being ERROR."""
    last = "0-0" if args.all else "$"
    try:
        while True:
            for _, entries in client.xread({stream: last}, block=1000, count=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if args.rank is not None and fields.get("rank") != str(args.rank):
                        continue
                    print(f"[rank {fields.get('rank')}] {fields.get('type', 'INFO'):5} "
                          f"{fields.get('msg', '')}", flush=True)
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
                run["points"] = {n: len(_points(client, args.id, n)) for n in names["names"]}
                print(json.dumps(run, indent=2))
                print(_ledger_line(run), file=sys.stderr)
                return 0
            params = {"project": args.project} if args.project else {}
            runs = client.get("/api/runs", params=params).raise_for_status().json()["runs"]
        except httpx.HTTPError as exc:
            print(f"pluto runs: {s.api_url}: {exc} (is `pluto server` running? PLUTO_API_URL)",
                  file=sys.stderr)
            return 1
    for run in runs:
        lost = run.get("lost")
        flag = f"  LOST {lost}" if lost else ""
        print(f"{run['id']:>6}  {run.get('status', 'ERROR'):<10} {run.get('project')}/"
              f"{run.get('externalId')}  {run.get('name') or run.get('error') or ''}{flag}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Health of Redis, the backend, the workers and every active run; non-zero if unhealthy."""
    import httpx
    import redis

    from . import _ops

    s = CliSettings.from_env()
    try:
        resp = httpx.get(f"{s.api_url}/healthz", timeout=3)
        backend = {"url": s.api_url, "ok": resp.status_code == 200,
                   "error": None if resp.status_code == 200 else f"HTTP {resp.status_code}"}
    except httpx.HTTPError as exc:
        backend = {"url": s.api_url, "ok": False, "error": str(exc)}
    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=3, socket_timeout=5)
    report = _ops.status(client, Keys(s.prefix), backend, args.max_pending_age)
    client.close()
    report.redis["url"] = redact(s.redis_url)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_status(report)
    return 0 if report.healthy else 1


def _print_status(report: Any) -> None:
    red, back = report.redis, report.backend
    print(f"redis    {'ok' if red.get('ok') else 'DOWN'}  {red.get('url')}  "
          f"{red.get('version') or red.get('error') or ''}  used {red.get('used_memory')} bytes")
    print(f"backend  {'ok' if back.get('ok') else 'DOWN'}  {back.get('url')}  "
          f"{back.get('error') or ''}")
    for w in report.workers:
        print(f"worker   {'alive' if w['alive'] else 'GONE '}  {w['name']}  heartbeat "
              f"{w['heartbeat_age_s']} s ago, idle {w['idle_s']} s")
    for run in report.runs:
        slow = run.get("slowest_rank")
        print(f"run {run['id']:>6}  members {run['members']}  lag {run['lag']}  pending "
              f"{run['pending']}  oldest pending {run['oldest_pending_s']} s  dead "
              f"{run['dead_letters']}" + (f"  slowest rank {slow['rank']} ({slow['behind']} "
                                          "steps behind)" if slow else ""))
    for problem in report.problems:
        print(f"PROBLEM  {problem}")
    print("healthy" if report.healthy else "UNHEALTHY")


def cmd_dead(args: argparse.Namespace) -> int:
    """List or replay a run's dead-lettered entries (``control`` for the control stream)."""
    import redis

    from . import _ops

    s = CliSettings.from_env()
    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=3, socket_timeout=10)
    keys = Keys(s.prefix)
    try:
        if args.action == "replay":
            n = _ops.replay(client, keys, args.run, args.id or None)
            print(f"pluto dead: replayed {n} entries into {_ops.dead_stream(keys, args.run)[1]}")
            return 0
        letters = _ops.dead_letters(client, keys, args.run, args.id or None)
    except ValueError as exc:
        print(f"pluto dead: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    for letter in letters:
        fields = " ".join(f"{k.decode(errors='replace')}={v[:60].decode(errors='replace')}"
                          for k, v in letter["fields"][:8])
        print(f"{letter['id']}  (entry {letter['original_id']})  {letter['reason'][:200]}\n"
              f"    {fields}")
    print(f"{len(letters)} dead letters", file=sys.stderr)
    return 0


def _points(client: Any, run: int, name: str) -> list[Any]:
    """A metric's points by name as a query parameter (names may hold ``.``/``..``)."""
    resp = client.get(f"/api/runs/{run}/metric", params={"name": name})
    if resp.status_code == 404 and "no run" not in resp.text:  # an older backend
        resp = client.get(f"/api/runs/{run}/metrics/{name}")
    return list(resp.raise_for_status().json()["points"])


def _ledger_line(run: dict[str, Any]) -> str:
    """One line saying whether the run is complete: what was logged, stored, and lost why."""
    ledger = run.get("ledger") or {}
    if not ledger:
        return f"run {run.get('id')} {run.get('status')}: no loss ledger (older backend)"
    drops: dict[str, int] = {}
    for member in run.get("members") or []:
        for reason, n in (member.get("drops") or {}).items():
            drops[reason] = drops.get(reason, 0) + int(n)
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(drops.items()) if n)
    verdict = "complete" if not ledger.get("lost") else f"LOST {ledger['lost']} entries"
    return (f"run {run.get('id')} {run.get('status')}, {len(run.get('members') or [])} members: "
            f"logged {ledger.get('logged')}, sent {ledger.get('sent')}, stored "
            f"{ledger.get('stored')}, dead-lettered {ledger.get('dead')}, missing "
            f"{ledger.get('missing')} — {verdict}" + (f" (dropped: {why})" if why else ""))


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
    tail.add_argument("--logs", action="store_true",
                      help="console lines (stdout/stderr of every rank) instead of metrics")
    tail.add_argument("--rank", type=int, default=None, help="with --logs: this rank only")
    runs = sub.add_parser("runs", help="list runs stored by the backend, or show one")
    runs.add_argument("id", nargs="?", type=int, help="numeric run id to show")
    runs.add_argument("--project", default=None)
    status = sub.add_parser("status", help="health of Redis, the backend, the workers and every "
                            "active run (lag, pending, dead letters, slowest rank); exits 1 when "
                            "something is unhealthy, so it serves as a readiness probe")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--max-pending-age", type=float, default=120.0, metavar="S",
                        help="unhealthy when an entry has been pending longer (default 120 s)")
    dead = sub.add_parser("dead", help="list a run's dead-lettered entries with their reasons, "
                          "or replay them into the run's stream once the cause is fixed")
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument("run", help="numeric run id (pluto runs), or 'control'")
    dead.add_argument("--id", action="append", help="only this dead letter id (repeatable)")
    args = parser.parse_args(argv)
    handler = {"worker": cmd_worker, "server": cmd_server, "up": cmd_up, "tail": cmd_tail,
               "runs": cmd_runs, "status": cmd_status, "dead": cmd_dead}[args.command]
    try:
        return handler(args)
    except PlutoError as exc:
        print(f"pluto {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
