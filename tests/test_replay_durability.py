"""The replay queue of `limits.onStoreFailure: local` survives a restart (DECISIONS 9, 10)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import FakeModel, Gateway, kill, start_gateway, stop
from redis_server import start_redis_server, stop_redis_server
from tollgate.config.schema import UNLIMITED_COST, RateLimitSchedule
from tollgate.limits import resilient
from tollgate.limits.ledger import Ask, BucketUsage, Charge, Refusal
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.policy import Limits
from tollgate.limits.replay import NO_LIMITS, ReplayQueue, decode, encode
from tollgate.limits.resilient import ResilientLedger
from tollgate.limits.windows import Clock, Instant, Schedule

BUCKET = "Keys/proj"
MODEL = "model"
CLOCK = Clock(Schedule.of(RateLimitSchedule()))
T0 = 1_778_760_000_000  # 2026-05-14 12:00 UTC
UC = UNLIMITED_COST
LIMITED = Limits(tokens=(100, 1000, 10_000, 100_000), requests=(10, 100), cost=(UC, UC, UC, UC))


def at(ms: int) -> Instant:
    # A fresh clock each time: Clock.at reuses one object for equal milliseconds.
    return Clock(CLOCK.schedule).at(ms)


def ask(ms: int, entity: str = MODEL, **extra: Any) -> Ask:
    return Ask(BUCKET, entity, LIMITED, at(ms), **extra)


def charge(ms: int, tokens: int, reserved_at: Instant | None = None, **extra: Any) -> Charge:
    return Charge(BUCKET, MODEL, at(ms), tokens, 0, reserved_at, **extra)


def rows(path: Path) -> list[tuple[int, str]]:
    """The replay table of a file no queue holds open."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return list(db.execute("SELECT id, entry FROM replay ORDER BY id"))


def same(a: Ask | Charge, b: Ask | Charge) -> bool:
    """Equal as the replay sees them (an admission's limits and estimate are not kept)."""
    if isinstance(a, Ask) and isinstance(b, Ask):
        return (a.bucket, a.entity, tuple(a.now)) == (b.bucket, b.entity, tuple(b.now))
    return a == b


# --- rows --------------------------------------------------------------------------------


def test_an_admission_keeps_its_caller_and_instant_and_drops_its_limits() -> None:
    original = ask(T0 + 1, reserve=True, tokens=50, cost_nano=7)
    back = decode(encode(original))
    assert isinstance(back, Ask)
    assert (back.bucket, back.entity, back.now) == (BUCKET, MODEL, original.now)
    # Replayed as an unlimited admission that only counts the request.
    assert back.limits == NO_LIMITS and back.tokens == 0 and back.cost_nano == 0


@pytest.mark.parametrize(
    "original",
    [
        charge(T0, 12),
        Charge(BUCKET, "other", at(T0 + 5), 3, 40, at(T0 - 86_400_000), 9, 11),
    ],
)
def test_a_charge_keeps_every_field(original: Charge) -> None:
    assert decode(encode(original)) == original


@pytest.mark.parametrize(
    "row",
    [
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b'{"kind": "refund", "bucket": "b", "entity": "e", "now": [1,2,3,4,5,6,7]}',
        b'{"kind": "admit", "bucket": "b", "entity": "e", "now": [1,2,3]}',
        b'{"kind": "admit", "bucket": "b", "entity": 3, "now": [1,2,3,4,5,6,7]}',
        b'{"kind": "admit", "bucket": "b", "entity": "e", "now": [1,2,3,4,5,6,"7"]}',
        b'{"kind": "charge", "bucket": "b", "entity": "e", "now": [1,2,3,4,5,6,7]}',
        b'{"kind": "charge", "bucket": "b", "entity": "e", "now": [1,2,3,4,5,6,7], "tokens": -1,'
        b' "cost_nano": 0, "reserved_at": null, "reserved_tokens": 0, "reserved_cost_nano": 0}',
        b'{"kind": "charge", "bucket": "b", "entity": "e", "now": [1,2,3,4,5,6,7], "tokens": true,'
        b' "cost_nano": 0, "reserved_at": null, "reserved_tokens": 0, "reserved_cost_nano": 0}',
    ],
)
def test_a_row_that_is_not_an_entry_is_refused(row: bytes) -> None:
    with pytest.raises((ValueError, KeyError)):
        decode(row)


