"""A/B: this checkout's Tollgate against another tree's, in one interleaved run.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/ab.py /tmp/base [--rounds 5] [--duration 5]
    .venv/bin/python bench/ab.py --stream-usage [--rounds 5]

With `--stream-usage` both gateways are this checkout's, on one fake model that reports stream
usage only when asked (as OpenAI does), so both relay the same upstream stream: `base` serves a
client that asks for usage itself (`stream_options.include_usage`, so Tollgate adds and hides
nothing), `this` one that does not ask (Tollgate asks for it and hides it). The difference is
what asking and hiding cost (compatibility C70).

Both gateways run the `tollgate-limits` target of `run.py` (embedded limits on every call,
metrics and the access log on) against one fake model, each from its own `src/`. Each round
runs every scenario (chat and stream, concurrency 64 and 1) on both, in alternating order, so
that the machine's drift and the load of other work hit both alike; the figures are medians
over the rounds. CPU µs/req is the gateway process's own CPU time per call, which moves less
with the machine's other load than req/s does. The servers run on free ports of 127.0.0.1 and
are stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import run  # bench/run.py: the same servers, config and wrk scripts as the benchmark

CONCURRENCIES = (64, 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, nargs="?", help="the other tree (its src/ is run)")
    parser.add_argument(
        "--stream-usage", action="store_true", help="this tree with and without asking for usage"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument(
        "--modes",
        default="chat,stream",
        help=f"comma-separated subset of: {','.join(run.ALL_MODES)} (default: chat,stream, "
        "which older trees serve too)",
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(run.ALL_MODES):
        parser.error(f"unknown modes: {args.modes}")
    run.select_modes(modes)
    return args


def main() -> int:
    args = parse_args()
    scenarios = [(mode, conc) for mode in run.MODES for conc in CONCURRENCIES]
    if (args.base is None) == (not args.stream_usage):
        print("give a tree to compare with, or --stream-usage", file=sys.stderr)
        return 2
    base_src = run.ROOT / "src" if args.stream_usage else args.base.resolve() / "src"
    trees = {"base": base_src, "this": run.ROOT / "src"}
    py = sys.executable
    servers: dict[str, run.Server] = {}
    runs: dict[tuple[str, str, int], list[run.Run]] = {}
    with tempfile.TemporaryDirectory(prefix="tollgate-ab-") as tmp, run.sigterm_as_interrupt():
        tmpdir = Path(tmp)
        try:
            port = run.free_port()
            fake = [py, "-m", "tollgate.fake_model", "--no-record", "--port", str(port)]
            if args.stream_usage:
                fake += ["--usage", "on-request"]
            servers["fake"] = run.start("fake", fake, port, tmpdir)
            run.wait_healthy(servers["fake"])
            fake_urls = {name: servers["fake"].url for name in trees}
            for name, src in trees.items():
                config = tmpdir / f"{name}.json"
                tollgate_config = run.tollgate_config(fake_urls[name], True)
                config.write_text(json.dumps(tollgate_config))
                settings = {"limits.embedded.file": str(tmpdir / f"{name}.sqlite")}
                port = run.free_port()
                argv = [py, "-m", "tollgate", "serve", "--config", str(config)]
                argv += ["--host", "127.0.0.1", "--port", str(port)]
                servers[name] = run.start(name, argv, port, tmpdir, settings, src)
            urls = {}
            for name in trees:
                run.wait_healthy(servers[name])
                urls[name] = servers[name].url + run.PATH
                run.sanity_check(name, urls[name])
                for mode in run.MODES:
                    run.run_wrk(urls[name], mode, 64, args.warmup)
            for rnd in range(args.rounds):
                for index, (mode, conc) in enumerate(scenarios):
                    for name in run.rotated(list(trees), rnd + index):
                        # measure() reads servers[target]: the gateway under test.
                        # --stream-usage: base's client asks for usage itself.
                        asking = args.stream_usage and name == "base" and mode == "stream"
                        result = run.measure(
                            name,
                            urls[name],
                            "stream-asking" if asking else mode,
                            conc,
                            rnd + 1,
                            args.duration,
                            servers,
                        )
                        runs.setdefault((name, mode, conc), []).append(result)
                        print(
                            f"round {rnd + 1} {mode} c{conc} {name}: {result.rps:8,.0f} req/s "
                            f"p50 {result.p50_ms:6.3f} ms cpu {result.cpu_us_per_req:4.0f} µs/req",
                            flush=True,
                        )
        except KeyboardInterrupt:
            return 130
        finally:
            for server in reversed(servers.values()):
                run.stop(server)
    what = "a client that asks for stream usage itself" if args.stream_usage else args.base
    print(f"\nmedians over {args.rounds} rounds; base = {what}")
    print("| scenario | base req/s | this req/s | this/base | base CPU µs/req | this CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, conc in scenarios:
        base, this = runs[("base", mode, conc)], runs[("this", mode, conc)]
        rps_b = statistics.median(r.rps for r in base)
        rps_t = statistics.median(r.rps for r in this)
        cpu_b = statistics.median(r.cpu_us_per_req or 0.0 for r in base)
        cpu_t = statistics.median(r.cpu_us_per_req or 0.0 for r in this)
        print(
            f"| {mode} c{conc} | {rps_b:,.0f} | {rps_t:,.0f} | {rps_t / rps_b:.2f} "
            f"| {cpu_b:.0f} | {cpu_t:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
