"""`tollgate keys create|list|show|rotate|revoke` and `tollgate audit` against a real Tollgate.

The commands run as processes, as an operator runs them, on a gateway process whose resource
store is a folder of this module's; the secrets they print must work (or stop working) on the
gateway's very next call, and the admin key must never be printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from gateway_config import chat, error_of
from harness import FakeModel, Gateway, free_port, start_gateway, stop

pytestmark = pytest.mark.e2e

ADMIN_KEY = "keys-cli-admin-key-0123456789abcdef"
USER_KEY = "keys-cli-user-key-0123456789abcdef"
ADMIN_FINGERPRINT = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:8]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fake_model: FakeModel) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("keys-api-cli")
    config = {
        "models": {"m": {"endpoint": fake_model.endpoint("m"), "userRoles": ["basic", "team"]}},
        "keys": {
            ADMIN_KEY: {"project": "ops", "role": "admin"},
            USER_KEY: {"project": "users", "role": "basic"},
        },
        "roles": {"basic": {"limits": {}}, "admin": {}},
    }
    settings = {
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder / "store")}},
    }
    gateway = start_gateway(folder, [config], settings=settings)
    yield gateway
    stop(gateway.process)


def tollgate(
    *args: str,
    key: str | None = ADMIN_KEY,
    stdin: str | None = None,
    url_env: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m tollgate ARGS` with the admin key in its environment (None: unset)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("aidial.", "AIDIAL_", "TOLLGATE_"))
    }
    if key is not None:
        env["TOLLGATE_ADMIN_KEY"] = key
    if url_env is not None:
        env["TOLLGATE_URL"] = url_env
    result = subprocess.run(
        [sys.executable, "-m", "tollgate", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    # Whatever happens, the admin key is never printed.
    assert ADMIN_KEY not in result.stdout and ADMIN_KEY not in result.stderr
    return result


def ok(*args: str, **kwargs: Any) -> str:
    result = tollgate(*args, **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ok_json(*args: str, **kwargs: Any) -> Any:
    return json.loads(ok(*args, "--json", **kwargs))


def call(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/deployments/m/chat/completions",
        headers={"Api-Key": key},
        json=chat(),
        timeout=30,
    )


def secret_of(text: str) -> str:
    """The secret a command printed: the indented line after the one saying it is shown once."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if "will not be shown again" in line:
            return lines[index + 1].strip()
    raise AssertionError(f"no secret in:\n{text}")


def test_create_prints_a_secret_once_that_works(gw: Gateway) -> None:
    out = ok("keys", "create", "ci-bot", "--project", "team-a", "--role", "basic", "--url", gw.url)
    secret = secret_of(out)
    assert secret.startswith("tg-") and out.count(secret) == 1
    fingerprint = hashlib.sha256(secret.encode()).hexdigest()[:8]
    assert f"fingerprint {fingerprint}" in out and "project team-a" in out
    assert call(gw, secret).status_code == 200

    shown = ok_json("keys", "show", "ci-bot", "--url", gw.url)
    assert shown["project"] == "team-a" and shown["roles"] == ["basic"]
    assert shown["fingerprint"] == fingerprint and shown["status"] == "valid"
    assert "key" not in shown and secret not in json.dumps(shown)
    text = ok("keys", "show", "ci-bot", "--url", gw.url)
    assert secret not in text
    assert any(line.split() == ["fingerprint:", fingerprint] for line in text.splitlines())

    again = tollgate(
        "keys", "create", "ci-bot", "--project", "x", "--role", "basic", "--url", gw.url
    )
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("tollgate: 412 Resource already exists")
    assert "exists already" in again.stderr
    assert call(gw, secret).status_code == 200  # the refused create changed nothing


def test_create_with_json_options_and_the_url_from_the_environment(gw: Gateway) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    made = ok_json(
        "keys",
        "create",
        "scripted",
        "--project",
        "team-b",
        "--role",
        "basic",
        "--role",
        "team",
        "--expires-at",
        expires,
        "--ip-range",
        "127.0.0.0/8",
        "--ip-range",
        "10.0.0.0/8",
        "--description",
        "made by a script",
        url_env=gw.url,
    )
    assert set(made) == {"name", "key"} and made["name"] == "scripted"
    assert call(gw, made["key"]).status_code == 200
    shown = ok_json("keys", "show", "scripted", url_env=gw.url)
    assert shown["roles"] == ["basic", "team"]
    assert shown["expiresAt"] == expires.replace("Z", ".000Z")
    assert shown["allowedIpAddressRanges"] == ["127.0.0.0/8", "10.0.0.0/8"]
    assert shown["description"] == "made by a script"