# --- the queue and its file --------------------------------------------------------------


async def test_entries_are_written_and_read_back_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    queue = ReplayQueue(str(path), flush_every_s=3600)
    assert await queue.open() == []
    entries: list[Ask | Charge] = [ask(T0), charge(T0 + 10, 7), ask(T0 + 20), charge(T0 + 30, 9)]
    for entry in entries:
        queue.append(entry)
    await queue.sync()
    assert [entry_id for entry_id, _ in rows_via(queue)] == [1, 2, 3, 4]
    await queue.close()

    again = ReplayQueue(str(path))
    loaded = await again.open()
    assert len(loaded) == len(again) == 4
    assert all(same(a, b) for a, b in zip(loaded, entries, strict=True))
    again.append(charge(T0 + 40, 1))  # ids go on from the file's
    await again.close()
    assert [entry_id for entry_id, _ in rows(path)] == [1, 2, 3, 4, 5]


def rows_via(queue: ReplayQueue) -> list[tuple[int, str]]:
    """The rows, read on the queue's own connection (the file is locked to it)."""
    assert queue._db is not None
    return list(queue._db.execute("SELECT id, entry FROM replay ORDER BY id"))


async def test_close_writes_what_the_periodic_flush_has_not(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    queue = ReplayQueue(str(path), flush_every_s=3600)
    await queue.open()
    queue.append(ask(T0))
    queue.append(charge(T0 + 1, 5))
    assert rows_via(queue) == []  # not yet: batched
    await queue.close()
    assert [decode(entry) for _, entry in rows(path)][1] == charge(T0 + 1, 5)


async def test_the_periodic_flush_writes_without_close(tmp_path: Path) -> None:
    queue = ReplayQueue(str(tmp_path / "usage.sqlite"), flush_every_s=0.02)
    await queue.open()
    queue.append(charge(T0, 5))
    deadline = time.monotonic() + 5
    while not rows_via(queue):
        assert time.monotonic() < deadline, "never written"
        await asyncio.sleep(0.02)
    await queue.close()


async def test_replayed_entries_are_deleted_and_never_written_twice(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    queue = ReplayQueue(str(path), flush_every_s=3600)
    await queue.open()
    for n in range(4):
        queue.append(charge(T0 + n, n + 1))
    await queue.sync()
    queue.append(charge(T0 + 10, 50))  # not yet written
    for _ in range(3):
        entry_id, _entry = queue.head()
        queue.replayed(entry_id)
    await queue.sync()
    assert [entry_id for entry_id, _ in rows_via(queue)] == [4, 5]
    for _ in range(2):
        queue.replayed(queue.head()[0])
    queue.append(charge(T0 + 20, 60))
    await queue.close()
    assert [(entry_id, decode(entry)) for entry_id, entry in rows(path)] == [
        (6, charge(T0 + 20, 60))
    ]


async def test_an_unreadable_row_is_skipped_logged_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.sqlite"
    queue = ReplayQueue(str(path))
    await queue.open()
    queue.append(charge(T0, 1))
    queue.append(charge(T0 + 1, 2))
    await queue.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE replay SET id = 3 WHERE id = 2")
        db.execute("INSERT INTO replay (id, entry) VALUES (2, ?)", (b"\xff not an entry",))
        db.execute('INSERT INTO replay (id, entry) VALUES (4, \'{"kind": "admit"}\')')
    with caplog.at_level(logging.WARNING, "tollgate.limits"):
        again = ReplayQueue(str(path))
        loaded = await again.open()
    assert loaded == [charge(T0, 1), charge(T0 + 1, 2)]
    unreadable = [r.getMessage() for r in caplog.records if "unreadable row" in r.getMessage()]
    assert len(unreadable) == 2 and "row 2 " in unreadable[0] and "row 4 " in unreadable[1]
    again.append(charge(T0 + 2, 3))
    await again.close()
    assert [entry_id for entry_id, _ in rows(path)] == [1, 3, 5]


async def test_a_full_queue_drops_the_oldest_in_memory_and_in_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.sqlite"
    queue = ReplayQueue(str(path), limit=3)
    await queue.open()
    with caplog.at_level(logging.ERROR, "tollgate.limits"):
        for n in range(5):
            queue.append(charge(T0 + n, n + 1))
    assert queue.dropped == 2 and len(queue) == 3
    assert [e.tokens for e in queue.entries() if isinstance(e, Charge)] == [3, 4, 5]
    assert any("replay queue full" in r.getMessage() for r in caplog.records)
    await queue.close()
    assert [entry_id for entry_id, _ in rows(path)] == [3, 4, 5]


async def test_a_file_another_instance_holds_is_not_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.sqlite"
    first = ReplayQueue(str(path))
    await first.open()
    first.append(charge(T0, 1))
    await first.sync()
    second = ReplayQueue(str(path))
    with caplog.at_level(logging.ERROR, "tollgate.limits"):
        loaded = await second.open()
    # Both replaying the same rows would count them twice: the second keeps to memory.
    assert loaded == [] and not second.durable and first.durable
    assert any("unusable" in r.getMessage() for r in caplog.records)
    second.append(charge(T0 + 1, 2))
    await second.close()
    await first.close()
    assert [decode(entry) for _, entry in rows(path)] == [charge(T0, 1)]


async def test_no_file_means_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    queue = ReplayQueue(None)
    assert await queue.open() == [] and not queue.durable
    queue.append(charge(T0, 1))
    await queue.close()
    closed_mode = ReplayQueue(str(tmp_path / "absent.sqlite"), create=False)
    assert await closed_mode.open() == []
    await closed_mode.close()
    assert list(tmp_path.iterdir()) == []


# --- the resilient ledger over a store that fails ----------------------------------------


class Store(MemoryLedger):
    """A shared store in memory that can be taken down, and records what it was sent."""

    def __init__(self) -> None:
        super().__init__(None)
        self.down = False
        self.sent: list[Ask | Charge] = []
        self.on_send: Callable[[int], None] = lambda n: None

    def _up(self) -> None:
        if self.down:
            raise ConnectionError("store down")

    async def admit(self, ask: Ask) -> Refusal | None:
        self._up()
        self.sent.append(ask)
        self.on_send(len(self.sent))
        return self.admit_now(ask)

    async def settle(self, charge: Charge) -> None:
        self._up()
        self.sent.append(charge)
        self.on_send(len(self.sent))
        self.settle_now(charge)

    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        self._up()
        return await super().usage(bucket, entities, now)

    async def ping(self) -> None:
        self._up()


@pytest.fixture(autouse=True)
def quick_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resilient, "PROBE_EVERY_S", 0.01)


def ledger_over(
    store: Store, path: Path | None, flush_every_s: float = 3600, now_ms: int = T0 + 60_000
) -> ResilientLedger:
    queue = ReplayQueue(None if path is None else str(path), flush_every_s)
    return ResilientLedger(store, MemoryLedger(None), "local", store.ping, queue, lambda: now_ms)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def count_calls_while_down(ledger: ResilientLedger, store: Store, n: int) -> None:
    store.down = True
    for i in range(n):
        a = ask(T0 + 100 * i)
        assert await ledger.admit(a) is None
        await ledger.settle(Charge(BUCKET, MODEL, at(T0 + 100 * i + 50), 10, 0, a.now))
    assert not ledger.healthy and ledger.pending == 2 * n


async def test_a_restart_while_the_store_is_down_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 3)
    expected = [e for e in first._queue.entries()]
    await first.close()  # still down: kept in the file
    assert len(rows(path)) == 6

    second = ledger_over(store, path)
    await second.start()
    assert second.pending == 6
    # Counted again on this instance: its limits hold while the store is down.
    await until(lambda: not second.healthy)
    local = await second.usage(BUCKET, [MODEL], at(T0 + 400))
    assert local.entities[MODEL].tokens[1] == 30 and local.entities[MODEL].requests[1] == 3

    store.down = False
    await until(lambda: second.healthy and second.pending == 0)
    # Replayed oldest first, each at its own instant; an admission unlimited, reserving nothing.
    assert len(store.sent) == 6
    assert all(same(a, b) for a, b in zip(store.sent, expected, strict=True))
    assert [type(e).__name__ for e in store.sent] == ["Ask", "Charge"] * 3
    for sent in store.sent:
        if isinstance(sent, Ask):
            assert sent.limits == NO_LIMITS and sent.tokens == 0 and sent.cost_nano == 0
    shared = await store.usage(BUCKET, [MODEL], at(T0 + 400))
    assert shared.entities[MODEL].tokens[1] == 30 and shared.entities[MODEL].requests[1] == 3
    await second.close()
    assert rows(path) == []

    third = ledger_over(store, path)  # nothing left to replay twice
    await third.start()
    assert third.pending == 0
    await third.close()
    assert len(store.sent) == 6


