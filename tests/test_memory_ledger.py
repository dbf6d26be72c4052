"""The embedded ledger: DIAL's admission rule, reservations, cost, persistence (spec 5, 9.4)."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, Config, RateLimitSchedule
from tollgate.limits.ledger import Ask, Charge, EntityUsage, Refusal
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.policy import LimitPolicy, Limits
from tollgate.limits.windows import HOUR, MINUTE, PERIODS, Clock, Instant, Schedule

U = UNLIMITED
UC = UNLIMITED_COST
NANO = 10**9
BUCKET = "Keys/proj"
MODEL = "model"
SCHEDULE = Schedule.of(RateLimitSchedule())


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


T0 = ms(2026, 5, 14, 12) + 250  # a Thursday, 250 ms into a second
MIDNIGHT = ms(2026, 5, 15)  # the Thursday's end
S = 1000
MIN = 60 * S


@functools.lru_cache(maxsize=4096)
def at(now_ms: int) -> Instant:
    return Clock(SCHEDULE).at(now_ms)


def lim(
    minute: int = U,
    day: int = U,
    week: int = U,
    month: int = U,
    hour: int = U,
    request_day: int = U,
    cost: tuple[str | None, str | None, str | None, str | None] = (None, None, None, None),
) -> Limits:
    """Limits; cost in USD as text, None for unlimited."""
    return Limits(
        (minute, day, week, month),
        (hour, request_day),
        tuple(UC if c is None else Decimal(c) for c in cost),  # type: ignore[arg-type]
    )


async def admit(
    ledger: MemoryLedger,
    now_ms: int,
    limits: Limits,
    *,
    entity: str = MODEL,
    bucket: str = BUCKET,
    reserve: bool = False,
    tokens: int = 0,
    cost_nano: int = 0,
) -> Refusal | None:
    return await ledger.admit(
        Ask(bucket, entity, limits, at(now_ms), reserve=reserve, tokens=tokens, cost_nano=cost_nano)
    )


async def settle(
    ledger: MemoryLedger,
    now_ms: int,
    tokens: int = 0,
    cost_nano: int = 0,
    *,
    entity: str = MODEL,
    bucket: str = BUCKET,
    reserved_at: int | None = None,
    reserved_tokens: int = 0,
    reserved_cost_nano: int = 0,
) -> None:
    await ledger.settle(
        Charge(
            bucket,
            entity,
            at(now_ms),
            tokens,
            cost_nano,
            reserved_at=None if reserved_at is None else at(reserved_at),
            reserved_tokens=reserved_tokens,
            reserved_cost_nano=reserved_cost_nano,
        )
    )


async def used(
    ledger: MemoryLedger, now_ms: int, entity: str = MODEL, bucket: str = BUCKET
) -> EntityUsage:
    return (await ledger.usage(bucket, [entity], at(now_ms))).entities[entity]


async def bucket_cost(
    ledger: MemoryLedger, now_ms: int, bucket: str = BUCKET
) -> tuple[int, int, int, int]:
    return (await ledger.usage(bucket, [], at(now_ms))).cost_nano


def ceil_s(wait_ms: int) -> int:
    return math.ceil(wait_ms / 1000)


@pytest_asyncio.fixture
async def ledger() -> AsyncIterator[MemoryLedger]:
    store = MemoryLedger(None)
    await store.start()
    yield store
    await store.close()


# --- DIAL's RateLimiterTest (spec 9.4) -----------------------------------------------------


async def test_no_usage_yet_is_admitted(ledger: MemoryLedger) -> None:
    """Item 2: a role limit configured, nothing recorded yet."""
    limits = lim(minute=100, day=10_000, hour=2, request_day=10)
    assert await admit(ledger, T0, limits) is None


async def test_token_limit_refuses_once_used_reaches_it(ledger: MemoryLedger) -> None:
    """Item 3: minute 100 / day 10000: 90 used -> allowed; 180 used -> refused."""
    limits = lim(minute=100, day=10_000)
    assert await admit(ledger, T0, limits) is None
    await settle(ledger, T0 + 100, 90)
    assert await admit(ledger, T0 + 200, limits) is None  # 90 < 100: a call may overshoot
    await settle(ledger, T0 + 300, 90)
    refusal = await admit(ledger, T0 + 400, limits)
    assert refusal == Refusal(
        "token",
        (180, 180, 180, 180),
        (100, 10_000, U, U),
        ("minute",),
        # Both charges are in T0's second, which leaves the minute 60 s after it began.
        ceil_s((T0 // S + 60) * S - (T0 + 400)),
    )
    assert refusal.retry_after_s == 60


async def test_usage_figures(ledger: MemoryLedger) -> None:
    """Item 4: one admitted call and 90 tokens; another 90 reported as is, over the limit."""
    limits = lim(minute=100, day=10_000, hour=2, request_day=10)
    assert await admit(ledger, T0, limits) is None
    await settle(ledger, T0 + 10, 90)
    figures = await used(ledger, T0 + 20)
    assert figures.tokens == (90, 90, 90, 90)
    assert figures.requests == (1, 1)
    assert figures.cost_nano == (0, 0, 0, 0)
    assert not figures.idle
    await settle(ledger, T0 + 30, 90)
    assert (await used(ledger, T0 + 40)).tokens == (180, 180, 180, 180)
    assert (await used(ledger, T0 + 40)).requests == (1, 1)


async def test_most_permissive_role_applies(ledger: MemoryLedger) -> None:
    """Item 5: roles minute 100 and 200: 150 used -> allowed, 300 -> refused."""
    config = Config.model_validate(
        {
            "roles": {
                "role1": {"limits": {MODEL: {"minute": 100}}},
                "role2": {"limits": {MODEL: {"minute": 200}}},
            }
        }
    )
    limits = LimitPolicy(config).limits(frozenset({"role1", "role2"}), MODEL, None)
    await settle(ledger, T0, 150)
    assert await admit(ledger, T0, limits) is None
    await settle(ledger, T0, 150)
    refusal = await admit(ledger, T0, limits)
    assert refusal is not None and refusal.used[0] == 300 and refusal.limits[0] == 200


async def test_no_limits_never_block(ledger: MemoryLedger) -> None:
    """Item 6: no limits and no default: unlimited."""
    limits = LimitPolicy(Config.model_validate({"roles": {"r": {}}})).limits(
        frozenset({"r"}), MODEL, None
    )
    for i in range(50):
        await settle(ledger, T0 + i, 10**15, 10**15)
        assert await admit(ledger, T0 + i, limits) is None
    assert (await used(ledger, T0 + 100)).requests == (50, 50)


async def test_request_hour_limit(ledger: MemoryLedger) -> None:
    """Item 7: requestHour 1: the first call passes, the second is refused."""
    limits = lim(hour=1)
    assert await admit(ledger, T0, limits) is None
    now = T0 + 10 * MIN
    refusal = await admit(ledger, now, limits)
    assert refusal == Refusal(
        "request",
        (1, 1),
        (1, U),
        ("hour",),
        ceil_s((T0 // MIN + 60) * MIN - now),  # the minute of T0 leaves the hour
    )
    assert refusal.retry_after_s == 50 * 60
    # The refused call was not counted; an hour later the window is empty again.
    assert (await used(ledger, now)).requests == (1, 1)
    assert await admit(ledger, (T0 // MIN + 60) * MIN - 1, limits) is not None
    assert await admit(ledger, (T0 // MIN + 60) * MIN, limits) is None


async def test_request_day_limit(ledger: MemoryLedger) -> None:
    limits = lim(request_day=2)
    assert await admit(ledger, T0, limits) is None
    assert await admit(ledger, T0 + 2 * 3600 * S, limits) is None
    now = T0 + 3 * 3600 * S
    refusal = await admit(ledger, now, limits)
    assert refusal is not None
    assert (refusal.kind, refusal.used, refusal.exceeded) == ("request", (0, 2), ("day",))
    assert refusal.retry_after_s == ceil_s(MIDNIGHT - now)
    assert await admit(ledger, MIDNIGHT - 1, limits) is not None
    assert await admit(ledger, MIDNIGHT, limits) is None  # a new calendar day


async def test_both_request_windows_exceeded(ledger: MemoryLedger) -> None:
    limits = lim(hour=1, request_day=1)
    assert await admit(ledger, T0, limits) is None
    refusal = await admit(ledger, T0 + MIN, limits)
    assert refusal is not None and refusal.exceeded == ("hour", "day")
    assert refusal.retry_after_s == ceil_s(MIDNIGHT - T0 - MIN)  # the longer wait


async def test_token_check_comes_before_the_request_check(ledger: MemoryLedger) -> None:
    limits = lim(minute=10, hour=1)
    assert await admit(ledger, T0, limits) is None
    await settle(ledger, T0, 10)
    refusal = await admit(ledger, T0 + 1, limits)
    assert refusal is not None and refusal.kind == "token"


async def test_token_day_week_month_windows(ledger: MemoryLedger) -> None:
    await settle(ledger, T0, 100)
    for name, limits, end in (
        ("day", lim(day=100), MIDNIGHT),
        ("week", lim(week=100), ms(2026, 5, 18)),
        ("month", lim(month=100), ms(2026, 6, 1)),
    ):
        now = T0 + 90 * S  # past the minute: only the calendar window refuses
        refusal = await admit(ledger, now, limits)
        assert refusal is not None and refusal.exceeded == (name,), name
        assert refusal.used == (0, 100, 100, 100)
        assert refusal.retry_after_s == ceil_s(end - now), name
        assert await admit(ledger, end - 1, limits) is not None
        assert await admit(ledger, end, limits) is None


async def test_minute_and_day_exceeded_waits_for_the_longer(ledger: MemoryLedger) -> None:
    await settle(ledger, T0, 500)
    refusal = await admit(ledger, T0 + 5 * S, lim(minute=100, day=100))
    assert refusal is not None and refusal.exceeded == ("minute", "day")
    assert refusal.retry_after_s == ceil_s(MIDNIGHT - T0 - 5 * S)


async def test_minute_retry_after_is_exact(ledger: MemoryLedger) -> None:
    limits = lim(minute=100)
    await settle(ledger, T0, 60)  # slot T0
    await settle(ledger, T0 + 20 * S, 50)  # slot T0 + 20 s
    now = T0 + 30 * S
    refusal = await admit(ledger, now, limits)
    assert refusal is not None
    # 110 used; once T0's 60 leave (60 s after T0's second began), 50 < 100.
    leaves = (T0 // S + 60) * S
    assert refusal.retry_after_s == ceil_s(leaves - now) == 30
    assert await admit(ledger, leaves - 1, limits) is not None
    assert await admit(ledger, leaves, limits) is None
    assert (await used(ledger, leaves)).tokens == (50, 110, 110, 110)


async def test_minute_retry_after_when_usage_falls_exactly_to_the_limit(
    ledger: MemoryLedger,
) -> None:
    """DIAL refuses at `used >= limit`: falling to the limit is not enough."""
    limits = lim(minute=100)
    await settle(ledger, T0, 10)
    await settle(ledger, T0 + 20 * S, 100)
    now = T0 + 30 * S
    refusal = await admit(ledger, now, limits)
    assert refusal is not None
    # 110 -> 100 when T0's 10 leave, still refused; 0 when the 100 leave.
    leaves = ((T0 + 20 * S) // S + 60) * S
    assert refusal.retry_after_s == ceil_s(leaves - now) == 50
    assert await admit(ledger, leaves - 1, limits) is not None
    assert await admit(ledger, leaves, limits) is None


async def test_calendar_windows_reset_at_their_own_boundaries(ledger: MemoryLedger) -> None:
    thursday = ms(2026, 5, 28, 12)
    await settle(ledger, thursday, 10)
    await settle(ledger, ms(2026, 5, 29, 12), 20)  # Friday
    assert (await used(ledger, ms(2026, 5, 29, 13))).tokens == (0, 20, 30, 30)
    assert (await used(ledger, ms(2026, 5, 31, 23))).tokens == (0, 0, 30, 30)  # Sunday
    assert (await used(ledger, ms(2026, 6, 1, 0))).tokens == (0, 0, 0, 0)  # Monday the 1st
    await settle(ledger, ms(2026, 6, 1, 1), 5)
    assert (await used(ledger, ms(2026, 6, 2))).tokens == (0, 0, 5, 5)


async def test_entities_and_buckets_are_separate(ledger: MemoryLedger) -> None:
    limits = lim(minute=100, hour=1)
    await settle(ledger, T0, 100, entity="a")
    assert await admit(ledger, T0, limits, entity="a") is not None
    assert await admit(ledger, T0, limits, entity="b") is None
    assert await admit(ledger, T0, limits, entity="a", bucket="Keys/other") is None
    report = await ledger.usage(BUCKET, None, at(T0))
    assert set(report.entities) == {"a", "b"}
    assert report.entities["a"].tokens == (100, 100, 100, 100)
    assert report.entities["a"].requests == (0, 0)
    assert report.entities["b"].requests == (1, 1)
    assert (await ledger.usage(BUCKET, ["nobody"], at(T0))).entities["nobody"].idle
    empty = await ledger.usage("Keys/never", None, at(T0))
    assert empty.entities == {} and empty.cost_nano == (0, 0, 0, 0)


async def test_non_positive_charges_count_nothing(ledger: MemoryLedger) -> None:
    await settle(ledger, T0, 0, 0)
    await settle(ledger, T0, -5, -5)
    assert (await used(ledger, T0)).idle
    assert await bucket_cost(ledger, T0) == (0, 0, 0, 0)


# --- reserve mode ---------------------------------------------------------------------------


async def test_reserve_admits_up_to_the_limit_exactly(ledger: MemoryLedger) -> None:
    limits = lim(minute=100, day=1000)
    assert await admit(ledger, T0, limits, reserve=True, tokens=60) is None
    assert (await used(ledger, T0)).tokens == (60, 60, 60, 60)  # reserved at admission
    assert await admit(ledger, T0, limits, reserve=True, tokens=41) is not None  # 101 > 100
    assert await admit(ledger, T0, limits, reserve=True, tokens=40) is None  # 100 == 100
    refusal = await admit(ledger, T0 + 5 * S, limits, reserve=True, tokens=1)
    assert refusal is not None
    assert (refusal.kind, refusal.used, refusal.exceeded) == (
        "token",
        (100, 100, 100, 100),
        ("minute",),
    )
    # Usage must fall to 99 or less: both reservations leave with T0's second.
    assert refusal.retry_after_s == ceil_s((T0 // S + 60) * S - T0 - 5 * S)
    assert (await used(ledger, T0 + 5 * S)).requests == (2, 2)


async def test_a_reservation_larger_than_a_limit(ledger: MemoryLedger) -> None:
    """Current behaviour, kept visible: in reserve mode an estimate above a limit is refused
    even with nothing used, and waiting never helps (DIAL would admit it and overshoot)."""
    refusal = await admit(ledger, T0, lim(minute=100), reserve=True, tokens=101)
    assert refusal is not None and refusal.used == (0, 0, 0, 0)
    assert refusal.retry_after_s == 60
    assert await admit(ledger, T0 + 3600 * S, lim(minute=100), reserve=True, tokens=101) is not None


async def test_reserve_retry_after_counts_the_reservation(ledger: MemoryLedger) -> None:
    limits = lim(minute=100)
    await settle(ledger, T0, 30)
    await settle(ledger, T0 + 10 * S, 30)
    now = T0 + 20 * S
    # 60 used: a 50-token call fits once usage is <= 50, i.e. when T0's 30 leave.
    refusal = await admit(ledger, now, limits, reserve=True, tokens=50)
    assert refusal is not None and refusal.retry_after_s == ceil_s((T0 // S + 60) * S - now)
    # A 75-token call must wait for both to leave.
    refusal = await admit(ledger, now, limits, reserve=True, tokens=75)
    assert refusal is not None and refusal.retry_after_s == ceil_s((T0 // S + 70) * S - now)


async def test_reserve_with_nothing_to_reserve_uses_dials_rule(ledger: MemoryLedger) -> None:
    await settle(ledger, T0, 100)
    assert await admit(ledger, T0, lim(minute=100), reserve=True, tokens=0) is not None
    assert await admit(ledger, T0, lim(minute=101), reserve=True, tokens=0) is None


async def test_reserve_requests_use_dials_rule(ledger: MemoryLedger) -> None:
    limits = lim(hour=2)
    assert await admit(ledger, T0, limits, reserve=True, tokens=5) is None
    assert await admit(ledger, T0, limits, reserve=True, tokens=5) is None
    refusal = await admit(ledger, T0, limits, reserve=True, tokens=5)
    assert refusal is not None and refusal.kind == "request"


async def test_settle_releases_the_reservation_and_charges_the_actual(
    ledger: MemoryLedger,
) -> None:
    limits = lim(minute=1000)
    assert await admit(ledger, T0, limits, reserve=True, tokens=300, cost_nano=7 * NANO) is None
    assert await admit(ledger, T0, limits, reserve=True, tokens=200, cost_nano=2 * NANO) is None
    assert (await used(ledger, T0)).tokens == (500, 500, 500, 500)
    assert await bucket_cost(ledger, T0) == (9 * NANO,) * 4
    await settle(
        ledger, T0 + 3 * S, 120, 3 * NANO, reserved_at=T0, reserved_tokens=300,
        reserved_cost_nano=7 * NANO,
    )  # fmt: skip
    figures = await used(ledger, T0 + 3 * S)
    assert figures.tokens == (320, 320, 320, 320)
    assert figures.cost_nano == (3 * NANO,) * 4  # attributed: only what was charged
    assert await bucket_cost(ledger, T0 + 3 * S) == (5 * NANO,) * 4
    # A failed call (nothing charged) gives its whole reservation back.
    await settle(
        ledger, T0 + 4 * S, reserved_at=T0, reserved_tokens=200, reserved_cost_nano=2 * NANO
    )
    assert (await used(ledger, T0 + 4 * S)).tokens == (120, 120, 120, 120)
    assert await bucket_cost(ledger, T0 + 4 * S) == (3 * NANO,) * 4


async def test_a_reservation_that_left_the_minute_is_not_released_from_another_slot(
    ledger: MemoryLedger,
) -> None:
    limits = lim(minute=1000)
    assert await admit(ledger, T0, limits, reserve=True, tokens=60) is None
    await settle(ledger, T0 + 65 * S, 50)  # another call's charge, in a later slot
    assert (await used(ledger, T0 + 65 * S)).tokens == (50, 110, 110, 110)
    await settle(ledger, T0 + 70 * S, 30, reserved_at=T0, reserved_tokens=60)
    # The reservation already left the minute window: the minute keeps the other charge;
    # the day (still the same) gives the reservation back once.
    assert (await used(ledger, T0 + 70 * S)).tokens == (80, 80, 80, 80)


async def test_a_reservation_from_the_previous_day_is_not_released_from_the_new_day(
    ledger: MemoryLedger,
) -> None:
    limits = lim(minute=1000)
    before = MIDNIGHT - 10 * S  # Thursday 23:59:50
    assert await admit(ledger, before, limits, reserve=True, tokens=60) is None
    await settle(ledger, MIDNIGHT + 5 * S, 40)  # Friday: a new day, same week and month
    await settle(ledger, MIDNIGHT + 10 * S, 30, reserved_at=before, reserved_tokens=60)
    figures = await used(ledger, MIDNIGHT + 10 * S)
    # Minute: the reservation's slot is still live, so it is released from there.
    # Day: Friday holds only Friday's charges. Week and month: released.
    assert figures.tokens == (70, 70, 70, 70)
    assert (await used(ledger, before + 1)).tokens[1] == 0  # Thursday's counter is gone


async def test_a_reservation_from_the_previous_month(ledger: MemoryLedger) -> None:
    limits = lim(minute=1000)
    before = ms(2026, 5, 31, 23, 59, 59)  # Sunday the 31st
    after = ms(2026, 6, 1, 0, 0, 30)  # Monday the 1st
    assert await admit(ledger, before, limits, reserve=True, tokens=60, cost_nano=60) is None
    await settle(
        ledger, after, 25, 25, reserved_at=before, reserved_tokens=60, reserved_cost_nano=60
    )
    assert (await used(ledger, after)).tokens == (25, 25, 25, 25)
    assert await bucket_cost(ledger, after) == (25, 25, 25, 25)
    # After the minute too: nothing is released anywhere.
    assert await admit(ledger, after, limits, reserve=True, tokens=60) is None
    later = after + 2 * MIN
    await settle(ledger, later, 0, reserved_at=after, reserved_tokens=60)
    assert (await used(ledger, later)).tokens == (0, 25, 25, 25)


async def test_counts_never_go_negative(ledger: MemoryLedger) -> None:
    assert await admit(ledger, T0, lim(), reserve=True, tokens=10, cost_nano=10) is None
    # A release larger than what is held (e.g. a reservation made before a restart).
    await settle(ledger, T0 + S, 0, reserved_at=T0, reserved_tokens=1000, reserved_cost_nano=1000)
    assert (await used(ledger, T0 + S)).tokens == (0, 0, 0, 0)
    assert await bucket_cost(ledger, T0 + S) == (0, 0, 0, 0)
    await settle(ledger, T0 + 2 * S, 5)
    assert (await used(ledger, T0 + 2 * S)).tokens == (5, 5, 5, 5)


# --- cost -----------------------------------------------------------------------------------


async def test_cost_is_shared_by_the_bucket_and_attributed_per_entity(
    ledger: MemoryLedger,
) -> None:
    limits = lim(cost=(None, "5", None, None))
    await settle(ledger, T0, 10, 3 * NANO, entity="a")
    assert await admit(ledger, T0 + S, limits, entity="b") is None
    await settle(ledger, T0 + 2 * S, 10, 2 * NANO, entity="b")
    refusal = await admit(ledger, T0 + 3 * S, limits, entity="c")  # never used, still refused
    assert refusal is not None
    assert refusal.kind == "cost" and refusal.exceeded == ("day",)
    assert refusal.used == (5 * NANO,) * 4
    assert refusal.limits == (U, 5 * NANO, U, U)
    assert refusal.retry_after_s == ceil_s(MIDNIGHT - T0 - 3 * S)
    report = await ledger.usage(BUCKET, None, at(T0 + 3 * S))
    assert report.cost_nano == (5 * NANO,) * 4
    assert report.entities["a"].cost_nano == (3 * NANO,) * 4
    assert report.entities["b"].cost_nano == (2 * NANO,) * 4
    assert report.entities["c"].idle
    # Another caller's budget is untouched.
    assert await admit(ledger, T0 + 3 * S, limits, bucket="Keys/other") is None


async def test_cost_minute_retry_after(ledger: MemoryLedger) -> None:
    limits = lim(cost=("0.5", None, None, None))
    await settle(ledger, T0, 0, NANO // 2, entity="a")
    now = T0 + 12 * S
    refusal = await admit(ledger, now, limits, entity="b")
    assert refusal is not None and refusal.exceeded == ("minute",)
    assert refusal.retry_after_s == ceil_s((T0 // S + 60) * S - now) == 48
    assert await admit(ledger, (T0 // S + 60) * S, limits, entity="b") is None


async def test_cost_week_and_month_windows(ledger: MemoryLedger) -> None:
    await settle(ledger, T0, 0, 10 * NANO)
    refusal = await admit(ledger, T0 + 2 * MIN, lim(cost=(None, None, "10", "10")))
    assert refusal is not None and refusal.exceeded == ("week", "month")
    assert refusal.retry_after_s == ceil_s(ms(2026, 6, 1) - T0 - 2 * MIN)


async def test_cost_reservation(ledger: MemoryLedger) -> None:
    limits = lim(cost=(None, "1", None, None))
    assert await admit(ledger, T0, limits, reserve=True, cost_nano=NANO // 2) is None
    assert await admit(ledger, T0, limits, reserve=True, cost_nano=NANO // 2 + 1) is not None
    assert await admit(ledger, T0, limits, reserve=True, cost_nano=NANO // 2) is None  # equal
    assert await bucket_cost(ledger, T0) == (NANO,) * 4


async def test_cost_retry_after_in_reserve_mode_without_a_cost_estimate(
    ledger: MemoryLedger,
) -> None:
    """A call to an unpriced model reserves no cost; the bucket's spend on priced models still
    refuses it once it reaches the limit (`used >= limit`), and it may retry once the spend is
    below the limit, not once it is at most the limit."""
    limits = lim(cost=("1", None, None, None))
    await settle(ledger, T0, 0, NANO // 2, entity="priced")
    await settle(ledger, T0 + 10 * S, 0, NANO // 2, entity="priced")
    now = T0 + 20 * S
    refusal = await admit(ledger, now, limits, entity="unpriced", reserve=True, tokens=10)
    assert refusal is not None and refusal.kind == "cost"
    assert refusal.retry_after_s == ceil_s((T0 // S + 60) * S - now) == 40


async def test_cost_check_comes_after_the_request_check(ledger: MemoryLedger) -> None:
    limits = lim(hour=1, cost=("1", None, None, None))
    assert await admit(ledger, T0, limits) is None
    await settle(ledger, T0, 0, NANO)
    refusal = await admit(ledger, T0 + S, limits)
    assert refusal is not None and refusal.kind == "request"


# --- a refusal changes nothing --------------------------------------------------------------


async def _state(ledger: MemoryLedger, now_ms: int) -> Any:
    report = await ledger.usage(BUCKET, None, at(now_ms))
    return report.cost_nano, {name: vars_of(e) for name, e in report.entities.items()}


def vars_of(usage: EntityUsage) -> tuple[Any, ...]:
    return usage.tokens, usage.requests, usage.cost_nano


@pytest.mark.parametrize(
    ("limits", "kind"),
    [
        (lim(minute=100), "token"),
        (lim(month=100), "token"),
        (lim(hour=1), "request"),
        (lim(request_day=1), "request"),
        (lim(cost=("0.000000100", None, None, None)), "cost"),
        (lim(cost=(None, None, None, "0.0000001")), "cost"),
    ],
)
@pytest.mark.parametrize("reserve", [False, True])
async def test_a_refusal_changes_no_counter(
    ledger: MemoryLedger, limits: Limits, kind: str, reserve: bool
) -> None:
    assert await admit(ledger, T0, lim()) is None
    await settle(ledger, T0, 100, 100)
    before = await _state(ledger, T0 + S)
    refusal = await admit(ledger, T0 + S, limits, reserve=reserve, tokens=7, cost_nano=7)
    assert refusal is not None and refusal.kind == kind
    assert await _state(ledger, T0 + S) == before


# --- extend: a streamed call's reservation grows block by block (compatibility C79) ----------


async def test_extend_grows_the_reservation_up_to_the_limit_exactly(ledger: MemoryLedger) -> None:
    limits = lim(minute=1_000)
    ask = Ask(BUCKET, MODEL, limits, at(T0))
    assert await ledger.admit(ask) is None
    assert await ledger.extend(ask, 600, 0, at(T0 + 100)) is None
    assert (ask.tokens, ask.now) == (600, at(T0 + 100))
    assert await ledger.extend(ask, 400, 0, at(T0 + 200)) is None  # 1000 <= 1000
    assert ask.tokens == 1_000
    assert (await used(ledger, T0 + 200)).tokens[0] == 1_000
    before = await _state(ledger, T0 + 300)
    refusal = await ledger.extend(ask, 1, 0, at(T0 + 300))
    assert refusal is not None
    assert (refusal.kind, refusal.exceeded, refusal.used) == ("token", ("minute",), (1_000,) * 4)
    assert (ask.tokens, ask.now) == (1_000, at(T0 + 200))  # a refusal changes nothing
    assert await _state(ledger, T0 + 300) == before
    # Nor is a request counted by an extension.
    assert (await used(ledger, T0 + 300)).requests == (1, 1)


async def test_extend_counts_what_others_use(ledger: MemoryLedger) -> None:
    limits = lim(day=1_000)
    ask = Ask(BUCKET, MODEL, limits, at(T0), reserve=True, tokens=100)
    assert await ledger.admit(ask) is None
    await settle(ledger, T0 + S, 850)  # another call of the bucket
    refusal = await ledger.extend(ask, 51, 0, at(T0 + 2 * S))
    assert refusal is not None and refusal.used[1] == 950
    assert await ledger.extend(ask, 50, 0, at(T0 + 2 * S)) is None
    assert (await used(ledger, T0 + 2 * S)).tokens[1] == 1_000


async def test_extend_checks_cost_windows_of_the_bucket(ledger: MemoryLedger) -> None:
    limits = lim(cost=(None, "0.000001", None, None))  # 1000 nano-dollars a day
    ask = Ask(BUCKET, MODEL, limits, at(T0))
    assert await ledger.admit(ask) is None
    await settle(ledger, T0, 0, 300, entity="other-model")  # the caller's spend elsewhere
    assert await ledger.extend(ask, 10_000, 700, at(T0 + S)) is None
    refusal = await ledger.extend(ask, 0, 1, at(T0 + S))
    assert refusal is not None
    assert (refusal.kind, refusal.exceeded, refusal.used[1]) == ("cost", ("day",), 1_000)
    assert await bucket_cost(ledger, T0 + S) == (1_000, 1_000, 1_000, 1_000)


async def test_extend_moves_the_reservation_into_the_current_minute(
    ledger: MemoryLedger,
) -> None:
    """A stream longer than a minute: its reservation left the sliding minute, but the charge
    will land in the current one, so the whole reservation is counted and held there again."""
    limits = lim(minute=1_000)
    ask = Ask(BUCKET, MODEL, limits, at(T0), reserve=True, tokens=700)
    assert await ledger.admit(ask) is None
    later = T0 + 2 * MIN
    assert (await used(ledger, later)).tokens[0] == 0  # the admission's slot left the window
    refusal = await ledger.extend(ask, 301, 0, at(later))
    assert refusal is not None and refusal.used[0] == 700
    assert await ledger.extend(ask, 300, 0, at(later)) is None
    assert (await used(ledger, later)).tokens == (1_000, 1_000, 1_000, 1_000)
    # Settled where it is held now: nothing is left reserved, the real usage is charged.
    await settle(ledger, later + S, 420, reserved_at=later, reserved_tokens=ask.tokens)
    assert (await used(ledger, later + S)).tokens == (420, 420, 420, 420)


async def test_extend_across_midnight_moves_the_reservation_to_the_new_day(
    ledger: MemoryLedger,
) -> None:
    limits = lim(day=1_000)
    ask = Ask(BUCKET, MODEL, limits, at(MIDNIGHT - 10 * S), reserve=True, tokens=600)
    assert await ledger.admit(ask) is None
    assert await ledger.extend(ask, 300, 0, at(MIDNIGHT + 10 * S)) is None
    assert (await used(ledger, MIDNIGHT - S)).tokens[1] == 0  # released from yesterday
    assert (await used(ledger, MIDNIGHT + 10 * S)).tokens[1] == 900
    await settle(
        ledger, MIDNIGHT + 20 * S, 880, reserved_at=MIDNIGHT + 10 * S, reserved_tokens=ask.tokens
    )
    assert (await used(ledger, MIDNIGHT + 20 * S)).tokens[1] == 880


async def test_extend_without_limits_of_a_kind_only_moves_it(ledger: MemoryLedger) -> None:
    ask = Ask(BUCKET, MODEL, lim(minute=10), at(T0))
    assert await ledger.admit(ask) is None
    assert await ledger.extend(ask, 5, 10**12, at(T0 + S)) is None  # no cost limit
    assert ask.cost_nano == 10**12
    assert await bucket_cost(ledger, T0 + S) == (10**12,) * 4
    await settle(
        ledger, T0 + 2 * S, 3, 30, reserved_at=T0 + S, reserved_tokens=5, reserved_cost_nano=10**12
    )
    assert await bucket_cost(ledger, T0 + 2 * S) == (30,) * 4
    assert (await used(ledger, T0 + 2 * S)).tokens[0] == 3


async def test_concurrent_streams_extend_within_the_limit(ledger: MemoryLedger) -> None:
    limits = lim(minute=1_000)
    asks = [Ask(BUCKET, MODEL, limits, at(T0)) for _ in range(5)]
    for ask in asks:
        assert await ledger.admit(ask) is None
    granted = 0
    for _ in range(10):
        for ask in asks:
            if await ledger.extend(ask, 64, 0, at(T0 + S)) is None:
                granted += 64
    assert granted == 15 * 64  # 960: one more block would cross 1000
    assert sum(ask.tokens for ask in asks) == granted
    assert (await used(ledger, T0 + S)).tokens[0] == granted


# --- property: the ledger against a model of spec 5 ----------------------------------------


@dataclass
class Event:
    entity: str
    what: str  # "tokens", "cost" (bucket), "attributed" (entity cost), "request"
    at_ms: int
    amount: int
    ticket: int | None = None  # the admission whose reservation this is


@dataclass
class Model:
    limits: Limits
    reserve: bool
    events: list[Event] = field(default_factory=list)

    def sliding(self, what: str, entity: str | None, now_ms: int, window: Any) -> int:
        oldest = window.oldest_live_slot(now_ms)
        return sum(
            e.amount
            for e in self.events
            if e.what == what and entity in (None, e.entity) and window.slot(e.at_ms) >= oldest
        )

    def calendar(self, what: str, entity: str | None, now_ms: int) -> tuple[int, ...]:
        now = at(now_ms)
        return tuple(
            sum(
                e.amount
                for e in self.events
                if e.what == what
                and entity in (None, e.entity)
                and at(e.at_ms).period(p) == now.period(p)
            )
            for p in PERIODS
        )

    def windows(self, what: str, entity: str | None, now_ms: int) -> tuple[int, ...]:
        return (self.sliding(what, entity, now_ms, MINUTE), *self.calendar(what, entity, now_ms))

    def requests(self, entity: str, now_ms: int) -> tuple[int, int]:
        return (
            self.sliding("request", entity, now_ms, HOUR),
            self.calendar("request", entity, now_ms)[0],
        )

    def refusal(self, entity: str, now_ms: int, tokens: int, cost: int) -> tuple[Any, ...] | None:
        def exceeded(
            used: tuple[int, ...],
            limits: tuple[int | None, ...],
            names: tuple[str, ...],
            extra: int,
        ) -> tuple[str, ...]:
            return tuple(
                n
                for n, u, lm in zip(names, used, limits, strict=True)
                if lm is not None
                and lm < U
                and (u + extra > lm if self.reserve and extra else u >= lm)
            )

        windows4 = ("minute", "day", "week", "month")
        used = self.windows("tokens", entity, now_ms)
        hit = exceeded(used, self.limits.tokens, windows4, tokens)
        if hit:
            return ("token", used, hit)
        req = self.requests(entity, now_ms)
        hit = exceeded(req, self.limits.requests, ("hour", "day"), 0)
        if hit:
            return ("request", req, hit)
        spent = self.windows("cost", None, now_ms)
        cost_limits = tuple(None if c >= UC else int(c * NANO) for c in self.limits.cost)
        hit = exceeded(spent, cost_limits, windows4, cost)
        if hit:
            return ("cost", spent, hit)
        return None


# Multiples of 10, so that usage often lands exactly on a limit.
tens = st.integers(-1, 12).map(lambda n: n * 10)
small_limits = st.one_of(
    st.just(U), st.integers(1, 30).map(lambda n: n * 10), st.integers(1, 2000).map(lambda n: n * 10)
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("wait"),
            st.one_of(
                st.integers(0, 3 * S), st.integers(0, 2 * 3600 * S), st.integers(0, 3 * 86_400 * S)
            ),
        ),
        st.tuples(st.just("admit"), st.sampled_from(("a", "b")), tens, tens),
        st.tuples(st.just("settle"), st.integers(0, 10), tens, tens),
    ),
    min_size=15,
    max_size=40,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.sampled_from([T0, ms(2026, 5, 31, 22, 30), ms(2026, 12, 31, 23, 59, 30)]),
    reserve=st.booleans(),
    token_limits=st.tuples(small_limits, small_limits, small_limits, small_limits),
    request_limits=st.tuples(
        st.one_of(st.just(U), st.integers(1, 6)), st.one_of(st.just(U), st.integers(1, 9))
    ),
    cost_limits=st.tuples(*(st.one_of(st.none(), st.integers(1, 40).map(lambda n: n * 10)),) * 4),
    ops=operations,
)
async def test_ledger_matches_the_model(
    start: int,
    reserve: bool,
    token_limits: tuple[int, int, int, int],
    request_limits: tuple[int, int],
    cost_limits: tuple[int | None, ...],
    ops: list[tuple[Any, ...]],
) -> None:
    limits = Limits(
        token_limits,
        request_limits,
        tuple(UC if c is None else Decimal(c) / NANO for c in cost_limits),  # type: ignore[arg-type]
    )
    model = Model(limits, reserve)
    store = MemoryLedger(None)
    now = start
    outstanding: list[tuple[int, str, int, int, int]] = []  # ticket, entity, at, tokens, cost
    tickets = 0

    async def check_retry_after(
        store: MemoryLedger, now: int, refusal: Refusal, entity: str, tokens: int, cost: int
    ) -> None:
        """With nothing else happening, the same call is still refused for the same reason a
        second before `Retry-After` ends, and not for that reason when it ends."""
        kinds = ("token", "request", "cost")
        wait_ms = refusal.retry_after_s * 1000
        assert wait_ms >= 1000
        probe = MemoryLedger(None)
        probe._buckets = copy.deepcopy(store._buckets)

        async def again(moment: int) -> Refusal | None:
            return await admit(
                probe, moment, limits, entity=entity, reserve=reserve, tokens=tokens, cost_nano=cost
            )

        early = await again(now + wait_ms - 1000)
        assert early is not None and early.kind == refusal.kind
        extra = tokens if refusal.kind == "token" else cost if refusal.kind == "cost" else 0
        if reserve and extra and any(extra > limit for limit in refusal.limits):
            return  # this reservation can never fit: see test_a_reservation_larger_than_a_limit
        late = await again(now + wait_ms)
        assert late is None or kinds.index(late.kind) > kinds.index(refusal.kind)
        await probe.close()

    async def check() -> None:
        report = await store.usage(BUCKET, ["a", "b"], at(now))
        assert report.cost_nano == model.windows("cost", None, now)
        for name in ("a", "b"):
            got = report.entities[name]
            assert got.tokens == model.windows("tokens", name, now)
            assert got.requests == model.requests(name, now)
            assert got.cost_nano == model.windows("attributed", name, now)
            assert min((*got.tokens, *got.requests, *got.cost_nano)) >= 0

    for op in ops:
        if op[0] == "wait":
            now += op[1]
        elif op[0] == "admit":
            _, entity, tokens, cost = op
            tokens, cost = (max(tokens, 0), max(cost, 0)) if reserve else (0, 0)
            expected = model.refusal(entity, now, tokens, cost)
            refusal = await admit(
                store, now, limits, entity=entity, reserve=reserve, tokens=tokens, cost_nano=cost
            )
            event(f"admitted: {expected is None}")
            if expected is None:
                assert refusal is None
                tickets += 1
                model.events.append(Event(entity, "request", now, 1))
                if tokens:
                    model.events.append(Event(entity, "tokens", now, tokens, tickets))
                if cost:
                    model.events.append(Event(entity, "cost", now, cost, tickets))
                outstanding.append((tickets, entity, now, tokens, cost))
            else:
                assert refusal is not None
                assert (refusal.kind, refusal.used, refusal.exceeded) == expected
                await check_retry_after(store, now, refusal, entity, tokens, cost)
        elif outstanding:
            _, index, tokens, cost = op
            ticket, entity, admitted_at, reserved_tokens, reserved_cost = outstanding.pop(
                index % len(outstanding)
            )
            await settle(
                store, now, tokens, cost, entity=entity, reserved_at=admitted_at,
                reserved_tokens=reserved_tokens, reserved_cost_nano=reserved_cost,
            )  # fmt: skip
            if at(admitted_at).day != at(now).day:
                event("settled in a later day")
            model.events = [e for e in model.events if e.ticket != ticket]
            if tokens > 0:
                model.events.append(Event(entity, "tokens", now, tokens))
            if cost > 0:
                model.events.append(Event(entity, "cost", now, cost))
                model.events.append(Event(entity, "attributed", now, cost))
        await check()
    await store.close()


# --- persistence ----------------------------------------------------------------------------


async def _fill(store: MemoryLedger) -> None:
    limits = lim(minute=10**6, hour=100)
    for i, entity in enumerate(("gpt-4", "model[1m]", "ünï")):
        for bucket in (BUCKET, "Keys/other"):
            assert (
                await admit(store, T0 - 3 * 86_400 * S + i, limits, entity=entity, bucket=bucket)
                is None
            )
            await settle(store, T0 - 3 * 86_400 * S, 7, 7 * NANO, entity=entity, bucket=bucket)
            assert await admit(store, T0 + i, limits, entity=entity, bucket=bucket) is None
            await settle(store, T0 + i, 100 + i, 10**9 + i, entity=entity, bucket=bucket)
    # A reservation in flight at shutdown survives too.
    assert await admit(store, T0 + 5, limits, reserve=True, tokens=11, cost_nano=11) is None


async def _everything(store: MemoryLedger, now_ms: int) -> dict[str, Any]:
    out = {}
    for bucket in (BUCKET, "Keys/other", "Keys/absent"):
        report = await store.usage(bucket, None, at(now_ms))
        out[bucket] = (report.cost_nano, {n: vars_of(e) for n, e in report.entities.items()})
    return out


async def test_usage_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "usage.db")  # the folder is created
    first = MemoryLedger(path, flush_every_s=3600)
    await first.start()
    await _fill(first)
    await first.close()
    reference = MemoryLedger(None)  # the same history, never restarted
    await _fill(reference)

    second = MemoryLedger(path, flush_every_s=3600)
    await second.start()
    assert (await used(second, T0 + 10, "gpt-4")).tokens == (100, 100, 107, 107)
    assert (await used(second, T0 + 10)).tokens == (11, 11, 11, 11)  # the reservation
    # Reads drop what left the sliding windows: compare moments in time order.
    for moment in (T0 + 10, T0 + 2 * MIN, MIDNIGHT + 1, ms(2026, 5, 20)):
        assert await _everything(second, moment) == await _everything(reference, moment)
    await reference.close()
    await second.close()

    # And it keeps counting from there.
    third = MemoryLedger(path)
    await third.start()
    await settle(third, T0 + 20, 1, entity="gpt-4")
    await third.close()
    fourth = MemoryLedger(path)
    await fourth.start()
    assert (await used(fourth, T0 + 30, "gpt-4")).tokens == (101, 101, 108, 108)
    assert (await used(fourth, T0 + 30, "gpt-4")).requests == (1, 1)
    await fourth.close()


async def test_flush_writes_changed_buckets(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    store = MemoryLedger(str(path), flush_every_s=3600)
    await store.start()
    await settle(store, T0, 5)
    await store.flush()
    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT bucket, state FROM usage"))
    assert set(rows) == {BUCKET}
    await settle(store, T0, 5, bucket="Keys/other")
    await store.flush()
    await store.flush()  # nothing changed: nothing to write
    with sqlite3.connect(path) as db:
        assert {r[0] for r in db.execute("SELECT bucket FROM usage")} == {BUCKET, "Keys/other"}
    await store.close()


async def test_periodic_flush(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    store = MemoryLedger(str(path), flush_every_s=0.01)
    await store.start()
    await settle(store, T0, 5)
    for _ in range(200):
        await asyncio.sleep(0.01)
        with sqlite3.connect(path) as db:
            if list(db.execute("SELECT bucket FROM usage")):
                break
    else:
        pytest.fail("not flushed")
    await store.close()


async def test_close_during_a_periodic_flush_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "usage.db")
    store = MemoryLedger(path, flush_every_s=0.01)
    await store.start()
    real_write = store._write
    writing = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_write(rows: list[tuple[str, str]]) -> None:
        loop.call_soon_threadsafe(writing.set)
        import time

        time.sleep(0.1)
        real_write(rows)

    monkeypatch.setattr(store, "_write", slow_write)
    await settle(store, T0, 42)
    await asyncio.wait_for(writing.wait(), 5)
    await store.close()  # while the periodic flush is still writing
    reopened = MemoryLedger(path)
    await reopened.start()
    assert (await used(reopened, T0)).tokens == (42, 42, 42, 42)
    await reopened.close()


async def test_a_failed_write_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "usage.db")
    store = MemoryLedger(path, flush_every_s=3600)
    await store.start()
    real_write = store._write

    def failing_write(rows: list[tuple[str, str]]) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_write", failing_write)
    await settle(store, T0, 42)
    with pytest.raises(sqlite3.OperationalError):
        await store.flush()
    monkeypatch.setattr(store, "_write", real_write)
    await store.close()  # nothing changed since: the failed rows must still be written
    reopened = MemoryLedger(path)
    await reopened.start()
    assert (await used(reopened, T0)).tokens == (42, 42, 42, 42)
    await reopened.close()


GOOD = '{"c": {"s": {}, "c": {"day": [0, 0], "week": [0, 0], "month": [0, 0]}}, "e": {}}'


@pytest.mark.parametrize(
    "state",
    [
        "not json",
        "null",
        "[]",
        "42",
        '{"c": {}, "e": {}}',
        '{"c": {"s": [], "c": {}}, "e": {}}',  # a list where a mapping belongs
        '{"c": {"s": {}, "c": []}, "e": {}}',
        '{"c": {"s": {"x": 1}, "c": {}}, "e": {}}',
        '{"c": {"s": {}, "c": {"day": [0, 0]}}, "e": {}}',  # periods missing
        '{"c": {"s": {}, "c": {"day": [0], "week": [0, 0], "month": [0, 0]}}, "e": {}}',
        GOOD.replace('"s": {}', '"s": {"1": 1e400}'),  # a number no int can hold
        GOOD.replace('"e": {}', '"e": {"m": {}}'),
        GOOD.replace('"e": {}', '"e": []'),
        GOOD.replace('"e": {}', '"e": {"m": {"t": 1, "c": 2, "rh": 3, "rd": 4}}'),
        "[" * 100_000,
    ],
)
async def test_an_unreadable_row_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, state: str
) -> None:
    path = tmp_path / "usage.db"
    store = MemoryLedger(str(path))
    await store.start()
    await settle(store, T0, 9)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO usage (bucket, state) VALUES ('Keys/broken', ?)", (state,))
    caplog.set_level(logging.WARNING, logger="tollgate.limits")
    reopened = MemoryLedger(str(path))
    await reopened.start()
    assert "unreadable row" in caplog.text
    assert (await used(reopened, T0)).tokens == (9, 9, 9, 9)
    # The skipped caller starts from nothing, and works.
    assert (
        await admit(reopened, T0, lim(minute=10, day=10, week=10, month=10), bucket="Keys/broken")
        is None
    )
    await settle(reopened, T0, 5, 5, bucket="Keys/broken")
    assert (await used(reopened, T0, bucket="Keys/broken")).tokens == (5, 5, 5, 5)
    await reopened.close()


async def test_a_row_that_is_not_utf8_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    store = MemoryLedger(str(path))
    await store.start()
    await settle(store, T0, 9)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO usage (bucket, state) VALUES ('Keys/a', CAST(x'ff7b' AS TEXT))")
        db.execute(f"INSERT INTO usage (bucket, state) VALUES (CAST(x'ff' AS TEXT), '{GOOD}')")
    caplog.set_level(logging.WARNING, logger="tollgate.limits")
    reopened = MemoryLedger(str(path))
    await reopened.start()
    assert "unreadable row" in caplog.text
    assert (await used(reopened, T0)).tokens == (9, 9, 9, 9)
    await reopened.close()


async def test_no_path_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = MemoryLedger(None, flush_every_s=0.001)
    await store.start()
    await _fill(store)
    await asyncio.sleep(0.01)
    await store.flush()
    await store.close()
    assert list(tmp_path.iterdir()) == []


async def test_close_twice_and_without_start(tmp_path: Path) -> None:
    store = MemoryLedger(str(tmp_path / "usage.db"))
    await store.close()
    assert list(tmp_path.iterdir()) == []
    store = MemoryLedger(str(tmp_path / "usage.db"))
    await store.start()
    await store.close()
    await store.close()