def test_a_secret_from_stdin_is_used_and_never_printed(gw: Gateway) -> None:
    secret = "keys-cli-own-secret-0123456789abcdef"
    out = ok(
        "keys",
        "create",
        "own",
        "--project",
        "p",
        "--role",
        "basic",
        "--key-from-stdin",
        "--url",
        gw.url,
        stdin=secret + "\n",
    )
    assert secret not in out and "from stdin" in out
    assert f"fingerprint {hashlib.sha256(secret.encode()).hexdigest()[:8]}" in out
    assert call(gw, secret).status_code == 200
    empty = tollgate(
        "keys",
        "create",
        "own-2",
        "--project",
        "p",
        "--role",
        "basic",
        "--key-from-stdin",
        "--url",
        gw.url,
        stdin="",
    )
    assert empty.returncode == 2 and "stdin held no secret" in empty.stderr
    assert tollgate("keys", "show", "own-2", "--url", gw.url).returncode == 1  # not made


def test_list_follows_the_pages(gw: Gateway) -> None:
    names = ["list-a", "list-b", "list-c"]
    for name in names:
        ok("keys", "create", name, "--project", "lister", "--role", "basic", "--url", gw.url)
    listed = ok_json("keys", "list", "--page-size", "1", "--url", gw.url)
    found = [item["name"] for item in listed["items"]]
    assert set(names) <= set(found) and found == sorted(found)
    assert all(item["author"] == f"ops (key {ADMIN_FINGERPRINT})" for item in listed["items"])

    text = ok("keys", "list", "--page-size", "2", "--url", gw.url)
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "UPDATED", "AUTHOR"]
    row = next(line for line in lines if line.startswith("list-b "))
    assert f"ops (key {ADMIN_FINGERPRINT})" in row

    long = ok("keys", "list", "--long", "--url", gw.url).splitlines()
    assert long[0].split() == [
        "NAME",
        "PROJECT",
        "ROLES",
        "STATUS",
        "EXPIRES",
        "FINGERPRINT",
        "UPDATED",
    ]
    cells = next(line for line in long if line.startswith("list-c ")).split()
    assert cells[1:5] == ["lister", "basic", "valid", "never"]
    shown = ok_json("keys", "show", "list-c", "--url", gw.url)
    assert cells[5] == shown["fingerprint"]
    detailed = ok_json("keys", "list", "--long", "--url", gw.url)
    assert {"project", "roles", "fingerprint"} <= set(detailed["items"][0])


def test_rotate_with_a_grace_period_and_without(gw: Gateway) -> None:
    first = secret_of(
        ok("keys", "create", "rotating", "--project", "r", "--role", "basic", "--url", gw.url)
    )
    before = datetime.now(UTC)
    out = ok("keys", "rotate", "rotating", "--grace", "15m", "--url", gw.url)
    second = secret_of(out)
    assert second != first and out.count(second) == 1
    assert f"new fingerprint {hashlib.sha256(second.encode()).hexdigest()[:8]}" in out
    until_line = next(line for line in out.splitlines() if "keeps working until" in line)
    until = datetime.fromisoformat(until_line.split("until ")[1].split(",")[0])
    assert timedelta(minutes=14) < until - before < timedelta(minutes=16)
    # Both secrets work during the grace period.
    assert call(gw, second).status_code == 200
    assert call(gw, first).status_code == 200

    other = ok_json(
        "keys", "create", "rotate-now", "--project", "r", "--role", "basic", "--url", gw.url
    )
    old = other["key"]
    rotated = ok_json("keys", "rotate", "rotate-now", "--grace", "0", "--url", gw.url)
    assert set(rotated) == {"name", "fingerprint", "key"}  # no grace: nothing still works
    assert error_of(call(gw, old)) == (401, "Unknown api key")
    assert call(gw, rotated["key"]).status_code == 200
    text = ok("keys", "rotate", "rotate-now", "--grace", "0", "--url", gw.url)
    assert "The old secret is refused from now on." in text
    assert error_of(call(gw, rotated["key"])) == (401, "Unknown api key")
    assert call(gw, secret_of(text)).status_code == 200

    bad = tollgate("keys", "rotate", "rotate-now", "--grace", "soon", "--url", gw.url)
    assert bad.returncode == 2 and "--grace" in bad.stderr
    too_long = tollgate("keys", "rotate", "rotate-now", "--grace", "31d", "--url", gw.url)
    assert too_long.returncode == 1
    assert too_long.stderr.startswith("tollgate: 400 gracePeriodSeconds: expected 0 to")
    missing = tollgate("keys", "rotate", "never-made", "--url", gw.url)
    assert missing.returncode == 1
    assert missing.stderr == "tollgate: 404 Resource not found: keys/platform/never-made\n"


