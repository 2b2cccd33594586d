"""``pluto acl``: least-privilege Redis users for training ranks and workers, per tenant.

A tenant's keys all live under ``<prefix>@<tenant>:`` (:class:`pluto.protocol.Keys`), a root no
other tenant's pattern matches, so Redis ACL key patterns can confine each team:

- ``pluto-rank[-<tenant>]`` (training processes) may elect a creator and read the run key,
  append (never read) the control stream and its runs' metrics, logs and heartbeats, write its
  own member entry, and read only what a waiting ``init`` needs (the answer to its create, the
  announce stream, the run's name, the workers' heartbeats). No ``DEL``, ``XTRIM``, ``XDEL``,
  ``XREADGROUP``, ``KEYS``, ``SCAN``, ``FLUSHALL``, no key of another tenant.
- ``pluto-worker`` (one user for every tenant it serves) may do what a worker does on those
  tenants' keys, and nothing ``@dangerous`` (``FLUSHALL``, ``KEYS``, ``CONFIG`` ...).

Passwords come from ``PLUTO_ACL_PASSWORD_<USER>`` (the user name upper-cased, ``-`` as
``_``) or, with ``--generate``, are made here and shown once. Redis receives only their
SHA-256 (``#<hash>``); a password never appears in a printed rule, a log line or a message.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from ._settings import AclSettings
from .env import redact
from .errors import ConfigError, PlutoError
from .protocol import Keys, glob_escape

RANK_COMMANDS = ("+ping", "+select")
"""Commands a rank may send on no key; every other one is tied to its keys by
:func:`rank_rules`."""

WORKER_COMMANDS = ("+@read", "+@write", "+@stream", "+@hash", "+@set", "+@string",
                   "+@keyspace", "+@connection", "+@transaction", "+eval", "+evalsha",
                   "+script|load", "+script|exists", "-@dangerous", "-scan", "-randomkey")
"""What a worker needs on its tenants' keys; ``SCAN`` and ``RANDOMKEY`` are refused because
key patterns do not filter the names they return (another tenant's project names)."""


def rank_rules(keys: Keys) -> list[str]:
    """What a rank of ``keys.tenant`` may do, each command only on the keys it needs it for
    (Redis 7 selectors, ``(...)``: a command passes if the root rules or one selector allow
    it on all its keys), so e.g. ``SET`` works on run keys but cannot overwrite a stream.

    Every command the SDK sends is here (``pluto/_init.py``, ``_attach.py``, ``_producer.py``,
    ``_run.py``, ``_console.py``, ``_preflight.py``); the lease script (``EVALSHA``) runs GET
    and PEXPIRE on the run key, which Redis checks against these same rules."""
    root = glob_escape(keys.root)
    run = f"{root}:{{*}}"
    return [*RANK_COMMANDS, "+get", "+set", "+expire", "+pexpire", "+evalsha", "+script|load",
            f"~{root}:run:*",  # elect a creator, read the id, keep the lease and TTL
            f"(+xadd %W~{root}:control %W~{run}:metrics %W~{run}:logs)",  # append, never read
            f"(+get %R~{root}:created:*)", f"(+xread %R~{root}:announce:*)",
            f"(+hget %R~{run}:info)", f"(+hvals %R~{root}:workers)",
            f"(+hset +hget ~{run}:members)", f"(+hset %W~{run}:heartbeats)"]


@dataclass(frozen=True)
class User:
    name: str
    rules: tuple[str, ...]
    password: str | None
    """None: not known (a placeholder is printed; ``--apply`` refuses)."""
    generated: bool = False
    settings: str = ""
    """What its processes set besides the URL (``PLUTO_TENANT=...``), shown with it."""

    def setuser(self, for_print: bool) -> list[str]:
        """The ``ACL SETUSER`` arguments; printed ones never hold a password the caller gave."""
        if self.password is None or (for_print and not self.generated):
            secret = f"><password-of-{self.name}>"
        else:
            secret = "#" + hashlib.sha256(self.password.encode()).hexdigest()
        rules = [f'"{r}"' if for_print and " " in r else r for r in self.rules]
        return [self.name, "reset", "on", secret, "resetchannels", "-@all", *rules]


def password_env(user: str) -> str:
    """The variable holding ``user``'s password: ``PLUTO_ACL_PASSWORD_PLUTO_RANK_VISION``."""
    return "PLUTO_ACL_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def users(prefix: str, tenants: Sequence[str], worker_user: str = "pluto-worker",
          generate: bool = False, env: Mapping[str, str] | None = None) -> list[User]:
    """One rank user per tenant (``pluto-rank`` without one), one worker user for all; their
    passwords from ``env`` (``PLUTO_ACL_PASSWORD_<USER>``, as :class:`AclSettings` read them
    once; none: no password given), so that this module never reads the environment itself."""
    env = {} if env is None else env
    if re.search(r"\s", prefix):
        raise ConfigError(f"PLUTO_PREFIX={prefix!r} contains whitespace; ACL rules cannot "
                          "name it")
    every = [Keys(prefix, t) for t in (tenants or [""])]

    def user(name: str, rules: list[str], settings: str) -> User:
        given = env.get(password_env(name)) or None
        if given is None and generate:
            return User(name, tuple(rules), secrets.token_urlsafe(32), True, settings)
        return User(name, tuple(rules), given, False, settings)

    out = [user(f"pluto-rank-{k.tenant}" if k.tenant else "pluto-rank", rank_rules(k),
                f"ranks: PLUTO_TENANT={k.tenant}" if k.tenant else "ranks:") for k in every]
    named = ",".join(k.tenant for k in every if k.tenant)
    out.append(user(worker_user, [*WORKER_COMMANDS, *(f"~{k.pattern}" for k in every)],
                    f"workers: PLUTO_TENANTS={named}" if named else "workers:"))
    return out


