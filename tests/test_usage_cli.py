"""`tollgate usage`: usage and remaining limits per project and deployment, from the store.

Calls go through a real Tollgate; the command then reads the embedded SQLite file (while the
gateway runs, read-only, and after it stopped) or Redis, as the settings say.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway_config import chat
from harness import FakeModel, Gateway, free_port, start_gateway, stop, write_json
from redis_server import RedisServer, start_redis_server, stop_redis_server

KEY = "usage-cli-key-0123456789"
OTHER_KEY = "usage-cli-other-key-0123456789"


def config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {
            "metered": {
                "endpoint": fake.endpoint("metered"),
                "pricing": {"unit": "token", "prompt": "0.5", "completion": "1"},
            },
            "open": {"endpoint": fake.endpoint("open")},
            "idle": {"endpoint": fake.endpoint("idle")},
        },
        "keys": {
            KEY: {"project": "team-usage", "role": "member"},
            OTHER_KEY: {"project": "bystander", "role": "member"},
        },
        "roles": {
            "member": {
                "limits": {"metered": {"minute": "1000", "requestDay": "10"}},
                "costLimit": {"day": "100"},
            }
        },
    }


def call(gw: Gateway, deployment: str, key: str = KEY) -> None:
    response = httpx.post(
        f"{gw.url}/openai/deployments/{deployment}/chat/completions",
        headers={"Api-Key": key, "Content-Type": "application/json"},
        json=chat("one two three"),  # 3 prompt tokens; the fake answers with 5
        timeout=30,
    )
    assert response.status_code == 200, response.text


def usage(
    config_file: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("aidial.", "AIDIAL_"))}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tollgate", "usage", "--config", str(config_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


def report(config_file: Path, *args: str, env: Mapping[str, str]) -> dict[str, Any]:
    result = usage(config_file, "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = orjson.loads(result.stdout)
    return parsed


def check_team(figures: dict[str, Any]) -> None:
    """Two calls to `metered`, one to `open`, as `make_calls` does."""
    metered = figures["deployments"]["metered"]
    assert metered["tokens"]["minute"] == {"used": 16, "limit": 1000, "remaining": 984}
    assert metered["tokens"]["day"]["used"] == 16 and metered["tokens"]["day"]["limit"] is None
    assert metered["requests"]["day"]["used"] == 2
    assert metered["requests"]["day"]["remaining"] == 8
    assert "resetsAt" in metered["requests"]["day"]
    assert metered["cost"]["day"] == pytest.approx(2 * (1.5 + 5))
    assert figures["deployments"]["open"]["tokens"]["day"]["used"] == 8
    # `idle` was not used and has no limit of its own: left out.
    assert "idle" not in figures["deployments"]
    assert figures["cost"]["day"]["used"] == pytest.approx(13.0)
    assert figures["cost"]["day"]["limit"] == 100
    assert figures["cost"]["day"]["remaining"] == pytest.approx(87.0)


def make_calls(gw: Gateway) -> None:
    call(gw, "metered")
    call(gw, "metered")
    call(gw, "open")


@pytest.fixture
def config_file(work_dir: Path, fake_model: FakeModel) -> Path:
    return write_json(work_dir / f"usage-config-{free_port()}.json", config(fake_model))


def test_embedded_file_while_running_and_after(work_dir: Path, config_file: Path) -> None:
    usage_file = work_dir / f"usage-cli-{free_port()}.sqlite"
    env = {"aidial.limits.embedded.file": str(usage_file)}
    gw = start_gateway(work_dir, [config_file], env=env)
    try:
        make_calls(gw)
        time.sleep(1.5)  # the file is written every flushInterval (1 s)
        running = report(config_file, env=env)
        assert running["store"] == "embedded" and running["file"] == str(usage_file)
        check_team(running["projects"]["team-usage"])
        assert running["projects"]["bystander"]["cost"]["day"]["used"] == 0
        call(gw, "open")  # the gateway still writes the file the command read
    finally:
        stop(gw.process)

    stopped = report(config_file, "--project", "team-usage", env=env)
    assert list(stopped["projects"]) == ["team-usage"]
    assert stopped["projects"]["team-usage"]["deployments"]["open"]["requests"]["day"]["used"] == 2

    table = usage(config_file, "--project", "team-usage", env=env)
    assert table.returncode == 0, table.stderr
    assert "project team-usage" in table.stdout
    assert "minute 16/1000 (984 left)" in table.stdout
    assert "day 2/10 (8 left)" in table.stdout
    assert KEY not in table.stdout and "bystander" not in table.stdout


def test_errors(work_dir: Path, config_file: Path) -> None:
    missing = usage(config_file, env={"aidial.limits.embedded.file": str(work_dir / "nope.db")})
    assert missing.returncode == 1
    assert "no usage file at" in missing.stderr
    unknown = usage(
        config_file,
        "--project",
        "nobody",
        env={"aidial.limits.embedded.file": str(work_dir / "nope.db")},
    )
    assert unknown.returncode == 1
    assert "no key of project 'nobody' in the config" in unknown.stderr
    unreachable = usage(
        config_file,
        env={"aidial.redis.singleServerConfig.address": f"redis://127.0.0.1:{free_port()}"},
    )
    assert unreachable.returncode == 1
    assert "cannot read usage from Redis" in unreachable.stderr


@pytest.fixture
def redis(work_dir: Path) -> Iterator[RedisServer]:
    server = start_redis_server(work_dir / "redis-usage-cli")
    yield server
    stop_redis_server(server)


def test_redis(work_dir: Path, config_file: Path, redis: RedisServer) -> None:
    env = {"aidial.redis.singleServerConfig.address": redis.url}
    gw = start_gateway(work_dir, [config_file], env=env)
    try:
        make_calls(gw)
        call(gw, "open", key=OTHER_KEY)
    finally:
        stop(gw.process)  # background settles are awaited at stop
    figures = report(config_file, env=env)
    assert figures["store"] == "redis"
    check_team(figures["projects"]["team-usage"])
    bystander = figures["projects"]["bystander"]["deployments"]
    assert bystander["open"]["tokens"]["day"]["used"] == 8
    assert "metered" in bystander and bystander["metered"]["requests"]["day"]["used"] == 0
