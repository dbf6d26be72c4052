"""In-process tests: Tollgate and the fake model server in the test's event loop.

Both listen on 127.0.0.1 (free ports, chosen by the kernel) and talk real HTTP over loopback, as
the processes of `harness.py` do, but start in milliseconds, share the test's event loop (so a
test can read the gateway's state and the fake model's records directly) and count for coverage.
Use these for behaviour of `pipeline/` and `http/`; use `harness.py` (real processes) for
start-up, signals, reload files, hostile sockets, Redis, shutdown and the real client libraries.
The relay interceptor of `apps/relay_interceptor.py` runs here too (`start_inprocess_relay`).

Tests that use these are `async def` and talk through an async client (`aclient`, or
`httpx.AsyncClient(base_url=gw.url)`); a blocking call (sync httpx, `socket.recv`) to an
in-process server waits on the very loop that has to answer it, so it hangs until its timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from harness import write_json
from tollgate import fake_model

if TYPE_CHECKING:
    from tollgate.config_store import ConfigStore
    from tollgate.http.app import Gateway
    from tollgate.settings import Settings


class Clock:
    """Wall-clock epoch milliseconds the test controls.

    It follows the real clock plus an offset the test moves with `advance`; `freeze` stops it
    at one instant (so that two readings are equal) until `unfreeze`.
    """

    def __init__(self) -> None:
        self.offset_ms = 0
        self.frozen_ms: int | None = None

    def __call__(self) -> int:
        if self.frozen_ms is not None:
            return self.frozen_ms
        return time.time_ns() // 1_000_000 + self.offset_ms

    def advance(self, ms: int) -> None:
        if self.frozen_ms is not None:
            self.frozen_ms += ms
        else:
            self.offset_ms += ms

    def freeze(self, at_ms: int | None = None) -> None:
        self.frozen_ms = self() if at_ms is None else at_ms

    def unfreeze(self) -> None:
        if self.frozen_ms is not None:
            self.offset_ms = self.frozen_ms - time.time_ns() // 1_000_000
        self.frozen_ms = None

    def reset(self) -> None:
        self.offset_ms = 0
        self.frozen_ms = None


class MonotonicClock:
    """Monotonic seconds the test moves on: `time.monotonic()` plus an offset (`advance`).

    What a deployment's balancer reads its parking times by (`InProcessGateway.balancer_clock`),
    so that a test waits out a `Retry-After` without sleeping.
    """

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


def clock_injectable() -> bool:
    """Whether `Gateway` takes `now_ms=` (the injectable wall clock)."""
    # Imported when first used: a module of the gateway being edited breaks these tests only.
    from tollgate.http.app import Gateway

    return "now_ms" in inspect.signature(Gateway).parameters


def listening_socket() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1, for a server started later
    (`start_inprocess_relay(..., sock=)`): a config can name its port first, and no other
    process can take the port in between."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def _listen(runner: web.BaseRunner) -> int:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return port


@dataclass
class InProcessFake:
    """The fake model server (`tollgate.fake_model`) in the test's event loop.

    The same methods as `harness.FakeModel`; records and faults are read and set directly, not
    through its control endpoints (a blocking HTTP call from the loop's own thread would wait on
    itself).
    """

    port: int
    app: web.Application
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self, deployment: str, api: str = "chat/completions") -> str:
        return f"{self.url}/openai/deployments/{deployment}/{api}"

    @property
    def _state(self) -> Any:
        return self.app[fake_model._STATE_KEY]

    def requests(self) -> list[dict[str, Any]]:
        # Through JSON, as `GET /_fake/requests` answers: the same shapes as the real process.
        result: list[dict[str, Any]] = json.loads(json.dumps(list(self._state.records)))
        return result

    def last(self) -> dict[str, Any]:
        recorded = self.requests()
        assert recorded, "the fake model received no request"
        return recorded[-1]

    def clear(self) -> None:
        self._state.records.clear()

    def add_fault(self, spec: Mapping[str, Any]) -> None:
        """What `POST /_fake/faults` does with `spec` (camelCase fields)."""
        self._state.faults.append(fake_model._parse_fault(dict(spec)))

    def clear_faults(self) -> None:
        self._state.faults.clear()

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_inprocess_fake(*, record: bool = True) -> InProcessFake:
    app = fake_model.build_app(record=record)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    port = await _listen(runner)
    return InProcessFake(port, app, runner)


@dataclass
class InProcessRelay:
    """The relay interceptor service (`apps/relay_interceptor.py`) in the test's event loop.

    The same methods as `harness.Relay`; what each interceptor got is read directly.
    """

    port: int
    app: web.Application
    runner: web.AppRunner

    def endpoint(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/chat/completions"

    def got(self, name: str) -> list[dict[str, Any]]:
        from apps.relay_interceptor import RECORDS

        # Through JSON, as `GET /_test/requests/<name>` answers.
        result: list[dict[str, Any]] = json.loads(json.dumps(self.app[RECORDS].get(name, [])))
        return result

    def clear(self) -> None:
        from apps.relay_interceptor import RECORDS

        self.app[RECORDS].clear()

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_inprocess_relay(
    dial_url: str, *, sock: socket.socket | None = None
) -> InProcessRelay:
    """The relay service calling Tollgate back at `dial_url`, on `sock` (see
    `listening_socket`) or a free port."""
    from apps.relay_interceptor import build_app

    app = build_app(dial_url)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    if sock is None:
        port = await _listen(runner)
    else:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
    return InProcessRelay(port, app, runner)


@dataclass
class InProcessGateway:
    """A started `Gateway` served on 127.0.0.1 in the test's event loop."""

    port: int
    gateway: Gateway
    runner: web.ServerRunner
    clock: Clock
    config_files: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def settings(self) -> Settings:
        return self.gateway.settings

    @property
    def store(self) -> ConfigStore:
        return self.gateway.store

    @property
    def clock_injected(self) -> bool:
        """Whether the gateway reads `clock` (else it reads the real wall clock)."""
        return clock_injectable()

    def balancer_clock(self, deployment: str) -> MonotonicClock:
        """A clock of the test's own for `deployment`'s balancer in the current config (its
        parking and back-off times); the other balancers keep the real one."""
        clock = MonotonicClock()
        self.store.current.balancers[deployment].clock = clock
        return clock

    async def stop(self) -> None:
        """What `tollgate serve` does on SIGTERM: end the held streams, stop serving, then stop
        the gateway."""
        try:
            await self.gateway.closing()
            await self.runner.cleanup()
        finally:
            await self.gateway.stop()


