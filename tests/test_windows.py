"""Limit windows: sliding slots, `rateLimitSchedule`'s calendar periods, the clock (spec 5.3)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.config.schema import RateLimitSchedule
from tollgate.limits.windows import (
    HOUR,
    MINUTE,
    PERIODS,
    Clock,
    Instant,
    Schedule,
    Sliding,
    seconds_until,
    sliding_retry_after_ms,
    sliding_total,
)

DAY_WINDOW = Sliding("day", 24, 3_600_000)  # DIAL 2024's sliding day: 24 x 1 h
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR_S = 3600

# Zones with everything DST can do: none, +-1 h, 30 min (Lord Howe), odd offsets (Kathmandu,
# Chatham), southern hemisphere (Santiago, whose changes happen at midnight), negative DST
# (Dublin), Ramadan suspensions (Casablanca), a skipped day (Apia, 2011-12-30), the date line.
ZONES = (
    "UTC",
    "Europe/Berlin",
    "Europe/London",
    "Europe/Dublin",
    "America/New_York",
    "America/St_Johns",
    "America/Santiago",
    "America/Sao_Paulo",
    "America/Moncton",
    "America/Havana",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Dhaka",
    "Asia/Tehran",
    "Africa/Casablanca",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Pacific/Apia",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
)
Y2000 = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp() * 1000)
Y2100 = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)


def add(counts: dict[int, int], window: Sliding, now_ms: int, amount: int) -> int:
    """What a ledger does: add to the current slot, return the window's usage."""
    slot = window.slot(now_ms)
    counts[slot] = counts.get(slot, 0) + amount
    return sliding_total(counts, window, now_ms)


