"""Limit windows: sliding minute/hour windows and calendar day/week/month periods.

See compatibility C16.

Pure time arithmetic and counter shapes shared by every ledger. A sliding window of N slots of
width w counts the current slot and the N-1 before it, as DIAL's `RateBucket` does; calendar
windows count from the start of the current period of `rateLimitSchedule` (timezone,
`weekStartDay`, `resetTime`; DST-aware) and reset when a new period starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from tollgate.config.schema import WEEKDAYS, RateLimitSchedule

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")


@dataclass(frozen=True, slots=True)
class Sliding:
    """A sliding window of `slots` intervals of `width_ms` each."""

    name: str
    slots: int
    width_ms: int

    def slot(self, now_ms: int) -> int:
        return now_ms // self.width_ms

    def oldest_live_slot(self, now_ms: int) -> int:
        return self.slot(now_ms) - self.slots + 1


MINUTE = Sliding("minute", 60, 1_000)  # tokens and cost per minute: 60 x 1 s
HOUR = Sliding("hour", 60, 60_000)  # requests per hour: 60 x 1 min


def sliding_total(counts: dict[int, int], window: Sliding, now_ms: int) -> int:
    """The window's usage now; slots that left the window are dropped from `counts`."""
    if not counts:
        return 0
    oldest = window.oldest_live_slot(now_ms)
    if min(counts) < oldest:  # min() and sum() run in C; the Python loop only when needed
        for slot in [slot for slot in counts if slot < oldest]:
            del counts[slot]
    return sum(counts.values())


def sliding_retry_after_ms(counts: dict[int, int], window: Sliding, now_ms: int, limit: int) -> int:
    """How long until the usage falls below `limit`, as slots leave the window oldest first."""
    remaining = sum(counts.values())
    for slot in sorted(counts):
        if remaining < limit:
            break
        remaining -= counts[slot]
        # A slot leaves the window when the slot `slots` later begins.
        leaves_at = (slot + window.slots) * window.width_ms
        if remaining < limit:
            return max(leaves_at - now_ms, 0)
    return 0 if remaining < limit else window.slots * window.width_ms


@dataclass(frozen=True, slots=True)
class Schedule:
    """`rateLimitSchedule`, ready for arithmetic."""

    zone: ZoneInfo
    week_start: int  # 0 = Monday, as date.weekday()
    reset: time

    @classmethod
    def of(cls, schedule: RateLimitSchedule) -> Schedule:
        hours, minutes = (int(part) for part in schedule.reset_time.split(":"))
        return cls(
            ZoneInfo(schedule.timezone),
            WEEKDAYS.index(schedule.week_start_day),
            time(hours, minutes),
        )

    def _at_reset(self, day: date) -> datetime:
        # Wall-clock reset time on that date; across a DST gap zoneinfo moves it consistently.
        local = datetime.combine(day, self.reset, tzinfo=self.zone)
        return local.astimezone(UTC).astimezone(self.zone)

    def start(self, period: Period, now: datetime) -> datetime:
        """Start of the period that contains `now` (an aware datetime)."""
        return self._at_reset(self._first_day(period, now))

    def next_start(self, period: Period, now: datetime) -> datetime:
        # Fix: step on from the period's first date, not from the local date of its start: a
        # reset on a date the zone skipped (Pacific/Apia, 2011-12-30) starts on the next date,
        # and a week counted from there ended on the wrong weekday.
        return self._at_reset(_following(period, self._first_day(period, now)))

    def _first_day(self, period: Period, now: datetime) -> date:
        """The date whose reset started the period that contains `now`."""
        # Fix: compare in UTC. Python compares two datetimes of the same zone by wall clock,
        # ignoring `fold`, so a `now` given in the schedule's zone inside the repeated autumn
        # hour (02:15 CET after a 02:30 CEST reset) looked earlier than the reset.
        now = now.astimezone(UTC)
        today = now.astimezone(self.zone).date()
        if period == "day":
            first = today
        elif period == "week":
            first = today - timedelta(days=(today.weekday() - self.week_start) % 7)
        else:
            first = today.replace(day=1)
        # Fix: step until the period holds `now`, instead of at most one step back. A DST
        # change next to midnight moves a reset to another date (Asia/Dhaka 2009-06-19: 23:30
        # fell in the 23:00 -> 00:00 gap and became 00:30 the next day) or takes the local date
        # back (America/St_Johns 2000-10-29: 00:01 -> 23:01), and `now` was left outside
        # [start, next_start).
        while self._at_reset(first) > now:  # before today's (this week's, ...) reset
            first = _previous(period, first, self.week_start)
        while self._at_reset(following := _following(period, first)) <= now:
            first = following
        return first


def _previous(period: Period, first: date, week_start: int) -> date:
    if period == "day":
        return first - timedelta(days=1)
    if period == "week":
        return first - timedelta(days=7)
    return (first - timedelta(days=1)).replace(day=1)


def _following(period: Period, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return (first.replace(day=28) + timedelta(days=4)).replace(day=1)


class Instant(NamedTuple):
    """One moment as every window sees it: milliseconds, and each calendar period's id.

    A calendar period is identified by its start (epoch seconds), the same on every instance.
    """

    ms: int
    day: int
    week: int
    month: int
    day_end: int
    week_end: int
    month_end: int

    def period(self, period: Period) -> int:
        return self.day if period == "day" else self.week if period == "week" else self.month

    def period_end(self, period: Period) -> int:
        if period == "day":
            return self.day_end
        return self.week_end if period == "week" else self.month_end


class Clock:
    """Makes `Instant`s; calendar arithmetic is redone only when a period boundary passes."""

    __slots__ = ("_cached", "_schedule")

    def __init__(self, schedule: Schedule) -> None:
        self._schedule = schedule
        self._cached: Instant | None = None

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    def at(self, now_ms: int) -> Instant:
        cached = self._cached
        if cached is not None and cached.day * 1000 <= now_ms < cached.day_end * 1000:
            if cached.ms == now_ms:  # busy: several calls a millisecond share one
                return cached
            self._cached = cached = Instant(
                now_ms,
                cached.day,
                cached.week,
                cached.month,
                cached.day_end,
                cached.week_end,
                cached.month_end,
            )
            return cached
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        s = self._schedule
        starts = [int(s.start(p, now).timestamp()) for p in PERIODS]
        ends = [int(s.next_start(p, now).timestamp()) for p in PERIODS]
        instant = Instant(now_ms, *starts, *ends)
        self._cached = instant
        return instant


def seconds_until(instant: Instant, end_s: int) -> int:
    """Whole seconds from `instant` to `end_s`, rounded up (never tell a client to come early)."""
    return max(math.ceil((end_s * 1000 - instant.ms) / 1000), 0)