async def test_entries_in_the_file_are_replayed_at_start_when_the_store_answers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 2)
    await first.close()

    store.down = False
    second = ledger_over(store, path)
    await second.start()
    await until(lambda: second.pending == 0)
    assert second.healthy and len(store.sent) == 4
    await second.close()
    assert rows(path) == []


async def test_a_crash_in_the_middle_of_a_replay_counts_at_most_one_batch_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resilient, "REPLAY_BATCH", 4)
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 10)  # 20 entries
    await first.close()

    crash = tmp_path / "crash"
    crash.mkdir()

    def snapshot(sent: int) -> None:
        # The files as a crash would leave them, taken just after the 11th entry reached the
        # store (the writer thread is idle: the loop is here, not in a sync).
        if sent == 11:
            for file in tmp_path.glob("usage.sqlite*"):
                shutil.copy(file, crash / file.name)

    store.on_send = snapshot
    store.down = False
    second = ledger_over(store, path)
    await second.start()
    await until(lambda: second.pending == 0)
    await second.close()
    # Batches of 4 deleted after each: 8 rows gone, the 3 replayed since still there.
    left = [entry_id for entry_id, _ in rows(crash / "usage.sqlite")]
    assert left == list(range(9, 21))


async def test_a_failure_in_the_middle_of_a_replay_keeps_exactly_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resilient, "REPLAY_BATCH", 4)
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 5)
    await first.close()

    def fail_after_seven(sent: int) -> None:
        if sent == 7:
            store.down = True

    store.on_send = fail_after_seven
    store.down = False
    second = ledger_over(store, path)
    await second.start()
    await until(lambda: not second.healthy)
    await until(lambda: second.pending == 3)  # the 8th found the store down
    await second.close()
    assert [entry_id for entry_id, _ in rows(path)] == [8, 9, 10]


