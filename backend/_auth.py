"""API keys with scopes: who may call what (issue 18).

Why it is shaped this way:

* A key is 32 random bytes (``pluto_`` + URL-safe base64), shown once by ``pluto server keys
  create``. Only its SHA-256 is stored: the token has 256 bits of entropy, so a plain hash
  cannot be brute-forced and needs no salt or slow KDF; a stolen database yields no key.
* Scopes nest: ``read`` (GET routes), ``write`` (a worker's key: every ingest and write route
  plus reads), ``admin`` (everything, incl. ``/api/keys``). The keys of ``PLUTO_API_KEY`` /
  ``PLUTO_API_KEY_FILE`` are bootstrap admin keys, checked in memory first, so the worker's hot
  path with such a key never touches the database.
* A stored key is looked up by its hash on every request (an indexed read on a connection of
  this module, WAL mode: never blocked by the writer), so ``revoke`` takes effect on the next
  request; the hash found is compared again with ``hmac.compare_digest``.
* The middleware answers 401 (no/unknown/revoked key) or 403 (scope too small) before the body
  is read, so a refused request changes nothing. It records the key's id in the ASGI scope
  (``pluto.key``) for the per-key rate limit (``backend/_headers.py``); never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ._schema import migrate

SCOPES = ("read", "write", "admin")
_RANK = {scope: i for i, scope in enumerate(SCOPES)}

PROTECTED = ("/api/", "/ingest/", "/files")
"""Path prefixes that need ``Authorization: Bearer <key>``; the dashboard page does not."""

UNSIGNED_UPLOADS = "/files/blob/"
"""Presigned-style upload URLs carry their own signature instead of the bearer header."""

ADMIN_PATHS = ("/api/keys",)
"""Key management over HTTP, should it be added: admin only."""

READ_POSTS = frozenset({"/api/slug"})
"""POST routes that change nothing (the official SDK's login check): a read key may call them."""

TOKEN_PREFIX = "pluto_"


def new_token() -> str:
    """A fresh key: 32 random bytes."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str | bytes) -> str:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def needed_scope(method: str, path: str) -> str:
    """The least scope a request needs: reads need ``read``, anything else ``write``."""
    if path.startswith(ADMIN_PATHS):
        return "admin"
    if method in ("GET", "HEAD", "OPTIONS") or path in READ_POSTS:
        return "read"
    return "write"


@dataclass(frozen=True)
class KeyInfo:
    id: int
    scope: str
    name: str
    created_at: int
    revoked_at: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "scope": self.scope, "name": self.name,
                "created_at": self.created_at, "revoked_at": self.revoked_at}


class KeyStore:
    """The ``api_keys`` table of the backend's SQLite file (created by ``_schema.migrate``).

    Used by the server (lookups) and by ``pluto server keys`` (create, list, revoke), also
    while the server runs: SQLite WAL lets both open the file at once.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        migrate(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, scope: str, name: str = "") -> tuple[int, str]:
        """A new key of ``scope``: ``(id, token)``. The token is not kept; show it once."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        token = new_token()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO api_keys (hash, scope, name, created_at) VALUES (?, ?, ?, ?)",
                (digest(token), scope, name, int(time.time())))
        return int(cur.lastrowid or 0), token

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute("SELECT id, scope, name, created_at, revoked_at "
                                    "FROM api_keys ORDER BY id").fetchall()
        return [KeyInfo(*row) for row in rows]

    def revoke(self, key_id: int) -> bool:
        """Revoke key ``key_id``; False when there is no such key (revoking twice is fine)."""
        with self._lock:
            cur = self._db.execute("UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) "
                                   "WHERE id = ?", (int(time.time()), key_id))
        return cur.rowcount > 0

    def lookup(self, token: bytes) -> tuple[int, str] | None:
        """``(id, scope)`` of the live key whose token this is, else None."""
        wanted = digest(token)
        with self._lock:
            row = self._db.execute("SELECT id, scope, hash FROM api_keys WHERE hash = ? AND "
                                   "revoked_at IS NULL", (wanted,)).fetchone()
        if row is None or not hmac.compare_digest(str(row[2]), wanted):
            return None
        return int(row[0]), str(row[1])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ScopedAuth:
    """401 unless the bearer token is a bootstrap key or a live stored key; 403 when the key's
    scope is below what the request needs (:func:`needed_scope`).

    ``db_path`` is the backend's SQLite file (``None`` or ``:memory:``: bootstrap keys only);
    it is opened on the first request that is not a bootstrap key's.
    """

    def __init__(self, app: ASGIApp, keys: Iterable[str], db_path: str | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.db_path = db_path if db_path not in (None, "", ":memory:") else None
        self._store: KeyStore | None = None

    def _bootstrap(self, token: bytes) -> bool:
        # Compare against every key, without stopping early, so timing reveals nothing.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(token, key)
        return found

    def identify(self, header: bytes | None) -> tuple[str, str] | None:
        """``(key id for rate limits, scope)`` of the header's token, or None."""
        if not header or header[:7].lower() != b"bearer ":
            return None
        token = header[7:].strip()
        if not token:
            return None
        if self._bootstrap(token):
            return "env:" + digest(token)[:16], "admin"
        if self.db_path is None:
            return None
        if self._store is None:
            self._store = KeyStore(self.db_path)
        found = self._store.lookup(token)
        return None if found is None else (f"key:{found[0]}", found[1])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and path.startswith(PROTECTED)
                and not path.startswith(UNSIGNED_UPLOADS)):
            header = dict(scope["headers"]).get(b"authorization")
            who = self.identify(header)
            if who is None:
                reason = "missing" if not header else "invalid or revoked"
                response = _error(401, f"{reason} API key: send 'Authorization: Bearer <key>' "
                                       "with a key from PLUTO_API_KEY of `pluto server` or "
                                       "from `pluto server keys create`")
                await response(scope, receive, send)
                return
            key_id, key_scope = who
            needed = needed_scope(scope.get("method", "GET"), path)
            if _RANK[key_scope] < _RANK[needed]:
                response = _error(403, f"this API key has scope {key_scope!r}; "
                                       f"{scope.get('method')} {path[:100]} needs {needed!r}: "
                                       f"use a key from `pluto server keys create --scope "
                                       f"{needed}`")
                await response(scope, receive, send)
                return
            scope["pluto.key"] = key_id
        await self.app(scope, receive, send)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
