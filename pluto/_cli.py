"""The ``pluto`` command: ``worker``, ``server``, ``up``, ``tail``, ``runs``, ``status``, ``dead``,
``acl``.

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
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from . import _acl, _servers
from ._settings import CliSettings
from .env import redact
from .errors import PlutoError
from .protocol import F_RANK, F_STEP, F_TIME, Keys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_verify(ca: str) -> Any:
    """How httpx verifies an ``https://`` backend: with the CA file ``ca``
    (:attr:`CliSettings.api_ca`, from ``PLUTO_API_CA``), else with the system's."""
    import ssl

    return ssl.create_default_context(cafile=ca) if ca else True


def cmd_worker(args: argparse.Namespace) -> int:
    try:
        from pluto_worker import main as worker_main
    except ImportError as exc:
        return _missing("worker", "worker", exc)
    return int(worker_main(tenants=args.tenant) or 0)


def cmd_server(args: argparse.Namespace) -> int:
    if getattr(args, "server_command", None) == "keys":
        return cmd_keys(args)
    try:
        from pluto_server import serve
    except ImportError as exc:
        return _missing("server", "server", exc)
    serve()
    return 0


def _need(module: str, command: str, extra: str) -> Any:
    """``module`` imported, or None after the one-line hint naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _missing(command, extra, exc)
        return None


def _missing(command: str, extra: str, exc: ImportError) -> int:
    """An extra that is not installed is one line naming the pip command, not a traceback."""
    module = (exc.name or 'a module').split('.')[0]
    print(f"pluto {command}: needs {module} from the {extra!r} extra: "
          f"pip install 'pluto-stream[{extra}]'", file=sys.stderr)
    return 2


def cmd_keys(args: argparse.Namespace) -> int:
    """``pluto server keys create|list|revoke`` on the database of ``PLUTO_DB_URL``; works
    while the server runs (SQLite WAL), and a revocation counts from its next request."""
    from pluto_server._auth import KeyStore
    from pluto_server._settings import db_path

    s = CliSettings.from_env()
    os.umask(0o077)  # a database this command creates is private from the start
    path = db_path(s.db_url)
    if path == ":memory:":
        print("pluto server keys: PLUTO_DB_URL names an in-memory database; keys must live in "
              "the server's database file", file=sys.stderr)
        return 2
    store = KeyStore(path)
    try:
        if args.keys_action == "create":
            key_id, token = store.create(args.scope, args.name or "")
            print(f"created API key {key_id} (scope {args.scope}{', ' + args.name if args.name else ''})"
                  f" in {path}; it is shown only this once, so store it now:", file=sys.stderr)
            print(token, flush=True)
            return 0
        if args.keys_action == "revoke":
            if not store.revoke(args.id):
                print(f"pluto server keys: no key with id {args.id} (see `pluto server keys "
                      "list`)", file=sys.stderr)
                return 1
            print(f"revoked API key {args.id}; requests with it get 401 from now on")
            return 0
        for info in store.list():
            state = ("revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.revoked_at))
                     if info.revoked_at else "active")
            made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.created_at))
            print(f"{info.id:>5}  {info.scope:<6} {state:<24} created {made} UTC  {info.name}")
        return 0
    finally:
        store.close()


def cmd_up(args: argparse.Namespace) -> int:
    """Redis (reused or embedded), backend and one worker on this machine, until Ctrl-C.

    The children are supervised: one that exits is restarted with back-off and a log line,
    and the embedded Redis is stopped only by Ctrl-C / SIGTERM (worker first), never because
    another child died."""
    import redis

    for module in ("starlette", "uvicorn", "httpx"):
        if _need(module, "up", "server") is None:
            return 2

    s = CliSettings.from_env()
    # Everything up creates, and every file its children create (the SQLite database, Redis's
    # append-only files, the logs), is private from the start: no chmod-after-write window.
    os.umask(0o077)
    try:
        _private_home(s.home)
        key = s.api_key or _local_key(s.home)
    except PlutoError as exc:
        print(f"pluto up: {exc}", file=sys.stderr, flush=True)
        return 1
    logs = s.home / "logs"
    sup = _servers.Supervisor(lambda line: print(f"pluto up: {line}", flush=True))
    stop = {"now": False}

    def on_signal(sig: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            redis.Redis.from_url(s.redis_url, socket_connect_timeout=1, **s.tls()).ping()
            print(f"pluto up: using the Redis at {redact(s.redis_url)}", flush=True)
            if urlsplit(s.redis_url).password and _open_to_anyone(s.redis_url, s.tls()):
                print("pluto up: WARNING: that Redis accepts connections without a password "
                      "(PLUTO_REDIS_URL has one): set requirepass or ACL users on it",
                      flush=True)
        except (redis.AuthenticationError, redis.ResponseError) as exc:
            raise PlutoError(f"the Redis at {redact(s.redis_url)} refused the credentials of "
                             f"PLUTO_REDIS_URL ({str(exc)[:100]}): fix the user:password in "
                             "it, or stop that Redis so that up starts its own") from None
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


def _open_to_anyone(url: str, tls: dict[str, Any]) -> bool:
    """Whether the Redis at ``url`` serves a client that sends no credentials (over TLS with
    ``tls``, the redis-py keyword arguments of :meth:`CliSettings.tls`)."""
    import redis

    parts = urlsplit(url)
    bare = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl()
    client = redis.Redis.from_url(bare, socket_connect_timeout=1, socket_timeout=2, **tls)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _embedded_redis(s: CliSettings) -> _servers.Child:
    url = urlsplit(s.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if host not in LOOPBACK:
        raise PlutoError(f"no Redis answers at {redact(s.redis_url)}, and pluto up only starts an "
                         "embedded one on loopback: start that Redis, or point PLUTO_REDIS_URL at "
                         "redis://127.0.0.1:<port>/0")
    if url.scheme != "redis":
        raise PlutoError(f"no Redis answers at {redact(s.redis_url)}, and pluto up starts an "
                         "embedded one only for a redis:// URL: start your TLS Redis first")
    password = unquote(url.password) if url.password is not None else None
    user = unquote(url.username) if url.username else None
    child = _servers.start_redis(port, s.home / "redis", appendonly=True, host=host,
                                 log_dir=s.home / "logs", password=password, user=user)
    need = (f", requiring the password of PLUTO_REDIS_URL (user {user or 'default'})"
            if password is not None else " without a password (put one in PLUTO_REDIS_URL: "
            "redis://:password@host:port/0)")
    print(f"pluto up: started an embedded Redis ({Path(_servers.redis_binary()).name}) on "
          f"{host}:{port}{need}, protected mode on, append-only files in {s.home / 'redis'}",
          flush=True)
    return child


LOOSE = 0o077
"""Group and other permission bits: none may be set on anything in ``.pluto``."""


def _private_home(home: Path) -> None:
    """``home`` as a 0700 directory whose files only the owner can read. A key file readable
    by others is refused (it may have leaked: the fix is to tighten and rotate it); other
    loose files (written by an older version) are tightened."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = home / "api_key"
    if key.exists() and key.stat().st_mode & LOOSE:
        raise PlutoError(f"{key} is readable by others (mode {key.stat().st_mode & 0o777:04o}): "
                         f"run `chmod 600 {key}` (and, if others may have read it, delete it so "
                         "that up makes a new key)")
    if home.stat().st_mode & LOOSE:
        home.chmod(0o700)
    tightened = 0
    for path in [home, *home.rglob("*")]:
        mode = path.lstat().st_mode
        if not path.is_symlink() and mode & LOOSE:
            path.chmod(mode & 0o700)
            tightened += 1
    if tightened:
        print(f"pluto up: made {tightened} files in {home} private (mode 0600/0700)", flush=True)


