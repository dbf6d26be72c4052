"""`POST /v1/ops/config/reload` (spec auth-limits 6.4): administrators reload the config now.

Administrators are the callers matching `access.admin.rules` (static settings), evaluated
against the API key's roles; anyone else gets 403 `User must be admin`. The answer is the config
now serving, without a secret; a file that cannot be used is 500 with its problems, and the
previous config keeps serving.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import error_of
from harness import FakeModel, Gateway, free_port, start_gateway, stop, write_json

ADMIN_KEY = "reload-admin-key-0123456789"
SYSADMIN_KEY = "reload-sysadmin-key-0123456789"
USER_KEY = "reload-user-key-0123456789"
NEW_KEY = "reload-new-key-0123456789"
UPSTREAM_KEY = "reload-upstream-secret-0123"
EXTRA_SECRET = "reload-extra-data-secret-0123"
URL_PASSWORD = "reload-url-password-0123"
SECRETS = (ADMIN_KEY, SYSADMIN_KEY, USER_KEY, NEW_KEY, UPSTREAM_KEY, EXTRA_SECRET, URL_PASSWORD)


def config(fake: FakeModel, *extra_keys: str) -> dict[str, Any]:
    keys: dict[str, Any] = {
        ADMIN_KEY: {"project": "ops", "role": "admin"},
        SYSADMIN_KEY: {"project": "ops", "roles": ["sysadmin"]},
        USER_KEY: {"project": "users", "role": "default"},
    }
    for key in extra_keys:
        keys[key] = {"project": "late", "role": "default"}
    return {
        "models": {
            "m": {
                "endpoint": fake.endpoint("m"),
                "upstreams": [
                    {
                        "endpoint": f"https://svc:{URL_PASSWORD}@provider.example/v1",
                        "key": UPSTREAM_KEY,
                        "extraData": {"region": "eu", "apiKey": EXTRA_SECRET},
                    }
                ],
            }
        },
        "keys": keys,
    }


def reload(gw: Gateway, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"Api-Key": key}
    return httpx.post(f"{gw.url}/v1/ops/config/reload", headers=headers, timeout=30)


def info_status(gw: Gateway, key: str) -> int:
    return httpx.get(f"{gw.url}/v1/user/info", headers={"Api-Key": key}).status_code


@pytest.fixture
def reloading(work_dir: Path, fake_model: FakeModel) -> Iterator[tuple[Gateway, Path]]:
    path = write_json(work_dir / f"reload-{free_port()}.json", config(fake_model))
    gw = start_gateway(work_dir, [path])  # the periodic reload is a minute away
    yield gw, path
    stop(gw.process)


def test_only_admins_may_reload(reloading: tuple[Gateway, Path]) -> None:
    gw, _ = reloading
    assert error_of(reload(gw, USER_KEY)) == (403, "User must be admin")
    assert error_of(reload(gw, None))[0] == 401
    # The default rule is an equality on the role "admin" (issue 11, item 8): a role that
    # merely contains the word, as DIAL's CONTAIN default let in, is not an administrator.
    assert reload(gw, ADMIN_KEY).status_code == 200
    assert error_of(reload(gw, SYSADMIN_KEY)) == (403, "User must be admin")


def test_reload_applies_the_files_and_answers_without_secrets(
    reloading: tuple[Gateway, Path], fake_model: FakeModel
) -> None:
    gw, path = reloading
    assert info_status(gw, NEW_KEY) == 401
    write_json(path, config(fake_model, NEW_KEY))
    response = reload(gw, ADMIN_KEY)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert info_status(gw, NEW_KEY) == 200  # at once, not at the next period

    body = response.json()
    upstream = body["models"]["m"]["upstreams"][0]
    assert "key" not in upstream
    assert upstream["extraData"] == {"region": "eu", "apiKey": "********"}
    assert upstream["endpoint"] == "https://svc:********@provider.example/v1"

    # Keys are named by fingerprint; their settings are kept.
    def name(key: str) -> str:
        return f"sha256:{hashlib.sha256(key.encode()).hexdigest()[:8]}…"

    assert len(body["keys"]) == 4
    assert body["keys"][name(NEW_KEY)]["project"] == "late"
    assert body["keys"][name(ADMIN_KEY)]["role"] == "admin"
    for secret in SECRETS:
        assert secret not in response.text
        assert hashlib.sha256(secret.encode()).hexdigest() not in response.text


def test_broken_files_keep_the_previous_config(
    reloading: tuple[Gateway, Path], fake_model: FakeModel
) -> None:
    gw, path = reloading
    path.write_text('{"keys": {')
    status, message = error_of(reload(gw, ADMIN_KEY))
    assert status == 500
    assert "invalid JSON" in message and str(path) in message
    assert info_status(gw, USER_KEY) == 200

    # Valid JSON, invalid config: nothing of it applies (not even the valid new key).
    broken = config(fake_model, NEW_KEY)
    broken["keys"]["reload-roleless-key-0123456789"] = {"project": "p"}
    write_json(path, broken)
    status, message = error_of(reload(gw, ADMIN_KEY))
    assert status == 500
    assert "Invalid key: at least one role must be assigned to the key p" in message
    assert "reload-roleless-key-0123456789" not in message
    assert info_status(gw, NEW_KEY) == 401
    assert info_status(gw, USER_KEY) == 200
    assert gw.process.poll() is None


def test_rules_from_the_settings(work_dir: Path, fake_model: FakeModel) -> None:
    rules = [{"source": "roles", "function": "REGEX", "targets": ["def.*"]}]
    gw = start_gateway(
        work_dir, [config(fake_model)], settings={"access": {"admin": {"rules": rules}}}
    )
    try:
        assert reload(gw, USER_KEY).status_code == 200  # role "default"
        assert error_of(reload(gw, ADMIN_KEY)) == (403, "User must be admin")
    finally:
        stop(gw.process)

    # A rule on a JWT claim never matches an API key; no rules at all: nobody (newest DIAL).
    for rules in ([{"source": "groups", "function": "EQUAL", "targets": ["admin"]}], []):
        gw = start_gateway(
            work_dir, [config(fake_model)], settings={"access": {"admin": {"rules": rules}}}
        )
        try:
            for key in (ADMIN_KEY, USER_KEY):
                assert error_of(reload(gw, key)) == (403, "User must be admin")
        finally:
            stop(gw.process)


def test_a_malformed_rule_stops_the_start(work_dir: Path, fake_model: FakeModel) -> None:
    settings = write_json(
        work_dir / "bad-rules.json",
        {"access": {"admin": {"rules": [{"source": "roles", "function": "LIKE", "targets": []}]}}},
    )
    config_file = write_json(work_dir / "bad-rules-config.json", config(fake_model))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"),
            *(
                "--port",
                str(free_port()),
                "--settings",
                str(settings),
                "--config",
                str(config_file),
            ),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "access.admin.rules[0].function: expected EQUAL, CONTAIN or REGEX" in result.stderr


def test_a_per_request_key_is_never_admin(
    reloading: tuple[Gateway, Path], fake_model: FakeModel
) -> None:
    """An application holds a per-request key during one call: it acts as the root caller, but
    never as an administrator, even when the root caller is one (newest DIAL)."""
    gw, _ = reloading
    headers = {
        "Api-Key": ADMIN_KEY,
        "Content-Type": "application/json",
        "X-Fake-Chunks": "4",
        "X-Fake-Chunk-Delay-Ms": "300",
    }
    body = {"stream": True, "messages": [{"role": "user", "content": "hi"}]}
    fake_model.clear()
    with httpx.stream(
        "POST", f"{gw.url}/openai/deployments/m/chat/completions", headers=headers, json=body
    ) as stream:
        chunks = stream.iter_raw()
        next(chunks)  # the hop is under way: its key lives until the stream ends
        hop_key = dict(fake_model.last()["headers"])["Api-Key"]
        assert hop_key != ADMIN_KEY
        assert info_status(gw, hop_key) == 200  # a live key...
        assert error_of(reload(gw, hop_key)) == (403, "User must be admin")  # ...not an admin's
        b"".join(chunks)


def test_rules_are_checked_with_the_settings() -> None:
    """`serve`, `config check` and `usage` all refuse a malformed rule (via load_settings)."""
    from tollgate.settings import SettingsError, load_settings

    for rules, message in (
        ('{"source": "roles"}', "access.admin.rules: expected a list of rules"),
        ('[{"source": "roles", "function": "REGEX", "targets": ["("]}]', "invalid regular"),
        ('[{"function": "EQUAL", "targets": ["a"]}]', r"rules\[0\].source: expected a claim"),
        ('[{"source": "roles", "function": "EQUAL", "targets": "admin"}]', "a list of strings"),
    ):
        with pytest.raises(SettingsError, match=message):
            load_settings(environ={"aidial.access.admin.rules": rules})
    ok = '[{"source": "roles", "function": "equal", "targets": ["ops"]}]'
    assert load_settings(environ={"aidial.access.admin.rules": ok}).raw["access"]["admin"]