def at_slot(window: Sliding, k: int) -> int:
    """A moment inside slot k (not at its start, so both edges are exercised elsewhere)."""
    return k * window.width_ms + window.width_ms // 2


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# Aware datetimes in one zone compare and subtract by wall clock (ignoring `fold`), and `==`
# across zones is always False inside a repeated hour (PEP 495): compare moments in UTC.
def u(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def hours(start: datetime, end: datetime) -> float:
    return (end.timestamp() - start.timestamp()) / HOUR_S


def schedule(timezone: str = "UTC", week_start: str = "MONDAY", reset: str = "00:00") -> Schedule:
    return Schedule.of(
        RateLimitSchedule.model_validate(
            {"timezone": timezone, "weekStartDay": week_start, "resetTime": reset}
        )
    )


# --- sliding windows ------------------------------------------------------------------------


def test_window_shapes() -> None:
    assert (MINUTE.slots, MINUTE.width_ms) == (60, 1_000)
    assert (HOUR.slots, HOUR.width_ms) == (60, 60_000)
    assert MINUTE.slot(59_999) == 59 and MINUTE.slot(60_000) == 60
    assert MINUTE.oldest_live_slot(60_000) == 1
    assert HOUR.oldest_live_slot(3_600_000) == 1


def test_rate_bucket_minute_example() -> None:
    """DIAL's `RateBucketTest`, minute bucket (spec 5.3)."""
    counts: dict[int, int] = {}
    w = MINUTE
    assert add(counts, w, at_slot(w, 0), 10) == 10
    assert add(counts, w, at_slot(w, 0), 20) == 30
    assert add(counts, w, at_slot(w, 1), 30) == 60
    assert add(counts, w, at_slot(w, 59), 40) == 100
    assert add(counts, w, at_slot(w, 60), 10) == 80  # k0's 30 dropped
    assert add(counts, w, at_slot(w, 61), 5) == 55  # k1's 30 dropped
    assert sliding_total(counts, w, at_slot(w, 121)) == 0
    assert counts == {}  # stale slots are dropped, not kept forever


def test_rate_bucket_day_example() -> None:
    """The same sequence on DIAL 2024's sliding day bucket, in hours (spec 5.3)."""
    counts: dict[int, int] = {}
    w = DAY_WINDOW
    assert add(counts, w, at_slot(w, 0), 10) == 10
    assert add(counts, w, at_slot(w, 0), 20) == 30
    assert add(counts, w, at_slot(w, 1), 30) == 60
    assert add(counts, w, at_slot(w, 23), 40) == 100
    assert add(counts, w, at_slot(w, 24), 10) == 80
    assert add(counts, w, at_slot(w, 25), 5) == 55
    assert sliding_total(counts, w, at_slot(w, 49)) == 0


def test_slot_edges() -> None:
    counts = {0: 7}
    assert sliding_total(dict(counts), MINUTE, 59_999) == 7  # last ms of slot 59
    assert sliding_total(dict(counts), MINUTE, 60_000) == 0  # slot 60 begins: slot 0 leaves


def test_retry_after_examples() -> None:
    counts = {0: 30, 1: 30, 59: 40}
    now = 59_500
    assert sliding_retry_after_ms(counts, MINUTE, now, 101) == 0  # 100 < 101 already
    assert sliding_retry_after_ms(counts, MINUTE, now, 100) == 500  # slot 0 leaves at 60 s
    assert sliding_retry_after_ms(counts, MINUTE, now, 71) == 500
    assert sliding_retry_after_ms(counts, MINUTE, now, 70) == 1_500  # slot 1 leaves at 61 s
    assert sliding_retry_after_ms(counts, MINUTE, now, 40) == 59_500  # slot 59 leaves at 119 s
    assert sliding_retry_after_ms({}, MINUTE, now, 1) == 0
    # The current slot alone over the limit: it leaves a whole window after it began.
    assert sliding_retry_after_ms({10: 5}, HOUR, 10 * 60_000, 5) == 3_600_000


def test_retry_after_ignores_stale_slots() -> None:
    """Slots a read has not yet dropped count as already gone."""
    now = at_slot(MINUTE, 100)
    assert sliding_retry_after_ms({0: 500, 41: 10, 100: 5}, MINUTE, now, 15) == 500
    assert sliding_retry_after_ms({0: 500, 100: 5}, MINUTE, now, 10) == 0


def _total_at(counts: dict[int, int], window: Sliding, now_ms: int) -> int:
    oldest = window.oldest_live_slot(now_ms)
    return sum(n for slot, n in counts.items() if oldest <= slot <= window.slot(now_ms))


windows = st.sampled_from([MINUTE, HOUR, DAY_WINDOW, Sliding("tiny", 3, 7)])


@settings(max_examples=200, deadline=None)
@given(
    window=windows,
    steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000)), min_size=1, max_size=60),
    start_slot=st.integers(0, 10**9),
)
def test_total_is_the_sum_of_the_last_n_slots(
    window: Sliding, steps: list[tuple[int, int]], start_slot: int
) -> None:
    counts: dict[int, int] = {}
    history: list[tuple[int, int]] = []  # (slot, amount) of every add
    now = start_slot * window.width_ms
    for advance_slots, amount in steps:
        now += advance_slots * window.width_ms // 3 + advance_slots % 2
        history.append((window.slot(now), amount))
        total = add(counts, window, now, amount)
        oldest = window.slot(now) - window.slots + 1
        assert total == sum(n for slot, n in history if slot >= oldest)
        assert all(slot >= oldest for slot in counts)


@settings(max_examples=300, deadline=None)
@given(
    window=windows,
    data=st.data(),
    limit=st.integers(1, 3000),
    offset=st.integers(0, 10**6),
)
def test_retry_after_is_when_usage_first_drops_below_the_limit(
    window: Sliding, data: st.DataObject, limit: int, offset: int
) -> None:
    current = window.slots * 3 + offset
    now = current * window.width_ms + data.draw(st.integers(0, window.width_ms - 1))
    # Live slots, and some stale ones a read has not dropped yet.
    live = data.draw(
        st.dictionaries(
            st.integers(current - window.slots + 1, current), st.integers(0, 500), max_size=20
        )
    )
    stale = data.draw(
        st.dictionaries(
            st.integers(current - 3 * window.slots, current - window.slots),
            st.integers(0, 500),
            max_size=5,
        )
    )
    counts = {**stale, **live}
    got = sliding_retry_after_ms(dict(counts), window, now, limit)
    # Brute force: the usage changes only when a slot begins; step slot by slot.
    if _total_at(counts, window, now) < limit:
        expected = 0
    else:
        moment = next(
            k * window.width_ms
            for k in range(current + 1, current + window.slots + 1)
            if _total_at(counts, window, k * window.width_ms) < limit
        )
        expected = moment - now
    assert got == expected
    if expected == 0:
        assert sliding_total(dict(counts), window, now) < limit


