"""Benchmark Tollgate's overhead against the fake model and a bare floor proxy, using wrk.

Also measures what role limits cost: Tollgate with limits checked on every call (embedded
store, then Redis store) against Tollgate without limits, in the same interleaved run.

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

MODEL = "bench-model"
PATH = f"/openai/deployments/{MODEL}/chat/completions?api-version=2024-02-01"
LIMITS_PATH = f"/v1/deployments/{MODEL}/limits"
API_KEY = "bench-key-0123456789abcdef"
TARGETS = ("direct", "floor", "tollgate", "tollgate-limits", "tollgate-redis")
TOLLGATES = ("tollgate", "tollgate-limits", "tollgate-redis")
LIMITED = ("tollgate-limits", "tollgate-redis")  # Tollgate with role limits on the bench model
# Scenario → wrk script. The Responses and Anthropic scripts set their own path (the body names
# the deployment); the chat ones use PATH.
ALL_MODES = {
    "chat": "chat.lua",
    "stream": "chat_stream.lua",
    "responses-stream": "responses_stream.lua",
    "anthropic-stream": "anthropic_stream.lua",
}
MODES = dict(ALL_MODES)  # the scenarios of this run (`--modes`)
# Scripts that are no scenario of their own: a client that asks for stream usage itself
# (bench/ab.py --stream-usage).
EXTRA_SCRIPTS = {"stream-asking": "chat_stream_asking.lua"}
WRK_SHAPE = {1: (1, 1), 64: (2, 64)}  # concurrency -> (wrk threads, connections)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from README.md, checked at the end of every run.
MIN_FLOOR_RATIO = 0.80
MAX_ADDED_P50_MS = 0.6
MAX_RSS_MB = 100.0
MAX_LIMITS_COST = {"tollgate-limits": 0.15, "tollgate-redis": 0.35}  # of req/s at c64
STORE_NAME = {"tollgate-limits": "embedded", "tollgate-redis": "redis"}

# Limits far above anything a run can reach, so every call is checked and counted but none
# is refused: the benchmark measures the cost of the limits path, not of 429s. Every window
# is set (sliding minute and requestHour, calendar day/week/month/requestDay) and a cost
# limit too, so with the model's pricing each call also has its cost computed and charged.
HUGE = "1000000000000"
LIMITED_ROLES: dict[str, Any] = {
    "default": {
        "limits": {
            MODEL: {
                "minute": HUGE,
                "day": HUGE,
                "week": HUGE,
                "month": HUGE,
                "requestHour": HUGE,
                "requestDay": HUGE,
            }
        },
        "costLimit": {"day": "1000000000"},
    }
}
PRICING = {"unit": "token", "prompt": "0.000001", "completion": "0.000002"}
UNLIMITED = 9223372036854775807  # what the limits API reports for "no limit"


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
    # Of redis-server during the run, for tollgate-redis only (it is not Tollgate's child).
    store_cpu_us_per_req: float | None = None
    store_commands_per_req: float | None = None  # including those run inside Lua scripts
    store_scripts_per_req: float | None = None  # EVAL/EVALSHA/FCALL: the scripted round trips
    store_commands: dict[str, int] | None = None  # calls per command during the run
    store_outages: int | None = None  # times Tollgate logged its Redis store unreachable


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(settings: dict[str, str] | None = None, src: Path | None = None) -> dict[str, str]:
    """The servers' environment; ``settings`` are Tollgate's static settings (``aidial.*``);
    ``src`` the tree whose `tollgate` runs (this checkout's `src/` by default)."""
    # Settings left in the caller's shell (a Redis address, a settings file) would silently
    # change what a target measures; each target gets exactly the settings given here.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("aidial.", "proxy.")) and k != "AIDIAL_SETTINGS"
    }
    # Let the servers import tollgate from this checkout even if it is not installed.
    tree = str(src or ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"aidial.{k}": v for k, v in (settings or {}).items()})
    return env


def start(
    name: str,
    argv: list[str],
    port: int,
    logdir: Path,
    settings: dict[str, str] | None = None,
    src: Path | None = None,
) -> Server:
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
            env=child_env(settings, src),
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


