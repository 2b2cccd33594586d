"""What the three deployables share, and how the worker's Redis client is typed.

The SDK, the worker and the server share only public ``pluto`` modules (``pluto.protocol``,
``pluto.errors``, ``pluto.env``, ``pluto.streams``...): a private ``pluto._*`` module may
change with the SDK alone. The worker names every Redis command it sends in one protocol
(``worker/_redis.py``); mypy checks the calls, these tests check the two redis-py clients.
Each deployable reads the environment in its settings module alone (issue 15).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import redis
import redis.client
import redis.cluster
import redis.commands.core

from pluto import streams
from pluto.protocol import GROUP
from tests.conftest import ROOT
from worker import _redis

SHARED_BY = ("worker", "backend")


def private_pluto_imports(source: str) -> list[str]:
    """Every import of a private ``pluto`` module (or a private name of ``pluto``) in ``source``,
    including ``importlib.import_module("pluto._x")``; dunders such as ``__version__`` are fine."""
    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] == "pluto" and any(p.startswith("_") and not p.startswith("__")
                                           for p in parts[1:])
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [node.module] if private(node.module) else [
                f"{node.module}.{a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and private(node.args[0].value)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"):
            found.append(node.args[0].value)
    return found


def test_the_import_check_sees_every_form() -> None:
    source = ("from pluto._settings import env_number\nimport pluto._ops\n"
              "from pluto import _keys, __version__, protocol\nfrom pluto.env import redact\n"
              "importlib.import_module('pluto._resp')\nfrom ._settings import x\n")
    assert private_pluto_imports(source) == ["pluto._settings", "pluto._ops", "pluto._keys",
                                             "pluto._resp"]


@pytest.mark.parametrize("folder", SHARED_BY)
def test_worker_and_backend_import_no_private_pluto_module(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) > 5, files  # the folder is really there
    found = {str(f.relative_to(ROOT)): private_pluto_imports(f.read_text()) for f in files}
    assert {f: names for f, names in found.items() if names} == {}


ENVIRONMENT = {"environ", "environb", "getenv", "getenvb"}
"""What reads the process environment in ``os``."""
SETTINGS_MODULES = {"pluto/_settings.py", "worker/_settings.py", "backend/_settings.py"}
"""The one settings module of each deployable (the SDK and the CLI share ``pluto``'s): the only
places that read the environment, and there only in a ``from_env``, so that every variable is
read once, with the same rule, and a test can pass a mapping instead."""
EXEMPT = {
    "pluto/_servers.py": "copies the whole environment for the child processes it starts",
    "pluto/_sysmetrics.py": "CUDA_VISIBLE_DEVICES: CUDA's variable, not a pluto setting",
}
"""Modules that touch ``os.environ`` without reading a setting from it, and why."""


def environment_reads(source: str) -> list[tuple[int, str]]:
    """``(line, enclosing function or "<module>")`` of every read of the process environment
    in ``source``: ``os.environ`` / ``os.getenv`` under any name ``os`` is imported as, and
    ``from os import environ`` (or ``getenv``)."""
    tree = ast.parse(source)
    names = {a.asname or "os" for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names if a.name == "os" or (a.name.startswith("os.") and not a.asname)}
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module == "os":
                found.extend((child.lineno, function) for a in child.names
                             if a.name in ENVIRONMENT)
            elif (isinstance(child, ast.Attribute) and child.attr in ENVIRONMENT
                  and isinstance(child.value, ast.Name) and child.value.id in names):
                found.append((child.lineno, function))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else function
            visit(child, inner)

    visit(tree, "<module>")
    return sorted(found)


def test_the_environment_check_sees_every_form() -> None:
    source = ("import os\nimport os as o\nimport os.path\nfrom os import environ, getenv as g\n"
              "def from_env():\n    return os.environ.get('A')\n"
              "class C:\n    def f(self):\n        return o.getenv('B')\n"
              "x = os.path.join('a', 'b')\ny = os.environ\n")
    assert environment_reads(source) == [(4, "<module>"), (4, "<module>"), (6, "from_env"),
                                         (9, "f"), (11, "<module>")]


def test_only_the_settings_modules_read_the_environment() -> None:
    """Every other module takes its settings (or an ``env`` mapping) from its deployable's
    settings module, instead of reading ``os.environ`` where it happens to need a value."""
    assert all((ROOT / m).is_file() for m in SETTINGS_MODULES | set(EXEMPT))  # none renamed
    files = sorted(f for folder in ("pluto", "worker", "backend") for f in (ROOT / folder).rglob("*.py"))
    assert len(files) > 30, files
    found = {}
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        reads = environment_reads(path.read_text())
        if name in SETTINGS_MODULES:
            reads = [(line, f) for line, f in reads if f != "from_env"]
        if reads and name not in EXEMPT:
            found[name] = reads
    assert found == {}


def _members(proto: type) -> dict[str, inspect.Signature]:
    """The methods a protocol class itself declares (not ``Protocol``'s machinery)."""
    return {name: inspect.signature(value) for name, value in vars(proto).items()
            if callable(value) and (not name.startswith("_") or name in
                                    ("__call__", "__len__", "__enter__", "__exit__"))}


def _accepts(impl: object, wanted: inspect.Signature) -> bool:
    """Whether ``impl`` takes every parameter the protocol names, by name where it may be given so."""
    have = inspect.signature(impl).parameters  # type: ignore[arg-type]
    if any(p.kind is p.VAR_KEYWORD for p in have.values()):
        return True
    for name, p in wanted.parameters.items():
        if name == "self":
            continue
        if p.kind is p.VAR_POSITIONAL:
            if not any(q.kind is q.VAR_POSITIONAL for q in have.values()):
                return False
        elif name not in have:
            return False
    return True


@pytest.mark.parametrize("proto,classes", [
    (_redis.RedisClient, (redis.Redis, redis.RedisCluster)),
    (streams.GroupReader, (redis.Redis, redis.RedisCluster)),
    (_redis.Pipeline, (redis.client.Pipeline, redis.cluster.ClusterPipeline)),
    (_redis.Script, (redis.commands.core.Script,)),
])
def test_both_redis_clients_take_every_command_the_worker_sends(proto: type,
                                                                classes: tuple[type, ...]) -> None:
    members = _members(proto)
    assert members, proto
    missing = {(cls.__name__, name) for cls in classes for name, sig in members.items()
               if not hasattr(cls, name) or not _accepts(getattr(cls, name), sig)}
    assert missing == set()


def test_every_worker_redis_parameter_is_typed_by_the_protocol() -> None:
    """A client passed as ``r`` is a ``RedisClient`` (or the narrower ``GroupReader``): never
    ``Any`` or untyped, which would switch mypy's checking of its calls off."""
    loose = []
    for path in sorted((ROOT / "worker").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for arg in node.args.args + node.args.kwonlyargs:
                    text = ast.unparse(arg.annotation) if arg.annotation else "(none)"
                    if arg.arg == "r" and text.split(" | ")[0] not in ("RedisClient", "GroupReader"):
                        loose.append(f"{path.name}:{node.lineno} {node.name}(r: {text})")
    assert loose == []


def test_group_state_reads_lag_pending_and_age(r: redis.Redis, prefix: str) -> None:
    stream = f"{prefix}:gs"
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for i in range(5):
        r.xadd(stream, {"i": i})
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=2)  # two delivered, not acknowledged
    state = streams.group_state(r, stream)
    assert {k: state[k] for k in ("length", "lag", "pending", "consumers")} == {
        "length": 5, "lag": 3, "pending": 2, "consumers": 1}
    assert state["oldest_pending_s"] is not None and 0 <= state["oldest_pending_s"] < 3600


def test_group_state_of_odd_keys_is_empty_not_an_error(r: redis.Redis, prefix: str) -> None:
    empty = {"length": 0, "lag": 0, "pending": 0, "oldest_pending_s": None, "consumers": 0}
    assert streams.group_state(r, f"{prefix}:absent") == empty
    r.set(f"{prefix}:plain", "x")  # not a stream: WRONGTYPE is refused, not raised
    assert streams.group_state(r, f"{prefix}:plain") == empty
    r.xadd(f"{prefix}:nogroup", {"a": 1})  # a stream no worker has grouped yet: all of it waits
    assert streams.group_state(r, f"{prefix}:nogroup") == {**empty, "length": 1, "lag": 1}


def test_the_protocol_module_holds_no_redis_call() -> None:
    """``pluto.streams`` reads Redis; ``pluto.protocol`` only defines (keys, formats, rules)."""
    tree = ast.parse(Path(ROOT / "pluto" / "protocol.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m == "redis" or m.startswith("redis.")}, imported


def test_group_state_counts_the_lag_redis_cannot(r: redis.Redis, prefix: str) -> None:
    """After an XDEL among undelivered entries Redis answers ``lag`` NULL; the undelivered
    entries are counted instead, so "entries wait" is never missed (pluto status, gauges)."""
    stream = f"{prefix}:gs-null"
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [r.xadd(stream, {"i": i}) for i in range(6)]
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=2)
    r.xdel(stream, ids[3])
    [group] = r.xinfo_groups(stream)
    assert group["lag"] is None  # what Redis says
    state = streams.group_state(r, stream)
    assert (state["length"], state["lag"], state["pending"]) == (5, 3, 2)