# --- calendar periods -----------------------------------------------------------------------


def test_schedule_defaults() -> None:
    s = Schedule.of(RateLimitSchedule())
    assert s.zone == ZoneInfo("UTC") and s.week_start == 0 and s.reset == time(0, 0)
    now = utc(2026, 5, 14, 15, 42, 7)  # a Thursday
    assert s.start("day", now) == utc(2026, 5, 14)
    assert s.next_start("day", now) == utc(2026, 5, 15)
    assert s.start("week", now) == utc(2026, 5, 11)  # Monday
    assert s.next_start("week", now) == utc(2026, 5, 18)
    assert s.start("month", now) == utc(2026, 5, 1)
    assert s.next_start("month", now) == utc(2026, 6, 1)


def test_period_starts_exactly_at_the_boundary() -> None:
    s = schedule()
    boundary = utc(2026, 6, 1)  # a Monday and the 1st
    for period in PERIODS:
        assert s.start(period, boundary) == boundary
        before = boundary - timedelta(microseconds=1)
        assert s.next_start(period, before) == boundary
        assert s.start(period, before) < boundary


@pytest.mark.parametrize(
    ("day_name", "expected_start"),
    [
        ("MONDAY", date(2026, 5, 11)),
        ("TUESDAY", date(2026, 5, 12)),
        ("WEDNESDAY", date(2026, 5, 13)),
        ("THURSDAY", date(2026, 5, 14)),  # today
        ("FRIDAY", date(2026, 5, 8)),
        ("SATURDAY", date(2026, 5, 9)),
        ("SUNDAY", date(2026, 5, 10)),
        ("sun", date(2026, 5, 10)),  # DIAL's parser accepts abbreviations, any case
    ],
)
def test_week_start_day(day_name: str, expected_start: date) -> None:
    s = schedule(week_start=day_name)
    now = utc(2026, 5, 14, 12)  # Thursday
    start = s.start("week", now)
    assert start == datetime.combine(expected_start, time(), UTC)
    assert s.next_start("week", now) == start + timedelta(days=7)
    assert start.weekday() == expected_start.weekday()


def test_reset_time_before_and_after_on_the_same_date() -> None:
    s = schedule(reset="09:30")
    before = utc(2026, 5, 14, 9, 29, 59)
    after = utc(2026, 5, 14, 9, 30)
    assert s.start("day", before) == utc(2026, 5, 13, 9, 30)
    assert s.next_start("day", before) == utc(2026, 5, 14, 9, 30)
    assert s.start("day", after) == utc(2026, 5, 14, 9, 30)
    assert s.next_start("day", after) == utc(2026, 5, 15, 9, 30)


def test_reset_time_on_the_week_start_day() -> None:
    s = schedule(week_start="THURSDAY", reset="09:30")
    assert s.start("week", utc(2026, 5, 14, 9)) == utc(2026, 5, 7, 9, 30)  # a week back
    assert s.start("week", utc(2026, 5, 14, 10)) == utc(2026, 5, 14, 9, 30)
    assert s.next_start("week", utc(2026, 5, 14, 9)) == utc(2026, 5, 14, 9, 30)


def test_reset_time_on_the_first_of_the_month() -> None:
    s = schedule(reset="09:30")
    assert s.start("month", utc(2026, 3, 1, 9)) == utc(2026, 2, 1, 9, 30)
    assert s.next_start("month", utc(2026, 3, 1, 9)) == utc(2026, 3, 1, 9, 30)
    assert s.start("month", utc(2026, 3, 1, 10)) == utc(2026, 3, 1, 9, 30)
    # Before the reset on January 1st: the period started on December 1st, a year earlier.
    assert s.start("month", utc(2026, 1, 1, 9)) == utc(2025, 12, 1, 9, 30)


