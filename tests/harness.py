"""Real processes for end-to-end tests: a fake model server and Tollgate, over loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

STARTUP_TIMEOUT_S = 20.0
TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{url} did not become healthy:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FakeModel:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, deployment: str, api: str = "chat/completions") -> str:
        return f"{self.url}/openai/deployments/{deployment}/{api}"

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(f"{self.url}/_fake/requests").json()
        return result

    def last(self) -> dict[str, Any]:
        recorded = self.requests()
        assert recorded, "the fake model received no request"
        return recorded[-1]

    def clear(self) -> None:
        httpx.delete(f"{self.url}/_fake/requests")


def start_fake_model(log_dir: Path) -> FakeModel:
    port = free_port()
    log = log_dir / f"fake-model-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tollgate.fake_model", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return FakeModel(port, process)


@dataclass
class Gateway:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    config_files: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2))
    return path


def start_gateway(
    work_dir: Path,
    configs: Sequence[Mapping[str, Any] | Path],
    *,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    log_level: str = "INFO",
) -> Gateway:
    """Run `tollgate serve` on a free port with the given config files (dicts are written out)."""
    port = free_port()
    files: list[Path] = []
    for index, config in enumerate(configs):
        if isinstance(config, Path):
            files.append(config)
        else:
            files.append(write_json(work_dir / f"config-{port}-{index}.json", config))
    args = [sys.executable, "-m", "tollgate", "--log-level", log_level, "serve"]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    for file in files:
        args += ["--config", str(file)]
    if settings is not None or "AIDIAL_SETTINGS" not in (env or {}):
        settings = own_storage(settings, work_dir / f"storage-{port}")
        args += ["--settings", str(write_json(work_dir / f"settings-{port}.json", settings))]
    args += list(extra_args)
    log = work_dir / f"gateway-{port}.log"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith(("aidial.", "AIDIAL_"))}
    # Each gateway counts usage in a file of its own unless the test shares one on purpose.
    process_env["aidial.limits.embedded.file"] = str(work_dir / f"usage-{port}.sqlite")
    process_env.update(env or {})
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=process_env)
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return Gateway(port, process, log, files)


def own_storage(settings: Mapping[str, Any] | None, folder: Path) -> dict[str, Any]:
    """`settings` with a resource store of the gateway's own (`folder`), unless they name
    one: gateways of one test session must not share API-managed keys by accident."""
    tree = dict(settings or {})
    if "storage" not in tree:
        tree["storage"] = {"overrides": {"jclouds.filesystem.basedir": str(folder)}}
    return tree


def run_gateway_expecting_exit(
    work_dir: Path, configs: Sequence[Mapping[str, Any] | Path | str]
) -> subprocess.CompletedProcess[str]:
    """Run `tollgate serve` that is expected to refuse to start; returns its result."""
    args = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
    args += ["--port", str(free_port())]
    for index, config in enumerate(configs):
        if isinstance(config, Mapping):
            config = write_json(work_dir / f"bad-{index}.json", config)
        args += ["--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def kill(process: subprocess.Popen[bytes]) -> None:
    """Stop at once, as a crash would."""
    if process.poll() is None:
        process.kill()
        process.wait()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `check` (every 50 ms) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


class Relay:
    """The relay interceptor service (`apps/relay_interceptor.py`): one process, one
    interceptor per path prefix."""

    def __init__(self, port: int, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.process = process

    def endpoint(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/chat/completions"

    def got(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(
            f"http://127.0.0.1:{self.port}/_test/requests/{name}"
        ).json()
        return result

    def clear(self) -> None:
        httpx.delete(f"http://127.0.0.1:{self.port}/_test/requests")


def start_relay(log_dir: Path, port: int, dial_url: str) -> Relay:
    log = log_dir / f"relay-interceptor-{port}.log"
    args = [sys.executable, str(TESTS_DIR / "apps" / "relay_interceptor.py")]
    args += ["--port", str(port), "--dial-url", dial_url]
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return Relay(port, process)
