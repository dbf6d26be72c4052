"""Where a running gateway's CPU goes under load: py-spy samples a real `tollgate serve` (the
`tollgate-limits` target of `run.py`: embedded limits, metrics and the access log on) while wrk
drives it at concurrency 64, then prints the functions and the modules that hold the samples.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py [--seconds 15] [--mode chat|stream] [--top 30]

The servers run on free ports of 127.0.0.1 and are stopped by pid at the end. The raw profile
(collapsed stacks) is written to `bench/out/profile-<mode>.txt` for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import run  # bench/run.py: the same servers, config and wrk scripts as the benchmark

OUT = Path(__file__).parent / "out"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--mode", choices=tuple(run.ALL_MODES), default="chat")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--src", type=Path, default=None, help="another tree's src/ to profile")
    parser.add_argument(
        "--usage",
        choices=("always", "on-request", "never"),
        default="always",
        help="when the fake model reports usage (on-request: as OpenAI, so Tollgate asks for "
        "stream usage and hides it)",
    )
    return parser.parse_args()


def frame_name(frame: str) -> tuple[str, str]:
    """`function (path/to/module.py:line)` → (function with its file, module's short path)."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    short = path.split("site-packages/")[-1].split("src/")[-1]
    return f"{name} ({short})", short


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # py-spy sometimes writes a line it could not decode: skipped
        count = int(count_text)
        frames = stack.split(";")
        total += count
        function, module = frame_name(frames[-1])
        own[function] += count
        modules[module] += count
        for seen in {frame_name(frame)[0] for frame in frames}:
            inclusive[seen] += count
    lines = [f"{total} samples", "", f"top {top} functions by own samples:"]
    for function, count in own.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {function}")
    lines += ["", f"top {top} modules by own samples:"]
    for module, count in modules.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {module}")
    lines += ["", "tollgate functions by inclusive samples:"]
    ours = [(f, c) for f, c in inclusive.items() if "tollgate/" in f]
    for function, count in sorted(ours, key=lambda item: -item[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {function}")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-profile-"))
    servers: list[run.Server] = []
    try:
        fake_port = run.free_port()
        fake = run.start(
            "fake",
            [
                sys.executable,
                "-m",
                "tollgate.fake_model",
                "--port",
                str(fake_port),
                "--no-record",
                "--usage",
                args.usage,
            ],
            fake_port,
            workdir,
        )
        servers.append(fake)
        run.wait_healthy(fake)
        config = workdir / "config.json"
        config.write_text(json.dumps(run.tollgate_config(fake.url, limited=True)))
        port = run.free_port()
        gateway = run.start(
            "tollgate",
            [
                sys.executable,
                "-m",
                "tollgate",
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            port,
            workdir,
            {"limits.embedded.file": str(workdir / "usage.sqlite")},
            args.src,
        )
        servers.append(gateway)
        run.wait_healthy(gateway)
        url = f"{gateway.url}{run.PATH}"
        run.run_wrk(url, args.mode, 64, 3)  # warm up
        OUT.mkdir(exist_ok=True)
        raw = OUT / f"profile-{args.mode}.txt"
        recorder = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(gateway.proc.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        result: dict[str, object] = {}
        load = threading.Thread(
            target=lambda: result.update(run.run_wrk(url, args.mode, 64, args.seconds + 1))
        )
        load.start()
        recorder.wait(timeout=args.seconds + 60)
        load.join()
        if result:
            rps = float(result["requests"]) / (float(result["duration_us"]) / 1e6)  # type: ignore[arg-type]
            print(f"wrk: {rps:,.0f} req/s at c64 ({args.mode})")
        print(summarize(raw, args.top))
    finally:
        for server in reversed(servers):
            run.stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