@pytest.mark.parametrize(
    ("now", "start", "following"),
    [
        (utc(2026, 1, 31, 23, 59), utc(2026, 1, 1), utc(2026, 2, 1)),
        (utc(2026, 2, 28, 12), utc(2026, 2, 1), utc(2026, 3, 1)),
        (utc(2024, 2, 29, 12), utc(2024, 2, 1), utc(2024, 3, 1)),  # leap year
        (utc(2000, 2, 29), utc(2000, 2, 1), utc(2000, 3, 1)),  # divisible by 400: leap
        (utc(2100, 2, 28, 23), utc(2100, 2, 1), utc(2100, 3, 1)),  # by 100: not leap
        (utc(2026, 12, 31, 23, 59, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
        (utc(2027, 1, 1), utc(2027, 1, 1), utc(2027, 2, 1)),
        (utc(2026, 4, 30, 5), utc(2026, 4, 1), utc(2026, 5, 1)),
    ],
)
def test_month_boundaries(now: datetime, start: datetime, following: datetime) -> None:
    s = schedule()
    assert s.start("month", now) == start
    assert s.next_start("month", now) == following


def test_day_boundaries_across_months_and_years() -> None:
    s = schedule()
    assert s.next_start("day", utc(2026, 1, 31, 12)) == utc(2026, 2, 1)
    assert s.next_start("day", utc(2024, 2, 28, 12)) == utc(2024, 2, 29)
    assert s.next_start("day", utc(2026, 12, 31, 12)) == utc(2027, 1, 1)
    # A week that spans the new year.
    assert s.start("week", utc(2027, 1, 1)) == utc(2026, 12, 28)
    assert s.next_start("week", utc(2027, 1, 1)) == utc(2027, 1, 4)


def test_berlin_spring_forward_day_is_23_hours() -> None:
    s = schedule("Europe/Berlin")
    now = utc(2026, 3, 29, 12)  # last Sunday of March
    start, end = s.start("day", now), s.next_start("day", now)
    assert u(start) == utc(2026, 3, 28, 23)  # 00:00 CET
    assert u(end) == utc(2026, 3, 29, 22)  # 00:00 CEST
    assert hours(start, end) == 23
    assert start.utcoffset() == timedelta(hours=1) and end.utcoffset() == timedelta(hours=2)
    assert hours(s.start("day", utc(2026, 3, 28, 12)), start) == 24


def test_berlin_fall_back_day_is_25_hours() -> None:
    s = schedule("Europe/Berlin")
    now = utc(2026, 10, 25, 12)  # last Sunday of October
    start, end = s.start("day", now), s.next_start("day", now)
    assert u(start) == utc(2026, 10, 24, 22)  # 00:00 CEST
    assert u(end) == utc(2026, 10, 25, 23)  # 00:00 CET
    assert hours(start, end) == 25
    # The week and the month that contain it are an hour longer too.
    assert hours(s.start("week", now), s.next_start("week", now)) == 7 * 24 + 1
    assert hours(s.start("month", now), s.next_start("month", now)) == 31 * 24 + 1
    assert hours(s.start("month", utc(2026, 3, 15)), s.next_start("month", utc(2026, 3, 15))) == (
        31 * 24 - 1
    )


def test_new_york_dst_days() -> None:
    s = schedule("America/New_York", reset="06:00")
    spring = s.start("day", utc(2026, 3, 8, 15))  # second Sunday of March
    assert u(spring) == utc(2026, 3, 8, 10)  # 06:00 EDT
    assert hours(s.start("day", utc(2026, 3, 7, 15)), spring) == 23
    assert hours(spring, s.next_start("day", spring)) == 24
    autumn = s.start("day", utc(2026, 11, 1, 15))  # first Sunday of November
    assert u(autumn) == utc(2026, 11, 1, 11)  # 06:00 EST
    assert hours(s.start("day", utc(2026, 10, 31, 15)), autumn) == 25


def test_reset_inside_the_spring_forward_gap() -> None:
    """02:30 does not exist in Berlin on 2026-03-29: the reset moves on by the gap, to 03:30
    CEST, as Java's `ZonedDateTime.of` does."""
    s = schedule("Europe/Berlin", reset="02:30")
    gap_reset = utc(2026, 3, 29, 1, 30)  # 03:30 CEST
    for now in (utc(2026, 3, 29, 0, 59), utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 29)):
        assert u(s.start("day", now)) == utc(2026, 3, 28, 1, 30)  # 02:30 CET
        assert u(s.next_start("day", now)) == gap_reset
    assert u(s.start("day", gap_reset)) == gap_reset
    assert u(s.next_start("day", gap_reset)) == utc(2026, 3, 30, 0, 30)  # 02:30 CEST
    lengths = [
        hours(s.start("day", d), s.next_start("day", d))
        for d in (utc(2026, 3, 28, 12), utc(2026, 3, 29, 12), utc(2026, 3, 30, 12))
    ]
    # 02:30 CET -> 03:30 CEST is 24 real hours; 03:30 CEST -> 02:30 CEST is 23.
    assert lengths == [24, 23, 24]


def test_reset_inside_the_repeated_autumn_hour() -> None:
    """02:30 happens twice in Berlin on 2026-10-25: the first (CEST) is the reset, as Java's
    `ZonedDateTime.of` picks the earlier offset."""
    s = schedule("Europe/Berlin", reset="02:30")
    first = utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    second = utc(2026, 10, 25, 1, 30)  # 02:30 CET, an hour later
    assert u(s.next_start("day", utc(2026, 10, 25, 0, 29))) == first
    assert u(s.start("day", utc(2026, 10, 25, 0, 29))) == utc(2026, 10, 24, 0, 30)
    assert u(s.start("day", first)) == first
    assert u(s.start("day", second)) == first
    assert u(s.next_start("day", second)) == utc(2026, 10, 26, 1, 30)
    assert hours(s.start("day", second), s.next_start("day", second)) == 25


def test_start_of_a_moment_given_in_the_schedule_zone() -> None:
    """Aware datetimes in the schedule's own zone compare by wall clock in Python, ignoring
    `fold`: the second 02:15 of 2026-10-25 in Berlin (01:15 UTC) is after the 02:30 CEST
    reset (00:30 UTC), though its wall clock is earlier."""
    s = schedule("Europe/Berlin", reset="02:30")
    second_0215 = datetime(2026, 10, 25, 2, 15, fold=1, tzinfo=BERLIN)
    as_utc = u(second_0215)
    assert as_utc == utc(2026, 10, 25, 1, 15)
    for period in PERIODS:
        assert u(s.start(period, second_0215)) == u(s.start(period, as_utc))
        assert u(s.next_start(period, second_0215)) == u(s.next_start(period, as_utc))
    assert u(s.start("day", second_0215)) == utc(2026, 10, 25, 0, 30)
    first_0215 = datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN)  # 00:15 UTC: before the reset
    assert u(s.start("day", first_0215)) == utc(2026, 10, 24, 0, 30)


