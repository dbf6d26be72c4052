"""Applications built with `aidial-sdk` as real upstream processes (uvicorn on loopback)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness import _wait_healthy, free_port

TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class App:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, deployment: str, api: str = "chat/completions") -> str:
        return f"{self.url}/openai/deployments/{deployment}/{api}"

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=10).json()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_app(
    log_dir: Path,
    module: str,
    *,
    port: int | None = None,
    dial_url: str,
    env: dict[str, str] | None = None,
) -> App:
    """Run `uvicorn apps.<module>:app` on `port` (a free one by default).

    The port can be chosen before Tollgate starts, so Tollgate's config can name the app's
    endpoint and the app can be given Tollgate's URL (`DIAL_URL`).
    """
    port = port or free_port()
    log = log_dir / f"app-{module}-{port}.log"
    process_env = dict(os.environ)
    process_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS_DIR), process_env.get("PYTHONPATH", "")) if p
    )
    process_env["DIAL_URL"] = dial_url
    process_env.update(env or {})
    args = [sys.executable, "-m", "uvicorn", f"apps.{module}:app"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=process_env, cwd=TESTS_DIR
        )
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return App(port, process, log)