def redis_command(port: int, *args: str, timeout: float = 2.0) -> str | int:
    """One command to the benchmark's redis-server, in RESP; enough for PING, INFO, DBSIZE."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        line = reader.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$" and int(rest) >= 0:
            return reader.read(int(rest) + 2)[:-2].decode()
        raise RuntimeError(f"redis {' '.join(args)}: unexpected reply {line[:200]!r}")


def wait_redis(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server)}"
            )
        with contextlib.suppress(OSError, RuntimeError):
            if redis_command(server.port, "PING") == "PONG":
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not answering PING after {timeout:.0f}s")


def redis_command_calls(port: int) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``), without the benchmark's own."""
    calls: dict[str, int] = {}
    for line in str(redis_command(port, "INFO", "commandstats")).splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            fields = dict(item.split("=", 1) for item in rest.split(","))
            calls[name] = int(fields["calls"])
    for own in ("info", "ping"):
        calls.pop(own, None)
    return calls


STORE_DOWN = "limits store unreachable"  # what Tollgate logs when it falls back to local counting


def store_outages(server: Server) -> int:
    try:
        return server.log.read_text(errors="replace").count(STORE_DOWN)
    except OSError:
        return 0


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
        str(WRK_DIR / (MODES.get(mode) or EXTRA_SCRIPTS[mode])),
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


def post_json(url: str, body: dict[str, Any]) -> tuple[int, str]:
    """POST `body` with the bench key: the status and the answer's text."""
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Api-Key": API_KEY},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# What the streamed Responses and Anthropic scenarios send, and their answer's last event.
TYPED_CHECKS: dict[str, tuple[str, dict[str, Any], str]] = {
    "responses-stream": (
        "/openai/v1/responses",
        {"model": MODEL, "input": "Say hello", "stream": True},
        "event: response.completed",
    ),
    "anthropic-stream": (
        "/anthropic/v1/messages",
        {
            "model": MODEL,
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "Say hello"}],
        },
        "event: message_stop",
    ),
}


def sanity_check(name: str, url: str) -> None:
    """Fail early, with the answer, if a target does not serve the benchmark requests."""
    for stream in (False, True):
        body: dict[str, Any] = {
            "model": "bench-model",
            "messages": [{"role": "user", "content": "Say hello"}],
        }
        if stream:
            body["stream"] = True
        status, text = post_json(url, body)
        ok = status == 200 and (
            text.rstrip().endswith("data: [DONE]") if stream else '"chat.completion"' in text
        )
        if not ok:
            kind = "streaming" if stream else "non-streaming"
            raise RuntimeError(f"{name}: bad {kind} answer, HTTP {status}: {text[:500]}")
    base = url.partition("/openai/deployments/")[0]
    for mode, (path, typed, last) in TYPED_CHECKS.items():
        if mode in MODES:
            status, text = post_json(base + path, typed)
            if status != 200 or last not in text:
                raise RuntimeError(f"{name}: bad {mode} answer, HTTP {status}: {text[:500]}")


def get_json(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        raise RuntimeError(f"GET {url}: HTTP {exc.code}: {text[:500]}") from exc


def ledger_state(server: Server) -> dict[str, Any]:
    """What Tollgate says of its limits store (``/health``) and of the bench key's usage."""
    health = get_json(server.url + "/health")
    stats = get_json(server.url + LIMITS_PATH, {"Api-Key": API_KEY})
    try:
        return {
            "store": health.get("limits", {}),
            "day_tokens_total": stats["dayTokenStats"]["total"],
            "day_tokens_used": stats["dayTokenStats"]["used"],
            "day_requests_used": stats["dayRequestStats"]["used"],
            "day_cost_used": stats["dayCostStats"]["used"],
        }
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"{server.name}: unexpected {LIMITS_PATH} answer: {stats}") from exc


