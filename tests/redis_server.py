"""A real `redis-server` for tests: started on a free loopback port, stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from harness import free_port

STARTUP_TIMEOUT_S = 10.0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


@dataclass
class RedisServer:
    port: int
    pid: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, password or not
    except OSError:
        return False


def start_redis_server(
    work_dir: Path,
    *,
    cluster: bool = False,
    port: int | None = None,
    durable: bool = False,
    password: str | None = None,
) -> RedisServer:
    """A throwaway server: no RDB snapshots, no AOF, files (if any) under `work_dir`.

    With `cluster`, a one-node Redis Cluster that serves all 16384 slots: a cluster client routes
    by slot and refuses a command or script whose declared keys are in more than one slot.
    """
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = port or free_port()
    log = work_dir / f"redis-{port}.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--dir", str(work_dir), "--daemonize", "no"]
    # `durable`: an append-only file synced on every write, so a restart on the same port and
    # directory finds the data again (a crash test needs Redis itself to lose nothing).
    args += (
        ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    )
    if password is not None:
        args += ["--requirepass", password]
    if cluster:
        # The bus port defaults to port + 10000, too high for many free ports: choose it too.
        args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
        args += ["--cluster-port", str(free_port())]
    work_dir.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _answers_ping(port):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            stop_redis_server(RedisServer(port, process.pid, process, log))
            raise RuntimeError(f"redis-server did not answer PING:\n{log.read_text()}")
        time.sleep(0.02)
    server = RedisServer(port, process.pid, process, log)
    if cluster:
        try:
            _serve_all_slots(port, deadline)
        except Exception:
            stop_redis_server(server)
            raise
    return server


def _serve_all_slots(port: int, deadline: float) -> None:
    with redis.Redis(port=port) as client:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the one-node cluster did not become ready")
            time.sleep(0.02)


def stop_redis_server(server: RedisServer) -> None:
    """SIGTERM to the server's pid, SIGKILL if it is still there after 10 s."""
    if server.process.poll() is not None:
        return
    os.kill(server.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