def _settings_for(
    work_dir: Path,
    files: Sequence[Path],
    settings: Mapping[str, Any] | None,
    env: Mapping[str, str] | None,
    tag: str,
) -> Settings:
    from tollgate.settings import load_settings

    settings_file = None
    if settings is not None:
        settings_file = str(write_json(work_dir / f"settings-{tag}.json", settings))
    # As harness.start_gateway: each gateway counts usage in a file of its own.
    environ = {"aidial.limits.embedded.file": str(work_dir / f"usage-{tag}.sqlite")}
    environ.update(env or {})
    overrides: dict[str, Any] = {
        "config": {"files": [str(f) for f in files]},
        "server": {"host": "127.0.0.1", "port": 0},
    }
    if settings is None or "storage" not in settings:  # a resource store of its own
        storage = str(work_dir / f"storage-{tag}")
        overrides["storage"] = {"overrides": {"jclouds.filesystem.basedir": storage}}
    return load_settings(settings_file, environ=environ, overrides=overrides)


_counter = 0


async def start_inprocess_gateway(
    work_dir: Path,
    configs: Sequence[Mapping[str, Any] | Path],
    *,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    clock: Clock | None = None,
) -> InProcessGateway:
    """What `tollgate serve --config ...` does, in this event loop, on a free port.

    `configs` are config files or dicts (written to `work_dir`); `settings` a static settings
    tree; `env` the `aidial.*` variables `serve` would read (the process environment is not).
    """
    from tollgate.config_store import ConfigStore
    from tollgate.http.app import Gateway, build_server

    global _counter
    _counter += 1
    tag = f"inproc-{_counter}"
    files: list[Path] = []
    for index, config in enumerate(configs):
        if isinstance(config, Path):
            files.append(config)
        else:
            files.append(write_json(work_dir / f"config-{tag}-{index}.json", config))
    loaded = _settings_for(work_dir, files, settings, env, tag)
    store = ConfigStore(
        loaded.config_files,
        overwrite_arrays=loaded.overwrite_arrays,
        reload_every_s=loaded.reload_ms / 1000,
    )
    clock = clock or Clock()
    # Before the gateway took a clock it read the real one; then only `now_ms` is left out.
    options: dict[str, Any] = {"now_ms": clock} if clock_injectable() else {}
    gateway = Gateway(loaded, store, **options)
    await gateway.start()
    runner = web.ServerRunner(build_server(gateway), shutdown_timeout=loaded.shutdown_grace_s)
    try:
        port = await _listen(runner)
    except BaseException:
        await gateway.stop()
        raise
    return InProcessGateway(port, gateway, runner, clock, files)


class Gateways:
    """Gateways a test starts (`await gateways.start(work_dir, configs, ...)`), all stopped
    when it ends."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.started: list[InProcessGateway] = []

    async def start(
        self, configs: Sequence[Mapping[str, Any] | Path], **options: Any
    ) -> InProcessGateway:
        gateway = await start_inprocess_gateway(self.work_dir, configs, **options)
        self.started.append(gateway)
        return gateway

    async def stop_all(self) -> None:
        while self.started:
            await self.started.pop().stop()


async def eventually_async(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0
) -> None:
    """Wait (without blocking the loop) until `check` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