def _local_key(home: Path) -> str:
    """The key in ``home/api_key``, else a new one (32 random bytes) written there, 0600 from
    the moment the file exists."""
    path = home / "api_key"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    key = "pluto_" + secrets.token_urlsafe(32)
    _servers.private_file(path, key + "\n")
    return key


def cmd_tail(args: argparse.Namespace) -> int:
    """Print a run's entries as they arrive, like ``redis-cli XREAD BLOCK 0 STREAMS <key> $``."""
    import redis

    s = CliSettings.from_env()
    project = s.project if args.project is None else args.project  # PLUTO_PROJECT, else default
    keys = Keys(s.prefix, s.tenant)
    client: Any = redis.Redis.from_url(s.redis_url, decode_responses=True, **s.tls())
    run = args.run if args.run.isdigit() else client.get(keys.run(project, args.run))
    if run is None or not str(run).isdigit():
        print(f"pluto tail: no run {args.run!r} in project {project!r} at "
              f"{redact(s.redis_url)}", file=sys.stderr)
        return 1
    if args.logs:
        return _tail_logs(client, keys.logs(run), args)
    stream = keys.metrics(run)
    print(f"# redis-cli -u {redact(s.redis_url)} XREAD BLOCK 0 STREAMS '{stream}' '$'", flush=True)
    for entry_id, fields in _follow(client, stream, args):
        metrics = " ".join(f"{k}={v}" for k, v in fields.items() if not k.startswith("_"))
        print(f"{entry_id} rank={fields.get(F_RANK)} step={fields.get(F_STEP)} "
              f"time={fields.get(F_TIME)} {metrics}", flush=True)
    return 0


def _follow(client: Any, stream: str, args: argparse.Namespace) -> Any:
    """The stream's entries as they arrive (``--all``: from the oldest kept; ``--once``: what
    is there, then stop; Ctrl-C ends it quietly)."""
    last = "0-0" if args.all else "$"
    try:
        while True:
            for _, entries in client.xread({stream: last}, block=1000, count=1000) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield entry_id, fields
            if args.once:
                return
    except KeyboardInterrupt:
        return


