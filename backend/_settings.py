"""The backend's settings: one frozen dataclass, read from the environment once at start.

Explicit arguments win over the environment; nothing else in ``backend`` reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pluto.env import env_number
from pluto.errors import ConfigError
from pluto.protocol import DEFAULT_API_URL, DEFAULT_DB_URL

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_FILES_DIR = ".pluto/files"
DEFAULT_MAX_FILE = 4 * 1024 * 1024 * 1024

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _tls_file(env: Mapping[str, str], name: str) -> str:
    """A certificate or key file named by ``env[name]``; one ConfigError if it is unreadable."""
    raw = env.get(name, "").strip()
    if raw and not os.access(Path(raw).expanduser(), os.R_OK):
        raise ConfigError(f"{name}={raw!r} is not a readable file")
    return str(Path(raw).expanduser()) if raw else ""


def _keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """Keys from ``PLUTO_API_KEY`` (comma-separated) plus one per line of ``PLUTO_API_KEY_FILE``.

    Several keys let an operator rotate one without stopping the workers holding the other.
    """
    raw = env.get("PLUTO_API_KEY", "").split(",")
    path = env.get("PLUTO_API_KEY_FILE", "").strip()
    if path:
        try:
            raw += Path(path).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"PLUTO_API_KEY_FILE={path!r} cannot be read: {exc}") from None
    keys = [k.strip() for k in raw if k.strip() and not k.strip().startswith("#")]
    return tuple(dict.fromkeys(keys))


def is_postgres(db_url: str) -> bool:
    """Whether ``db_url`` names a PostgreSQL database (``postgresql://user@host:port/db``,
    libpq's URL, also spelled ``postgres://``); anything else is SQLite."""
    return db_url.startswith(("postgresql://", "postgres://"))


def check_db_url(db_url: str) -> None:
    """ConfigError naming the fix unless ``db_url`` is a SQLite path/URL or a PostgreSQL URL."""
    if is_postgres(db_url):
        parts = urlsplit(db_url)
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"PLUTO_DB_URL={db_url!r} has an invalid port") from None
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise ConfigError(f"PLUTO_DB_URL={db_url!r} names no database: use "
                              "postgresql://user@host:5432/dbname")
    elif "://" in db_url and not db_url.startswith("sqlite://"):
        raise ConfigError(f"PLUTO_DB_URL={db_url!r}: use sqlite:///path.db or "
                          "postgresql://user@host:port/dbname")


def db_path(db_url: str, cwd: Path | None = None) -> str:
    """The file (or ``:memory:``) named by a ``sqlite:///`` URL; relative paths are under cwd.

    ``sqlite:///rel/x.db`` is relative, ``sqlite:////abs/x.db`` absolute (SQLAlchemy's rule);
    a bare path without the scheme is accepted too. The parent directory is created.
    """
    if db_url.startswith("sqlite://"):
        rest = db_url[len("sqlite://"):]
        if not rest.startswith("/"):
            raise ConfigError(f"PLUTO_DB_URL={db_url!r}: use sqlite:///relative/path.db "
                              "or sqlite:////absolute/path.db")
        rest = rest[1:]
    elif "://" in db_url:
        raise ConfigError(f"PLUTO_DB_URL={db_url!r}: not a sqlite:/// URL (PostgreSQL: "
                          "postgresql://user@host:port/dbname)")
    else:
        rest = db_url
    if rest in ("", ":memory:"):
        return ":memory:"
    path = Path(rest).expanduser()
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _files_url(env: Mapping[str, str]) -> str:
    """``PLUTO_FILES_URL``, checked now: an ``s3://bucket[/prefix]`` URL, with boto3 present."""
    url = env.get("PLUTO_FILES_URL", "").strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"PLUTO_FILES_URL={url!r} must look like s3://bucket/prefix (or be "
                          "unset, to keep files in PLUTO_FILES_DIR)")
    import importlib.util

    if importlib.util.find_spec("boto3") is None:
        raise ConfigError("PLUTO_FILES_URL is an s3:// URL but boto3 is missing: "
                          "pip install 'pluto-stream[server,s3]'")
    return url