def test_week_starting_on_a_skipped_date() -> None:
    """Samoa skipped 2011-12-30 (a Friday): that week starts when the skipped date would have,
    at the next existing moment, and the next week on Friday 2012-01-06 as usual."""
    s = schedule("Pacific/Apia", week_start="FRIDAY")
    apia = ZoneInfo("Pacific/Apia")
    first = u(datetime(2011, 12, 31, tzinfo=apia))  # 2011-12-30 10:00 UTC
    for now in (first, first + timedelta(hours=20), u(datetime(2012, 1, 5, 23, tzinfo=apia))):
        assert u(s.start("week", now)) == first
        assert u(s.next_start("week", now)) == u(datetime(2012, 1, 6, tzinfo=apia))
    before = first - timedelta(seconds=1)
    assert u(s.next_start("week", before)) == first
    assert u(s.start("week", before)) == u(datetime(2011, 12, 23, tzinfo=apia))
    assert hours(s.start("day", before), first) == 24  # Thursday 29th's day, then Saturday's


def test_reset_moved_past_midnight_by_a_gap() -> None:
    """Asia/Dhaka, 2009-06-19: clocks went from 23:00 to 00:00, so a 23:30 reset happened at
    00:30 on the 20th. Just after the gap, the period is still the one of the 18th."""
    s = schedule("Asia/Dhaka", reset="23:30")
    now = utc(2009, 6, 19, 17)  # 00:00 +07 on the 20th
    assert u(s.start("day", now)) == utc(2009, 6, 18, 17, 30)
    assert u(s.next_start("day", now)) == utc(2009, 6, 19, 17, 30)  # 00:30 +07
    assert u(s.next_start("day", utc(2009, 6, 19, 17, 30))) == utc(2009, 6, 20, 16, 30)
    _check_invariants(s, now)


