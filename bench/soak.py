"""Soak: 20,000 calls of mixed kinds against one `tollgate serve`, with aborted connections in
between, and the gateway's RSS and open file descriptors before and after (issue 11).

    .venv/bin/python bench/soak.py [--calls 20000] [--concurrency 32] [--warmup 2000]

The kinds, in a fixed rotation: plain chat, streamed chat, embeddings, `GET /openai/models`,
`GET /v1/user/limits`, a 404 (unknown deployment), a 401 (unknown key), a client that sends half
a request and closes, and a client that closes mid-stream. RSS (`VmRSS`) and the number of open
descriptors are read from `/proc/<pid>` after the warm-up and after the run, each time with the
client's connections closed, the gateway's idle upstream connections expired and its descriptor
count settled. Exit status 1 when a call
got an unexpected status or either figure grew by 10% or more.

The fake model and the gateway run on free ports of 127.0.0.1 and are stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

import run  # bench/run.py: the same servers and config as the benchmark

EMBED_MODEL = "bench-embed"
MAX_GROWTH = 0.10
CHAT = json.dumps({"messages": [{"role": "user", "content": "Say hello"}]}).encode()
STREAM = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
EMBED = json.dumps({"input": ["soak test text"]}).encode()
# A stream long enough that a client closing after its first bytes leaves it mid-way.
LONG_STREAM = {"X-Fake-Chunks": "40", "X-Fake-Chunk-Delay-Ms": "2"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2_000)
    return parser.parse_args()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def upstream_connections(pid: int, upstream_port: int) -> int:
    """How many of the gateway's descriptors are TCP connections to `upstream_port` (its
    pooled keep-alive connections to the fake model)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == upstream_port and fields[9] in inodes:
                    count += 1
    return count


def settled_fds(pid: int, timeout: float = 30.0) -> int:
    """The descriptor count once it stays the same for a second (closed client connections
    take a moment to be closed on the gateway's side too)."""
    deadline = time.monotonic() + timeout
    last, since = open_fds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = open_fds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last


