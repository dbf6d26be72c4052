"""A real S3-protocol server for tests: moto's, in its own process on a free loopback port.

Why moto (`moto[server]` from PyPI, in the `test` extra): it installs with pip alone on any
machine `scripts/test` sets up (MinIO's and SeaweedFS's servers are neither on PyPI, which has
only MinIO's client SDK, nor in Debian's archive; LocalStack wants Docker); it speaks S3's REST
protocol over HTTP as a real server (obstore talks to it exactly as to AWS: signed requests,
XML listings with continuation tokens, 412 answers); and moto 5.2 honours the preconditions
the store relies on, `If-None-Match: *` and `If-Match: "<etag>"` on PutObject (412
`PreconditionFailed` when they do not hold), which
`tests/test_storage.py::test_s3_server_honours_preconditions` checks with boto3, so an older
moto fails loudly rather than letting the race tests pass by luck. Its ETags are the hex MD5
of the content, as AWS's.

It runs as a separate process (`python -m moto.server`), so its request handling does not share
the test's interpreter, and is stopped by its pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness import free_port

STARTUP_TIMEOUT_S = 30.0
ACCESS_KEY = "tollgate-test"
SECRET_KEY = "tollgate-test-secret"  # moto accepts any credentials; the signature is checked
REGION = "us-east-1"


@dataclass
class S3Server:
    port: int
    pid: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        """`CreateBucket` (obstore creates none); moto needs no signature for it."""
        response = httpx.put(f"{self.endpoint}/{name}", timeout=10)
        if response.status_code not in (200, 409):
            raise RuntimeError(f"CreateBucket {name}: {response.status_code} {response.text}")

    def new_bucket_storage(self) -> dict[str, Any]:
        """A fresh bucket, and the `storage.*` settings of Tollgate's S3 provider on it."""
        bucket = f"tg-{uuid.uuid4().hex[:16]}"
        self.create_bucket(bucket)
        return {
            "provider": "s3",
            "bucket": bucket,
            "endpoint": self.endpoint,
            "identity": ACCESS_KEY,
            "credential": SECRET_KEY,
            "overrides": {"jclouds.regions": REGION},
        }


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_s3_server(work_dir: Path) -> S3Server:
    port = free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / f"moto-{port}.log"
    env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = S3Server(port, process.pid, process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _listening(port):
        if process.poll() is not None:
            raise RuntimeError(f"moto exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            stop_s3_server(server)
            raise RuntimeError(f"moto did not listen on {port}:\n{log.read_text()}")
        time.sleep(0.05)
    return server


def stop_s3_server(server: S3Server) -> None:
    """SIGTERM to the server's pid, SIGKILL if it is still there after 10 s."""
    if server.process.poll() is not None:
        return
    os.kill(server.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