def test_local_date_going_back_at_midnight() -> None:
    """America/St_Johns, 2000-10-29: clocks went back from 00:01 to 23:01, so the date was the
    28th again for an hour after the 29th had begun."""
    s = schedule("America/St_Johns")
    started = utc(2000, 10, 29, 2, 30)  # 00:00 NDT on the 29th
    # 23:30 NST on the 28th, then 00:10 NST on the 29th
    for now in (started, utc(2000, 10, 29, 3, 0), utc(2000, 10, 29, 3, 40)):
        assert u(s.start("day", now)) == started
        assert u(s.next_start("day", now)) == utc(2000, 10, 30, 3, 30)
        _check_invariants(s, now)


def test_next_start_chain_is_strictly_increasing_through_dst() -> None:
    for zone, reset in (("Europe/Berlin", "02:30"), ("America/New_York", "01:30")):
        s = schedule(zone, week_start="SUNDAY", reset=reset)
        for period in PERIODS:
            moment = s.start(period, utc(2025, 12, 15))
            for _ in range(400 if period == "day" else 60):
                following = s.next_start(period, moment)
                length = hours(moment, following)
                assert length > 0
                assert u(s.start(period, following)) == u(following)
                if period == "day":
                    assert length in (23, 24, 25)
                elif period == "week":
                    assert length in (167, 168, 169)
                else:
                    assert 28 * 24 - 1 <= length <= 31 * 24 + 1
                moment = following


def _check_invariants(s: Schedule, now: datetime) -> None:
    for period in PERIODS:
        start = s.start(period, now)
        following = s.next_start(period, now)
        assert start.timestamp() <= now.timestamp() < following.timestamp()
        assert u(s.start(period, following)) == u(following)
        assert u(s.start(period, start)) == u(start)
        assert u(s.next_start(period, start)) == u(following)
        # A period starts at the reset of a day of its kind: its own local date, or the day
        # before when a DST gap moved that reset past midnight.
        local = start.astimezone(s.zone).date()
        days = [
            d
            for d in (local, local - timedelta(days=1))
            if u(datetime.combine(d, s.reset, tzinfo=s.zone)) == u(start)
        ]
        assert days
        if period == "week":
            assert any(d.weekday() == s.week_start for d in days)
        if period == "month":
            assert any(d.day == 1 for d in days)


schedules = st.builds(
    lambda zone, week_start, hours, minutes: Schedule(
        ZoneInfo(zone), week_start, time(hours, minutes)
    ),
    st.sampled_from(ZONES),
    st.integers(0, 6),
    st.integers(0, 23),
    st.integers(0, 59),
)


@settings(max_examples=600, deadline=None)
@given(s=schedules, now_ms=st.integers(Y2000, Y2100))
def test_period_invariants_at_random_instants(s: Schedule, now_ms: int) -> None:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    _check_invariants(s, now)
    _check_invariants(s, now.astimezone(s.zone))  # the same moment given in local time


@settings(max_examples=300, deadline=None)
@given(
    s=schedules,
    day=st.dates(date(2000, 1, 1), date(2099, 12, 31)),
    minutes=st.integers(-180, 180),
)
def test_period_invariants_near_resets(s: Schedule, day: date, minutes: int) -> None:
    """Moments within three hours of a wall-clock reset, where DST changes bite."""
    wall = datetime.combine(day, s.reset, tzinfo=s.zone)
    now = u(wall) + timedelta(minutes=minutes)
    _check_invariants(s, now)
    _check_invariants(s, now.astimezone(s.zone))  # the same moment given in local time