class Soak:
    """Sends calls of the rotation from `concurrency` workers; counts statuses per kind."""

    def __init__(self, port: int, concurrency: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.concurrency = concurrency
        self.results: collections.Counter[tuple[str, int | str]] = collections.Counter()
        self.unexpected: collections.Counter[tuple[str, int | str]] = collections.Counter()
        key = {"Api-Key": run.API_KEY, "Content-Type": "application/json"}
        deployment = f"/openai/deployments/{run.MODEL}"
        self.kinds: list[tuple[str, Callable[[aiohttp.ClientSession], Coroutine[Any, Any, Any]]]]
        self.kinds = [
            ("chat", lambda s: self.http(s, "POST", f"{deployment}/chat/completions", key, CHAT)),
            ("stream", lambda s: self.stream(s, key)),
            ("chat", lambda s: self.http(s, "POST", f"{deployment}/chat/completions", key, CHAT)),
            (
                "embeddings",
                lambda s: self.http(
                    s, "POST", f"/openai/deployments/{EMBED_MODEL}/embeddings", key, EMBED
                ),
            ),
            ("models", lambda s: self.http(s, "GET", "/openai/models", key)),
            ("half-request", lambda s: self.half_request()),
            ("user-limits", lambda s: self.http(s, "GET", "/v1/user/limits", key)),
            (
                "404",
                lambda s: self.http(
                    s, "POST", "/openai/deployments/nope/chat/completions", key, CHAT
                ),
            ),
            (
                "401",
                lambda s: self.http(
                    s,
                    "POST",
                    f"{deployment}/chat/completions",
                    {"Api-Key": "not-a-key", "Content-Type": "application/json"},
                    CHAT,
                ),
            ),
            ("closed-mid-stream", lambda s: self.closed_mid_stream()),
        ]
        self.expected = {
            "chat": 200,
            "stream": 200,
            "embeddings": 200,
            "models": 200,
            "user-limits": 200,
            "404": 404,
            "401": 401,
            "half-request": "aborted",
            "closed-mid-stream": "aborted",
        }

    def note(self, kind: str, outcome: int | str) -> None:
        self.results[kind, outcome] += 1
        if outcome != self.expected[kind]:
            self.unexpected[kind, outcome] += 1

    async def http(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
    ) -> int:
        async with session.request(method, self.url + path, headers=headers, data=body) as resp:
            await resp.read()
            return resp.status

    async def stream(self, session: aiohttp.ClientSession, headers: dict[str, str]) -> int:
        path = f"/openai/deployments/{run.MODEL}/chat/completions"
        async with session.post(self.url + path, headers=headers, data=STREAM) as resp:
            body = await resp.read()
            if resp.status == 200 and b"data: [DONE]" not in body:
                return -1  # a stream that did not end properly
            return resp.status

    async def half_request(self) -> str:
        """Half a request head and body, then the connection closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        path = f"/openai/deployments/{run.MODEL}/chat/completions"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nApi-Key: {run.API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n\r\n"
        ).encode()
        writer.write(head + CHAT[: len(CHAT) // 2])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        del reader
        return "aborted"

    async def closed_mid_stream(self) -> str:
        """A streamed call whose client closes after the first bytes of the answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        path = f"/openai/deployments/{run.MODEL}/chat/completions"
        extra = "".join(f"{name}: {value}\r\n" for name, value in LONG_STREAM.items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nApi-Key: {run.API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(STREAM)}\r\n{extra}\r\n"
        ).encode()
        writer.write(head + STREAM)
        await writer.drain()
        first = await asyncio.wait_for(reader.read(4096), 30)
        writer.transport.abort()  # gone without a goodbye, mid-stream
        return "aborted" if first.startswith(b"HTTP/1.1 200") else "no-stream"

    async def run(self, calls: int) -> float:
        """`calls` calls of the rotation; returns the seconds taken."""
        counter = iter(range(calls))
        timeout = aiohttp.ClientTimeout(total=60)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                for index in counter:
                    kind, call = self.kinds[index % len(self.kinds)]
                    try:
                        outcome = await call(session)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        outcome = type(exc).__name__
                    self.note(kind, outcome)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return time.monotonic() - started


def soak_config(fake_url: str) -> dict[str, Any]:
    config = run.tollgate_config(fake_url, limited=True)
    config["models"][EMBED_MODEL] = {
        "type": "embedding",
        "endpoint": f"{fake_url}/openai/deployments/{EMBED_MODEL}/embeddings",
    }
    config["roles"]["default"]["limits"][EMBED_MODEL] = {}
    return config


def settled(pid: int, upstream_port: int, timeout: float = 45.0) -> int:
    """The gateway's descriptors once its idle upstream connections have expired (aiohttp's
    connector keeps them 15 s) and the count is steady: the pool's high-water mark depends on
    how the last calls overlapped (closed streams are drained while new calls start), not on
    what the calls left behind."""
    deadline = time.monotonic() + timeout
    while upstream_connections(pid, upstream_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    return settled_fds(pid)


def growth(before: int, after: int) -> float:
    return (after - before) / before


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-soak-"))
    servers: list[run.Server] = []
    try:
        fake_port = run.free_port()
        fake = run.start(
            "fake",
            [sys.executable, "-m", "tollgate.fake_model", "--port", str(fake_port), "--no-record"],
            fake_port,
            workdir,
        )
        servers.append(fake)
        run.wait_healthy(fake)
        config = workdir / "config.json"
        config.write_text(json.dumps(soak_config(fake.url)))
        port = run.free_port()
        argv = [sys.executable, "-m", "tollgate", "serve", "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        gateway = run.start(
            "tollgate", argv, port, workdir, {"limits.embedded.file": str(workdir / "usage.db")}
        )
        servers.append(gateway)
        run.wait_healthy(gateway)
        pid = gateway.proc.pid

        warm = Soak(port, args.concurrency)
        asyncio.run(warm.run(args.warmup))
        pooled_before = upstream_connections(pid, fake_port)
        fds_before, rss_before = settled(pid, fake_port), rss_kib(pid)

        soak = Soak(port, args.concurrency)
        seconds = asyncio.run(soak.run(args.calls))
        pooled_after = upstream_connections(pid, fake_port)
        fds_after, rss_after = settled(pid, fake_port), rss_kib(pid)

        rss_growth, fds_growth = growth(rss_before, rss_after), growth(fds_before, fds_after)
        traceback = "Traceback" in gateway.log.read_text(errors="replace")
        ok = not soak.unexpected and not traceback
        ok = ok and rss_growth < MAX_GROWTH and fds_growth < MAX_GROWTH
        print(
            f"{args.calls} calls (after {args.warmup} warm-up) at concurrency "
            f"{args.concurrency} in {seconds:.1f} s ({args.calls / seconds:,.0f} calls/s)"
        )
        for (kind, outcome), count in sorted(soak.results.items(), key=str):
            print(f"  {kind:18} {outcome!s:>8}  {count:6}")
        print(
            f"RSS   before {rss_before / 1024:7.1f} MiB  after {rss_after / 1024:7.1f} MiB  "
            f"growth {100 * rss_growth:+.1f}%"
        )
        print(
            f"FDs   before {fds_before:7}      after {fds_after:7}      "
            f"growth {100 * fds_growth:+.1f}%  (idle pool emptied first; it held "
            f"{pooled_before} and {pooled_after} upstream connections at the end of each phase)"
        )
        print(
            f"unexpected outcomes: {dict(soak.unexpected) or 'none'}; "
            f"traceback in the gateway log: {'yes' if traceback else 'no'}"
        )
        print(f"growth under {100 * MAX_GROWTH:.0f}%: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        for server in reversed(servers):
            run.stop(server)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
