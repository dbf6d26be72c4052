"""Static settings: defaults, settings file, `aidial.*` variables (spec auth-limits 1.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tollgate.settings import SettingsError, load_settings, settings_from_env


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.port == 8080
    assert settings.reload_ms == 60000
    assert settings.config_files == ()
    assert settings.per_request_key_ttl_s == 1800
    assert settings.proxy_count == 0
    assert settings.overwrite_arrays is False


def test_env_values_are_typed_like_vertx_config() -> None:
    tree = settings_from_env(
        {
            "aidial.config.reload": "5000",
            "aidial.config.files": '["/a.json", "/b.json"]',
            "aidial.config.jsonMergeStrategy.overwriteArrays": "true",
            "proxy.server.host": "127.0.0.1",
            "aidial.ratio": "0.5",
            "unrelated": "x",
        }
    )
    assert tree == {
        "config": {
            "reload": 5000,
            "files": ["/a.json", "/b.json"],
            "jsonMergeStrategy": {"overwriteArrays": True},
        },
        "server": {"host": "127.0.0.1"},
        "ratio": 0.5,
    }


def test_precedence_file_then_env_then_command_line(tmp_path: Path) -> None:
    file = tmp_path / "settings.json"
    file.write_text(
        json.dumps({"config": {"reload": 1000, "files": ["/f.json"]}, "server": {"port": 1}})
    )
    env = {"AIDIAL_SETTINGS": str(file), "aidial.config.reload": "2000"}
    settings = load_settings(environ=env)
    assert (settings.reload_ms, settings.config_files, settings.port) == (2000, ("/f.json",), 1)
    settings = load_settings(environ=env, overrides={"server": {"port": 9}})
    assert settings.port == 9


def test_settings_argument_replaces_the_variable(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.json"
    chosen.write_text('{"perRequestApiKey": {"ttl": 60}}')
    settings = load_settings(str(chosen), environ={"AIDIAL_SETTINGS": str(tmp_path / "missing")})
    assert settings.per_request_key_ttl_s == 60


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "invalid JSON at line 1 column 2"),
        ("[]", "top level must be a JSON object"),
        ('{"config": {"reload": "soon"}}', "setting config.reload: expected a number"),
        ('{"config": {"files": {"a": 1}}}', "setting config.files: expected a list of paths"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "s.json"
    file.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_settings(str(file), environ={})


def test_missing_settings_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read file"):
        load_settings(environ={"AIDIAL_SETTINGS": str(tmp_path / "none.json")})


def test_server_limits_default_to_production_values() -> None:
    settings = load_settings(environ={})
    assert settings.shutdown_grace_s == 30
    assert settings.keep_alive_timeout_s == 75
    assert settings.body_read_timeout_s == 60
    assert settings.write_stall_timeout_s == 60
    assert settings.max_header_size == 8190
    assert settings.max_headers == 128


def test_server_limits_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"server": {"shutdownGracePeriod": 5000, "maxHeaders": 64}}))
    settings = load_settings(
        str(path),
        environ={
            "aidial.server.bodyReadTimeout": "2500",
            "aidial.server.maxHeaderSize": "16384",
            "aidial.server.writeStallTimeout": "1500",
        },
    )
    assert settings.write_stall_timeout_s == 1.5
    assert settings.shutdown_grace_s == 5
    assert settings.body_read_timeout_s == 2.5
    assert settings.max_headers == 64
    assert settings.max_header_size == 16384
    assert settings.keep_alive_timeout_s == 75


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("shutdownGracePeriod", 0),
        ("keepAliveTimeout", -1),
        ("maxHeaderSize", "big"),
        ("writeStallTimeout", 0),
    ],
)
def test_server_limits_must_be_positive_numbers(name: str, value: object) -> None:
    with pytest.raises(SettingsError, match=f"setting server.{name}"):
        load_settings(environ={}, overrides={"server": {name: value}})


def test_enforce_during_stream_is_off_by_default_and_a_boolean(tmp_path: Path) -> None:
    """`limits.enforceDuringStream` (compatibility C79): false unless set to true."""
    assert load_settings(environ={}).enforce_during_stream is False
    on = load_settings(environ={"aidial.limits.enforceDuringStream": "true"})
    assert on.enforce_during_stream is True
    file = tmp_path / "enforce.json"
    file.write_text(json.dumps({"limits": {"enforceDuringStream": True}}))
    assert load_settings(str(file), environ={}).enforce_during_stream is True
    off = load_settings(str(file), environ={"aidial.limits.enforceDuringStream": "false"})
    assert off.enforce_during_stream is False
    for value in ("yes", 1, None):
        with pytest.raises(
            SettingsError, match=r"setting limits\.enforceDuringStream: expected true or false"
        ):
            load_settings(environ={}, overrides={"limits": {"enforceDuringStream": value}})
