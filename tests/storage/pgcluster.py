"""A throwaway PostgreSQL cluster for tests and benches: ``initdb`` + ``postgres`` on a free
loopback port in a temporary directory, stopped by its pid.

The server binaries come from PATH, else ``/usr/lib/postgresql/*/bin`` (``.ci/run`` installs
them with apt when missing). PostgreSQL refuses to run as root, so as root the cluster runs as
the ``postgres`` system user (created if missing) and its directory is given to that user. A
PostgreSQL already running on the machine is never used.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from typing_extensions import Self

from pluto import _servers

USER = "pluto"
"""The superuser ``initdb`` creates (trust auth on loopback: a throwaway cluster only)."""


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    return None


def _as_user() -> dict[str, Any]:
    """Popen arguments that drop root to the ``postgres`` user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid}


class Cluster:
    """``with Cluster() as c: c.url`` (database ``postgres``); ``c.new_database()`` for more."""

    def __init__(self, base: Path | None = None) -> None:
        initdb, postgres = binary("initdb"), binary("postgres")
        if not initdb or not postgres:
            raise RuntimeError("PostgreSQL server binaries (initdb, postgres) not found: "
                               "apt-get install postgresql (or set PLUTO_TEST_DB_URL)")
        self.dir = Path(tempfile.mkdtemp(prefix="pluto-pg-", dir=base))
        self.port = _servers.free_port()
        self._initdb, self._postgres = initdb, postgres
        self.child: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def start(self, max_connections: int = 200) -> Cluster:
        user = _as_user()
        if user:
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", user["group"])
        data = self.dir / "data"
        subprocess.run([self._initdb, "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8",
                        "--locale=C", "--no-sync"], check=True, capture_output=True, **user)
        # fsync off: a test cluster trades durability for speed (the benches say so too).
        with open(self.dir / "postgres.log", "ab") as log:
            self.child = subprocess.Popen(
                [self._postgres, "-D", str(data), "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"max_connections={max_connections}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "shared_buffers=128MB"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **user)
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL."""
        return new_database(self.url, prefix)

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the postmaster we started, then remove its directory."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(2)
            try:
                self.child.wait(20)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_database(url: str, prefix: str = "t") -> str:
    """A fresh database on the server of ``url`` (which may be PLUTO_TEST_DB_URL); its URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