def test_revoke_refuses_the_secret_and_audit_tells_the_story(gw: Gateway) -> None:
    first = secret_of(
        ok("keys", "create", "doomed", "--project", "d", "--role", "basic", "--url", gw.url)
    )
    second = ok_json("keys", "rotate", "doomed", "--grace", "1h", "--url", gw.url)["key"]
    assert call(gw, first).status_code == 200
    out = ok("keys", "revoke", "doomed", "--url", gw.url)
    assert out == "Revoked key doomed: its secret is refused from now on.\n"
    assert error_of(call(gw, second)) == (401, "Unknown api key")
    assert error_of(call(gw, first)) == (401, "Unknown api key")  # its grace ends with it
    again = tollgate("keys", "revoke", "doomed", "--json", "--url", gw.url)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == "tollgate: 404 Resource not found: keys/platform/doomed\n"
    gone = tollgate("keys", "show", "doomed", "--url", gw.url)
    assert (gone.returncode, gone.stderr) == (1, "tollgate: 404 Not found\n")

    entries = ok_json("audit", "--name", "doomed", "--url", gw.url)["items"]
    assert [entry["action"] for entry in entries] == ["delete", "rotate", "create"]
    assert [entry["timeMs"] for entry in entries] == sorted(
        (entry["timeMs"] for entry in entries), reverse=True
    )
    assert all(e["actor"] == {"project": "ops", "key": ADMIN_FINGERPRINT} for e in entries)
    lines = ok("audit", "--name", "doomed", "--url", gw.url).splitlines()
    assert len(lines) == 3
    assert [line.split()[1:4] for line in lines] == [
        ["delete", "key", "doomed"],
        ["rotate", "key", "doomed"],
        ["create", "key", "doomed"],
    ]
    assert all(f"by ops (key {ADMIN_FINGERPRINT})" in line for line in lines)
    assert "gracePeriodSeconds=3600" in lines[1] and "project: none -> d" in lines[2]
    text = "\n".join(lines)
    assert first not in text and second not in text

    newest = ok_json("audit", "--limit", "2", "--page-size", "1", "--url", gw.url)
    assert len(newest["items"]) == 2 and "nextToken" in newest
    assert [e["name"] for e in newest["items"]] == ["doomed", "doomed"]
    assert [e["action"] for e in newest["items"]] == ["delete", "rotate"]
    keys_only = ok_json("audit", "--type", "role", "--url", gw.url)
    assert keys_only == {"items": []}
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert ok("audit", "--since", later, "--url", gw.url) == "no audit entries\n"


def test_a_key_that_is_not_an_admin_is_refused(gw: Gateway) -> None:
    for args in (
        ("keys", "list"),
        ("keys", "create", "nope", "--project", "p", "--role", "basic"),
        ("audit",),
    ):
        result = tollgate(*args, "--url", gw.url, key=USER_KEY)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == "tollgate: 403 User must be admin\n"
        assert USER_KEY not in result.stderr
    unknown = tollgate("keys", "list", "--url", gw.url, key="keys-cli-not-a-key-0123456789")
    assert unknown.returncode == 1 and unknown.stderr.startswith("tollgate: 401 ")


def test_no_admin_key_is_a_usage_error(gw: Gateway) -> None:
    for args in (("keys", "list"), ("audit",), ("keys", "show", "x")):
        result = tollgate(*args, "--url", gw.url, key=None)
        assert (result.returncode, result.stdout) == (2, "")
        assert "TOLLGATE_ADMIN_KEY" in result.stderr
    blank = tollgate("keys", "list", "--url", gw.url, key="  ")
    assert blank.returncode == 2
    # Only the environment holds it: there is no flag for it.
    flag = tollgate("keys", "list", "--url", gw.url, "--admin-key", "x")
    assert flag.returncode == 2 and "unrecognized arguments" in flag.stderr


def test_an_unreachable_gateway_is_named(gw: Gateway) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = tollgate("keys", "list", "--url", url)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"tollgate: cannot reach Tollgate at {url}: connection refused")
    from_env = tollgate("audit", url_env=url)
    assert from_env.returncode == 1 and url in from_env.stderr
    bad = tollgate("keys", "list", "--url", "ftp://127.0.0.1/")
    assert bad.returncode == 2 and "--url" in bad.stderr


def test_help_lists_the_commands() -> None:
    keys = tollgate("keys", "--help", key=None)
    assert keys.returncode == 0
    for command in ("new", "create", "list", "show", "rotate", "revoke"):
        assert command in keys.stdout
    top = tollgate("--help", key=None)
    assert top.returncode == 0 and "audit" in top.stdout
    create = tollgate("keys", "create", "--help", key=None)
    assert "--key-from-stdin" in create.stdout and "TOLLGATE_ADMIN_KEY" in create.stdout
