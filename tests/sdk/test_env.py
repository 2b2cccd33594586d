"""pluto.env: how the SDK, the worker and the server read PLUTO_* variables, alike."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from pluto import env
from pluto.errors import ConfigError


def test_its_examples_hold() -> None:
    result = doctest.testmod(env)
    assert result.attempted >= 3 and result.failed == 0, result


@pytest.mark.parametrize("raw", ["soon", "nan", "inf", "-inf", "0", "-1", "1e400"])
def test_a_bad_number_is_one_config_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"PLUTO_X={raw!r}"):
        env.env_number({"PLUTO_X": raw}, "PLUTO_X", 5.0)


def test_numbers_blank_default_and_bound() -> None:
    assert env.env_number({}, "PLUTO_X", 5.0) == 5.0
    assert env.env_number({"PLUTO_X": "  "}, "PLUTO_X", 5.0) == 5.0
    assert env.env_number({"PLUTO_X": " 2.5 "}, "PLUTO_X", 5.0) == 2.5
    assert env.env_number({"PLUTO_X": "0"}, "PLUTO_X", 5.0, low=-0.5) == 0.0


@pytest.mark.parametrize("raw,want", [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                      ("0", False), ("", False), ("no", False), ("2", False)])
def test_flags(raw: str, want: bool) -> None:
    assert env.env_flag({"PLUTO_F": raw}, "PLUTO_F") is want
    assert env.env_flag({}, "PLUTO_F") is False


def test_redis_tls_reads_only_what_it_is_handed(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    monkeypatch.setenv("PLUTO_REDIS_CA", str(ca))  # the process environment is not read here
    assert env.redis_tls("rediss://h:6380/0") == {"ssl_cert_reqs": "required"}
    assert env.redis_tls("rediss://h:6380/0", {"PLUTO_REDIS_CA": str(ca)}) == {
        "ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
    assert env.redis_tls("redis://h:6379/0", {"PLUTO_REDIS_CA": str(ca)}) == {}
    with pytest.raises(ConfigError, match="PLUTO_REDIS_CA='/nonexistent' is not a readable"):
        env.redis_tls("rediss://h/0", ca="/nonexistent")
    with pytest.raises(ConfigError, match="needs both"):
        env.redis_tls("rediss://h/0", {"PLUTO_REDIS_CERT": str(ca)})


@pytest.mark.parametrize("url,shown", [
    ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
    ("rediss://:p%40ss@h/0", "rediss://:***@h/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://u:pw@h:notaport/0", "redis://u:pw@h:notaport/0"),  # unparsable: as given
])
def test_redact(url: str, shown: str) -> None:
    assert env.redact(url) == shown
