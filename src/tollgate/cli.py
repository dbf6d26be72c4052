"""The `tollgate` command: `serve` the gateway, run the bundled `fake-model`, operator tools.

`keys new` makes a project API key; `config check` validates config files without serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tollgate import __version__

if TYPE_CHECKING:
    from tollgate.http.app import Gateway

log = logging.getLogger("tollgate")


def _serve(args: argparse.Namespace) -> int:
    from tollgate.config.load import ConfigError
    from tollgate.config_store import ConfigStore
    from tollgate.http.app import Gateway
    from tollgate.observability.logs import configure as configure_logging
    from tollgate.resources.encryption import cipher_from_settings
    from tollgate.settings import SettingsError, load_settings
    from tollgate.storage.settings import StorageSettings

    overrides: dict[str, Any] = {}
    if args.config:
        overrides["config"] = {"files": list(args.config)}
    if args.host is not None or args.port is not None:
        overrides["server"] = {
            k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None
        }
    log_level = args.serve_log_level or args.log_level or None
    if log_level is not None or args.log_format is not None:  # over log.* of the settings
        overrides["log"] = {
            k: v for k, v in (("level", log_level), ("format", args.log_format)) if v is not None
        }
    try:
        settings = load_settings(args.settings, overrides=overrides)
        StorageSettings.from_raw(settings.raw)  # `storage.*` (compatibility C80)
        cipher_from_settings(settings.raw)  # `encryption.*` (compatibility C82)
        if settings.tracing is not None:
            _require_tracing(settings.tracing.source)
        configure_logging(settings.log_level, settings.log_format)
        store = ConfigStore(
            settings.config_files,
            overwrite_arrays=settings.overwrite_arrays,
            reload_every_s=settings.reload_ms / 1000,
        )
    except (SettingsError, ConfigError) as exc:
        print(f"tollgate: cannot start: invalid configuration\n{exc}", file=sys.stderr)
        return 1

    try:
        gateway = Gateway(settings, store)
    except Exception as exc:  # e.g. an object store its client cannot open (bad endpoint)
        print(f"tollgate: cannot start: {exc}", file=sys.stderr)
        return 1
    _tune_garbage_collector()
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_run(gateway))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    finally:
        _cancel_remaining(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _run(gateway: Gateway) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully.

    Stopping: the listening socket is closed (new connections are refused), idle keep-alive
    connections are closed, calls and streams in flight get `server.shutdownGracePeriod` to
    finish (those still running then are cut), and the gateway stops last: pending settles,
    counters flushed to their store, logs and spans written. Exit code 0.
    """
    from aiohttp import web

    from tollgate.http.app import build_server
    from tollgate.limits.memory import UsageFileError

    settings = gateway.settings
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await gateway.start()
    except UsageFileError as exc:
        print(f"tollgate: cannot start: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await gateway.stop()
        return 1
    runner = web.ServerRunner(build_server(gateway), shutdown_timeout=settings.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"tollgate: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
                file=sys.stderr,
            )
            return 1
        snapshot = gateway.store.current
        # The usage file's absolute path: two gateways started in one folder share it.
        usage_file = settings.usage_file
        stored = (
            ""
            if usage_file is None
            else f"; {'replay queue' if gateway.redis is not None else 'usage counters'} in "
            f"{os.path.abspath(usage_file)}"
        )
        print(
            f"Tollgate {__version__} listening on http://{settings.host}:{settings.port} "
            f"({len(snapshot.deployments)} deployments, {len(snapshot.keys)} keys, "
            f"{len(gateway.managed)} API keys{stored})",
            flush=True,
        )
        await stopping.wait()
        log.info("shutting down: new connections refused, calls in flight finishing")
        await gateway.closing()
    finally:
        await runner.cleanup()
        await gateway.stop()
    return 0


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks still pending once the gateway stopped (none is expected) end cancelled, not
    destroyed mid-flight with a warning."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _require_tracing(source: str) -> None:
    """Traces are configured: the optional `otel` extra must be installed."""
    from tollgate.settings import SettingsError

    try:
        import tollgate.observability.tracing  # noqa: F401
    except ImportError as exc:
        raise SettingsError(
            f"setting {source}: traces are configured but OpenTelemetry is not installed "
            f"(missing module {exc.name}): install Tollgate with the otel extra, "
            "pip install 'tollgate[otel]', or leave tracing unconfigured"
        ) from None


def _tune_garbage_collector() -> None:
    """Keep the cyclic collector off the request path.

    Requests allocate many short-lived objects that reference counting frees; with the default
    threshold (700) the collector still runs every few requests and walks the long-lived heap
    (config, modules) each time it reaches the older generations. Freezing what exists at
    start-up and collecting the young generation less often cut about 8% of CPU per request in
    `bench/`.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _fake_model(rest: Sequence[str]) -> int:
    from tollgate import fake_model

    return fake_model.main(list(rest))


def _keys_new(args: argparse.Namespace) -> int:
    from tollgate.security.key_generator import DEFAULT_ROLE, new_key

    key = new_key(args.project, args.roles or [DEFAULT_ROLE])
    if args.json:
        print(
            json.dumps(
                {
                    "key": key.secret,
                    "name": key.name,
                    "fingerprint": key.fingerprint,
                    "entry": key.entry(),
                }
            )
        )
        return 0
    print(
        "New API key (256 random bits; shown only now: give it to the client, keep it out of "
        f"config files and logs):\n  {key.secret}\n"
        f"Its name for aidial.config.json (SHA-256 of the key):\n  {key.name}\n"
        f"Logs name it by its fingerprint:\n  {key.fingerprint}\n"
        f'Entry for the "keys" object:\n  {json.dumps(key.entry())}'
    )
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from tollgate.config_check import check, exit_code

    problems = check(args.files, settings_file=args.settings)
    code = exit_code(problems, strict=args.strict)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if args.json:
        report = {
            "errors": errors,
            "warnings": warnings,
            "exitCode": code,
            "problems": [p.to_json() for p in problems],
        }
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return code
    for problem in problems:
        print(problem)
    if problems:
        print(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}")
    else:
        print("no problems found")
    return code


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _not_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_operator_commands(commands: Any) -> None:
    from tollgate.security.key_generator import DEFAULT_PROJECT, DEFAULT_ROLE

    keys = commands.add_parser("keys", help="make API keys; manage those of a running Tollgate")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser(
        "new",
        help="print a new 256-bit API key, its sha256: name and a `keys` entry",
        description="Print a new random 256-bit API key, its `sha256:<hex>` name (what "
        "aidial.config.json needs; the secret itself need not be stored) and a ready-to-paste "
        "`keys` entry.",
    )
    new.add_argument(
        "--project",
        default=DEFAULT_PROJECT,
        type=_not_empty,
        help=f'project of the key (default "{DEFAULT_PROJECT}", a placeholder to replace)',
    )
    new.add_argument(
        "--role",
        action="append",
        dest="roles",
        metavar="R",
        type=_not_empty,
        help=f'role of the key; repeat for several (default "{DEFAULT_ROLE}", the role DIAL '
        "falls back to for limits)",
    )
    new.add_argument("--json", action="store_true", help="print one JSON object")
    from tollgate.cli_keys import add_commands  # keys create|list|show|rotate|revoke, audit

    add_commands(keys_commands, commands)

    config = commands.add_parser("config", help="work with aidial.config.json files")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser(
        "check",
        help="validate config files without starting anything",
        description="Validate dynamic config files, deep-merged in order as `serve` merges them, "
        "and the static settings. Errors are what `serve` would refuse; warnings are likely "
        "mistakes (unknown fields, weak keys, roles, interceptors and addons that lead "
        "nowhere). Secrets are shown as sha256: fingerprints.",
        epilog="Exit status: 0 no problems, 1 errors (or warnings with --strict), 2 warnings only.",
    )
    check.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="dynamic config file (aidial.config.json); several are deep-merged in order "
        "(default: config.files of the settings)",
    )
    check.add_argument(
        "--settings",
        metavar="FILE",
        help="static settings file to check too, whose config.jsonMergeStrategy applies "
        "(default: $AIDIAL_SETTINGS)",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.add_argument("--json", action="store_true", help="print one JSON object")

    usage = commands.add_parser(
        "usage",
        help="print current usage and remaining limits per project and deployment",
        description="Read the configured store (Redis when the settings name it, else the "
        "embedded file, read-only) and print each project's usage and what its limits leave.",
    )
    usage.add_argument(
        "--settings", metavar="FILE", help="static settings file (default: $AIDIAL_SETTINGS)"
    )
    usage.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="dynamic config file; repeat to deep-merge several (default: config.files)",
    )
    usage.add_argument("--project", type=_not_empty, help="only this project")
    usage.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate", description="A DIAL-compatible LLM gateway.")
    parser.add_argument("--version", action="version", version=f"tollgate {__version__}")
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING or ERROR (default INFO; for serve, log.level of the settings)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Serve the gateway until SIGTERM or SIGINT (then stop gracefully). Static "
        "settings come from --settings (or $AIDIAL_SETTINGS) and aidial.* environment "
        "variables; the options below override them.",
        epilog="Exit status: 0 after a graceful stop; 1 when it cannot start (invalid "
        "configuration, port taken, usage file in use by another process).",
    )
    serve.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="dynamic config file (aidial.config.json); repeat to deep-merge several in order; "
        "replaces config.files of the settings",
    )
    serve.add_argument(
        "--settings", metavar="FILE", help="static settings file (default: $AIDIAL_SETTINGS)"
    )
    serve.add_argument(
        "--host", help="address to listen on (default: server.host of the settings, 0.0.0.0)"
    )
    serve.add_argument(
        "--port", type=int, help="port to listen on (default: server.port of the settings, 8080)"
    )
    serve.add_argument(
        "--log-level",
        dest="serve_log_level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default: log.level of the settings, else INFO)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text lines, or one JSON object per line (default: log.format of the settings)",
    )

    commands.add_parser(
        "fake-model",
        help="run the bundled fake model server (see `tollgate fake-model --help`)",
        add_help=False,
    )
    _add_operator_commands(commands)

    args, rest = parser.parse_known_args(argv)
    level = getattr(args, "serve_log_level", None) or args.log_level or "INFO"
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "fake-model":
        return _fake_model(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "run", None) is not None:  # a Configuration API command (cli_keys)
        return int(args.run(args))
    if args.command == "keys":
        return _keys_new(args)
    if args.command == "config":
        return _config_check(args)
    if args.command == "usage":
        from tollgate.usage_report import run

        return run(args.settings, args.config or (), args.project, args.json)
    return _serve(args)
