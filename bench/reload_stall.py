"""Does a config reload stall the event loop? `/health` latency during reloads of a big config.

Writes the config of `bench/big_config.py` (100,000 keys, 1,000 models, 50 roles) to a
temporary folder, then starts a real `tollgate serve` on it twice, each on 127.0.0.1:

(a) forced reloads: the file is changed (one model's `displayName`) and the gateway told to
    reload, by `SIGHUP` (default) or `POST /v1/ops/config/reload` with an admin key
    (`--trigger post`), `--forced` times, each awaited until the gateway logs it;
(b) periodic reloads of an unchanged file: `aidial.config.reload` = `--period-ms` (200), for
    `--seconds` (5);
(c) quiet: the same, with no reload in that time, for the noise floor of the machine.

During each, one client polls `GET /health` back to back on one keep-alive connection and
records every answer's latency. Printed: max and p99 latency of `/health` per phase, start-up
time (process start to the first healthy `/health`) and peak RSS (VmHWM) of the gateway.

    .venv/bin/python bench/reload_stall.py [--trigger sighup|post] [--json]

`PYTHONPATH` chooses the Tollgate measured (e.g. a `git worktree` of an older commit).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import big_config

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Poller(threading.Thread):
    """GET /health back to back; `latencies` holds each answer's seconds."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.started: list[float] = []  # when each answered request was sent (perf_counter)
        self.failures = 0
        self._done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._done.is_set():
            start = time.perf_counter()
            try:
                conn.request("GET", "/health")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            if ok:
                self.latencies.append(time.perf_counter() - start)
                self.started.append(start)
            else:
                self.failures += 1
        conn.close()

    def stop(self) -> None:
        self._done.set()
        self.join()


def slowest(poller: Poller, marks: list[float], count: int = 3) -> list[str]:
    """The slowest answers, each with when it was sent relative to the last reload trigger."""
    found = sorted(zip(poller.latencies, poller.started, strict=True), reverse=True)[:count]
    out = []
    for latency, start in found:
        before = [m for m in marks if m <= start]
        since = f"{(start - before[-1]) * 1000:+.0f} ms after trigger" if before else "before"
        out.append(f"{latency * 1000:.1f} ms, sent {since}")
    return out


def summary(latencies: list[float], failures: int) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan")
    return {
        "requests": len(ms),
        "failures": failures,
        "max_ms": round(ms[-1], 2) if ms else None,
        "p99_ms": round(p99, 2),
        "p50_ms": round(statistics.median(ms), 3) if ms else None,
    }


class Gateway:
    def __init__(self, config: Path, work: Path, settings: dict[str, str], name: str) -> None:
        self.port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("aidial.", "proxy.")) and k != "AIDIAL_SETTINGS"
        }
        env.setdefault("PYTHONPATH", str(ROOT / "src"))
        env["PYTHONUNBUFFERED"] = "1"
        env["aidial.limits.embedded.file"] = str(work / f"{name}.sqlite")
        env["aidial.metrics.enabled"] = "false"
        env["aidial.log.access"] = "false"
        env.update({f"aidial.{k}": v for k, v in settings.items()})
        self.log = work / f"{name}.log"
        argv = [sys.executable, "-m", "tollgate", "serve", "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.started = time.perf_counter()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.startup_s = self._wait_healthy()
        self.rss_started_mb = self._status_mb("VmRSS:")

    def _wait_healthy(self, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log.read_text(errors='replace')}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.02)
        raise RuntimeError("gateway not healthy in time")

    def reloads_logged(self) -> int:
        return self.log.read_text(errors="replace").count("config reloaded")

    def _status_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return float("nan")

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM:")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post_reload(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/ops/config/reload", headers={"Api-Key": big_config.ADMIN_KEY})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"POST /v1/ops/config/reload answered {response.status}")


def forced(config: Path, work: Path, times: int, trigger: str) -> dict[str, Any]:
    # The changed files are made first: encoding 13 MB of JSON here while polling would hold
    # this process's GIL and show up as /health latency.
    tree = json.loads(config.read_text())
    editions = []
    for index in range(times):
        tree["models"]["model-0000"]["displayName"] = f"Model 0, edition {index}"
        editions.append(json.dumps(tree, indent=1).encode())
    del tree
    gateway = Gateway(config, work, {}, "forced")
    try:
        poller = Poller(gateway.port)
        poller.start()
        time.sleep(0.5)  # a baseline of quiet polling before the first reload
        marks: list[float] = []
        for edition in editions:
            config.write_bytes(edition)
            before = gateway.reloads_logged()
            marks.append(time.perf_counter())
            if trigger == "post":
                post_reload(gateway.port)
            else:
                gateway.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 120
            while gateway.reloads_logged() == before:
                if time.monotonic() > deadline:
                    raise RuntimeError("the reload was never logged")
                time.sleep(0.01)
            time.sleep(0.3)
        poller.stop()
        return {
            **summary(poller.latencies, poller.failures),
            "slowest": slowest(poller, marks),
            "reloads": times,
            "startup_s": round(gateway.startup_s, 2),
            "rss_started_mb": round(gateway.rss_started_mb, 1),
            "peak_rss_mb": round(gateway.peak_rss_mb(), 1),
        }
    finally:
        gateway.stop()


def periodic(config: Path, work: Path, period_ms: int, seconds: float) -> dict[str, Any]:
    gateway = Gateway(config, work, {"config.reload": str(period_ms)}, "periodic")
    try:
        poller = Poller(gateway.port)
        poller.start()
        time.sleep(seconds)
        poller.stop()
        return {
            **summary(poller.latencies, poller.failures),
            "period_ms": period_ms,
            "startup_s": round(gateway.startup_s, 2),
            "rss_started_mb": round(gateway.rss_started_mb, 1),
            "peak_rss_mb": round(gateway.peak_rss_mb(), 1),
        }
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trigger", choices=("sighup", "post"), default="sighup")
    parser.add_argument("--forced", type=int, default=3, help="forced reloads in phase (a)")
    parser.add_argument("--period-ms", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollgate-reload-") as tmp:
        work = Path(tmp)
        config = work / "aidial.config.json"
        big_config.write(config)
        size_mb = config.stat().st_size / 1e6
        results = {
            "config_mb": round(size_mb, 1),
            "forced": forced(config, work, args.forced, args.trigger),
            "periodic": periodic(config, work, args.period_ms, args.seconds),
            # The same polling with no reload at all: the machine's own noise floor.
            "quiet": periodic(config, work, 3_600_000, args.seconds),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"config: {results['config_mb']} MB (100,000 keys, 1,000 models, 50 roles)")
    for phase in ("forced", "periodic", "quiet"):
        r = results[phase]
        print(
            f"{phase:9} /health max {r['max_ms']} ms, p99 {r['p99_ms']} ms, p50 {r['p50_ms']} "
            f"ms over {r['requests']} requests ({r['failures']} failed); start-up "
            f"{r['startup_s']} s, RSS {r['rss_started_mb']} MB once started, peak "
            f"{r['peak_rss_mb']} MB"
        )


if __name__ == "__main__":
    main()
