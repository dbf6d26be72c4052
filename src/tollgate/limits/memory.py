"""The embedded ledger: counters in memory, persisted to a local SQLite file (compatibility C58).

Every `admit` and `settle` runs without an `await` between its check and its write, so on the
event loop it is one critical section: concurrent calls cannot slip between them. Changed
buckets are written to SQLite every `flush_every_s` seconds (on a worker thread) and on close;
at start the file is read back, so day, week and month usage survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from tollgate.config.schema import UNLIMITED
from tollgate.limits.ledger import (
    Ask,
    BucketUsage,
    Charge,
    EntityUsage,
    Kind,
    Ledger,
    Refusal,
    retry_after_s,
)
from tollgate.limits.usage import USAGE_MAX, clamp
from tollgate.limits.windows import (
    HOUR,
    MINUTE,
    PERIODS,
    Instant,
    Period,
    Sliding,
    sliding_total,
)

log = logging.getLogger("tollgate.limits")


class UsageFileError(Exception):
    """`limits.embedded.file` cannot be used; the message is one line for the operator."""


class FileLock:
    """An exclusive lock on `<file>.lock`, held while this process uses the usage file.

    SQLite's own locks do not stop two gateways from each keeping counters in memory and
    overwriting the other's rows (data loss), so a second process is refused outright.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.lock_path = self.path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `UsageFileError` when another process holds it."""
        if self._fd is not None or sys.platform == "win32":  # pragma: no cover - no flock there
            return
        import fcntl

        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UsageFileError(
                f"usage file {self.path}: cannot create its lock {self.lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageFileError(
                f"usage file {self.path} is in use by another Tollgate process (lock "
                f"{self.lock_path}); give each instance a limits.embedded.file of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock; the file stays


_T = TypeVar("_T")

Calendar = list[int]  # [period start (epoch s), count, period end (epoch s; 0: unknown)]


def _holds(counter: Calendar, period: int, ms: int) -> bool:
    """Whether `counter` counts a moment `ms` of `period`: its own period, or a moment inside
    the period it holds (a change of `rateLimitSchedule` gave that moment another period id).

    The rule for a schedule change: the stored period keeps counting until it ends, then the
    new schedule's period starts. A change can thus never start a limit over early, whichever
    way it moves the clock (docs/deployment.md, "Changing rateLimitSchedule")."""
    return counter[0] == period or counter[0] * 1000 <= ms < counter[2] * 1000


def _calendar_total(counter: Calendar, period: int, ms: int) -> int:
    return counter[1] if _holds(counter, period, ms) else 0


def _calendar_add(counter: Calendar, period: int, end: int, ms: int, amount: int) -> None:
    """Add at moment `ms` of `period` (which ends at `end`): in the period held while it holds
    that moment; a moment before it (a call replayed or settled late) is over and counts
    nowhere, rather than starting the current one over; any other starts the new period."""
    if counter[0] == period:
        counter[2] = end
    elif not _holds(counter, period, ms):
        if ms < counter[0] * 1000:
            return
        counter[0], counter[1], counter[2] = period, 0, end
    counter[1] = clamp(max(counter[1] + amount, 0))


def _calendar(data: Any) -> Calendar:
    """A stored calendar counter; one written before period ends were kept has none (0)."""
    return [int(data[0]), clamp(int(data[1])), int(data[2]) if len(data) > 2 else 0]


def _sliding_add(counts: dict[int, int], slot: int, amount: int) -> None:
    counts[slot] = max(counts.get(slot, 0) + amount, 0)


class _Windows:
    """A sliding window plus the three calendar periods: tokens, or cost."""

    __slots__ = ("day", "month", "sliding", "week")

    def __init__(self) -> None:
        self.sliding: dict[int, int] = {}
        # Calendar counters as their own fields, not a dict by period: read on every call.
        self.day: Calendar = [0, 0, 0]
        self.week: Calendar = [0, 0, 0]
        self.month: Calendar = [0, 0, 0]

    @property
    def calendar(self) -> dict[Period, Calendar]:
        return {"day": self.day, "week": self.week, "month": self.month}

    def totals(self, window: Sliding, now: Instant) -> tuple[int, int, int, int]:
        day, week, month = self.day, self.week, self.month
        ms = now.ms
        return (
            clamp(sliding_total(self.sliding, window, ms)) if self.sliding else 0,
            day[1] if day[0] == now.day or day[0] * 1000 <= ms < day[2] * 1000 else 0,
            week[1] if week[0] == now.week or week[0] * 1000 <= ms < week[2] * 1000 else 0,
            month[1] if month[0] == now.month or month[0] * 1000 <= ms < month[2] * 1000 else 0,
        )

    def add(self, window: Sliding, now: Instant, amount: int) -> None:
        if amount <= 0:
            return
        if amount > USAGE_MAX:  # 1e30 tokens reported: counted as the most a ledger holds
            amount = USAGE_MAX
        sliding = self.sliding
        slot = now.ms // window.width_ms
        held = sliding.get(slot)
        if held is not None:
            sliding[slot] = clamp(held + amount)
        else:
            if len(sliding) >= window.slots:
                # Windows only written (attributed cost) are never read on the hot path, so
                # they are pruned here, or they would keep a slot per second forever.
                sliding_total(sliding, window, now.ms)
            sliding[slot] = amount
        # The common case inline (this runs for every call); the rest in _calendar_add.
        counter = self.day
        if counter[0] == now.day and counter[2]:
            counter[1] = clamp(counter[1] + amount)
        else:
            _calendar_add(counter, now.day, now.day_end, now.ms, amount)
        counter = self.week
        if counter[0] == now.week and counter[2]:
            counter[1] = clamp(counter[1] + amount)
        else:
            _calendar_add(counter, now.week, now.week_end, now.ms, amount)
        counter = self.month
        if counter[0] == now.month and counter[2]:
            counter[1] = clamp(counter[1] + amount)
        else:
            _calendar_add(counter, now.month, now.month_end, now.ms, amount)

    def release(self, window: Sliding, at: Instant, now: Instant, amount: int) -> None:
        """Take back what was added at `at`, from the slots and periods that still hold it."""
        slot = window.slot(at.ms)
        if slot >= window.oldest_live_slot(now.ms) and slot in self.sliding:
            _sliding_add(self.sliding, slot, -amount)
        for counter, period in ((self.day, at.day), (self.week, at.week), (self.month, at.month)):
            if _holds(counter, period, at.ms):
                counter[1] = max(counter[1] - amount, 0)

    def held(self, window: Sliding, at: Instant, now: Instant, amount: int) -> tuple[int, ...]:
        """The part of `amount`, added at `at`, that each window (minute, day, week, month)
        still counts at `now`: what `release` would take back from the totals of `now`."""
        slot = window.slot(at.ms)
        minute = (
            min(self.sliding.get(slot, 0), amount) if slot >= window.oldest_live_slot(now.ms) else 0
        )
        calendar = (
            min(counter[1], amount)
            if _holds(counter, period, now.ms) and _holds(counter, held_in, at.ms)
            else 0
            for counter, period, held_in in (
                (self.day, now.day, at.day),
                (self.week, now.week, at.week),
                (self.month, now.month, at.month),
            )
        )
        return (minute, *calendar)

    def dump(self) -> dict[str, Any]:
        return {"s": self.sliding, "c": self.calendar}

    @classmethod
    def load(cls, data: dict[str, Any]) -> _Windows:
        windows = cls()
        windows.sliding = {int(slot): int(n) for slot, n in data["s"].items()}
        # Fix: every period, or the row is unreadable (a missing one was a KeyError in admit).
        calendar = data["c"]
        windows.day, windows.week, windows.month = (_calendar(calendar[p]) for p in PERIODS)
        return windows


class _Entity:
    __slots__ = ("cost", "request_day", "request_hour", "tokens")

    def __init__(self) -> None:
        self.tokens = _Windows()
        self.cost = _Windows()  # attributed to this deployment, for reports
        self.request_hour: dict[int, int] = {}
        self.request_day: Calendar = [0, 0, 0]

    def dump(self) -> dict[str, Any]:
        return {
            "t": self.tokens.dump(),
            "c": self.cost.dump(),
            "rh": self.request_hour,
            "rd": self.request_day,
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> _Entity:
        entity = cls()
        entity.tokens = _Windows.load(data["t"])
        entity.cost = _Windows.load(data["c"])
        entity.request_hour = {int(slot): int(n) for slot, n in data["rh"].items()}
        entity.request_day = _calendar(data["rd"])
        return entity


class _Bucket:
    __slots__ = ("cost", "entities")

    def __init__(self) -> None:
        self.cost = _Windows()  # the caller's total spend: what cost limits check
        self.entities: dict[str, _Entity] = {}

    def entity(self, name: str) -> _Entity:
        found = self.entities.get(name)
        if found is None:
            found = self.entities[name] = _Entity()
        return found

    def dump(self) -> dict[str, Any]:
        return {"c": self.cost.dump(), "e": {n: e.dump() for n, e in self.entities.items()}}

    @classmethod
    def load(cls, data: dict[str, Any]) -> _Bucket:
        bucket = cls()
        bucket.cost = _Windows.load(data["c"])
        bucket.entities = {name: _Entity.load(e) for name, e in data["e"].items()}
        return bucket


def _exceeded(
    used: tuple[int, ...],
    limits: tuple[int | None, ...],
    names: tuple[str, ...],
    ask: Ask,
    extra: int,
) -> tuple[str, ...]:
    """Windows that refuse: DIAL's `used >= limit`, or in reserve mode `used + extra > limit`."""
    return tuple(
        name
        for name, value, limit in zip(names, used, limits, strict=True)
        if limit is not None
        and limit < UNLIMITED
        and (value + extra > limit if ask.reserve and extra else value >= limit)
    )


def _over(used: tuple[int, ...], limits: tuple[int, ...], extra: int) -> bool:
    """Whether any window refuses (see `_exceeded`), compared in C: the check of every call.

    No limit is UNLIMITED, a value usage never reaches, so it needs no test of its own."""
    if extra:
        return any(map(operator.gt, map(extra.__add__, used), limits))
    return any(map(operator.ge, used, limits))


WINDOW_NAMES: tuple[str, ...] = ("minute", "day", "week", "month")


def _room(
    kind: Kind,
    windows: _Windows,
    at: Instant,
    now: Instant,
    held: int,
    extra: int,
    limits: tuple[int, ...],
) -> Refusal | None:
    """`extend`'s check of one kind: every window with a limit must have room for the call's
    whole reservation (`held`, added at `at`) plus `extra`, counted as held at `now`. A kind
    the extension adds nothing to is not checked: it cannot cross a limit of it."""
    if not extra or all(limit >= UNLIMITED for limit in limits):
        return None  # nothing to add, or nothing it could cross
    used: tuple[int, ...] = windows.totals(MINUTE, now)
    if held:
        still = windows.held(MINUTE, at, now, held)
        used = tuple(u - part + held for u, part in zip(used, still, strict=True))
    exceeded = tuple(
        name
        for name, value, limit in zip(WINDOW_NAMES, used, limits, strict=True)
        if limit < UNLIMITED and value + extra > limit
    )
    if not exceeded:
        return None
    threshold = limits[0] - held - extra + 1
    return Refusal(
        kind,
        used,
        limits,
        exceeded,
        retry_after_s(exceeded, windows.sliding, MINUTE, now, threshold),
    )


def move_aside(path: str) -> str:
    """Rename `path` (and its `-wal` and `-shm` files) to `<path>.corrupt-<UTC time>`."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.corrupt-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    return aside


def open_usage_file(path: str, open_and_read: Callable[[], _T], close: Callable[[], None]) -> _T:
    """Run `open_and_read` on the usage file at `path`, or say in one line why it cannot be used.

    A file SQLite cannot read as a database (not SQLite, damaged) is moved aside
    (`move_aside`, logged as an error) and a new one started: its counts are lost either way,
    and refusing to start would turn a damaged cache into an outage. A file that exists but
    cannot be used (no permission, read-only disk, another program's table) raises
    `UsageFileError`: moving it would not help.
    """
    absolute = os.path.abspath(path)
    for attempt in (1, 2):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return open_and_read()
        except sqlite3.OperationalError as exc:
            close()
            raise UsageFileError(f"usage file {absolute} cannot be used: {exc}") from None
        except sqlite3.DatabaseError as exc:
            close()
            if attempt == 2:
                raise UsageFileError(f"usage file {absolute} cannot be used: {exc}") from None
            aside = move_aside(path)
            log.error(
                "usage file %s is not a usable database (%s): moved to %s, counting starts afresh",
                absolute,
                exc,
                os.path.abspath(aside),
            )
        except OSError as exc:
            close()
            raise UsageFileError(
                f"usage file {absolute} cannot be used: {exc.strerror or exc}"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


class MemoryLedger(Ledger):
    synchronous = True

    def __init__(self, path: str | None, flush_every_s: float = 1.0) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._dirty: set[str] = set()
        self._path = path
        self._flush_every_s = flush_every_s
        self._db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-sqlite")
        self._task: asyncio.Task[None] | None = None
        self._lock: FileLock | None = None

    # --- the critical sections: plain functions, so nothing can run between check and write

    async def admit(self, ask: Ask) -> Refusal | None:
        return self.admit_now(ask)

    async def settle(self, charge: Charge) -> None:
        self.settle_now(charge)

    def admit_now(self, ask: Ask) -> Refusal | None:
        """`admit`, called directly: the gateway saves a coroutine per call on the hot path."""
        bucket = self._buckets.get(ask.bucket) or self._bucket(ask.bucket)
        entity = bucket.entities.get(ask.entity) or bucket.entity(ask.entity)
        now = ask.now
        limits = ask.limits
        if not (limits.unlimited and not ask.tokens and not ask.cost_nano):
            refusal = self._check(ask, bucket, entity)
            if refusal is not None:
                return refusal
            if ask.tokens:
                entity.tokens.add(MINUTE, now, ask.tokens)
            if ask.cost_nano:
                bucket.cost.add(MINUTE, now, ask.cost_nano)
        # Count the request (inlined: this runs for every call).
        hour = entity.request_hour
        slot = now.ms // HOUR.width_ms
        held = hour.get(slot)
        if held is not None:
            hour[slot] = held + 1
        else:
            if len(hour) >= HOUR.slots:
                sliding_total(hour, HOUR, now.ms)  # drop expired slots
            hour[slot] = 1
        day = entity.request_day
        if day[0] == now.day and day[2]:
            day[1] += 1
        else:
            _calendar_add(day, now.day, now.day_end, now.ms, 1)
        self._dirty.add(ask.bucket)
        return None

    def _check(self, ask: Ask, bucket: _Bucket, entity: _Entity) -> Refusal | None:
        now = ask.now
        limits = ask.limits
        tokens_used = entity.tokens.totals(MINUTE, now)
        if _over(tokens_used, limits.tokens, ask.tokens if ask.reserve else 0) and (
            exceeded := _exceeded(
                tokens_used, limits.tokens, ("minute", "day", "week", "month"), ask, ask.tokens
            )
        ):
            threshold = (
                limits.tokens[0] - ask.tokens + 1
                if ask.reserve and ask.tokens
                else limits.tokens[0]
            )
            return Refusal(
                "token",
                tokens_used,
                limits.tokens,
                exceeded,
                retry_after_s(exceeded, entity.tokens.sliding, MINUTE, now, threshold),
            )

        requests_used = (
            sliding_total(entity.request_hour, HOUR, now.ms),
            _calendar_total(entity.request_day, now.day, now.ms),
        )
        if _over(requests_used, limits.requests, 0) and (
            exceeded := _exceeded(requests_used, limits.requests, ("hour", "day"), ask, 0)
        ):
            return Refusal(
                "request",
                requests_used,
                limits.requests,
                exceeded,
                retry_after_s(exceeded, entity.request_hour, HOUR, now, limits.requests[0]),
            )

        cost_limits = limits.cost_nano
        cost_used = bucket.cost.totals(MINUTE, now)
        if _over(cost_used, cost_limits, ask.cost_nano if ask.reserve else 0) and (
            exceeded := _exceeded(
                cost_used, cost_limits, ("minute", "day", "week", "month"), ask, ask.cost_nano
            )
        ):
            # Fix: `and ask.cost_nano`, as for tokens: with no cost to reserve `_exceeded` used
            # `used >= limit`, and a threshold of limit + 1 told the caller to retry at once.
            threshold = (
                cost_limits[0] - ask.cost_nano + 1
                if ask.reserve and ask.cost_nano
                else cost_limits[0]
            )
            return Refusal(
                "cost",
                cost_used,
                cost_limits,
                exceeded,
                retry_after_s(exceeded, bucket.cost.sliding, MINUTE, now, threshold),
            )
        return None

    async def extend(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        return self.extend_now(ask, tokens, cost_nano, now)

    def extend_now(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        """`extend`, called directly (see `admit_now`): check, then move the reservation to
        `now` grown by the extension, with no `await` in between (compatibility C79)."""
        bucket = self._buckets.get(ask.bucket) or self._bucket(ask.bucket)
        entity = bucket.entities.get(ask.entity) or bucket.entity(ask.entity)
        limits = ask.limits
        at = ask.now
        held_tokens, held_cost = ask.tokens, ask.cost_nano
        refusal = _room(
            "token", entity.tokens, at, now, held_tokens, tokens, limits.tokens
        ) or _room("cost", bucket.cost, at, now, held_cost, cost_nano, limits.cost_nano)
        if refusal is not None:
            return refusal
        for windows, held, extra in (
            (entity.tokens, held_tokens, tokens),
            (bucket.cost, held_cost, cost_nano),
        ):
            if held:
                windows.release(MINUTE, at, now, held)
            windows.add(MINUTE, now, held + extra)
        ask.tokens = held_tokens + tokens
        ask.cost_nano = held_cost + cost_nano
        ask.now = now
        self._dirty.add(ask.bucket)
        return None

    def settle_now(self, charge: Charge) -> None:
        """`settle`, called directly (see `admit_now`)."""
        bucket = self._buckets.get(charge.bucket) or self._bucket(charge.bucket)
        entity = bucket.entities.get(charge.entity) or bucket.entity(charge.entity)
        if charge.reserved_at is not None:
            if charge.reserved_tokens:
                entity.tokens.release(
                    MINUTE, charge.reserved_at, charge.now, charge.reserved_tokens
                )
            if charge.reserved_cost_nano:
                bucket.cost.release(
                    MINUTE, charge.reserved_at, charge.now, charge.reserved_cost_nano
                )
        if charge.tokens > 0:
            entity.tokens.add(MINUTE, charge.now, charge.tokens)
        if charge.cost_nano > 0:
            bucket.cost.add(MINUTE, charge.now, charge.cost_nano)
            entity.cost.add(MINUTE, charge.now, charge.cost_nano)
        self._dirty.add(charge.bucket)

    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        state = self._buckets.get(bucket)
        if state is None:
            state = _Bucket()
        names = list(state.entities) if entities is None else list(entities)
        report = BucketUsage(cost_nano=state.cost.totals(MINUTE, now))
        for name in names:
            entity = state.entities.get(name)
            if entity is None:
                report.entities[name] = EntityUsage()
                continue
            report.entities[name] = EntityUsage(
                tokens=entity.tokens.totals(MINUTE, now),
                requests=(
                    sliding_total(entity.request_hour, HOUR, now.ms),
                    _calendar_total(entity.request_day, now.day, now.ms),
                ),
                cost_nano=entity.cost.totals(MINUTE, now),
            )
        return report

    @classmethod
    def read_only(cls, path: str) -> MemoryLedger:
        """What the file at `path` holds, for reports (`tollgate usage`): opened read-only, so
        safe while a gateway writes it, and never written. Raises `sqlite3.Error`."""
        uri = f"file:{quote(Path(path).resolve().as_posix())}?mode=ro"
        db = sqlite3.connect(uri, uri=True)
        try:
            db.text_factory = bytes
            rows = list(db.execute("SELECT bucket, state FROM usage"))
        finally:
            db.close()
        ledger = cls(None)
        for name, text in rows:
            try:
                ledger._buckets[name.decode()] = _Bucket.load(json.loads(text))
            except Exception:
                log.warning("usage store %s: unreadable row for one bucket, skipped", path)
        return ledger

    def _bucket(self, name: str) -> _Bucket:
        found = self._buckets.get(name)
        if found is None:
            found = self._buckets[name] = _Bucket()
        return found

    # --- persistence ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._path is None:
            return
        loop = asyncio.get_running_loop()
        self._lock = FileLock(self._path)
        self._lock.acquire()
        try:
            rows = await loop.run_in_executor(self._writer, self._open_or_move_aside)
        except BaseException:
            self._lock.release()
            raise
        for name, text in rows:
            # Fix: `except Exception`: whatever is wrong with one row (a list for a mapping, a
            # number too large, nesting too deep, not UTF-8) is skipped; it stopped the start.
            try:
                self._buckets[name.decode()] = _Bucket.load(json.loads(text))
            except Exception:
                log.warning("usage store %s: unreadable row for one bucket, skipped", self._path)
        if rows:
            log.info("usage store %s: %d callers' usage restored", self._path, len(rows))
        self._task = loop.create_task(self._flush_periodically())

    def _open_or_move_aside(self) -> list[tuple[bytes, bytes]]:
        assert self._path is not None
        return open_usage_file(self._path, self._open_and_read, self._close_db_now)

    def _open_and_read(self) -> list[tuple[bytes, bytes]]:
        assert self._path is not None
        self._close_db_now()
        self._db = sqlite3.connect(self._path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS usage (bucket TEXT PRIMARY KEY, state TEXT NOT NULL)"
        )
        # Fix: read bytes, decoded row by row in start(); a text value that is not UTF-8 made
        # sqlite3 raise for the whole query, and start() failed.
        self._db.text_factory = bytes
        try:
            return list(self._db.execute("SELECT bucket, state FROM usage"))
        finally:
            self._db.text_factory = str

    def _close_db_now(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _snapshot_dirty(self) -> list[tuple[str, str]]:
        rows = [(name, json.dumps(self._buckets[name].dump())) for name in self._dirty]
        self._dirty.clear()
        return rows

    def _write(self, rows: list[tuple[str, str]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(
                "INSERT INTO usage (bucket, state) VALUES (?, ?) "
                "ON CONFLICT(bucket) DO UPDATE SET state = excluded.state",
                rows,
            )

    async def flush(self) -> None:
        if self._db is None or not self._dirty:
            return
        rows = self._snapshot_dirty()
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, rows)
        except BaseException:
            # Fix: these buckets are dirty again, so the next flush writes them. Before, rows of
            # a failed write were lost until their bucket changed again, and so were those of
            # a periodic flush that close() cancelled before its write ran.
            self._dirty.update(name for name, _ in rows)
            raise

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every_s)
            try:
                await self.flush()
            except sqlite3.Error as exc:
                log.error("usage store %s: write failed: %s", self._path, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._db is not None:
            await self.flush()
            # Fix: closed on the writer thread, after any write still running there (one of a
            # periodic flush cancelled above), instead of under its feet.
            await asyncio.get_running_loop().run_in_executor(self._writer, self._db.close)
            self._db = None
        self._writer.shutdown(wait=True)
        if self._lock is not None:
            self._lock.release()
