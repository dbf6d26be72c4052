"""API-managed keys at scale: 100,000 keys of the Configuration API in the resource store.

Measures, with the store holding `--keys` (100,000) API-managed keys:

(a) start-up: from `tollgate serve`'s launch until `/health` answers with every key loaded
    (`resources.keys`), and the process's peak RSS (VmHWM) then and after the load runs;
(b) the call path: wrk's req/s, p50 and the gateway's CPU µs per call of a chat call made with
    a managed key, the store holding 10 keys against `--keys` keys, in one interleaved run
    (two gateways on one fake model, rounds alternating which goes first);
(c) propagation: two gateways on the big store and one redis-server; the time from a PUT of a
    new key on A until a call with it succeeds on B, `--propagations` times (median, max).

The stores are folders of the filesystem provider, written before any gateway starts with the
real record format (`KeyRecord.to_json()` through `FilesystemStore.put` at `store_key`), so
start-up reads them as it reads keys the API made.

    .venv/bin/python bench/keys_scale.py [--keys 100000] [--duration 10] [--rounds 3]
                                         [--propagations 20] [--json OUT]

Needs `wrk` and `redis-server`. Every server runs on 127.0.0.1 and is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import run as bench  # noqa: E402  (bench/run.py: processes, wrk, CPU and RSS helpers)
from tollgate.managed.entities import KEYS_FOLDER, KeyRecord, store_key  # noqa: E402
from tollgate.storage.filesystem import FilesystemStore  # noqa: E402

MODEL = bench.MODEL
ADMIN_KEY = "keys-scale-admin-key-0123456789abcdef"
BUCKET = "dial"
WRITE_CONCURRENCY = 64
PROBE_KEY_INDEX = 7  # the managed key wrk calls with: in both stores, the same secret


def secret_of(index: int) -> str:
    return "ks-" + hashlib.sha256(f"keys scale {index}".encode()).hexdigest()[:40]


def name_of(index: int) -> str:
    return f"scale-{index:07d}"


def record_of(index: int, now_ms: int) -> KeyRecord:
    return KeyRecord(
        name=name_of(index),
        spec={"project": f"project-{index % 2000:04d}", "roles": ["default"], "secured": False},
        digest=hashlib.sha256(secret_of(index).encode()).digest(),
        created_at=now_ms,
        updated_at=now_ms,
        key_generated_at=now_ms,
        author="bench/keys_scale.py",
    )


async def write_store(basedir: Path, keys: int) -> float:
    """`keys` records into `<basedir>/dial/`, as the API writes them; seconds taken."""
    store = FilesystemStore(basedir / BUCKET)
    started = time.monotonic()
    now_ms = int(time.time() * 1000)
    semaphore = asyncio.Semaphore(WRITE_CONCURRENCY)

    async def put(index: int) -> None:
        async with semaphore:
            record = record_of(index, now_ms)
            await store.put(store_key(KEYS_FOLDER, record.name), record.to_json())

    try:
        for start in range(0, keys, 5000):
            await asyncio.gather(*(put(i) for i in range(start, min(keys, start + 5000))))
    finally:
        await store.close()
    return time.monotonic() - started


def gateway_config(fake_url: str) -> dict[str, Any]:
    return {
        "models": {
            MODEL: {
                "type": "chat",
                "endpoint": f"{fake_url}/openai/deployments/{MODEL}/chat/completions",
            }
        },
        "keys": {ADMIN_KEY: {"project": "ops", "role": "admin"}},
        "roles": {"default": {"limits": {MODEL: {}}}, "admin": {}},
    }


def settings_file(work: Path, name: str, basedir: Path, redis_port: int | None) -> Path:
    tree: dict[str, Any] = {
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(basedir)}},
        "limits": {"embedded": {"file": str(work / f"{name}.sqlite")}},
    }
    if redis_port is not None:
        tree["redis"] = {"singleServerConfig": {"address": f"redis://127.0.0.1:{redis_port}"}}
    path = work / f"{name}.settings.json"
    path.write_text(json.dumps(tree))
    return path


def health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            if resp.status == 200:
                answer: dict[str, Any] = json.loads(resp.read())
                return answer
    except (OSError, urllib.error.URLError, ValueError):
        pass
    return None


def start_gateway(
    name: str, work: Path, config: Path, basedir: Path, keys: int, redis_port: int | None = None
) -> tuple[bench.Server, dict[str, float]]:
    """A gateway on `basedir`'s store; returns it with its start-up figures: seconds until
    `/health` first answers, seconds until it reports `keys` keys, VmHWM MB then."""
    port = bench.free_port()
    settings = settings_file(work, name, basedir, redis_port)
    argv = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--config", str(config), "--settings", str(settings)]
    launched = time.monotonic()
    server = bench.start(name, argv, port, work)
    first: float | None = None
    deadline = launched + 600
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{bench.log_tail(server)}")
        if time.monotonic() > deadline:
            bench.stop(server)
            raise RuntimeError(f"{name} did not load {keys} keys:\n{bench.log_tail(server)}")
        answer = health(server.url)
        if answer is not None:
            if first is None:
                first = time.monotonic() - launched
            if answer.get("resources", {}).get("keys") == keys:
                break
        time.sleep(0.05)
    loaded = time.monotonic() - launched
    return server, {
        "health_s": first or loaded,
        "loaded_s": loaded,
        "rss_mb": bench.peak_rss_mb(server.proc.pid),
    }


def call(url: str, key: str) -> int:
    request = urllib.request.Request(
        url + bench.PATH,
        data=json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}
        ).encode(),
        headers={"Api-Key": key, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def admin(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Api-Key": ADMIN_KEY, "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        data = resp.read()
        return json.loads(data) if data else None


def measure(label: str, server: bench.Server, fake: bench.Server, conc: int, rnd: int, s: float):
    run = bench.measure(
        label,
        server.url + bench.PATH,
        "chat",
        conc,
        rnd,
        s,
        {
            label: server,
            "fake": fake,
        },
    )
    return run


def propagation(a: bench.Server, b: bench.Server, count: int) -> list[float]:
    """Seconds from sending a PUT of a new key to A until a call with it succeeds on B."""
    delays = []
    for index in range(count):
        name = f"propagation-{index:02d}-{int(time.time() * 1000)}"
        since = time.monotonic()
        made = admin(
            a.url, "PUT", f"/v1/keys/platform/{name}", {"project": "p", "roles": ["default"]}
        )
        secret = made["key"]
        while call(b.url, secret) != 200:
            if time.monotonic() - since > 30:
                raise RuntimeError(f"{name} never reached B")
            time.sleep(0.005)
        delays.append(time.monotonic() - since)
        admin(a.url, "DELETE", f"/v1/keys/platform/{name}")
        time.sleep(0.05)
    return delays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--propagations", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write every figure here too")
    args = parser.parse_args(argv)
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="keys-scale-"))
    small_dir, big_dir = work / "store-small", work / "store-big"
    servers: list[bench.Server] = []
    figures: dict[str, Any] = {
        "keys": args.keys,
        "small": args.small,
        "machine": bench.machine_info(),
    }
    try:
        print(f"writing {args.small} and {args.keys} key records ...", flush=True)
        asyncio.run(write_store(small_dir, args.small))
        figures["write_s"] = asyncio.run(write_store(big_dir, args.keys))
        print(f"  {args.keys} records written in {figures['write_s']:.1f} s", flush=True)

        fake_port = bench.free_port()
        fake = bench.start(
            "fake",
            [sys.executable, "-m", "tollgate.fake_model", "--port", str(fake_port), "--no-record"],
            fake_port,
            work,
        )
        servers.append(fake)
        bench.wait_healthy(fake)
        config = work / "config.json"
        config.write_text(json.dumps(gateway_config(fake.url)))

        # (a) start-up, one at a time (nothing else loads meanwhile).
        small, small_start = start_gateway("keys-10", work, config, small_dir, args.small)
        servers.append(small)
        big, big_start = start_gateway("keys-big", work, config, big_dir, args.keys)
        servers.append(big)
        figures["startup"] = {"small": small_start, "big": big_start}
        print(f"  start-up: {args.small} keys {small_start}, {args.keys} keys {big_start}")

        key = secret_of(PROBE_KEY_INDEX)
        bench.API_KEY = key  # wrk's Api-Key (run_wrk passes bench.API_KEY to the scripts)
        for server in (small, big):
            status = call(server.url, key)
            if status != 200:
                raise RuntimeError(f"{server.name}: a managed key's call answered {status}")
            if call(server.url, key + "-not-it") != 401:
                raise RuntimeError(f"{server.name}: an unknown key was not refused")

        # (b) the call path, interleaved.
        targets = {"keys-10": small, "keys-big": big}
        for server in targets.values():
            bench.run_wrk(server.url + bench.PATH, "chat", 64, args.warmup)
        runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            for conc in (1, 64):
                order = list(targets) if (rnd + conc) % 2 else list(reversed(targets))
                for label in order:
                    run = measure(label, targets[label], fake, conc, rnd, args.duration)
                    runs.append(
                        {
                            "target": label,
                            "concurrency": conc,
                            "round": rnd,
                            "rps": run.rps,
                            "p50_ms": run.p50_ms,
                            "p99_ms": run.p99_ms,
                            "cpu_us_per_req": run.cpu_us_per_req,
                            "errors": run.errors,
                        }
                    )
                    print(
                        f"  round {rnd} c{conc} {label}: {run.rps:.0f} req/s, "
                        f"p50 {run.p50_ms:.2f} ms, CPU {run.cpu_us_per_req:.0f} µs/req, "
                        f"errors {run.errors}",
                        flush=True,
                    )
        figures["runs"] = runs
        figures["rss_after_mb"] = {
            "small": bench.peak_rss_mb(small.proc.pid),
            "big": bench.peak_rss_mb(big.proc.pid),
        }
        for server in (small, big):
            bench.stop(server)
            servers.remove(server)

        # (c) propagation on the big store: two gateways, one Redis.
        redis_port = bench.free_port()
        redis = bench.start(
            "redis",
            [
                *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            redis_port,
            work,
        )
        servers.append(redis)
        bench.wait_redis(redis)
        a, a_start = start_gateway("prop-a", work, config, big_dir, args.keys, redis_port)
        servers.append(a)
        b, b_start = start_gateway("prop-b", work, config, big_dir, args.keys, redis_port)
        servers.append(b)
        delays = propagation(a, b, args.propagations)
        figures["propagation_s"] = delays
        figures["startup"]["redis_a"], figures["startup"]["redis_b"] = a_start, b_start
    finally:
        for server in reversed(servers):
            bench.stop(server)
        shutil.rmtree(work, ignore_errors=True)

    print_table(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(figures: dict[str, Any]) -> None:
    keys, small = figures["keys"], figures["small"]
    start = figures["startup"]
    print()
    print(f"Start-up ({figures['machine'].get('nproc', '?')} CPUs)")
    print("| store | /health answers s | keys loaded s | peak RSS MB after load | after the runs |")
    print("|-------|------------------:|--------------:|-----------------------:|---------------:|")
    for label, count, rss_key in (("small", small, "small"), ("big", keys, "big")):
        s = start[label]
        print(
            f"| {count:,} keys | {s['health_s']:.2f} | {s['loaded_s']:.2f} | {s['rss_mb']:.0f} | "
            f"{figures['rss_after_mb'][rss_key]:.0f} |"
        )
    print()
    rounds = 1 + max(r["round"] for r in figures["runs"])
    print(f"Chat call with a managed key, medians over {rounds} rounds")
    print("| keys in store | conc | req/s | p50 ms | p99 ms | CPU µs/req | errors |")
    print("|--------------:|-----:|------:|-------:|-------:|-----------:|-------:|")
    for conc in (1, 64):
        for label, count in (("keys-10", small), ("keys-big", keys)):
            runs = [r for r in figures["runs"] if r["target"] == label and r["concurrency"] == conc]
            rps = med([r["rps"] for r in runs])
            p50, p99 = med([r["p50_ms"] for r in runs]), med([r["p99_ms"] for r in runs])
            cpu = med([r["cpu_us_per_req"] for r in runs])
            errors = sum(r["errors"] for r in runs)
            row = f"| {count:,} | {conc} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {cpu:.0f} |"
            print(f"{row} {errors} |")
    delays = figures["propagation_s"]
    print()
    print(f"Propagation with {keys:,} keys (PUT on A, accepted on B; Redis), n={len(delays)}")
    print("| median ms | min ms | max ms |")
    print("|----------:|-------:|-------:|")
    print(f"| {med(delays) * 1000:.0f} | {min(delays) * 1000:.0f} | {max(delays) * 1000:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