def apply(url: str, given: list[User], tls: Mapping[str, Any] | None = None) -> None:
    """Send every ``ACL SETUSER`` to the Redis at ``url`` (an admin's credentials; ``tls``:
    redis-py's TLS arguments for a ``rediss://`` URL, ``AclSettings.tls``)."""
    import redis

    missing = [u.name for u in given if u.password is None]
    if missing:
        raise ConfigError("no password for " + ", ".join(missing) + ": set " + ", ".join(
            password_env(m) for m in missing) + ", or pass --generate")
    try:
        client: Any = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10,
                                           **(tls or {}))
        with client:
            for u in given:
                client.execute_command("ACL", "SETUSER", *u.setuser(for_print=False))
    except (redis.RedisError, OSError, ValueError) as exc:
        raise PlutoError(f"could not apply the ACL users at {redact(url)}: "
                         f"{type(exc).__name__}: {redact(str(exc))} (the URL needs a user "
                         "allowed ACL SETUSER, e.g. the default one)") from None


def user_url(url: str, u: User) -> str:
    """``url`` with ``u``'s name and password instead of whatever credentials it carried."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(u.name)}:{quote(u.password or '', safe='')}@" + (
        f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def add_parser(sub: Any) -> None:
    acl = sub.add_parser("acl", help="print (or --apply) least-privilege Redis ACL users "
                         "pluto-rank[-<tenant>] and pluto-worker for PLUTO_PREFIX")
    acl.add_argument("--tenant", action="append", default=None, metavar="T",
                     help="a tenant (team) whose keys live under <prefix>@T: (repeatable; "
                     "default: PLUTO_TENANTS, else PLUTO_TENANT, else none)")
    acl.add_argument("--worker-user", default="pluto-worker", help="the worker's user name")
    acl.add_argument("--generate", action="store_true", help="make a random password for each "
                     "user without PLUTO_ACL_PASSWORD_<USER>, and show it once")
    acl.add_argument("--apply", action="store_true", help="send the users to --redis-url")
    acl.add_argument("--redis-url", default=None, help="an admin's URL (default "
                     "PLUTO_REDIS_URL); the URLs shown for the users take its host and port")


def cmd_acl(args: argparse.Namespace) -> int:
    s = AclSettings.from_env(args.tenant)
    url = args.redis_url or s.redis_url
    made = users(s.prefix, list(s.tenants), args.worker_user, args.generate, env=s.passwords)
    if args.apply:
        apply(url, made, s.tls(url))
        print(f"applied {len(made)} ACL users at {redact(url)}: "
              f"{', '.join(u.name for u in made)} (persist them with ACL SAVE or CONFIG "
              "REWRITE)")
    else:
        for u in made:
            print("ACL SETUSER " + " ".join(u.setuser(for_print=True)))
    for u in made:
        if u.generated:
            print(f"# {u.settings} PLUTO_REDIS_URL={user_url(url, u)}  (shown once)")
    return 0
