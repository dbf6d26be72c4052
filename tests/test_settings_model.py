"""Static settings as one validated model: sections parsed once, messages that name the setting."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tollgate.config.key_names import digest_of
from tollgate.config.load import ConfigError, load_config
from tollgate.config_check import check_files
from tollgate.security.admin import AdminRules
from tollgate.security.principal import Principal
from tollgate.settings import RedisNode, SettingsError, load_settings
from tollgate.snapshot import build_snapshot

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def principal(*roles: str) -> Principal:
    return Principal("p", roles, frozenset(roles), "00000000")


def test_the_default_admin_rule_is_an_equality_on_admin() -> None:
    """Issue 11, item 8: the shipped rule is `EQUAL admin`, not DIAL's `CONTAIN admin`."""
    admins = AdminRules.from_settings(load_settings(environ={}))
    assert admins.allows(principal("admin"))
    assert not admins.allows(principal("not-an-admin"))
    assert not admins.allows(principal("sysadmin", "administrator"))


def test_rule_functions_stay_as_dial_defines_them() -> None:
    rules = '[{"source": "roles", "function": "contain", "targets": ["admin"]}]'
    admins = AdminRules.from_settings(load_settings(environ={"aidial.access.admin.rules": rules}))
    assert admins.allows(principal("not-an-admin"))  # CONTAIN is a substring match
    regex = '[{"source": "roles", "function": "REGEX", "targets": ["ops-[0-9]+"]}]'
    admins = AdminRules.from_settings(load_settings(environ={"aidial.access.admin.rules": regex}))
    assert admins.allows(principal("ops-12")) and not admins.allows(principal("ops-12x"))


def test_redis_settings_are_parsed_once() -> None:
    settings = load_settings(
        environ={
            "aidial.redis.singleServerConfig.address": "rediss://cache:7000",
            "aidial.redis.singleServerConfig.timeout": "250",
            "aidial.redis.singleServerConfig.database": "2",
        }
    )
    assert settings.redis is not None
    server = settings.redis.server
    assert server is settings.redis.single_server_config and server is not None
    assert server.address == RedisNode("cache", 7000, True)
    assert (server.timeout, server.connect_timeout, server.database) == (0.25, 1.0, 2)
    cluster = load_settings(
        environ={"aidial.redis.clusterServersConfig.nodeAddresses": '["a:1", "redis://b"]'}
    ).redis
    assert cluster is not None and cluster.server is cluster.cluster_servers_config
    assert cluster.server is not None
    assert cluster.server.node_addresses == [RedisNode("a", 1, False), RedisNode("b", 6379, False)]
    assert load_settings(environ={}).redis is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"aidial.redis.singleServerConfig.address": "http://x"},
            "setting redis.singleServerConfig.address: expected redis://host:port, got 'http://x'",
        ),
        (
            {"aidial.redis.clusterServersConfig.nodeAddresses": "redis://a:1"},
            "setting redis.clusterServersConfig.nodeAddresses: expected a list",
        ),
        ({"aidial.server": "5"}, "setting server: expected an object, got 5"),
        ({"aidial.access.admin.rules": "[5]"}, r"setting access.admin.rules\[0\]: expected an"),
    ],
)
def test_problems_name_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"aidial.server.port": "x", "aidial.log.level": "loud"})
    assert str(caught.value).splitlines() == [
        "setting server.port: expected a number, got 'x'",
        "setting log.level: expected DEBUG, INFO, WARNING or ERROR, got 'LOUD'",
    ]


def test_settings_do_not_import_security() -> None:
    code = (
        "import sys, tollgate.settings\n"
        "print(any(m.startswith('tollgate.security') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- `SHA256:` names (issue 11, item 11) -------------------------------------------------------


def write(tmp_path: Path, tree: dict[str, object]) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tree, indent=1))
    return str(path)


def test_a_hashed_name_in_upper_case_is_the_hashed_form(tmp_path: Path) -> None:
    secret = "a-long-and-random-secret-0123456789abcdef"
    name = "SHA256:" + hashlib.sha256(secret.encode()).hexdigest().upper()
    tree = {"keys": {name: {"project": "p", "role": "r"}}, "roles": {"r": {}}}
    path = write(tmp_path, tree)
    keys = build_snapshot(load_config([path]).config).keys
    assert keys.lookup_digest(digest_of(secret)) is not None  # the secret authenticates
    assert keys.lookup_digest(digest_of(name)) is None  # the published digest does not
    assert check_files([path]) == []  # not a weak plaintext key


@pytest.mark.parametrize("name", ["sha256:abc", "Sha256:" + "0" * 63, "SHA256:" + "g" * 64])
def test_a_malformed_hashed_name_is_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, {"keys": {name: {"project": "p", "role": "r"}}})
    with pytest.raises(ConfigError) as caught:
        load_config([path])
    [problem] = caught.value.problems
    assert "must be followed by exactly 64 hex digits" in problem
    assert name not in problem  # named by its fingerprint, as every key
    [found] = check_files([path])
    assert found.severity == "error" and found.line == 3


# --- `config check` papercuts (issue 11, item 19) ----------------------------------------------


def test_a_role_the_admin_rules_use_has_an_effect(tmp_path: Path) -> None:
    tree = {"keys": {"k" * 40 + "-0123456789ABCDEF": {"project": "p", "roles": ["admin"]}}}
    path = write(tmp_path, tree)
    rules = load_settings(environ={}).admin_rules
    assert check_files([path], admin_rules=rules) == []
    [warning] = check_files([path])  # without rules that use it, it has none
    assert "has no effect" in warning.message


def test_the_shipped_example_passes_config_check() -> None:
    example = ROOT / "examples" / "aidial.config.json"
    done = subprocess.run(
        [sys.executable, "-m", "tollgate", "config", "check", str(example)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_demo_key_is_not_judged_weak(tmp_path: Path) -> None:
    weak = {"keys": {"demo-key": {"project": "p", "role": "default"}}}
    [warning] = check_files([write(tmp_path, weak)])
    assert warning.message.startswith("weak key")
    weak["keys"]["demo-key"]["demo"] = True  # type: ignore[index]
    assert check_files([write(tmp_path, weak)]) == []
