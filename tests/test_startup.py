"""Starting `tollgate serve`: config sources, and refusing to start on a bad config."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from gateway_config import chat, key_headers
from harness import (
    FakeModel,
    free_port,
    run_gateway_expecting_exit,
    start_gateway,
    stop,
    write_json,
)


def test_invalid_key_stops_start_up_with_file_path_and_message(work_dir: Path) -> None:
    secret = "very-secret-key-material"
    result = run_gateway_expecting_exit(work_dir, [{"keys": {secret: {"role": "default"}}}])
    assert result.returncode == 1
    assert "bad-0.json" in result.stderr
    assert '$.keys["sha256:' in result.stderr
    assert "Project key is undefined" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_syntax_error_and_missing_file(work_dir: Path) -> None:
    broken = work_dir / "broken.json"
    broken.write_text('{"models": }')
    result = run_gateway_expecting_exit(work_dir, [broken, str(work_dir / "absent.json")])
    assert result.returncode == 1
    assert f"{broken}: line 1 column 12: invalid JSON" in result.stderr
    assert "File not found" in result.stderr


def test_config_files_from_settings_and_environment(work_dir: Path, fake_model: FakeModel) -> None:
    models = write_json(
        work_dir / "models.json",
        {
            "models": {"m": {"endpoint": fake_model.endpoint("m")}},
        },
    )
    keys = write_json(
        work_dir / "keys.json", {"keys": {"env-key-123": {"project": "p", "role": "r"}}}
    )
    # config.files comes from the aidial.* variable; the reload period from the settings file.
    gw = start_gateway(
        work_dir,
        [],
        settings={"config": {"reload": 3600000}},
        env={"aidial.config.files": json.dumps([str(models), str(keys)])},
    )
    try:
        response = httpx.post(
            f"{gw.url}/openai/deployments/m/chat/completions",
            headers=key_headers("env-key-123"),
            json=chat(),
        )
        assert response.status_code == 200
    finally:
        stop(gw.process)


def test_aidial_settings_variable(work_dir: Path, fake_model: FakeModel) -> None:
    config = write_json(work_dir / "c.json", {"keys": {"s-key-123": {"project": "p", "role": "r"}}})
    settings = write_json(work_dir / "aidial.settings.json", {"config": {"files": [str(config)]}})
    gw = start_gateway(work_dir, [], env={"AIDIAL_SETTINGS": str(settings)})
    try:
        info = httpx.get(f"{gw.url}/v1/user/info", headers={"Api-Key": "s-key-123"})
        assert info.json() == {"roles": ["r"], "project": "p"}
    finally:
        stop(gw.process)


def test_port_from_the_environment(work_dir: Path) -> None:
    """Without --port, `aidial.server.port` decides (the default would be 8080)."""
    import subprocess
    import sys
    import time

    config = write_json(work_dir / "empty.json", {})
    port = free_port()
    env = {
        "aidial.server.port": str(port),
        "PATH": "/usr/bin:/bin",
        "aidial.limits.embedded.file": "",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/version").status_code == 200
    finally:
        stop(process)


def test_a_port_in_use_stops_start_up_with_a_message(work_dir: Path) -> None:
    import socket
    import subprocess
    import sys

    config = write_json(work_dir / "empty-port.json", {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
        result = subprocess.run(
            [*serve, "--port", str(port), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "aidial.limits.embedded.file": ""},
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
