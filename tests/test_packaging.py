"""How pluto installs: three packages with names of their own, a training install without the
service dependencies, and services that never run code from the caller's working directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pluto import _servers
from tests.conftest import ROOT


@pytest.mark.e2e
def test_the_wheel_holds_no_generic_top_level_module(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("pluto_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pluto", "pluto_worker", "pluto_server"}, tops
    assert "pluto_server/static/index.html" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    base = [line for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert all(("redis" in line or "msgpack" in line) for line in base), base  # no httpx


@pytest.mark.parametrize("command,module,extra", [("server", "starlette", "server"),
                                                  ("worker", "httpx", "worker"),
                                                  ("runs", "httpx", "worker")])
def test_a_missing_extra_is_one_line_naming_the_pip_command(command: str, module: str,
                                                            extra: str) -> None:
    code = (f"import sys; sys.modules[{module!r}] = None; from pluto._cli import main; "
            f"sys.exit(main([{command!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"pluto {command}: needs {module} from the {extra!r} extra: "
                                  f"pip install 'pluto-stream[{extra}]'"), out.stderr


def test_spawned_services_ignore_the_callers_working_directory(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    for name in ("pluto_worker", "pluto_server"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise SystemExit('the caller code ran')\n")
    monkeypatch.chdir(tmp_path)
    code = _servers.module_argv("pluto_worker")[2].replace(
        "runpy.run_module('pluto_worker', run_name='__main__', alter_sys=True)",
        "import pluto_worker; print(pluto_worker.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and str(ROOT / "worker") in out.stdout, out


def test_the_redis_py_floor_is_the_release_whose_api_the_producer_calls() -> None:
    """The producer takes its raw socket with ``connection_pool.get_connection()`` — no
    argument, which redis-py accepts from 5.3 on (5.0-5.2 require a command name), and reads
    RESP2 or RESP3 replies (``protocol=`` exists from 5.0). pyproject must not allow older."""
    import inspect
    import re

    import redis

    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"redis(?:\[[^\]]*\])?>=([0-9.]+)', text)
    assert floor is not None, "pyproject lists redis without a lower bound"
    assert tuple(map(int, floor.group(1).split(".")))[:2] >= (5, 3), floor.group(0)
    calls = re.findall(r"get_connection\(([^)]*)\)",
                       (ROOT / "pluto" / "_producer.py").read_text())
    assert calls == [""], calls  # the call the floor is for
    params = list(inspect.signature(redis.ConnectionPool.get_connection).parameters.values())[1:]
    assert all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params), params  # the installed redis-py takes the call
