"""A ticket remembers which ledger admitted it: a failover never releases a reservation on the
wrong one (the Redis ledger behind `ResilientLedger`, with the embedded one as its fallback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from redis_server import RedisServer, start_redis_server, stop_redis_server
from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, RateLimitSchedule
from tollgate.limits.ledger import Ask, Charge
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.pipelined_redis import PipelinedRedis
from tollgate.limits.policy import Limits
from tollgate.limits.redis_ledger import RedisLedger
from tollgate.limits.resilient import ResilientLedger
from tollgate.limits.windows import Clock, Schedule

pytestmark = pytest.mark.redis

LIMITS = Limits(
    (10_000, UNLIMITED, UNLIMITED, UNLIMITED),
    (UNLIMITED, UNLIMITED),
    (UNLIMITED_COST, UNLIMITED_COST, UNLIMITED_COST, UNLIMITED_COST),
)
BUCKET = "Keys/failover"
ENTITY = "chat-model"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis-tickets"))
    yield server
    stop_redis_server(server)


def settled(ask: Ask, tokens: int, clock: Clock) -> Charge:
    """What `pipeline.settle.charge_for` builds for a call that used `tokens`."""
    return Charge(
        ask.bucket,
        ask.entity,
        clock.at(time.time_ns() // 1_000_000),
        tokens,
        0,
        ask.now,
        ask.tokens,
        ask.cost_nano,
        ask.local,
    )


async def test_a_failover_in_one_millisecond_releases_each_reservation_where_it_was_made(
    redis_server: RedisServer,
) -> None:
    client = PipelinedRedis("127.0.0.1", redis_server.port, timeout_s=0.2)
    local = MemoryLedger(None)
    ledger = ResilientLedger(RedisLedger(client), local, "local", ping=client.ping)
    await ledger.start()
    admin = redis.Redis(port=redis_server.port)
    try:
        clock = Clock(Schedule.of(RateLimitSchedule()))
        # Two calls admitted in the same millisecond share one Instant (Clock.at caches it).
        now = clock.at(time.time_ns() // 1_000_000)
        on_redis = Ask(BUCKET, ENTITY, LIMITS, now, reserve=True, tokens=100)
        assert await ledger.admit(on_redis) is None
        admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # Redis stops answering
        locally = Ask(BUCKET, ENTITY, LIMITS, now, reserve=True, tokens=100)
        assert await ledger.admit(locally) is None
        assert not ledger.healthy and locally.local and not on_redis.local
        deadline = time.monotonic() + 10
        while not ledger.healthy:  # the probe finds Redis back and replays the admission
            assert time.monotonic() < deadline, "the store never came back"
            await asyncio.sleep(0.05)

        # The call admitted on Redis settles first: its reservation is Redis's to release.
        await ledger.settle(settled(on_redis, 10, clock))
        shared = await ledger.usage(BUCKET, [ENTITY], clock.at(time.time_ns() // 1_000_000))
        assert shared.entities[ENTITY].tokens[0] == 10  # the 100 reserved there: released
        kept = await local.usage(BUCKET, [ENTITY], clock.at(time.time_ns() // 1_000_000))
        assert kept.entities[ENTITY].tokens[0] == 100  # the local call's reservation: held

        await ledger.settle(settled(locally, 20, clock))
        shared = await ledger.usage(BUCKET, [ENTITY], clock.at(time.time_ns() // 1_000_000))
        assert shared.entities[ENTITY].tokens[0] == 30
        kept = await local.usage(BUCKET, [ENTITY], clock.at(time.time_ns() // 1_000_000))
        assert kept.entities[ENTITY].tokens[0] == 20
    finally:
        admin.close()
        await ledger.close()
        await client.aclose()


def test_no_caller_outside_limits_tests_the_ledger_type() -> None:
    """The ledger owns its fast path: callers read `synchronous`, never the concrete class."""
    source = Path(__file__).parents[1] / "src" / "tollgate"
    offenders = [
        str(path.relative_to(source))
        for path in source.rglob("*.py")
        if "limits" not in path.relative_to(source).parts[:1]
        and "isinstance(" in (text := path.read_text())
        and ("MemoryLedger)" in text or "ResilientLedger)" in text or "RedisLedger)" in text)
    ]
    assert offenders == []
