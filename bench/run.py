"""Benchmark Tollgate's overhead against the fake model and a bare floor proxy, using wrk.

Run from the repository root: ``.venv/bin/python bench/run.py [--duration 10] [--rounds 3]``.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WRK_DIR = BENCH / "wrk"
OUT_DIR = BENCH / "out"

PATH = "/openai/deployments/bench-model/chat/completions?api-version=2024-02-01"
API_KEY = "bench-key-0123456789abcdef"
TARGETS = ("direct", "floor", "tollgate")
MODES = {"chat": "chat.lua", "stream": "chat_stream.lua"}
WRK_SHAPE = {1: (1, 1), 64: (2, 64)}  # concurrency -> (wrk threads, connections)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from README.md, checked at the end of every run.
MIN_FLOOR_RATIO = 0.80
MAX_ADDED_P50_MS = 0.6
MAX_RSS_MB = 100.0


@dataclass
class Server:
    """A server process started by the benchmark."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Run:
    """One wrk run against one target."""

    target: str
    mode: str
    concurrency: int
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_req: float | None  # of the target's own process tree
    upstream_cpu_us_per_req: float  # of the fake model during the same run
    wrk: dict[str, Any] = field(repr=False)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Let the servers import tollgate from this checkout even if it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(name: str, argv: list[str], port: int, logdir: Path) -> Server:
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        # Output goes to a file, never a pipe nobody reads, which would block a chatty server.
        # A new session keeps Ctrl-C away from the servers: the finally block stops them.
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=child_env(),
            start_new_session=True,
        )
    return Server(name, proc, port, log)


def log_tail(server: Server, lines: int = 30) -> str:
    try:
        return "\n".join(server.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server)}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not healthy after {timeout:.0f}s:\n{log_tail(server)}")