# --- the clock ------------------------------------------------------------------------------


def _uncached(s: Schedule, now_ms: int) -> Instant:
    return Clock(s).at(now_ms)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@pytest.mark.parametrize(
    ("zone", "reset", "boundary"),
    [
        ("UTC", "00:00", utc(2026, 5, 14)),  # a day
        ("UTC", "00:00", utc(2026, 5, 18)),  # a week (Monday)
        ("UTC", "00:00", utc(2026, 6, 1)),  # a month (and a week)
        ("UTC", "00:00", utc(2027, 1, 1)),  # a year
        ("Europe/Berlin", "00:00", datetime(2026, 3, 1, tzinfo=BERLIN).astimezone(UTC)),
        ("Europe/Berlin", "02:30", utc(2026, 3, 29, 1, 30)),  # reset in the DST gap
        ("America/New_York", "09:30", utc(2026, 11, 2, 14, 30)),  # after fall back, Monday
    ],
)
def test_clock_cache_matches_uncached_across_boundaries(
    zone: str, reset: str, boundary: datetime
) -> None:
    s = schedule(zone, reset=reset)
    clock = Clock(s)
    edge = _ms(boundary)
    offsets = [-86_400_000, -3_600_000, -1_001, -1, 0, 1, 999, 3_600_000, 86_400_000 + 5]
    for offset in [*offsets, *reversed(offsets), 0, -1, 0]:
        got = clock.at(edge + offset)
        assert got == _uncached(s, edge + offset), offset
        assert got.ms == edge + offset
    at_edge = clock.at(edge)
    assert at_edge.day == edge // 1000
    assert clock.at(edge - 1).day_end == edge // 1000


def test_clock_instant_fields() -> None:
    s = schedule()
    instant = Clock(s).at(_ms(utc(2026, 5, 14, 15, 42, 7)) + 123)
    assert instant.day == _ms(utc(2026, 5, 14)) // 1000
    assert instant.week == _ms(utc(2026, 5, 11)) // 1000
    assert instant.month == _ms(utc(2026, 5, 1)) // 1000
    assert instant.day_end == _ms(utc(2026, 5, 15)) // 1000
    assert instant.week_end == _ms(utc(2026, 5, 18)) // 1000
    assert instant.month_end == _ms(utc(2026, 6, 1)) // 1000
    assert [instant.period(p) for p in PERIODS] == [instant.day, instant.week, instant.month]
    assert [instant.period_end(p) for p in PERIODS] == [
        instant.day_end,
        instant.week_end,
        instant.month_end,
    ]
    assert Clock(s).schedule is s


@settings(max_examples=100, deadline=None)
@given(
    s=schedules,
    start_ms=st.integers(Y2000, Y2100),
    steps=st.lists(st.integers(-2 * 86_400_000, 9 * 86_400_000), min_size=1, max_size=15),
)
def test_clock_cache_matches_uncached(s: Schedule, start_ms: int, steps: list[int]) -> None:
    clock = Clock(s)
    now = start_ms
    for step in steps:
        now += step
        assert clock.at(now) == _uncached(s, now)


@pytest.mark.parametrize(
    ("now_ms", "end_s", "expected"),
    [(0, 10, 10), (1, 10, 10), (999, 10, 10), (1_000, 10, 9), (9_999, 10, 1), (10_000, 10, 0)],
)
def test_seconds_until_rounds_up(now_ms: int, end_s: int, expected: int) -> None:
    instant = Instant(now_ms, 0, 0, 0, end_s, end_s, end_s)
    assert seconds_until(instant, end_s) == expected


def test_seconds_until_never_negative() -> None:
    assert seconds_until(Instant(20_000, 0, 0, 0, 10, 10, 10), 10) == 0


def test_schedule_of_parses_the_config() -> None:
    s = schedule("America/New_York", "friday", "23:59")
    assert s.zone == NEW_YORK and s.week_start == 4 and s.reset == time(23, 59)