def check_ledger_config(name: str, state: dict[str, Any]) -> None:
    """Before measuring: the target runs with the store and limits it is meant to measure.

    A Redis ledger that cannot reach Redis falls back to counting in memory and still serves,
    so without this a broken Redis setup would be measured as a fast "Redis" target.
    """
    store = state["store"]
    want_store = "redis" if name == "tollgate-redis" else "embedded"
    if store.get("store") != want_store or not store.get("healthy"):
        raise RuntimeError(f"{name}: expected a healthy {want_store} limits store, got {store}")
    limited = state["day_tokens_total"] != UNLIMITED
    if limited != (name in LIMITED):
        raise RuntimeError(
            f"{name}: day token limit is {state['day_tokens_total']}, "
            f"expected {'a limit' if name in LIMITED else 'none'}"
        )


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
                    "store_cpu_us_per_req": median([r.store_cpu_us_per_req for r in mine]),
                    "store_commands_per_req": median([r.store_commands_per_req for r in mine]),
                    "store_scripts_per_req": median([r.store_scripts_per_req for r in mine]),
                    "store_outages": sum(r.store_outages or 0 for r in mine),
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
                    # What limits cost, against the same gateway without them.
                    "limits": {
                        target: _limits_cost(per, target, conc)
                        for target in LIMITED
                        if target in per
                    },
                }
            )
    return scenarios


def _limits_cost(per: dict[str, dict[str, Any]], target: str, conc: int) -> dict[str, Any]:
    ratio = _ratio(per, target, "tollgate")
    mine, base = per[target], per.get("tollgate")
    if base is None:
        return {"throughput_cost": None, "added_p50_ms": None, "added_cpu_us_per_req": None}
    cpu, base_cpu = mine["cpu_us_per_req"], base["cpu_us_per_req"]
    return {
        "throughput_cost": None if ratio is None else 1 - ratio,
        # As for added p50 over direct: only meaningful without queueing.
        "added_p50_ms": mine["p50_ms"] - base["p50_ms"] if conc == 1 else None,
        # CPU per request is far steadier than req/s on a shared machine: the cross-check.
        "added_cpu_us_per_req": None if cpu is None or base_cpu is None else cpu - base_cpu,
    }


def exercised(state: dict[str, Any]) -> bool:
    """Did the ledger count tokens, requests and cost for the bench key?"""
    return all(state[k] > 0 for k in ("day_tokens_used", "day_requests_used", "day_cost_used"))