async def test_entries_whose_windows_all_ended_are_dropped_not_replayed(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 2)
    await first.close()

    store.down = False
    # The file is read again on 2 June: the calls' day, week (from Monday 11 May) and month
    # (May) have ended; replayed, their old period ids would start June's counters over.
    june = ledger_over(store, path, now_ms=T0 + 19 * 86_400_000)
    await june.start()
    await until(lambda: june.pending == 0)
    assert store.sent == []
    await june.close()
    assert rows(path) == []


async def test_entries_of_a_period_still_running_are_replayed(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite"
    store = Store()
    first = ledger_over(store, path)
    await first.start()
    await count_calls_while_down(first, store, 1)
    await first.close()

    store.down = False
    # Two days later: the day has ended, but not the week nor the month.
    later = ledger_over(store, path, now_ms=T0 + 2 * 86_400_000)
    await later.start()
    await until(lambda: later.pending == 0)
    assert len(store.sent) == 2
    await later.close()


async def test_calls_reserved_in_the_same_millisecond_each_release_locally() -> None:
    store = Store()
    ledger = ledger_over(store, None)
    await ledger.start()
    store.down = True
    now = at(T0)
    asks = [Ask(BUCKET, MODEL, LIMITED, now, reserve=True, tokens=40) for _ in range(2)]
    for a in asks:
        assert await ledger.admit(a) is None
    store.down = False
    await until(lambda: ledger.healthy)
    for a in asks:
        # As `settle.charge_for` builds it: the ticket says where it was admitted.
        await ledger.settle(Charge(BUCKET, MODEL, at(T0 + 10), 5, 0, a.now, 40, 0, a.local))
    # Both reservations were local: released there; the store, back, gets the charges alone.
    local = await ledger.local.usage(BUCKET, [MODEL], at(T0 + 20))
    assert local.entities[MODEL].tokens[0] == 10
    charges = [c for c in store.sent if isinstance(c, Charge)]
    assert [(c.tokens, c.reserved_at) for c in charges] == [(5, None), (5, None)]
    assert ledger.pending == 0
    await ledger.close()


# --- end to end: real processes ----------------------------------------------------------

KEY = "replay-key-0123456789"


def config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {"free-model": {"endpoint": fake.endpoint("free-model")}},
        "keys": {KEY: {"project": "replay", "role": "default"}},
        "roles": {"default": {"limits": {"free-model": {}}}},
    }


