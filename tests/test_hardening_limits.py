"""Hardening of the limits (issue 11): a change of `rateLimitSchedule` never opens a limit
(item 13), and huge numbers never break the limits API (item 14). Both ledgers: embedded, and
Redis (a private redis-server)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis.asyncio

from gateway_config import chat
from harness import run_gateway_expecting_exit, start_gateway, stop
from redis_server import RedisServer, redis_server_binary, start_redis_server, stop_redis_server
from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, RateLimitSchedule
from tollgate.limits.ledger import Ask, Charge, Ledger
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.policy import Limits
from tollgate.limits.redis_ledger import RedisLedger
from tollgate.limits.usage import USAGE_MAX, Usage
from tollgate.limits.windows import Clock, Instant, Schedule

MODEL = "m"
U = UNLIMITED
UTC_CLOCK = Clock(Schedule.of(RateLimitSchedule()))
TOKYO = Clock(Schedule.of(RateLimitSchedule(timezone="Asia/Tokyo")))
LOS_ANGELES = Clock(Schedule.of(RateLimitSchedule(timezone="America/Los_Angeles")))
THREE_A_DAY = Limits(tokens=(U, U, U, U), requests=(U, 3), cost=(UNLIMITED_COST,) * 4)
TOKENS_A_DAY = Limits(tokens=(U, 100, U, U), requests=(U, U), cost=(UNLIMITED_COST,) * 4)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def at(clock: Clock, text: str) -> Instant:
    # A fresh Instant each time: Clock.at caches one per millisecond and period.
    return Clock(clock.schedule).at(ms(text))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("needs redis-server")
    server = start_redis_server(tmp_path_factory.mktemp("redis-limits"))
    yield server
    stop_redis_server(server)


@pytest_asyncio.fixture(params=["embedded", "redis"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "embedded":
        memory = MemoryLedger(None)
        await memory.start()
        yield memory
        await memory.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.asyncio.Redis(port=server.port)
    shared = RedisLedger(client, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield shared
    await client.aclose()


async def requests_today(ledger: Ledger, now: Instant) -> int:
    return (await ledger.usage("b", [MODEL], now)).entities[MODEL].requests[1]


# --- item 13: a schedule change -------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "description"),
    [(TOKYO, "period ids earlier than the stored ones"), (LOS_ANGELES, "later ones")],
)
async def test_a_schedule_change_never_opens_a_limit(
    ledger: Ledger, new: Clock, description: str
) -> None:
    for second in range(3):
        assert (
            await ledger.admit(
                Ask("b", MODEL, THREE_A_DAY, at(UTC_CLOCK, f"2026-07-01T12:06:0{second}"))
            )
            is None
        )
    assert (
        await ledger.admit(Ask("b", MODEL, THREE_A_DAY, at(UTC_CLOCK, "2026-07-01T12:06:30")))
        is not None
    )
    # Reloaded at 12:07 UTC with another timezone: the day counted so far still counts.
    for when in ("2026-07-01T12:07:00", "2026-07-01T18:00:00", "2026-07-01T23:59:59"):
        now = at(new, when)
        refusal = await ledger.admit(Ask("b", MODEL, THREE_A_DAY, now))
        assert refusal is not None and refusal.exceeded == ("day",), (description, when)
        assert refusal.used[1] == 3
        assert await requests_today(ledger, now) == 3
    # The period it was counted in has ended: the new schedule's day starts from 0.
    now = at(new, "2026-07-02T00:00:01")
    assert await ledger.admit(Ask("b", MODEL, THREE_A_DAY, now)) is None
    assert await requests_today(ledger, now) == 1


@pytest.mark.parametrize("new", [TOKYO, LOS_ANGELES])
async def test_tokens_charged_after_a_schedule_change_count_in_the_stored_day(
    ledger: Ledger, new: Clock
) -> None:
    first = at(UTC_CLOCK, "2026-07-01T12:00:00")
    assert await ledger.admit(Ask("b", MODEL, TOKENS_A_DAY, first)) is None
    await ledger.settle(Charge("b", MODEL, first, 60, 0))
    later = at(new, "2026-07-01T12:10:00")
    assert await ledger.admit(Ask("b", MODEL, TOKENS_A_DAY, later)) is None
    # Charged under the new schedule: counted in the day it still falls in, not dropped.
    await ledger.settle(Charge("b", MODEL, later, 50, 0))
    usage = await ledger.usage("b", [MODEL], at(new, "2026-07-01T12:11:00"))
    assert usage.entities[MODEL].tokens[1] == 110
    refusal = await ledger.admit(Ask("b", MODEL, TOKENS_A_DAY, at(new, "2026-07-01T12:12:00")))
    assert refusal is not None and refusal.kind == "token"


async def test_a_reservation_made_before_the_change_is_released(ledger: Ledger) -> None:
    before = at(UTC_CLOCK, "2026-07-01T12:06:00")
    ask = Ask("b", MODEL, TOKENS_A_DAY, before, reserve=True, tokens=90)
    assert await ledger.admit(ask) is None
    after = at(TOKYO, "2026-07-01T12:08:00")
    await ledger.settle(Charge("b", MODEL, after, 10, 0, before, 90))
    usage = await ledger.usage("b", [MODEL], at(TOKYO, "2026-07-01T12:09:00"))
    assert usage.entities[MODEL].tokens[1] == 10


# --- item 14: huge numbers ------------------------------------------------------------------


def test_usage_reported_beyond_a_long_is_capped() -> None:
    usage = Usage.from_object({"prompt_tokens": 1e30, "completion_tokens": 10**40})
    assert usage.prompt_tokens == USAGE_MAX and usage.completion_tokens == USAGE_MAX
    assert usage.total_tokens < 2**63


async def test_huge_charges_stay_within_a_long(ledger: Ledger) -> None:
    now = at(UTC_CLOCK, "2026-07-01T12:00:00")
    for _ in range(3):
        await ledger.settle(Charge("b", MODEL, now, 10**30, 10**40))
    usage = await ledger.usage("b", [MODEL], now)
    figures = [*usage.cost_nano, *usage.entities[MODEL].tokens, *usage.entities[MODEL].cost_nano]
    assert figures and all(0 < n <= USAGE_MAX for n in figures), figures
    assert usage.entities[MODEL].tokens[1] == USAGE_MAX
    limited = Limits(tokens=(U, 10**18, U, U), requests=(U, U), cost=(Decimal(5),) * 4)
    refusal = await ledger.admit(Ask("b", MODEL, limited, now))
    assert refusal is not None and refusal.used[1] == USAGE_MAX


# --- item 14, end to end: an upstream that reports 1e30 tokens; a limit beyond a long -------


class _HugeUsage(BaseHTTPRequestHandler):
    """An upstream whose every answer reports 1e30 prompt tokens."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = (
            b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":'
            b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":1e30,"completion_tokens":1,"total_tokens":1e30}}'
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def huge_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HugeUsage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/openai/deployments/big/chat/completions"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_an_upstream_reporting_1e30_tokens_never_breaks_the_limits_api(
    work_dir: Path, huge_upstream: str, store: str, request: pytest.FixtureRequest
) -> None:
    settings = None
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        settings = {
            "redis": {"singleServerConfig": {"address": f"redis://127.0.0.1:{server.port}"}}
        }
    config = {
        "models": {"big": {"endpoint": huge_upstream}},
        "keys": {f"huge-key-{store}-0123": {"project": f"huge-{store}", "role": "r"}},
        "roles": {"r": {"limits": {"big": {"day": "1000000", "minute": "1000000"}}}},
    }
    gw = start_gateway(work_dir, [config], settings=settings)
    try:
        headers = {"Api-Key": f"huge-key-{store}-0123"}
        answer = httpx.post(
            f"{gw.url}/openai/deployments/big/chat/completions", headers=headers, json=chat()
        )
        assert answer.status_code == 200
        for path in ("/v1/user/limits", "/v1/user/usage", "/v1/deployments/big/limits"):
            response = httpx.get(f"{gw.url}{path}", headers=headers)
            assert response.status_code == 200, (path, response.text)
            numbers = [n for n in _numbers(response.json()) if isinstance(n, int)]
            assert numbers and all(-(2**63) <= n < 2**63 for n in numbers), (path, numbers)
            assert USAGE_MAX in numbers, (path, response.text)
        # Over its limits now: refused, not a 500.
        again = httpx.post(
            f"{gw.url}/openai/deployments/big/chat/completions", headers=headers, json=chat()
        )
        assert again.status_code == 429, again.text
    finally:
        stop(gw.process)


def _numbers(value: object) -> Iterator[object]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def test_a_limit_beyond_a_long_is_refused_with_a_message(work_dir: Path) -> None:
    config = {
        "models": {"m": {"endpoint": "http://127.0.0.1:9/x"}},
        "roles": {"r": {"limits": {"m": {"day": "99999999999999999999999"}}}},
    }
    result = run_gateway_expecting_exit(work_dir, [config])
    assert result.returncode == 1
    assert "99999999999999999999999 is outside Java's long range" in result.stderr
    assert "Traceback" not in result.stderr