@dataclass(frozen=True)
class ServerSettings:
    """What ``pluto server`` needs; DESIGN.md §2 lists the variables."""

    api_url: str = DEFAULT_API_URL
    db_url: str = DEFAULT_DB_URL
    api_keys: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    """Largest request body in bytes; beyond it the backend answers 413."""
    faults_file: str = ""
    """Test hook (``PLUTO_FAULTS_FILE``): a file selecting an injected ingest fault; see
    ``backend/_faults.py``. Empty (the default) disables it; never set it in production."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's headers (``PLUTO_HEADER_TIMEOUT``);
    then it is closed (slowloris)."""
    body_timeout: float = 60.0
    """Seconds a request's body may take in all (``PLUTO_BODY_TIMEOUT``); then 408."""
    keepalive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open (``PLUTO_KEEPALIVE_TIMEOUT``)."""
    max_connections: int = 1000
    """Open connections plus requests in progress beyond which the server answers 503
    (``PLUTO_MAX_CONNECTIONS``, uvicorn's ``limit_concurrency``)."""
    create_rate: float = 100.0
    """Run creations per second per API key (``PLUTO_CREATE_RATE``; 0 disables); 429 beyond."""
    create_burst: float = 1000.0
    """Creations a key may make at once before the rate applies (``PLUTO_CREATE_BURST``)."""
    tls_cert: str = ""
    """PEM certificate (chain) to serve HTTPS with (``PLUTO_TLS_CERT``), with ``tls_key``."""
    tls_key: str = ""
    files_dir: str = DEFAULT_FILES_DIR
    """Where uploaded files (``PLUTO_FILES_DIR``) are kept, one file per upload."""
    max_file: int = DEFAULT_MAX_FILE
    """Largest file upload in bytes (``PLUTO_MAX_FILE``); streamed to disk, not held."""
    files_url: str = ""
    """``s3://bucket/prefix``: keep files in an S3-compatible bucket (``PLUTO_FILES_URL``, the
    ``s3`` extra) rather than ``files_dir`` (which then only spools uploads)."""
    s3_endpoint: str = ""
    """The bucket's endpoint for an S3-compatible server (``PLUTO_S3_ENDPOINT_URL``); empty:
    AWS. Credentials and region come from boto3's usual chain (``AWS_*``, profile, role)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Settings from ``PLUTO_API_URL``, ``PLUTO_DB_URL``, ``PLUTO_API_KEY[_FILE]``,
        ``PLUTO_MAX_BODY``.

        >>> ServerSettings.from_env({"PLUTO_API_KEY": "k1,k2"}).api_keys
        ('k1', 'k2')
        """
        env = os.environ if env is None else env
        raw_max = env.get("PLUTO_MAX_BODY", "").strip()
        try:
            max_body = int(raw_max) if raw_max else DEFAULT_MAX_BODY
        except ValueError:
            raise ConfigError(f"PLUTO_MAX_BODY={raw_max!r} must be a number of bytes") from None
        if max_body <= 0:
            raise ConfigError(f"PLUTO_MAX_BODY={raw_max!r} must be positive")
        raw_file = env.get("PLUTO_MAX_FILE", "").strip()
        try:
            max_file = int(raw_file) if raw_file else DEFAULT_MAX_FILE
        except ValueError:
            raise ConfigError(f"PLUTO_MAX_FILE={raw_file!r} must be a number of bytes") from None
        settings = cls(
            api_url=env.get("PLUTO_API_URL", "").strip() or DEFAULT_API_URL,
            db_url=env.get("PLUTO_DB_URL", "").strip() or DEFAULT_DB_URL,
            api_keys=_keys(env),
            max_body=max_body,
            faults_file=env.get("PLUTO_FAULTS_FILE", "").strip(),
            header_timeout=env_number(env, "PLUTO_HEADER_TIMEOUT", 10.0),
            body_timeout=env_number(env, "PLUTO_BODY_TIMEOUT", 60.0),
            keepalive_timeout=env_number(env, "PLUTO_KEEPALIVE_TIMEOUT", 5.0),
            max_connections=int(env_number(env, "PLUTO_MAX_CONNECTIONS", 1000, low=0.5)),
            create_rate=env_number(env, "PLUTO_CREATE_RATE", 100.0, low=-1e-9),
            create_burst=env_number(env, "PLUTO_CREATE_BURST", 1000.0, low=0.5),
            tls_cert=_tls_file(env, "PLUTO_TLS_CERT"),
            tls_key=_tls_file(env, "PLUTO_TLS_KEY"),
            files_dir=env.get("PLUTO_FILES_DIR", "").strip() or DEFAULT_FILES_DIR,
            max_file=max_file,
            files_url=_files_url(env),
            s3_endpoint=env.get("PLUTO_S3_ENDPOINT_URL", "").strip(),
        )
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError("HTTPS needs both PLUTO_TLS_CERT and PLUTO_TLS_KEY (PEM files)")
        settings.host_port()  # fail on a bad URL now, not when binding
        check_db_url(settings.db_url)
        return settings

    def host_port(self) -> tuple[str, int]:
        """Where to listen: the host and port of ``api_url``."""
        parts = urlsplit(self.api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"PLUTO_API_URL={self.api_url!r} must look like http://host:port")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"PLUTO_API_URL={self.api_url!r} has an invalid port") from None
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)
