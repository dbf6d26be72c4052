"""Share-accept latency through the Share API (issue 14), against what it costs at least.

One `tollgate serve` on a store folder of its own (the filesystem provider). The owner shares
a conversation; then:

- one after another, `--count` callers (keys of their own projects) accept one invitation
  each (`GET /v1/invitations/{id}?accept=true`): latency p50 / p99 / max;
- at once, `--burst` callers accept the same invitation (room for half of them): the wall
  time of the burst, how many got in (must be exactly the room), the latency p50 / p99;
- the reference: a GET of one's own conversation through the same gateway (an authenticated
  resource read: what any resource call costs), and the floor: the store's own read plus
  conditional write of the owner's record done directly in this process (what an atomic
  accept costs at least on this disk).

    .venv/bin/python bench/sharing.py [--count 300] [--burst 100]

Every server runs on 127.0.0.1 and is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import httpx  # noqa: E402
import orjson  # noqa: E402

import run as bench  # noqa: E402  (bench/run.py: processes, CPU and RSS helpers)
from tollgate.storage.filesystem import FilesystemStore  # noqa: E402

OWNER_KEY = "bench-sharing-owner-key-0123456789"
OWNER = {"Api-Key": OWNER_KEY}


def crowd_key(index: int) -> str:
    return f"bench-sharing-crowd-{index:04d}-0123456789"


def config(crowd: int, room: int) -> dict[str, Any]:
    keys: dict[str, Any] = {OWNER_KEY: {"project": "owner", "role": "sharer"}}
    keys.update({crowd_key(i): {"project": f"crowd-{i}", "role": "default"} for i in range(crowd)})
    return {
        "keys": keys,
        "roles": {
            "default": {},
            "sharer": {"share": {"PROMPT": {"max_accepted_users": room}}},
        },
    }


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def share(http: httpx.AsyncClient, url: str) -> str:
    answer = await http.post(
        "/v1/ops/resource/share/create", headers=OWNER, json={"resources": [{"url": url}]}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["invitationLink"])


async def timed_accept(http: httpx.AsyncClient, link: str, index: int) -> tuple[float, int]:
    started = time.perf_counter()
    answer = await http.get(link, params={"accept": "true"}, headers={"Api-Key": crowd_key(index)})
    return time.perf_counter() - started, answer.status_code


async def through_gateway(url: str, bucket: str, count: int, burst: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        own = f"/v1/conversations/{bucket}/own"
        assert (await http.put(own, headers=OWNER, json={"a": 1})).status_code == 200
        reads = []
        for _ in range(count):
            started = time.perf_counter()
            assert (await http.get(own, headers=OWNER)).status_code == 200
            reads.append(time.perf_counter() - started)

        # One after another: each caller accepts an invitation of its own resource.
        sequential = []
        for index in range(count):
            link = await share(http, f"conversations/{bucket}/c{index}")
            took, status = await timed_accept(http, link, index)
            assert status == 200
            sequential.append(took)

        # At once, one invitation of a prompt with room for half of the burst.
        prompt = f"prompts/{bucket}/popular"
        made = await http.put(f"/v1/{prompt}", headers=OWNER, json={"content": "x"})
        assert made.status_code == 200
        link = await share(http, prompt)
        started = time.perf_counter()
        results = await asyncio.gather(*(timed_accept(http, link, count + i) for i in range(burst)))
        wall = time.perf_counter() - started
    admitted = sum(1 for _, status in results if status == 200)
    assert all(status in (200, 400) for _, status in results)
    return {
        "reads": reads,
        "sequential": sequential,
        "burst": [took for took, _ in results],
        "burst_wall": wall,
        "admitted": admitted,
    }


async def through_store(root: Path, count: int) -> list[float]:
    """The floor: read a record and write it back over exactly that version."""
    store = FilesystemStore(root)
    try:
        key = "Keys/floor/shared_by_me/share"
        await store.put(key, orjson.dumps({"resources": {}}))
        took = []
        for index in range(count):
            started = time.perf_counter()
            blob = await store.get(key)
            assert blob is not None
            record = orjson.loads(blob.data)
            record["resources"][f"u{index}"] = {"users": {f"Keys/c{index}/": ["READ"]}}
            await store.put(key, orjson.dumps(record), if_match=blob.etag)
            took.append(time.perf_counter() - started)
        return took
    finally:
        await store.close()


def ms(value: float) -> str:
    return f"{value * 1000:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--burst", type=int, default=100)
    args = parser.parse_args(argv)
    room = args.burst // 2
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-sharing-") as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(config(args.count + args.burst, room)))
        settings = {"storage": {"overrides": {"jclouds.filesystem.basedir": str(work / "store")}}}
        (work / "settings.json").write_text(json.dumps(settings))
        port = bench.free_port()
        argv_ = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
        argv_ += ["--port", str(port), "--config", str(work / "config.json")]
        argv_ += ["--settings", str(work / "settings.json")]
        server = bench.start("tollgate-sharing", argv_, port, work)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    bucket = httpx.get(f"{url}/v1/bucket", headers=OWNER).json()["bucket"]
                    break
                except (httpx.HTTPError, ValueError, KeyError):
                    time.sleep(0.05)
            else:
                raise RuntimeError(bench.log_tail(server))
            cpu0 = bench.cpu_seconds(server.proc.pid)
            seen = asyncio.run(through_gateway(url, bucket, args.count, args.burst))
            cpu = bench.cpu_seconds(server.proc.pid) - cpu0
            rss = bench.peak_rss_mb(server.proc.pid)
        finally:
            bench.stop(server)
        floor = asyncio.run(through_store(work / "floor", args.count))
    print(f"filesystem store; {args.count} sequential accepts, a burst of {args.burst}")
    print(f"{'what':<44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    rows = [
        ("GET own conversation (reference)", seen["reads"]),
        ("accept, one after another", seen["sequential"]),
        (f"accept, {args.burst} at once on one invitation", seen["burst"]),
        ("floor: store read + conditional write", floor),
    ]
    for name, values in rows:
        print(
            f"{name:<44} {ms(statistics.median(values)):>8} {ms(percentile(values, 0.99)):>8}"
            f" {ms(max(values)):>8}"
        )
    print(
        f"burst: {seen['admitted']} admitted of {args.burst} for {room} places,"
        f" {seen['burst_wall'] * 1000:.0f} ms wall,"
        f" {args.burst / seen['burst_wall']:.0f} accepts/s"
    )
    added = statistics.median(seen["sequential"]) - statistics.median(seen["reads"])
    print(f"an accept costs {added * 1000:.2f} ms more than a resource read (p50)")
    calls = 2 * args.count + args.count + args.burst + 2
    print(f"gateway CPU {cpu / calls * 1e6:.0f} µs per call on average, peak RSS {rss:.1f} MB")
    assert seen["admitted"] == room, seen["admitted"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