def _tail_logs(client: Any, stream: str, args: argparse.Namespace) -> int:
    """Console lines of the run's processes (``--rank N``: that rank's only), as they arrive:
    ``<rank> <INFO|ERROR> <line>``, stderr lines being ERROR."""
    for _, fields in _follow(client, stream, args):
        if args.rank is None or fields.get("rank") == str(args.rank):
            print(f"[rank {fields.get('rank')}] {fields.get('type', 'INFO'):5} "
                  f"{fields.get('msg', '')}", flush=True)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List runs (or show one with its metrics) from the backend's read API."""
    httpx = _need("httpx", "runs", "worker")
    if httpx is None:
        return 2
    s = CliSettings.from_env()
    key = s.key()
    if not key:
        print("pluto runs: no API key: set PLUTO_API_KEY (or run `pluto up`, which writes "
              ".pluto/api_key)", file=sys.stderr)
        return 1
    with httpx.Client(base_url=s.api_url, headers={"Authorization": f"Bearer {key}"},
                      timeout=10, verify=api_verify(s.api_ca)) as client:
        try:
            if args.id is not None:
                run = client.get(f"/api/runs/{args.id}").raise_for_status().json()
                names = client.get(f"/api/runs/{args.id}/metrics").raise_for_status().json()
                run["points"] = {n: len(_points(client, args.id, n)) for n in names["names"]}
                print(json.dumps(run, indent=2))
                print(_ledger_line(run), file=sys.stderr)
                return 0
            params: dict[str, Any] = {"project": args.project} if args.project else {}
            runs, offset = [], 0
            while offset is not None:  # the backend pages its list (``next``); older: one list
                page = client.get("/api/runs", params={**params, "offset": offset,
                                                       "limit": 1000}).raise_for_status().json()
                runs += page["runs"]
                offset = page.get("next")
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
    import redis

    from . import _ops

    httpx = _need("httpx", "status", "worker")
    if httpx is None:
        return 2
    s = CliSettings.from_env()
    try:
        resp = httpx.get(f"{s.api_url}/healthz", timeout=3, verify=api_verify(s.api_ca))
        backend = {"url": s.api_url, "ok": resp.status_code == 200,
                   "error": None if resp.status_code == 200 else f"HTTP {resp.status_code}"}
    except httpx.HTTPError as exc:
        backend = {"url": s.api_url, "ok": False, "error": str(exc)}
    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=3, socket_timeout=5,
                                  **s.tls())
    report = _ops.status(client, Keys(s.prefix, s.tenant), backend, args.max_pending_age)
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
    client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=3, socket_timeout=10,
                                  **s.tls())
    keys = Keys(s.prefix, s.tenant)
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
    worker = sub.add_parser("worker", help="consume run streams from PLUTO_REDIS_URL into "
                            "PLUTO_API_URL (needs PLUTO_API_KEY); SIGTERM stops it after the "
                            "batch in hand")
    worker.add_argument("--tenant", action="append", default=None, metavar="T",
                        help="serve this tenant's keys (<prefix>@T:); repeatable; default "
                        "PLUTO_TENANTS, else PLUTO_TENANT, else none")
    _acl.add_parser(sub)
    server = sub.add_parser("server", help="the backend HTTP API and dashboard on PLUTO_API_URL, "
                            "storing in PLUTO_DB_URL, accepting the keys in PLUTO_API_KEY and "
                            "those of `pluto server keys`")
    server_sub = server.add_subparsers(dest="server_command")
    keys = server_sub.add_parser("keys", help="API keys stored (as hashes) in PLUTO_DB_URL")
    keys_sub = keys.add_subparsers(dest="keys_action", required=True)
    create = keys_sub.add_parser("create", help="make a key and print it (on the last line) once")
    create.add_argument("--scope", choices=["read", "write", "admin"], required=True,
                        help="read: GET routes; write: a worker's key (ingest, writes, reads); "
                        "admin: everything")
    create.add_argument("--name", default="", help="a label for `keys list`")
    keys_sub.add_parser("list", help="id, scope, state and name of every key (never the key)")
    revoke = keys_sub.add_parser("revoke", help="refuse a key from its next request on")
    revoke.add_argument("id", type=int)
    sub.add_parser("up", help="everything one machine needs: Redis (reused or embedded), the "
                   "backend and one worker; Ctrl-C stops all of it")
    tail = sub.add_parser("tail", help="print a run's metrics entries as they arrive")
    tail.add_argument("run", help="the run id given to pluto.init (or the numeric id)")
    tail.add_argument("--project", default=None, help="default: PLUTO_PROJECT, else 'default'")
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
               "runs": cmd_runs, "status": cmd_status, "dead": cmd_dead,
               "acl": _acl.cmd_acl}[args.command]
    try:
        return handler(args)
    except PlutoError as exc:
        print(f"pluto {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
