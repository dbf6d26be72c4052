"""RedisLedger against a real redis-server: the same answers as MemoryLedger, atomic under
concurrency, shared across instances, one cluster slot per bucket, TTLs, NOSCRIPT recovery."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from harness import free_port
from redis_server import RedisServer, start_redis_server, stop_redis_server
from tollgate.config.schema import UNLIMITED, UNLIMITED_COST
from tollgate.limits.ledger import Ask, Charge, Refusal
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.pipelined_redis import PipelinedRedis
from tollgate.limits.policy import Limits
from tollgate.limits.redis_ledger import (
    ADMIT,
    KEY_TTL_S,
    RedisLedger,
)
from tollgate.limits.windows import Instant

DAY_MS = 86_400_000


def instant(ms: int) -> Instant:
    """UTC calendar periods, weeks from Monday 00:00 (DIAL's default `rateLimitSchedule`)."""
    day = ms // 1000 - ms // 1000 % 86_400
    week = day - (day // 86_400 + 3) % 7 * 86_400  # 1970-01-01 was a Thursday
    date = datetime.fromtimestamp(day, UTC)
    month = datetime(date.year, date.month, 1, tzinfo=UTC)
    following = datetime(date.year + date.month // 12, date.month % 12 + 1, 1, tzinfo=UTC)
    return Instant(
        ms,
        day,
        week,
        int(month.timestamp()),
        day + 86_400,
        week + 7 * 86_400,
        int(following.timestamp()),
    )


def limits(
    minute: int = UNLIMITED,
    request_hour: int = UNLIMITED,
    cost_minute: Decimal = UNLIMITED_COST,
) -> Limits:
    return Limits(
        (minute, UNLIMITED, UNLIMITED, UNLIMITED),
        (request_hour, UNLIMITED),
        (cost_minute, UNLIMITED_COST, UNLIMITED_COST, UNLIMITED_COST),
    )


NO_LIMITS = limits()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis_server(server)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis-cluster"), cluster=True)
    yield server
    stop_redis_server(server)


@pytest_asyncio.fixture  # on the loop the tests run on (the session's)
async def client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis(port=redis_server.port)
    yield connection
    await connection.aclose()


CLIENTS = ("redis-py", "pipelined")


def make_client(kind: str, port: int) -> Any:
    """The ledger works on redis-py's client and on Tollgate's pipelined one alike."""
    if kind == "pipelined":
        return PipelinedRedis("127.0.0.1", port)
    return redis.asyncio.Redis(port=port)


@pytest_asyncio.fixture(params=CLIENTS)
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Any]:
    """The client a ledger runs on (each test once per client kind)."""
    connection = make_client(request.param, redis_server.port)
    yield connection
    await connection.aclose()


def fresh_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


async def keys_of(client: redis.asyncio.Redis, prefix: str) -> list[str]:
    return sorted([key.decode() async for key in client.scan_iter(match=prefix + ":*")])


# --- 1. the same answers as MemoryLedger ---------------------------------------------------------

BUCKETS = ("Keys/proj-a", "Users/a}b{c")  # the second one needs its braces escaped
ENTITIES = ("gpt-4", "model:with:colons", "special[1m]")
START = (  # just before a minute, a day, a week (Monday) and a month boundary
    datetime(2026, 1, 31, 23, 58, 30, tzinfo=UTC),
    datetime(2026, 3, 1, 23, 59, 0, tzinfo=UTC),
    datetime(2026, 3, 15, 23, 57, 0, tzinfo=UTC),
    datetime(2026, 4, 30, 22, 0, 0, tzinfo=UTC),
)


@dataclass(frozen=True)
class DoAdmit:
    bucket: str
    entity: str
    limits: Limits
    reserve: bool
    tokens: int
    cost_nano: int


@dataclass(frozen=True)
class DoSettle:
    """Settle the `admitted`-th latest admitted call (its entity and reservation), or, when
    None or nothing was admitted yet, an arbitrary reservation made `reserved_ago_ms` ago."""

    admitted: int | None
    bucket: str
    entity: str
    tokens: int
    cost_nano: int
    reserved_ago_ms: int | None
    reserved_tokens: int
    reserved_cost_nano: int


@dataclass(frozen=True)
class Advance:
    ms: int


def capped(limit: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Mostly no limit: only calls that pass the token windows reach the request and cost ones."""
    return st.one_of(st.just(UNLIMITED), st.just(UNLIMITED), limit)


def capped_cost(nano: st.SearchStrategy[int]) -> st.SearchStrategy[Decimal]:
    dollars = nano.map(lambda n: Decimal(n) / 1_000_000_000)
    return st.one_of(st.just(UNLIMITED_COST), st.just(UNLIMITED_COST), dollars)


any_limits = st.builds(
    Limits,
    st.tuples(
        capped(st.integers(0, 800)),
        capped(st.integers(0, 2_500)),
        capped(st.integers(0, 5_000)),
        capped(st.integers(0, 8_000)),
    ),
    st.tuples(capped(st.integers(0, 6)), capped(st.integers(0, 12))),
    st.tuples(
        capped_cost(st.integers(0, 4_000_000)),
        capped_cost(st.integers(0, 10_000_000)),
        capped_cost(st.integers(0, 20_000_000)),
        capped_cost(st.integers(0, 30_000_000)),
    ),
)
admits = st.builds(
    DoAdmit,
    st.sampled_from(BUCKETS),
    st.sampled_from(ENTITIES),
    any_limits,
    st.booleans(),
    st.one_of(st.just(0), st.integers(0, 300)),
    st.one_of(st.just(0), st.integers(0, 1_500_000)),
)
settles = st.builds(
    DoSettle,
    st.one_of(st.none(), st.integers(0, 4)),
    st.sampled_from(BUCKETS),
    st.sampled_from(ENTITIES),
    st.integers(0, 400),
    st.one_of(st.just(0), st.integers(0, 2_000_000)),
    st.one_of(st.none(), st.integers(0, 3_000), st.integers(0, 90_000), st.integers(0, 2 * DAY_MS)),
    st.one_of(st.just(0), st.integers(0, 300)),
    st.one_of(st.just(0), st.integers(0, 1_500_000)),
)
advances = st.builds(
    Advance,
    st.one_of(
        st.integers(0, 1_500),  # within a slot or to the next one
        st.integers(0, 70_000),  # across the minute window
        st.integers(0, 4_000_000),  # across the hour window
        st.sampled_from([DAY_MS, 7 * DAY_MS, 31 * DAY_MS]),  # across calendar periods
    ),
)
operations = st.one_of(admits, admits, settles, advances)


def charge_of(op: DoSettle, now: Instant, admitted: list[Ask]) -> Charge:
    if op.admitted is not None and admitted:
        ask = admitted[-1 - op.admitted % len(admitted)]
        return Charge(
            ask.bucket,
            ask.entity,
            now,
            op.tokens,
            op.cost_nano,
            ask.now,
            ask.tokens,
            ask.cost_nano,
        )
    reserved_at = None if op.reserved_ago_ms is None else instant(now.ms - op.reserved_ago_ms)
    return Charge(
        op.bucket,
        op.entity,
        now,
        op.tokens,
        op.cost_nano,
        reserved_at,
        op.reserved_tokens,
        op.reserved_cost_nano,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(START),
    start_offset_ms=st.integers(0, 120_000),
    ops=st.lists(operations, min_size=5, max_size=50),
)
@pytest.mark.parametrize("client_kind", CLIENTS)
async def test_same_answers_as_the_memory_ledger(
    redis_server: RedisServer,
    client_kind: str,
    start: datetime,
    start_offset_ms: int,
    ops: list[DoAdmit | DoSettle | Advance],
) -> None:
    connection = make_client(client_kind, redis_server.port)
    memory = MemoryLedger(path=None)
    shared = RedisLedger(connection, prefix=fresh_prefix())
    now_ms = int(start.timestamp() * 1000) + start_offset_ms
    admitted: list[Ask] = []
    try:
        for step, op in enumerate(ops):
            if isinstance(op, Advance):
                now_ms += op.ms
            now = instant(now_ms)
            if isinstance(op, DoAdmit):
                ask = Ask(op.bucket, op.entity, op.limits, now, op.reserve, op.tokens, op.cost_nano)
                expected = await memory.admit(ask)
                assert await shared.admit(ask) == expected, (step, op)
                if expected is None:
                    admitted.append(ask)
            elif isinstance(op, DoSettle):
                charge = charge_of(op, now, admitted)
                await memory.settle(charge)
                await shared.settle(charge)
            for bucket in BUCKETS:
                for names in (None, [ENTITIES[0], "never-used"]):
                    want = await memory.usage(bucket, names, now)
                    got = await shared.usage(bucket, names, now)
                    assert got == want, (step, op, bucket, names)
    finally:
        await memory.close()
        await connection.aclose()


@dataclass(frozen=True)
class DoExtend:
    """Extend the reservation of the `admitted`-th latest admitted call (compatibility C79)."""

    admitted: int
    tokens: int
    cost_nano: int


extends = st.builds(
    DoExtend,
    st.integers(0, 4),
    st.one_of(st.just(0), st.integers(0, 400)),
    st.one_of(st.just(0), st.integers(0, 2_000_000)),
)
streaming = st.one_of(admits, extends, extends, settles, advances)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from(START),
    start_offset_ms=st.integers(0, 120_000),
    ops=st.lists(streaming, min_size=5, max_size=50),
)
@pytest.mark.parametrize("client_kind", CLIENTS)
async def test_extend_answers_as_the_memory_ledger(
    redis_server: RedisServer,
    client_kind: str,
    start: datetime,
    start_offset_ms: int,
    ops: list[DoAdmit | DoExtend | DoSettle | Advance],
) -> None:
    """Admissions, extensions of their reservations and settles (of what the extensions made
    the reservation) leave both ledgers with the same figures and the same refusals."""
    connection = make_client(client_kind, redis_server.port)
    memory = MemoryLedger(path=None)
    shared = RedisLedger(connection, prefix=fresh_prefix())
    now_ms = int(start.timestamp() * 1000) + start_offset_ms
    # Each ledger moves its own copy of a ticket's reservation.
    admitted: list[tuple[Ask, Ask]] = []
    try:
        for step, op in enumerate(ops):
            if isinstance(op, Advance):
                now_ms += op.ms
            now = instant(now_ms)
            if isinstance(op, DoAdmit):
                ask = Ask(op.bucket, op.entity, op.limits, now, op.reserve, op.tokens, op.cost_nano)
                twin = replace(ask)
                expected = await memory.admit(ask)
                assert await shared.admit(twin) == expected, (step, op)
                if expected is None:
                    admitted.append((ask, twin))
            elif isinstance(op, DoExtend) and admitted:
                ask, twin = admitted[-1 - op.admitted % len(admitted)]
                expected = await memory.extend(ask, op.tokens, op.cost_nano, now)
                assert await shared.extend(twin, op.tokens, op.cost_nano, now) == expected, (
                    step,
                    op,
                )
                assert twin == ask, (step, op)
            elif isinstance(op, DoSettle):
                if op.admitted is not None and admitted:
                    ask, twin = admitted.pop(-1 - op.admitted % len(admitted))
                    await memory.settle(charge_of(op, now, [ask]))
                    await shared.settle(charge_of(op, now, [twin]))
                else:
                    charge = charge_of(op, now, [])
                    await memory.settle(charge)
                    await shared.settle(charge)
            for bucket in BUCKETS:
                want = await memory.usage(bucket, None, now)
                got = await shared.usage(bucket, None, now)
                assert got == want, (step, op, bucket)
    finally:
        await memory.close()
        await connection.aclose()


async def test_concurrent_extensions_never_cross_the_limits(store: Any) -> None:
    """Streams of one caller on two instances extend at once: together within the limits."""
    prefix = fresh_prefix()
    one, two = RedisLedger(store, prefix=prefix), RedisLedger(store, prefix=prefix)
    now = instant(1_780_000_000_000)
    tight = Limits(
        (UNLIMITED, 10_000, UNLIMITED, UNLIMITED),
        (UNLIMITED, UNLIMITED),
        (UNLIMITED_COST, UNLIMITED_COST, UNLIMITED_COST, Decimal("0.000005")),  # 5000 nano
    )
    asks = [Ask("Keys/p", "m", tight, now) for _ in range(8)]
    for index, ask in enumerate(asks):
        assert await (one if index % 2 else two).admit(ask) is None

    async def stream(index: int, ask: Ask) -> int:
        ledger = one if index % 2 else two
        granted = 0
        for _ in range(40):
            if await ledger.extend(ask, 256, 100, now) is not None:
                break
            granted += 256
        return granted

    granted = await asyncio.gather(*(stream(i, ask) for i, ask in enumerate(asks)))
    # 39 blocks of 256 tokens fit 10,000; 50 of $0.0000001 fit $0.000005: tokens bind first.
    assert sum(granted) == 39 * 256
    assert sum(ask.tokens for ask in asks) == 39 * 256
    usage = await one.usage("Keys/p", None, now)
    assert usage.entities["m"].tokens[1] == 39 * 256
    assert usage.cost_nano[3] == 39 * 100
    refusal = await one.extend(asks[0], 256, 100, now)
    assert refusal is not None and refusal.kind == "token" and refusal.exceeded == ("day",)
    cost_only = await one.extend(asks[0], 0, 5_000 - 39 * 100 + 1, now)
    assert cost_only is not None and cost_only.kind == "cost" and cost_only.exceeded == ("month",)


MIDNIGHT_MS = int(datetime(2026, 5, 1, tzinfo=UTC).timestamp() * 1000)  # a new day and month


@pytest.mark.parametrize(
    ("reserved_ms", "settled_ms", "other", "used", "tokens"),
    [
        (MIDNIGHT_MS - 30_000, MIDNIGHT_MS - 29_500, 0, 40, (47, 47, 47, 47)),  # same slot
        (MIDNIGHT_MS - 130_000, MIDNIGHT_MS - 60_000, 0, 40, (40, 47, 47, 47)),  # slot left
        (MIDNIGHT_MS - 30_000, MIDNIGHT_MS + 20_000, 0, 40, (47, 40, 47, 40)),  # new day, month
        (MIDNIGHT_MS - 30_000, MIDNIGHT_MS + 20_000, 0, 0, (7, 0, 7, 0)),  # nothing used
        # Another call counted in the new day first: yesterday's reservation is not in it.
        (MIDNIGHT_MS - 30_000, MIDNIGHT_MS + 20_000, 5, 40, (52, 45, 52, 45)),
    ],
)
async def test_a_reservation_is_released_where_it_still_counts(
    store: Any,
    reserved_ms: int,
    settled_ms: int,
    other: int,
    used: int,
    tokens: tuple[int, int, int, int],
) -> None:
    memory = MemoryLedger(path=None)
    shared = RedisLedger(store, prefix=fresh_prefix())
    reserved_at, settled = instant(reserved_ms), instant(settled_ms)
    for ledger in (memory, shared):
        await ledger.settle(Charge("Keys/p", "m", reserved_at, 7, 3))  # an earlier call
        ask = Ask("Keys/p", "m", limits(), reserved_at, True, 100, 1_000)
        assert await ledger.admit(ask) is None
        await ledger.settle(Charge("Keys/p", "m", settled, other, other))
        await ledger.settle(Charge("Keys/p", "m", settled, used, 2, reserved_at, 100, 1_000))
    usage = await shared.usage("Keys/p", None, settled)
    assert usage == await memory.usage("Keys/p", None, settled)
    assert usage.entities["m"].tokens == tokens
    await memory.close()


# --- 2. atomic under concurrency -----------------------------------------------------------------


async def test_concurrent_reservations_never_cross_the_token_limit(
    store: Any,
) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    ask = Ask("Keys/p", "m", limits(minute=1_000), now, reserve=True, tokens=100)
    results = await asyncio.gather(*(ledger.admit(ask) for _ in range(50)))
    assert sum(result is None for result in results) == 10
    assert {r.kind for r in results if r is not None} == {"token"}
    usage = await ledger.usage("Keys/p", None, now)
    assert usage.entities["m"].tokens[0] == 1_000
    assert usage.entities["m"].requests == (10, 10)


async def test_concurrent_reservations_never_cross_the_cost_limit(
    store: Any,
) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    per_call = 100_000_000  # $0.10
    ask = Ask(
        "Keys/p", "m", limits(cost_minute=Decimal("0.7")), now, reserve=True, cost_nano=per_call
    )
    results = await asyncio.gather(*(ledger.admit(ask) for _ in range(50)))
    assert sum(result is None for result in results) == 7
    assert (await ledger.usage("Keys/p", None, now)).cost_nano[0] == 7 * per_call


async def test_concurrent_admissions_count_each_request_once(store: Any) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    ask = Ask("Keys/p", "m", limits(request_hour=7), now)
    results = await asyncio.gather(*(ledger.admit(ask) for _ in range(50)))
    assert sum(result is None for result in results) == 7
    refusals = [r for r in results if r is not None]
    assert all(r.kind == "request" and r.used == (7, 7) for r in refusals)
    assert (await ledger.usage("Keys/p", ["m"], now)).entities["m"].requests == (7, 7)


async def test_concurrent_admit_and_settle_lose_no_update(store: Any) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    ask = Ask("Keys/p", "m", limits(minute=1_000), now, reserve=True, tokens=100)

    async def call() -> bool:
        if await ledger.admit(ask) is not None:
            return False
        await ledger.settle(Charge("Keys/p", "m", now, 40, 25, now, 100))
        return True

    admitted = sum(await asyncio.gather(*(call() for _ in range(50))))
    # Settling gives back 60 of every 100 reserved; each call then holds 40 of the 1,000.
    assert 10 <= admitted <= 23
    usage = (await ledger.usage("Keys/p", None, now)).entities["m"]
    assert usage.tokens == (40 * admitted,) * 4
    assert usage.requests == (admitted, admitted)
    assert usage.cost_nano == (25 * admitted,) * 4


# --- 3. shared across instances ------------------------------------------------------------------


async def test_two_instances_share_counts(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    first_client = redis.asyncio.Redis(port=redis_server.port)
    second_client = redis.asyncio.Redis(port=redis_server.port)
    try:
        first = RedisLedger(first_client, prefix=prefix)
        second = RedisLedger(second_client, prefix=prefix)
        now = instant(1_780_000_000_000)
        ask = Ask("Keys/p", "m", limits(request_hour=5), now)
        answers = [await (first if i % 2 else second).admit(ask) for i in range(8)]
        assert [a is None for a in answers] == [True] * 5 + [False] * 3
        await first.settle(Charge("Keys/p", "m", now, 70, 9))
        await second.settle(Charge("Keys/p", "m", now, 30, 1))
        for ledger in (first, second):
            usage = await ledger.usage("Keys/p", None, now)
            assert usage.cost_nano == (10, 10, 10, 10)
            assert usage.entities["m"].tokens == (100, 100, 100, 100)
            assert usage.entities["m"].requests == (5, 5)
        other = RedisLedger(first_client, prefix=fresh_prefix())  # another prefix shares nothing
        assert (await other.usage("Keys/p", None, now)).entities == {}
    finally:
        await first_client.aclose()
        await second_client.aclose()


# --- 4.-5. key layout and TTLs -------------------------------------------------------------------


async def use_every_key(ledger: RedisLedger, bucket: str, now: Instant) -> None:
    for entity in ("gpt-4", "e:{x}", "}"):
        assert await ledger.admit(Ask(bucket, entity, NO_LIMITS, now, True, 10, 5)) is None
        await ledger.settle(Charge(bucket, entity, now, 20, 7, now, 10, 5))


@pytest.mark.parametrize("bucket", ["Keys/proj-a", "Users/a{b}c", "Keys/}x", "{", ""])
async def test_every_key_of_a_bucket_is_in_one_cluster_slot(
    client: redis.asyncio.Redis, bucket: str
) -> None:
    prefix = fresh_prefix()
    await use_every_key(RedisLedger(client, prefix=prefix), bucket, instant(1_780_000_000_000))
    keys = await keys_of(client, prefix)
    assert len(keys) == 2  # the entity set and the bucket's hash
    assert len({key_slot(key.encode()) for key in keys}) == 1
    tags = {key[key.index("{") + 1 : key.index("}")] for key in keys}
    assert len(tags) == 1 and "" not in tags


async def test_buckets_do_not_share_keys(client: redis.asyncio.Redis) -> None:
    prefix = fresh_prefix()
    ledger = RedisLedger(client, prefix=prefix)
    now = instant(1_780_000_000_000)
    # Without escaping, both buckets' keys would carry the hash tag `a`.
    await use_every_key(ledger, "a}b", now)
    await use_every_key(ledger, "a}c", now)
    assert len(await keys_of(client, prefix)) == 2 * 2
    assert set((await ledger.usage("a}b", None, now)).entities) == {"gpt-4", "e:{x}", "}"}


async def test_entity_names_never_meet_in_the_bucket_hash(client: redis.asyncio.Redis) -> None:
    """Entities live under `<entity>|` in one hash: names built to collide with another
    entity's fields, or with the caller's cost fields, keep their own counts."""
    ledger = RedisLedger(client, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    names = ["x", "x|t", "x|tm", "x|tm.", "c", "cm", "|", ""]
    for n, entity in enumerate(names, start=1):
        assert await ledger.admit(Ask("Keys/p", entity, NO_LIMITS, now)) is None
        await ledger.settle(Charge("Keys/p", entity, now, n * 100, n))
    report = await ledger.usage("Keys/p", None, now)
    assert set(report.entities) == set(names)
    for n, entity in enumerate(names, start=1):
        usage = report.entities[entity]
        assert usage.tokens == (n * 100,) * 4, entity
        assert usage.requests == (1, 1), entity
        assert usage.cost_nano == (n,) * 4, entity
    total_cost = sum(range(1, len(names) + 1))
    assert report.cost_nano == (total_cost,) * 4


async def test_ttls_are_refreshed_at_the_first_write_of_a_day(
    client: redis.asyncio.Redis,
) -> None:
    prefix = fresh_prefix()
    ledger = RedisLedger(client, prefix=prefix)
    day_one = instant(1_780_000_000_000)
    await use_every_key(ledger, "Keys/p", day_one)
    keys = await keys_of(client, prefix)
    for key in keys:
        await client.expire(key, 1000)
    await use_every_key(ledger, "Keys/p", instant(day_one.ms + 60_000))  # the same day
    for key in keys:
        assert 0 < await client.ttl(key) <= 1000, key
    await use_every_key(ledger, "Keys/p", instant(day_one.ms + DAY_MS))  # the next day
    for key in keys:
        assert KEY_TTL_S - 60 < await client.ttl(key) <= KEY_TTL_S, key


async def test_every_key_expires(client: redis.asyncio.Redis) -> None:
    prefix = fresh_prefix()
    ledger = RedisLedger(client, prefix=prefix)
    now = instant(1_780_000_000_000)
    await use_every_key(ledger, "Keys/p", now)
    refused = Ask("Keys/p", "refused", limits(minute=0), now)
    assert await ledger.admit(refused) is not None
    keys = await keys_of(client, prefix)
    assert keys
    for key in keys:
        ttl = await client.ttl(key)
        assert KEY_TTL_S - 60 < ttl <= KEY_TTL_S, key


async def test_the_window_slides_with_the_instant_not_the_ttl(client: redis.asyncio.Redis) -> None:
    ledger = RedisLedger(client, prefix=fresh_prefix())
    start = 1_780_000_000_000
    for second in range(0, 200, 10):  # steady traffic keeps refreshing the TTL
        await ledger.settle(Charge("Keys/p", "m", instant(start + second * 1000), 1, 0))
    usage = await ledger.usage("Keys/p", None, instant(start + 199_000))
    assert usage.entities["m"].tokens[0] == 6  # 140 s .. 190 s: only what the last minute holds


async def test_works_on_redis_cluster(redis_cluster: RedisServer) -> None:
    # redis-py's cluster client refuses a script whose keys are in more than one slot.
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    try:
        ledger = RedisLedger(cluster, prefix=fresh_prefix())
        now = instant(1_780_000_000_000)
        for bucket in ("Keys/proj-a", "Users/a{b}c", ""):
            await use_every_key(ledger, bucket, now)
            refusal = await ledger.admit(Ask(bucket, "gpt-4", limits(request_hour=1), now))
            assert refusal is not None and refusal.kind == "request"
            usage = await ledger.usage(bucket, None, now)
            assert usage.cost_nano == (21, 21, 21, 21)
            assert usage.entities["}"].tokens == (20, 20, 20, 20)
        await cluster.script_flush()
        assert await ledger.admit(Ask("Keys/proj-a", "new", limits(request_hour=1), now)) is None
    finally:
        await cluster.aclose()


async def test_works_with_decoded_responses(redis_server: RedisServer) -> None:
    decoding = redis.asyncio.Redis(port=redis_server.port, decode_responses=True)
    try:
        ledger = RedisLedger(decoding, prefix=fresh_prefix())
        now = instant(1_780_000_000_000)
        await use_every_key(ledger, "Keys/p", now)
        refusal = await ledger.admit(Ask("Keys/p", "gpt-4", limits(minute=20), now))
        assert refusal == Refusal(
            "token", (20, 20, 20, 20), limits(minute=20).tokens, ("minute",), 60
        )
        assert set((await ledger.usage("Keys/p", None, now)).entities) == {"gpt-4", "e:{x}", "}"}
    finally:
        await decoding.aclose()


# --- 6. NOSCRIPT, prefix, big numbers ------------------------------------------------------------


async def test_admit_survives_a_script_flush(client: redis.asyncio.Redis, store: Any) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    assert await ledger.admit(Ask("Keys/p", "m", limits(request_hour=1), now)) is None
    await client.script_flush()
    assert await client.script_exists(ADMIT.sha) == [False]
    refusal = await ledger.admit(Ask("Keys/p", "m", limits(request_hour=1), now))
    assert refusal is not None and refusal.kind == "request"
    assert await client.script_exists(ADMIT.sha) == [True]
    await client.script_flush()
    await ledger.settle(Charge("Keys/p", "m", now, 5, 0))
    await client.script_flush()
    assert (await ledger.usage("Keys/p", None, now)).entities["m"].tokens[0] == 5


def test_a_prefix_cannot_break_the_hash_tag() -> None:
    with pytest.raises(ValueError, match="hash tag"):
        RedisLedger(redis.asyncio.Redis(), prefix="tollgate{x}")


async def test_large_amounts_stay_exact_below_2_to_53(store: Any) -> None:
    ledger = RedisLedger(store, prefix=fresh_prefix())
    now = instant(1_780_000_000_000)
    big = 2**52 + 1  # odd, so a float rounding anywhere would show
    await ledger.settle(Charge("Keys/p", "m", now, big, big))
    await ledger.settle(Charge("Keys/p", "m", now, 2, 2))
    usage = await ledger.usage("Keys/p", None, now)
    assert usage.cost_nano == (big + 2,) * 4
    assert usage.entities["m"].tokens == (big + 2,) * 4
    refusal = await ledger.admit(Ask("Keys/p", "m", limits(minute=big + 3), now, True, 2))
    assert refusal is not None and refusal.used[0] == big + 2
    assert await ledger.admit(Ask("Keys/p", "m", limits(minute=big + 3), now, True, 1)) is None


def test_redis_server_helper_stops_the_server(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path)
    stop_redis_server(server)
    assert server.process.poll() is not None


async def test_a_late_charge_for_an_ended_period_leaves_the_current_one_alone(store: Any) -> None:
    """A charge replayed or settled late, stamped in yesterday, must not start today's counters
    over (they compare period ids, and an older id is an ended period)."""
    memory = MemoryLedger(path=None)
    shared = RedisLedger(store, prefix=fresh_prefix())
    today, yesterday = instant(MIDNIGHT_MS + 5_000), instant(MIDNIGHT_MS - 5_000)
    for ledger in (memory, shared):
        assert await ledger.admit(Ask("Keys/p", "m", limits(), today)) is None
        await ledger.settle(Charge("Keys/p", "m", today, 40, 7))
        await ledger.settle(Charge("Keys/p", "m", yesterday, 25, 3))  # late, for yesterday
    usage = await shared.usage("Keys/p", None, today)
    assert usage == await memory.usage("Keys/p", None, today)
    # Ten seconds apart: the same minute window and week, another day and month (MIDNIGHT_MS).
    assert usage.entities["m"].tokens == (65, 40, 65, 40)
    assert usage.entities["m"].requests == (1, 1)
    assert usage.cost_nano == (10, 7, 10, 7)
    await memory.close()


@pytest.mark.parametrize("on_failure", ["local", "closed"])
async def test_resilient_extend_where_the_reservation_is_held(
    redis_server: RedisServer, on_failure: str
) -> None:
    """A reservation Redis holds grows in Redis; with Redis gone, `local` lets the stream go on
    unreserved and `closed` ends it with 503 (compatibility C79, C59)."""
    from tollgate.errors import GatewayError
    from tollgate.limits.resilient import ResilientLedger

    connection = PipelinedRedis("127.0.0.1", redis_server.port)
    shared = RedisLedger(connection, prefix=fresh_prefix())
    local = MemoryLedger(path=None)
    ledger = ResilientLedger(shared, local, on_failure, ping=connection.ping)
    now = instant(1_780_000_000_000)
    ask = Ask("Keys/p", "m", limits(minute=1_000), now)
    try:
        assert await ledger.admit(ask) is None and not ask.local
        assert await ledger.extend(ask, 600, 0, now) is None
        assert ask.tokens == 600
        assert (await shared.usage("Keys/p", None, now)).entities["m"].tokens[0] == 600
        assert (await ledger.extend(ask, 401, 0, now)) is not None  # Redis says no
        await connection.aclose()  # the store goes away
        broken = RedisLedger(PipelinedRedis("127.0.0.1", free_port()), prefix="x")
        ledger.shared = broken
        if on_failure == "closed":
            with pytest.raises(GatewayError) as refused:
                await ledger.extend(ask, 10, 0, now)
            assert (refused.value.status, refused.value.message) == (
                503,
                "Limits store is unavailable",
            )
        else:
            assert await ledger.extend(ask, 10, 0, now) is None
            assert ask.tokens == 600  # nothing reserved anywhere: the ticket is unchanged
            assert (await local.usage("Keys/p", None, now)).entities == {}
        assert not ledger.healthy
    finally:
        await ledger.close()
