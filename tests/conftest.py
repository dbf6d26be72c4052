"""Shared fixtures and markers.

Per session: one fake model server and one Tollgate on the rich test config of `gateway_config`,
as real processes (`fake_model`, `gateway`, `client`, `fake`) and in the test's event loop
(`inprocess_fake`, `inprocess_gateway`, `aclient`, `afake`); `gateways` starts more in-process
gateways for one test. Every test gets one of the markers `unit`, `inprocess` or `e2e` (a module
may set its own; otherwise the fixtures it uses decide), so `scripts/test -m "unit or inprocess"`
runs the fast part alone.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway_config import (  # noqa: F401  (re-exported: older modules import them from here)
    CLOSED_PORT_ENDPOINT,
    DEFAULT_KEY,
    HASHED_SECRET,
    IP_KEY,
    LOCAL_IP_KEY,
    NO_IP_KEY,
    POWER_KEY,
    PROVIDER_SECRET,
    chat,
    error_of,
    key_headers,
    main_config,
)
from harness import FakeModel, Gateway, start_fake_model, start_gateway, stop
from inprocess import (
    Clock,
    Gateways,
    InProcessFake,
    InProcessGateway,
    start_inprocess_fake,
    start_inprocess_gateway,
)

KINDS = ("unit", "inprocess", "e2e")
# What a test runs against, when its module does not say, is told by its code and the code of
# the fixtures it needs: starting a process makes it e2e, a private redis-server adds `redis`.
PROCESS_CALLS = (
    "start_gateway(",
    "start_fake_model(",
    "start_app(",
    "start_relay(",
    "start_sdk_interceptor(",
    "run_gateway_expecting_exit(",
    "start_redis_server(",
    "subprocess.",
)
REDIS_CALLS = ("start_redis_server(",)
INPROCESS_FIXTURES = frozenset({"inprocess_gateway", "inprocess_fake", "gateways"})


def _sources(item: pytest.Item) -> str:
    """The test function's source and that of every fixture it needs."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for definitions in info.name2fixturedefs.values() if info is not None else ():
        functions += [definition.func for definition in definitions]
    texts = []
    for function in functions:
        with contextlib.suppress(OSError, TypeError):  # a builtin, or no source
            texts.append(inspect.getsource(function))  # type: ignore[arg-type]
    return "\n".join(texts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test without `unit`, `inprocess` or `e2e` gets one: e2e if it or a fixture it
    needs starts a process (or it keeps files in `work_dir` for one), else inprocess if it
    needs an in-process server, else unit; `redis` if it starts a redis-server."""
    for item in items:
        code = _sources(item)
        fixtures = set(getattr(item, "fixturenames", ()))
        if any(call in code for call in REDIS_CALLS) and item.get_closest_marker("redis") is None:
            item.add_marker(pytest.mark.redis)
        if any(item.get_closest_marker(kind) is not None for kind in KINDS):
            continue
        if any(call in code for call in PROCESS_CALLS):
            item.add_marker(pytest.mark.e2e)
        elif fixtures & INPROCESS_FIXTURES:
            item.add_marker(pytest.mark.inprocess)
        elif "work_dir" in fixtures:
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.unit)


# Real processes (tests/harness.py).


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tollgate")


@pytest.fixture(scope="session")
def fake_model(work_dir: Path) -> Iterator[FakeModel]:
    fake = start_fake_model(work_dir)
    yield fake
    stop(fake.process)


@pytest.fixture(scope="session")
def gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    gw = start_gateway(
        work_dir,
        [main_config(fake_model)],
        env={"aidial.apiKeyValidation.proxyCount": "1"},
    )
    yield gw
    stop(gw.process)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield http


@pytest.fixture
def fake(fake_model: FakeModel) -> FakeModel:
    fake_model.clear()
    return fake_model


# In the test's event loop (pytest-asyncio's session loop): see tests/inprocess.py.


@pytest.fixture(scope="session")
async def inprocess_fake() -> AsyncIterator[InProcessFake]:
    fake = await start_inprocess_fake()
    yield fake
    await fake.stop()


@pytest.fixture(scope="session")
async def inprocess_gateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    """The session's in-process gateway on `main_config` (the same as `gateway`)."""
    gw = await start_inprocess_gateway(
        work_dir, [main_config(inprocess_fake)], env={"aidial.apiKeyValidation.proxyCount": "1"}
    )
    yield gw
    await gw.stop()


@pytest.fixture
async def aclient(inprocess_gateway: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=inprocess_gateway.url, timeout=30) as http:
        yield http


@pytest.fixture
def afake(inprocess_fake: InProcessFake) -> Iterator[InProcessFake]:
    """The in-process fake model, its records and faults cleared before and after the test."""
    inprocess_fake.clear()
    inprocess_fake.clear_faults()
    yield inprocess_fake
    inprocess_fake.clear_faults()


@pytest.fixture
def clock(inprocess_gateway: InProcessGateway) -> Iterator[Clock]:
    """The session in-process gateway's clock, back to the real time after the test."""
    yield inprocess_gateway.clock
    inprocess_gateway.clock.reset()


@pytest.fixture
async def gateways(work_dir: Path) -> AsyncIterator[Gateways]:
    """Start in-process gateways for one test: `await gateways.start([config], env=...)`."""
    started = Gateways(work_dir)
    try:
        yield started
    finally:
        await started.stop_all()
