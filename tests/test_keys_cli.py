"""`tollgate keys new`: a 256-bit key, its `sha256:` name, and an entry the gateway accepts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tollgate.config.load import load_config
from tollgate.security.key_generator import new_key
from tollgate.security.keys import digest_of
from tollgate.snapshot import build_snapshot


def tollgate(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or `python -m tollgate` when there is none)."""
    script = shutil.which("tollgate", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "tollgate"]
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("aidial.", "proxy.")) and name != "AIDIAL_SETTINGS"
    }
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=env)


def new_key_json(*args: str) -> dict[str, Any]:
    result = tollgate("keys", "new", "--json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_human_output_has_key_name_fingerprint_and_entry() -> None:
    result = tollgate("keys", "new")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 8
    secret, name, fingerprint, entry = (lines[i].strip() for i in (1, 3, 5, 7))
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32  # 256 bits
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert name == f"sha256:{digest}"
    assert fingerprint == digest[:8]
    # The placeholders the help promises.
    assert json.loads(entry) == {name: {"project": "my-project", "roles": ["default"]}}


def test_json_output_with_project_and_roles() -> None:
    report = new_key_json("--project", "team-a", "--role", "default", "--role", "power-user")
    assert set(report) == {"key", "name", "fingerprint", "entry"}
    digest = hashlib.sha256(report["key"].encode()).hexdigest()
    assert report["name"] == f"sha256:{digest}"
    assert report["fingerprint"] == digest[:8]
    assert report["entry"] == {
        report["name"]: {"project": "team-a", "roles": ["default", "power-user"]}
    }


def test_every_key_is_new() -> None:
    keys = {new_key_json()["key"] for _ in range(3)}
    assert len(keys) == 3
    assert len({new_key().secret for _ in range(1000)}) == 1000


def test_the_entry_authenticates_the_key_and_passes_the_check(tmp_path: Path) -> None:
    report = new_key_json("--project", "team-a", "--role", "reader")
    config = {
        "models": {"m": {"endpoint": "http://model/x", "userRoles": ["reader"]}},
        "roles": {"reader": {"limits": {"m": {"minute": 1000}}}},
        "keys": report["entry"],
    }
    path = tmp_path / "aidial.config.json"
    path.write_text(json.dumps(config))

    check = tollgate("config", "check", str(path))
    assert (check.returncode, check.stdout) == (0, "no problems found\n")
    assert report["key"] not in path.read_text()  # the config holds no secret

    snapshot = build_snapshot(load_config([str(path)]).config)
    key = snapshot.keys.lookup_digest(digest_of(report["key"]))
    assert key is not None
    assert (key.principal.project, key.principal.roles) == ("team-a", ("reader",))
    assert key.principal.key_fingerprint == report["fingerprint"]


@pytest.mark.parametrize("args", [["--project", ""], ["--role", ""], ["--colour"]])
def test_bad_arguments_are_refused(args: list[str]) -> None:
    result = tollgate("keys", "new", *args)
    assert result.returncode == 2
    assert result.stdout == ""  # no key printed
    assert "usage: tollgate" in result.stderr and "error:" in result.stderr


def test_help_names_the_defaults() -> None:
    result = tollgate("keys", "new", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert 'default "my-project"' in text and 'default "default"' in text


def test_the_other_commands_are_still_there() -> None:
    top = tollgate("--help")
    assert top.returncode == 0
    assert all(command in top.stdout for command in ("serve", "fake-model", "keys", "config"))
    serve = tollgate("serve", "--help")
    assert serve.returncode == 0 and "--config FILE" in serve.stdout
    fake = tollgate("fake-model", "--help")
    assert fake.returncode == 0 and "usage:" in fake.stdout
    missing = tollgate("keys")
    assert missing.returncode == 2 and "usage: tollgate keys" in missing.stderr


class TestNewKey:
    def test_secret_is_not_in_the_repr(self) -> None:
        key = new_key("p", ["r"])
        assert key.secret not in repr(key)
        assert key.name == "sha256:" + digest_of(key.secret).hex()

    @pytest.mark.parametrize(("project", "roles"), [("", ["r"]), ("p", []), ("p", ["r", ""])])
    def test_an_entry_dial_would_reject_is_refused(self, project: str, roles: list[str]) -> None:
        with pytest.raises(ValueError):
            new_key(project, roles)
