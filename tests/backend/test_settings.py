"""ServerSettings.from_env and the sqlite URL rules (pure functions, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pluto.errors import ConfigError
from pluto_server._settings import DEFAULT_MAX_BODY, ServerSettings, db_path


def test_defaults() -> None:
    s = ServerSettings.from_env({})
    assert (s.api_url, s.db_url, s.api_keys, s.max_body) == (
        "http://127.0.0.1:8080", "sqlite:///.pluto/pluto.db", (), DEFAULT_MAX_BODY)
    assert s.host_port() == ("127.0.0.1", 8080)
    assert ServerSettings.from_env({"PLUTO_MAX_BODY": "10"}).max_body == 10


def test_db_url_relative_absolute_memory(tmp_path: Path) -> None:
    assert db_path("sqlite:///sub/dir/x.db", cwd=tmp_path) == str(tmp_path / "sub/dir/x.db")
    assert (tmp_path / "sub" / "dir").is_dir()
    assert db_path(f"sqlite:///{tmp_path}/abs.db") == str(tmp_path / "abs.db")
    assert db_path("sqlite:///:memory:") == ":memory:"
    with pytest.raises(ConfigError, match="PLUTO_DB_URL"):
        db_path("postgresql://localhost/pluto")


@pytest.mark.parametrize("env", [{"PLUTO_MAX_BODY": "lots"}, {"PLUTO_MAX_BODY": "-1"},
                                 {"PLUTO_API_URL": "localhost:8080"},
                                 {"PLUTO_API_KEY_FILE": "/nonexistent/keys"}])
def test_bad_settings_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        ServerSettings.from_env(env)