def stop(server: Server) -> None:
    proc = server.proc
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, so a server with worker processes is measured whole."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its descendants."""
    ticks = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over ``pid`` and its descendants."""
    kb = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kb += int(line.split()[1])
    return kb / 1024


# ---------------------------------------------------------------- load


def run_wrk(url: str, mode: str, concurrency: int, seconds: float) -> dict[str, Any]:
    threads, connections = WRK_SHAPE[concurrency]
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / MODES[mode]),
        url,
    ]
    env = dict(os.environ, BENCH_API_KEY=API_KEY)
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
            return result
    raise RuntimeError(
        f"wrk printed no summary (exit {done.returncode}):\n{done.stdout}{done.stderr}"
    )


def sanity_check(name: str, url: str) -> None:
    """Fail early, with the answer, if a target does not serve the benchmark request."""
    for stream in (False, True):
        body: dict[str, Any] = {
            "model": "bench-model",
            "messages": [{"role": "user", "content": "Say hello"}],
        }
        if stream:
            body["stream"] = True
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Api-Key": API_KEY},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, text = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        ok = status == 200 and (
            text.rstrip().endswith("data: [DONE]") if stream else '"chat.completion"' in text
        )
        if not ok:
            kind = "streaming" if stream else "non-streaming"
            raise RuntimeError(f"{name}: bad {kind} answer, HTTP {status}: {text[:500]}")


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version.splitlines()[0] if wrk_version else "unknown",
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(per: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a in per and b in per and per[b]["rps"]:
        return float(per[a]["rps"] / per[b]["rps"])
    return None


def _added_p50(per: dict[str, dict[str, Any]], target: str) -> float | None:
    if target in per and "direct" in per:
        return float(per[target]["p50_ms"] - per["direct"]["p50_ms"])
    return None


def summarize(runs: list[Run], targets: Sequence[str]) -> list[dict[str, Any]]:
    """Medians over rounds per scenario and target, plus the ratios of interest."""
    scenarios: list[dict[str, Any]] = []
    for mode in MODES:
        for conc in WRK_SHAPE:
            per: dict[str, dict[str, Any]] = {}
            for target in targets:
                mine = [
                    r
                    for r in runs
                    if r.target == target and r.mode == mode and r.concurrency == conc
                ]
                if not mine:
                    continue
                per[target] = {
                    "rps": median([r.rps for r in mine]),
                    "p50_ms": median([r.p50_ms for r in mine]),
                    "p99_ms": median([r.p99_ms for r in mine]),
                    "cpu_us_per_req": median([r.cpu_us_per_req for r in mine]),
                    "errors": sum(r.errors for r in mine),
                    "rounds": len(mine),
                }
            if not per:
                continue

            scenarios.append(
                {
                    "mode": mode,
                    "concurrency": conc,
                    "targets": per,
                    "tollgate_over_direct": _ratio(per, "tollgate", "direct"),
                    "tollgate_over_floor": _ratio(per, "tollgate", "floor"),
                    "floor_over_direct": _ratio(per, "floor", "direct"),
                    # Added latency is only meaningful without queueing, i.e. at concurrency 1.
                    "added_p50_ms_tollgate": _added_p50(per, "tollgate") if conc == 1 else None,
                    "added_p50_ms_floor": _added_p50(per, "floor") if conc == 1 else None,
                }
            )
    return scenarios


def checks(scenarios: list[dict[str, Any]], rss: dict[str, float]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for sc in scenarios:
        name = f"{sc['mode']} c{sc['concurrency']}"
        if sc["concurrency"] == 64 and sc["tollgate_over_floor"] is not None:
            value = sc["tollgate_over_floor"]
            out.append(
                {
                    "check": f"{name}: tollgate req/s >= {MIN_FLOOR_RATIO:.0%} of floor",
                    "value": f"{value:.0%}",
                    "ok": value >= MIN_FLOOR_RATIO,
                }
            )
        if sc["added_p50_ms_tollgate"] is not None:
            value = sc["added_p50_ms_tollgate"]
            out.append(
                {
                    "check": f"{name}: tollgate added p50 <= {MAX_ADDED_P50_MS} ms",
                    "value": f"{value:.3f} ms",
                    "ok": value <= MAX_ADDED_P50_MS,
                }
            )
    if "tollgate" in rss:
        out.append(
            {
                "check": f"tollgate peak RSS < {MAX_RSS_MB:.0f} MB",
                "value": f"{rss['tollgate']:.1f} MB",
                "ok": rss["tollgate"] < MAX_RSS_MB,
            }
        )
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def tables(
    scenarios: list[dict[str, Any]],
    targets: Sequence[str],
    rss: dict[str, float],
    results: list[dict[str, Any]],
) -> tuple[list[str], list[list[list[str]]]]:
    """Titles and rows (header first) of the report tables, shared by text and Markdown."""
    main = [["scenario", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"]]
    for sc in scenarios:
        for target in targets:
            t = sc["targets"].get(target)
            if t is None:
                continue
            main.append(
                [
                    f"{sc['mode']} c{sc['concurrency']}",
                    target,
                    fmt(t["rps"], ",.0f"),
                    fmt(t["p50_ms"], ".3f"),
                    fmt(t["p99_ms"], ".3f"),
                    fmt(t["cpu_us_per_req"], ".0f"),
                    str(t["errors"]),
                ]
            )
    ratios = [
        [
            "scenario",
            "tollgate/direct",
            "tollgate/floor",
            "floor/direct",
            "added p50 tollgate ms",
            "added p50 floor ms",
        ]
    ]
    for sc in scenarios:
        ratios.append(
            [
                f"{sc['mode']} c{sc['concurrency']}",
                fmt(sc["tollgate_over_direct"], ".2f"),
                fmt(sc["tollgate_over_floor"], ".2f"),
                fmt(sc["floor_over_direct"], ".2f"),
                fmt(sc["added_p50_ms_tollgate"], ".3f"),
                fmt(sc["added_p50_ms_floor"], ".3f"),
            ]
        )
    memory = [["process", "peak RSS MB"]] + [[name, f"{mb:.1f}"] for name, mb in rss.items()]
    verdicts = [["target check", "measured", "result"]] + [
        [c["check"], c["value"], "PASS" if c["ok"] else "FAIL"] for c in results
    ]
    titles = ["Throughput and latency (medians over rounds)", "Overhead", "Memory", "Targets"]
    return titles, [main, ratios, memory, verdicts]


LEFT_COLUMNS = frozenset({"scenario", "target", "process", "target check", "measured", "result"})


def render_text(titles: list[str], blocks: list[list[list[str]]]) -> str:
    out: list[str] = []
    for title, rows in zip(titles, blocks, strict=True):
        if len(rows) < 2:
            continue
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        left = [header in LEFT_COLUMNS for header in rows[0]]
        out.append(f"\n{title}")
        for n, row in enumerate(rows):
            cells = [
                c.ljust(w) if lft else c.rjust(w)
                for c, w, lft in zip(row, widths, left, strict=True)
            ]
            out.append("  ".join(cells).rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(titles: list[str], blocks: list[list[list[str]]]) -> str:
    out: list[str] = []
    for title, rows in zip(titles, blocks, strict=True):
        if len(rows) < 2:
            continue
        out.append(f"\n### {title}\n")
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "|".join("---" if h in LEFT_COLUMNS else "---:" for h in rows[0]) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
    return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds per target")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s runs, 1 round, 1 s warm-up"
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of: direct,floor,tollgate",
    )
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--keep-logs", action="store_true", help="copy server logs to bench/out")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets: {', '.join(sorted(unknown)) or '(none)'}")
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so the servers are stopped in either case."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tollgate_available() -> str | None:
    """None if ``python -m tollgate serve --help`` works, else why not."""
    done = subprocess.run(
        [sys.executable, "-m", "tollgate", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=60,
    )
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip()[-2000:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    targets: list[str] = [t for t in TARGETS if t in args.targets]
    if "tollgate" in targets and (why := tollgate_available()) is not None:
        print(f"`python -m tollgate serve` does not work:\n{why}", file=sys.stderr)
        print("use --targets direct,floor to run without it", file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    servers: dict[str, Server] = {}
    runs: list[Run] = []
    rss: dict[str, float] = {}
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp, sigterm_as_interrupt():
        tmpdir = Path(tmp)
        try:
            port = free_port()
            fake_argv = [py, "-m", "tollgate.fake_model", "--no-record", "--port", str(port)]
            servers["fake"] = start("fake", fake_argv, port, tmpdir)
            wait_healthy(servers["fake"])
            fake_url = servers["fake"].url
            if "floor" in targets:
                port = free_port()
                floor_argv = [py, str(BENCH / "floor_proxy.py"), "--port", str(port)]
                floor_argv += ["--upstream", fake_url]
                servers["floor"] = start("floor", floor_argv, port, tmpdir)
            if "tollgate" in targets:
                config = tmpdir / "tollgate.json"
                endpoint = f"{fake_url}/openai/deployments/bench-model/chat/completions"
                config.write_text(
                    json.dumps(
                        {
                            "models": {"bench-model": {"type": "chat", "endpoint": endpoint}},
                            "keys": {API_KEY: {"project": "bench", "role": "default"}},
                            "roles": {"default": {"limits": {"bench-model": {}}}},
                        },
                        indent=2,
                    )
                )
                port = free_port()
                tollgate_argv = [py, "-m", "tollgate", "serve", "--config", str(config)]
                tollgate_argv += ["--host", "127.0.0.1", "--port", str(port)]
                servers["tollgate"] = start("tollgate", tollgate_argv, port, tmpdir)
            for name in ("floor", "tollgate"):
                if name in servers:
                    wait_healthy(servers[name])

            urls = {t: (fake_url if t == "direct" else servers[t].url) + PATH for t in targets}
            for target in targets:
                sanity_check(target, urls[target])
            pids = {t: servers["fake" if t == "direct" else t].proc.pid for t in targets}
            fake_pid = servers["fake"].proc.pid

            print(f"machine: {machine_info()}", flush=True)
            print(
                f"targets: {', '.join(targets)}; {args.rounds} round(s) of {args.duration:g} s "
                f"per scenario; warm-up {args.warmup:g} s",
                flush=True,
            )
            for target in targets:
                for mode in MODES:
                    run_wrk(urls[target], mode, 64, args.warmup)

            total = args.rounds * len(MODES) * len(WRK_SHAPE) * len(targets)
            n = 0
            for rnd in range(args.rounds):
                for s_index, (mode, conc) in enumerate((m, c) for m in MODES for c in WRK_SHAPE):
                    # Rotate the order each time so slow drift (heat, caches) hits every target.
                    for target in rotated(targets, rnd + s_index):
                        n += 1
                        cpu0, fake0 = cpu_seconds(pids[target]), cpu_seconds(fake_pid)
                        wrk = run_wrk(urls[target], mode, conc, args.duration)
                        cpu1, fake1 = cpu_seconds(pids[target]), cpu_seconds(fake_pid)
                        requests = int(wrk["requests"])
                        seconds = wrk["duration_us"] / 1e6
                        errors = sum(int(v) for v in wrk["errors"].values())
                        per_req = 1e6 / requests if requests else 0.0
                        run = Run(
                            target=target,
                            mode=mode,
                            concurrency=conc,
                            round=rnd + 1,
                            requests=requests,
                            seconds=seconds,
                            rps=requests / seconds if seconds else 0.0,
                            p50_ms=wrk["latency_us"]["p50"] / 1000,
                            p99_ms=wrk["latency_us"]["p99"] / 1000,
                            errors=errors,
                            cpu_us_per_req=(cpu1 - cpu0) * per_req,
                            upstream_cpu_us_per_req=(fake1 - fake0) * per_req,
                            wrk=wrk,
                        )
                        runs.append(run)
                        warn = f"  ERRORS {wrk['errors']}" if errors else ""
                        print(
                            f"[{n}/{total}] round {rnd + 1} {mode} c{conc} {target:9s} "
                            f"{run.rps:9,.0f} req/s  p50 {run.p50_ms:7.3f} ms  "
                            f"p99 {run.p99_ms:7.3f} ms  cpu {run.cpu_us_per_req:6.0f} µs/req"
                            f"{warn}",
                            flush=True,
                        )
            for name, server in servers.items():
                rss[name] = peak_rss_mb(server.proc.pid)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping servers", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            for server in servers.values():
                stop(server)
            if args.keep_logs and servers:
                logdir = OUT_DIR / f"logs-{stamp}"
                logdir.mkdir(parents=True, exist_ok=True)
                for server in servers.values():
                    shutil.copy(server.log, logdir / server.log.name)

    scenarios = summarize(runs, targets)
    results = checks(scenarios, rss)
    titles, blocks = tables(scenarios, targets, rss, results)
    print(render_text(titles, blocks))
    if args.markdown:
        print("\n--- Markdown ---")
        print(render_markdown(titles, blocks))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"results-{stamp}.json"
    report = {
        "started": started.isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: v for k, v in vars(args).items()},
        "machine": machine_info(),
        "path": PATH,
        "scenarios": scenarios,
        "peak_rss_mb": rss,
        "checks": results,
        "runs": [vars(r) for r in runs],
    }
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