def checks(
    scenarios: list[dict[str, Any]], rss: dict[str, float], ledgers: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
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
        for target, cost in sc["limits"].items():
            value = cost["throughput_cost"]
            if sc["concurrency"] != 64 or value is None:
                continue
            limit = MAX_LIMITS_COST[target]
            out.append(
                {
                    "check": f"{name}: limits cost ({STORE_NAME[target]}) < {limit:.0%}",
                    "value": f"{value:.1%}",
                    "ok": value < limit,
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
    # Validity checks: when one fails, the limits figures above do not measure what they claim.
    for target, state in ledgers.items():
        if target not in LIMITED:
            continue
        out.append(
            {
                "check": f"{target}: limits path exercised (day tokens, requests, cost used > 0)",
                "value": f"{state['day_tokens_used']:,} tok, {state['day_requests_used']:,} req, "
                f"${state['day_cost_used']:g}",
                "ok": exercised(state),
                "validity": True,
            }
        )
        if target == "tollgate-redis":
            store = state["store"]
            out.append(
                {
                    "check": "tollgate-redis: Redis store up all run (no local fallback)",
                    "value": f"{state['outages']} outage(s), "
                    f"{store.get('pendingReplay')} pending replay",
                    "ok": state["outages"] == 0
                    and store.get("store") == "redis"
                    and bool(store.get("healthy")),
                    "validity": True,
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
    ledgers: dict[str, dict[str, Any]],
    sent: dict[str, int],
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
        row = [
            fmt(sc["tollgate_over_direct"], ".2f"),
            fmt(sc["tollgate_over_floor"], ".2f"),
            fmt(sc["floor_over_direct"], ".2f"),
            fmt(sc["added_p50_ms_tollgate"], ".3f"),
            fmt(sc["added_p50_ms_floor"], ".3f"),
        ]
        # Without direct or floor in the run there is nothing to compare; leave the row out.
        if any(cell != "-" for cell in row):
            ratios.append([f"{sc['mode']} c{sc['concurrency']}", *row])
    limits = [
        [
            "scenario",
            "target",
            "store",
            "req/s",
            "tollgate req/s",
            "throughput cost",
            "added p50 ms",
            "added CPU µs/req",
            "store CPU µs/req",
            "store cmds/req",
        ]
    ]
    for sc in scenarios:
        base = sc["targets"].get("tollgate")
        for target, cost in sc["limits"].items():
            t = sc["targets"][target]
            limits.append(
                [
                    f"{sc['mode']} c{sc['concurrency']}",
                    target,
                    STORE_NAME[target],
                    fmt(t["rps"], ",.0f"),
                    fmt(base and base["rps"], ",.0f"),
                    fmt(cost["throughput_cost"], ".1%"),
                    fmt(cost["added_p50_ms"], ".3f"),
                    fmt(cost["added_cpu_us_per_req"], ".0f"),
                    fmt(t["store_cpu_us_per_req"], ".0f"),
                    fmt(t["store_commands_per_req"], ".1f"),
                ]
            )
    usage = [
        [
            "target",
            "store",
            "day tokens used",
            "day requests used",
            "day cost used $",
            "requests completed",
        ]
    ]
    for target, state in ledgers.items():
        usage.append(
            [
                target,
                str(state["store"].get("store", "?")),
                f"{state['day_tokens_used']:,}",
                f"{state['day_requests_used']:,}",
                f"{state['day_cost_used']:.6f}",
                f"{sent.get(target, 0):,}",
            ]
        )
    memory = [["process", "peak RSS MB"]] + [[name, f"{mb:.1f}"] for name, mb in rss.items()]
    verdicts = [["target check", "measured", "result"]] + [
        [c["check"], c["value"], "PASS" if c["ok"] else "FAIL"] for c in results
    ]
    titles = [
        "Throughput and latency (medians over rounds)",
        "Overhead",
        "Limits cost (against tollgate without limits; medians over rounds)",
        "Ledger usage of the bench key after the run (GET " + LIMITS_PATH + ")",
        "Memory",
        "Targets",
    ]
    return titles, [main, ratios, limits, usage, memory, verdicts]


LEFT_COLUMNS = frozenset(
    {"scenario", "target", "store", "process", "target check", "measured", "result"}
)


def render_text(titles: list[str], blocks: list[list[list[str]]], notes: list[str]) -> str:
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
    if notes:
        out.append("\nNotes")
        out.extend(f"- {note}" for note in notes)
    return "\n".join(out)


def render_markdown(titles: list[str], blocks: list[list[list[str]]], notes: list[str]) -> str:
    out: list[str] = []
    for title, rows in zip(titles, blocks, strict=True):
        if len(rows) < 2:
            continue
        out.append(f"\n### {title}\n")
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "|".join("---" if h in LEFT_COLUMNS else "---:" for h in rows[0]) + "|")
        out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
    if notes:
        out.append("\n### Notes\n")
        out.extend(f"- {note}" for note in notes)
    return "\n".join(out)


def notes_for(
    scenarios: list[dict[str, Any]], skipped: dict[str, str], elapsed_s: float
) -> list[str]:
    out = [f"{target} skipped: {why}" for target, why in skipped.items()]
    redis = [
        (f"{sc['mode']} c{sc['concurrency']}", sc["targets"]["tollgate-redis"])
        for sc in scenarios
        if "tollgate-redis" in sc["targets"]
    ]
    if redis:
        # Tollgate's CPU column leaves Redis out (it is not Tollgate's child); this is the rest
        # of what a call through the Redis store costs on the machine.
        cpu = ", ".join(f"{name} {fmt(t['store_cpu_us_per_req'], '.0f')}" for name, t in redis)
        cmds = ", ".join(
            f"{name} {fmt(t['store_commands_per_req'], '.1f')} "
            f"({fmt(t['store_scripts_per_req'], '.1f')} scripts)"
            for name, t in redis
        )
        out.append(f"redis-server's own CPU, µs per request of tollgate-redis: {cpu}")
        out.append(
            "Redis commands per request of tollgate-redis, counting those run inside Lua "
            f"scripts (of which EVAL/EVALSHA calls): {cmds}"
        )
        outages = sum(t["store_outages"] for _, t in redis)
        if outages:
            out.append(
                f"tollgate-redis lost its Redis store {outages} time(s) during measured runs "
                "and counted locally meanwhile: its figures are not those of the Redis store"
            )
    out.append(f"total wall time {elapsed_s / 60:.1f} min")
    return out


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
        default=None,
        help=f"comma-separated subset of: {','.join(TARGETS)} (default: all that can run)",
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated subset of: {','.join(ALL_MODES)} (default: all)",
    )
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--keep-logs", action="store_true", help="copy server logs to bench/out")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3.0, 1, 1.0
    names = TARGETS if args.targets is None else args.targets.split(",")
    args.targets = [t.strip() for t in names if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets: {', '.join(sorted(unknown)) or '(none)'}")
    modes = list(ALL_MODES) if args.modes is None else [m.strip() for m in args.modes.split(",")]
    unknown = set(modes) - set(ALL_MODES)
    if unknown or not modes:
        parser.error(f"unknown modes: {', '.join(sorted(unknown)) or '(none)'}")
    select_modes(modes)
    return args


def select_modes(modes: Sequence[str]) -> None:
    """Run only `modes` (in the order of ALL_MODES)."""
    MODES.clear()
    MODES.update({m: script for m, script in ALL_MODES.items() if m in modes})


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


def python_fails(*argv: str) -> str | None:
    """None if ``python argv...`` works in the servers' environment, else why not."""
    done = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
        timeout=60,
    )
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip()[-2000:]


def tollgate_available() -> str | None:
    """None if ``python -m tollgate serve --help`` works, else why not."""
    return python_fails("-m", "tollgate", "serve", "--help")


def redis_unavailable() -> str | None:
    """None if the Redis target can run, else why not (it is skipped, not an error)."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    why = python_fails("-c", "import redis, tollgate.limits.redis_ledger")
    if why is not None:
        return f"the Redis ledger cannot be imported: {why.splitlines()[-1]}"
    return None


def estimated_seconds(args: argparse.Namespace, targets: Sequence[str]) -> float:
    scenarios = len(MODES) * len(WRK_SHAPE)
    rounds, duration, warmup_s = int(args.rounds), float(args.duration), float(args.warmup)
    measured = rounds * scenarios * len(targets) * duration
    warmup = len(targets) * len(MODES) * warmup_s
    # Start-up, sanity checks and wrk's own start and stop, per target and per run.
    setup = 3 + len(targets) + 0.1 * (rounds * scenarios + len(MODES)) * len(targets)
    return measured + warmup + setup


def tollgate_config(fake_url: str, limited: bool) -> dict[str, Any]:
    """One model in front of the fake model; with ``limited``, huge limits and a price."""
    model: dict[str, Any] = {
        "type": "chat",
        "endpoint": f"{fake_url}/openai/deployments/{MODEL}/chat/completions",
        # The Responses and Anthropic scenarios (compatibility C75).
        "interfaces": {
            "openaiResponses": {"baseUrl": fake_url},
            "anthropicMessages": {"baseUrl": fake_url},
        },
    }
    config: dict[str, Any] = {
        "models": {MODEL: model},
        "keys": {API_KEY: {"project": "bench", "role": "default"}},
        # An entry with no fields: the model is unlimited (every call is still counted).
        "roles": {"default": {"limits": {MODEL: {}}}},
    }
    if limited:
        model["pricing"] = PRICING
        config["roles"] = LIMITED_ROLES
    return config


@dataclass
class StoreSample:
    """redis-server's counters at one moment, with the Tollgate that uses it."""

    cpu_s: float
    calls: dict[str, int]
    outages: int

    @classmethod
    def take(cls, redis_server: Server, tollgate: Server) -> StoreSample:
        return cls(
            cpu_seconds(redis_server.proc.pid),
            redis_command_calls(redis_server.port),
            store_outages(tollgate),
        )


SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})


def measure(
    target: str,
    url: str,
    mode: str,
    conc: int,
    rnd: int,
    seconds: float,
    servers: dict[str, Server],
) -> Run:
    pid = servers["fake" if target == "direct" else target].proc.pid
    fake_pid = servers["fake"].proc.pid
    redis_server = servers["redis"] if target == "tollgate-redis" else None
    cpu0, fake0 = cpu_seconds(pid), cpu_seconds(fake_pid)
    store0 = StoreSample.take(redis_server, servers[target]) if redis_server else None
    wrk = run_wrk(url, mode, conc, seconds)
    cpu1, fake1 = cpu_seconds(pid), cpu_seconds(fake_pid)
    store1 = StoreSample.take(redis_server, servers[target]) if redis_server else None
    requests = int(wrk["requests"])
    duration = wrk["duration_us"] / 1e6
    per_req = 1e6 / requests if requests else 0.0
    run = Run(
        target=target,
        mode=mode,
        concurrency=conc,
        round=rnd,
        requests=requests,
        seconds=duration,
        rps=requests / duration if duration else 0.0,
        p50_ms=wrk["latency_us"]["p50"] / 1000,
        p99_ms=wrk["latency_us"]["p99"] / 1000,
        errors=sum(int(v) for v in wrk["errors"].values()),
        cpu_us_per_req=(cpu1 - cpu0) * per_req,
        upstream_cpu_us_per_req=(fake1 - fake0) * per_req,
        wrk=wrk,
    )
    if store0 is not None and store1 is not None:
        calls = {
            name: n - store0.calls.get(name, 0)
            for name, n in store1.calls.items()
            if n != store0.calls.get(name, 0)
        }
        per_call = 1 / requests if requests else 0.0
        run.store_cpu_us_per_req = (store1.cpu_s - store0.cpu_s) * per_req
        run.store_commands_per_req = sum(calls.values()) * per_call
        run.store_scripts_per_req = (
            sum(n for c, n in calls.items() if c in SCRIPT_COMMANDS) * per_call
        )
        run.store_commands = calls
        run.store_outages = store1.outages - store0.outages
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    targets: list[str] = [t for t in TARGETS if t in args.targets]
    skipped: dict[str, str] = {}
    if any(t in TOLLGATES for t in targets) and (why := tollgate_available()) is not None:
        print(f"`python -m tollgate serve` does not work:\n{why}", file=sys.stderr)
        print("use --targets direct,floor to run without it", file=sys.stderr)
        return 2
    if "tollgate-redis" in targets and (why := redis_unavailable()) is not None:
        # Skipped, not failed: the rest of the comparison still stands on its own.
        skipped["tollgate-redis"] = why
        targets.remove("tollgate-redis")
        print(f"note: skipping tollgate-redis: {why}", flush=True)
    if not targets:
        print("no target left to run", file=sys.stderr)
        return 2

    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    estimate = estimated_seconds(args, targets)
    print(
        f"targets: {', '.join(targets)}; {args.rounds} round(s) of {args.duration:g} s "
        f"per scenario; warm-up {args.warmup:g} s; "
        f"expected total time about {estimate / 60:.1f} min",
        flush=True,
    )
    servers: dict[str, Server] = {}
    runs: list[Run] = []
    rss: dict[str, float] = {}
    ledgers: dict[str, dict[str, Any]] = {}
    sent: dict[str, int] = {}
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp, sigterm_as_interrupt():
        tmpdir = Path(tmp)
        try:
            port = free_port()
            fake_argv = [py, "-m", "tollgate.fake_model", "--no-record", "--port", str(port)]
            servers["fake"] = start("fake", fake_argv, port, tmpdir)
            wait_healthy(servers["fake"])
            fake_url = servers["fake"].url
            if "tollgate-redis" in targets:
                port = free_port()
                redis_argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
                # No persistence: disk writes would add noise and leave files behind.
                redis_argv += ["--save", "", "--appendonly", "no", "--dir", str(tmpdir)]
                servers["redis"] = start("redis", redis_argv, port, tmpdir)
                wait_redis(servers["redis"])
            if "floor" in targets:
                port = free_port()
                floor_argv = [py, str(BENCH / "floor_proxy.py"), "--port", str(port)]
                floor_argv += ["--upstream", fake_url]
                servers["floor"] = start("floor", floor_argv, port, tmpdir)
            for name in (t for t in targets if t in TOLLGATES):
                config = tmpdir / f"{name}.json"
                limited = name in LIMITED
                config.write_text(json.dumps(tollgate_config(fake_url, limited), indent=2))
                # Each process its own ledger file: none reads another's usage at start-up,
                # and nothing is left in the working directory.
                settings = {"limits.embedded.file": str(tmpdir / f"{name}.sqlite")}
                if name == "tollgate-redis":
                    address = f"redis://127.0.0.1:{servers['redis'].port}"
                    settings["redis.singleServerConfig.address"] = address
                port = free_port()
                tollgate_argv = [py, "-m", "tollgate", "serve", "--config", str(config)]
                tollgate_argv += ["--host", "127.0.0.1", "--port", str(port)]
                servers[name] = start(name, tollgate_argv, port, tmpdir, settings)
            for name in targets:
                if name in servers:
                    wait_healthy(servers[name])

            urls = {t: (fake_url if t == "direct" else servers[t].url) + PATH for t in targets}
            for target in targets:
                sanity_check(target, urls[target])
                sent[target] = 2
                if target in TOLLGATES:
                    check_ledger_config(target, ledger_state(servers[target]))

            print(f"machine: {machine_info()}", flush=True)
            for target in targets:
                for mode in MODES:
                    warm = run_wrk(urls[target], mode, 64, args.warmup)
                    sent[target] += int(warm["requests"])

            total = args.rounds * len(MODES) * len(WRK_SHAPE) * len(targets)
            n = 0
            for rnd in range(args.rounds):
                for s_index, (mode, conc) in enumerate((m, c) for m in MODES for c in WRK_SHAPE):
                    # Rotate the order each time so slow drift (heat, caches) hits every target.
                    for target in rotated(targets, rnd + s_index):
                        n += 1
                        run = measure(
                            target, urls[target], mode, conc, rnd + 1, args.duration, servers
                        )
                        runs.append(run)
                        sent[target] += run.requests
                        warn = f"  ERRORS {run.wrk['errors']}" if run.errors else ""
                        if run.store_outages:
                            # Part of this run was counted in memory, not in Redis.
                            warn += f"  REDIS STORE LOST x{run.store_outages}"
                        print(
                            f"[{n}/{total}] round {rnd + 1} {mode} c{conc} {target:15s} "
                            f"{run.rps:9,.0f} req/s  p50 {run.p50_ms:7.3f} ms  "
                            f"p99 {run.p99_ms:7.3f} ms  cpu {run.cpu_us_per_req:6.0f} µs/req"
                            f"{warn}",
                            flush=True,
                        )
            for target in (t for t in targets if t in TOLLGATES):
                ledgers[target] = ledger_state(servers[target])
                ledgers[target]["outages"] = store_outages(servers[target])
            for name, server in servers.items():
                rss[name] = peak_rss_mb(server.proc.pid)
        except KeyboardInterrupt:
            print("\ninterrupted; stopping servers", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            # Reverse order: Tollgate closes its ledger while Redis is still there to take it.
            for server in reversed(servers.values()):
                stop(server)
            if args.keep_logs and servers:
                logdir = OUT_DIR / f"logs-{stamp}"
                logdir.mkdir(parents=True, exist_ok=True)
                for server in servers.values():
                    shutil.copy(server.log, logdir / server.log.name)

    elapsed = time.monotonic() - t0
    scenarios = summarize(runs, targets)
    results = checks(scenarios, rss, ledgers)
    titles, blocks = tables(scenarios, targets, rss, results, ledgers, sent)
    notes = notes_for(scenarios, skipped, elapsed)
    print(render_text(titles, blocks, notes))
    if args.markdown:
        print("\n--- Markdown ---")
        print(render_markdown(titles, blocks, notes))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"results-{stamp}.json"
    report = {
        "started": started.isoformat(),
        "elapsed_s": round(elapsed, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: v for k, v in vars(args).items()},
        "machine": machine_info(),
        "path": PATH,
        "tollgate_configs": {
            t: tollgate_config("http://127.0.0.1:<fake>", t in LIMITED)
            for t in targets
            if t in TOLLGATES
        },
        "skipped": skipped,
        "scenarios": scenarios,
        "peak_rss_mb": rss,
        "ledgers": ledgers,
        "requests_completed": sent,
        "checks": results,
        "runs": [vars(r) for r in runs],
    }
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    invalid = [c["check"] for c in results if c.get("validity") and not c["ok"]]
    if invalid:
        # Loud, and a non-zero exit: the limits figures of this run are not to be used.
        print(
            f"\nerror: the limits figures of this run are invalid: {'; '.join(invalid)}",
            file=sys.stderr,
        )
        print("see the servers' logs (--keep-logs) for why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