def call(gw: Gateway) -> int:
    return httpx.post(
        f"{gw.url}/openai/deployments/free-model/chat/completions",
        headers={"Api-Key": KEY, "X-Fake-Reply": " ".join(["w"] * 9)},  # 10 tokens
        json={"messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    ).status_code


def day_usage(gw: Gateway) -> tuple[int, int]:
    response = httpx.get(f"{gw.url}/v1/deployments/free-model/limits", headers={"Api-Key": KEY})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["dayTokenStats"]["used"], body["dayRequestStats"]["used"]


def health(gw: Gateway) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{gw.url}/health").json()["limits"]
    return result


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.mark.parametrize("ending", ["sigterm", "crash"])
def test_usage_counted_before_a_restart_while_redis_is_down_reaches_redis(
    work_dir: Path, fake_model: FakeModel, ending: str
) -> None:
    directory = work_dir / f"replay-{ending}"
    directory.mkdir()
    file = directory / "usage.sqlite"
    redis = start_redis_server(directory / "redis", durable=True)
    env = {
        "aidial.redis.singleServerConfig.address": redis.url,
        "aidial.limits.embedded.file": str(file),
        "aidial.limits.embedded.flushInterval": "100",
    }
    gateways: list[Gateway] = []

    def gateway(**extra: str) -> Gateway:
        gw = start_gateway(directory, [config(fake_model)], env={**env, **extra})
        gateways.append(gw)
        return gw

    try:
        first = gateway()
        assert call(first) == 200
        assert day_usage(first) == (10, 1)

        kill(redis.process)
        assert [call(first) for _ in range(3)] == [200] * 3  # counted on this instance
        assert health(first)["healthy"] is False
        if ending == "sigterm":
            stop(first.process)
            assert f"kept in {file} for the next start" in first.output()
        else:
            time.sleep(1.0)  # ten flush intervals: the entries are in the file
            kill(first.process)
        # 3 admissions and 3 charges wait in the file.
        assert len(rows(file)) == 6

        second = gateway()  # Redis still down
        eventually(lambda: health(second)["healthy"] is False)
        assert health(second)["pendingReplay"] == 6
        assert "waiting to reach it" in second.output()
        # The restarted instance counts on from what it had counted: its limits still hold.
        assert day_usage(second) == (30, 3)

        redis = start_redis_server(directory / "redis", port=redis.port, durable=True)
        eventually(lambda: health(second)["healthy"] and health(second)["pendingReplay"] == 0)
        # Read through an instance that never counted locally: what Redis holds.
        fresh = gateway(**{"aidial.limits.embedded.file": str(directory / "fresh.sqlite")})
        assert day_usage(fresh) == (40, 4)
        stop(second.process)
        assert rows(file) == []

        third = gateway()  # the file is empty: nothing is replayed twice
        assert call(third) == 200
        assert day_usage(fresh) == (50, 5)
    finally:
        for gw in gateways:
            stop(gw.process)
        stop_redis_server(redis)
