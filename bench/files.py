"""Files per second through the Files API, against the store it writes to (issue 14).

One `tollgate serve` on a store folder of its own (the filesystem provider); a client of
`--concurrency` connections uploads `--count` files of each size (`PUT /v1/files/...`, DIAL's
multipart form), downloads each (`GET`), and the same bytes are written and read through the
store itself in the client process (`FilesystemStore.put_stream` / `get_stream`: the floor,
what any gateway on this disk pays). Prints files per second, MB/s, the ratio to the floor,
the gateway's CPU per file and its peak RSS.

    .venv/bin/python bench/files.py [--count 300] [--concurrency 8] [--sizes 1024,1048576]

Every server runs on 127.0.0.1 and is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import httpx  # noqa: E402

import run as bench  # noqa: E402  (bench/run.py: processes, CPU and RSS helpers)
from tollgate.storage.filesystem import FilesystemStore  # noqa: E402

KEY = "bench-files-key-0123456789abcdef"


def config() -> dict[str, Any]:
    return {"keys": {KEY: {"project": "bench-files", "role": "default"}}}


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def timed(jobs: list[Any], concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)

    async def run(job: Any) -> None:
        async with semaphore:
            await job()

    started = time.perf_counter()
    await asyncio.gather(*(run(job) for job in jobs))
    return time.perf_counter() - started


async def through_gateway(
    url: str, bucket: str, size: int, count: int, concurrency: int, tag: str
) -> tuple[float, float]:
    data = os.urandom(size)
    headers = {"Api-Key": KEY}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        def upload(index: int) -> Any:
            async def job() -> None:
                files = {"attachment": (f"f{index}.bin", data, "application/octet-stream")}
                answer = await client.put(
                    f"{url}/v1/files/{bucket}/{tag}/f{index}.bin", headers=headers, files=files
                )
                assert answer.status_code == 200, answer.text

            return job

        def download(index: int) -> Any:
            async def job() -> None:
                answer = await client.get(
                    f"{url}/v1/files/{bucket}/{tag}/f{index}.bin", headers=headers
                )
                assert answer.status_code == 200 and len(answer.content) == size

            return job

        up = await timed([upload(i) for i in range(count)], concurrency)
        down = await timed([download(i) for i in range(count)], concurrency)
    return up, down


async def through_store(
    root: Path, size: int, count: int, concurrency: int, tag: str
) -> tuple[float, float]:
    data = os.urandom(size)
    store = FilesystemStore(root)
    try:

        def upload(index: int) -> Any:
            async def job() -> None:
                await store.put_stream(f"floor/{tag}/f{index}", one_chunk(data))

            return job

        def download(index: int) -> Any:
            async def job() -> None:
                streamed = await store.get_stream(f"floor/{tag}/f{index}")
                assert streamed is not None
                read = 0
                async for chunk in streamed.chunks:
                    read += len(chunk)
                assert read == size

            return job

        up = await timed([upload(i) for i in range(count)], concurrency)
        down = await timed([download(i) for i in range(count)], concurrency)
    finally:
        await store.close()
    return up, down


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sizes", default="1024,1048576")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-files-") as tmp:
        work = Path(tmp)
        store_dir = work / "store"
        (work / "config.json").write_text(json.dumps(config()))
        settings = {"storage": {"overrides": {"jclouds.filesystem.basedir": str(store_dir)}}}
        (work / "settings.json").write_text(json.dumps(settings))
        port = bench.free_port()
        argv_ = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
        argv_ += ["--port", str(port), "--config", str(work / "config.json")]
        argv_ += ["--settings", str(work / "settings.json")]
        server = bench.start("tollgate-files", argv_, port, work)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    bucket = httpx.get(f"{url}/v1/bucket", headers={"Api-Key": KEY}).json()
                    break
                except (httpx.HTTPError, ValueError):
                    time.sleep(0.05)
            else:
                raise RuntimeError(bench.log_tail(server))
            rows = []
            for size in sizes:
                tag = f"s{size}"
                cpu0 = bench.cpu_seconds(server.proc.pid)
                up, down = asyncio.run(
                    through_gateway(url, bucket["bucket"], size, args.count, args.concurrency, tag)
                )
                cpu = bench.cpu_seconds(server.proc.pid) - cpu0
                floor_up, floor_down = asyncio.run(
                    through_store(store_dir / "dial", size, args.count, args.concurrency, tag)
                )
                rows.append((size, up, down, floor_up, floor_down, cpu))
            rss = bench.peak_rss_mb(server.proc.pid)
        finally:
            bench.stop(server)
    count = args.count
    print(f"{count} files of each size, {args.concurrency} at a time, filesystem store")
    print(
        f"{'size':>9}  {'up files/s':>10}  {'floor':>8}  {'ratio':>5}  {'down files/s':>12}  "
        f"{'floor':>8}  {'ratio':>5}  {'up MB/s':>8}  {'down MB/s':>9}  {'CPU µs/file':>11}"
    )
    for size, up, down, floor_up, floor_down, cpu in rows:
        print(
            f"{size:>9}  {count / up:>10,.0f}  {count / floor_up:>8,.0f}  {floor_up / up:>5.2f}"
            f"  {count / down:>12,.0f}  {count / floor_down:>8,.0f}  {floor_down / down:>5.2f}"
            f"  {count * size / up / 1e6:>8.1f}  {count * size / down / 1e6:>9.1f}"
            f"  {cpu / (2 * count) * 1e6:>11,.0f}"
        )
    print(f"gateway peak RSS {rss:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
