"""The replay queue of a shared ledger whose store is down, kept on disk (compatibility C57, C59).

While Redis cannot be reached, `ResilientLedger` counts calls on this instance and queues every
admission and every charge here, to replay them into Redis when it answers again. The queue is a
deque in memory and, when a file is set (`limits.embedded.file`), the `replay` table of that
SQLite file too, so that a restart or a crash while Redis is down does not lose the usage:

- appended entries are written every `flush_every_s` seconds and on close, on one worker thread
  (as `MemoryLedger` writes its counters): the event loop never waits for the disk;
- entries replayed into the store are deleted from the file right after each batch of
  `REPLAY_BATCH` (`sync`, called by the replay);
- at start the file's entries are loaded, oldest first, and replayed once the store answers.
  They keep their original `Instant`s, so they land in the windows and periods they were
  counted in.

Rows are JSON. An admission keeps its bucket, entity and instant only: it is replayed as an
unlimited admission that counts the request (see `ResilientLedger._replay`), so its limits and
estimate are not stored; a charge keeps every field. A row that cannot be read back is skipped
with a warning and deleted.

At least once, at most one batch twice: replaying an entry (into Redis) and deleting its row
(from SQLite) cannot be one atomic step, so a crash between the two replays that entry again at
the next start. Rows are deleted after every batch, so at most the last `REPLAY_BATCH` entries
replayed before a crash are counted twice. Marking entries as replayed would have to happen in
Redis, in the same Lua call that counts them; a bounded, logged overcount was chosen instead of a
mark per entry in every counter script. Never the reverse: a row is deleted only after its entry
was replayed.

Bounded like the deque: when `limit` entries wait, appending one drops the oldest (logged as an
error, counted in `dropped`), in memory and in the file.

One instance per file: the connection holds the file's lock for its life (SQLite's exclusive
locking mode), since two instances replaying the same rows would count them twice. An instance
that cannot open or lock the file logs an error and keeps its queue in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST
from tollgate.limits.ledger import Ask, Charge
from tollgate.limits.memory import FileLock, UsageFileError, open_usage_file
from tollgate.limits.policy import Limits
from tollgate.limits.windows import Instant

log = logging.getLogger("tollgate.limits")

MAX_PENDING = 1_000_000  # entries (an admission, a charge) kept while the store is down
REPLAY_BATCH = 256  # entries replayed between two deletions from the file
LOCK_TIMEOUT_S = 0.5  # how long to wait for a file another process holds
NO_LIMITS = Limits(tokens=(UNLIMITED,) * 4, requests=(UNLIMITED,) * 2, cost=(UNLIMITED_COST,) * 4)

Entry = Ask | Charge


# --- rows --------------------------------------------------------------------------------


def encode(entry: Entry) -> str:
    """One entry as a JSON row."""
    if isinstance(entry, Ask):
        return json.dumps(
            {"kind": "admit", "bucket": entry.bucket, "entity": entry.entity, "now": entry.now}
        )
    return json.dumps(
        {
            "kind": "charge",
            "bucket": entry.bucket,
            "entity": entry.entity,
            "now": entry.now,
            "tokens": entry.tokens,
            "cost_nano": entry.cost_nano,
            "reserved_at": entry.reserved_at,
            "reserved_tokens": entry.reserved_tokens,
            "reserved_cost_nano": entry.reserved_cost_nano,
        }
    )


def _text(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string")
    return value


def _count(data: dict[str, Any], name: str) -> int:
    value = data[name]
    if type(value) is not int or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer")
    return value


def _instant(value: object) -> Instant:
    if not isinstance(value, list) or len(value) != len(Instant._fields):
        raise ValueError(f"expected an instant of {len(Instant._fields)} integers")
    if not all(type(part) is int for part in value):
        raise ValueError("expected an instant of integers")
    return Instant(*value)


def decode(row: bytes | str) -> Entry:
    """An entry from its JSON row; ValueError (or UnicodeDecodeError) when it is not one."""
    data = json.loads(row)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    kind = data.get("kind")
    bucket, entity = _text(data, "bucket"), _text(data, "entity")
    now = _instant(data["now"])
    if kind == "admit":
        return Ask(bucket, entity, NO_LIMITS, now)
    if kind == "charge":
        reserved_at = data["reserved_at"]
        return Charge(
            bucket,
            entity,
            now,
            _count(data, "tokens"),
            _count(data, "cost_nano"),
            None if reserved_at is None else _instant(reserved_at),
            _count(data, "reserved_tokens"),
            _count(data, "reserved_cost_nano"),
        )
    raise ValueError(f"unknown kind {kind!r}")


# --- the queue ---------------------------------------------------------------------------


class ReplayQueue:
    """Entries waiting for the store, oldest first; persisted when `path` is set.

    Every entry has an id, increasing with each append and kept in the file; entries only
    leave from the front (replayed, or dropped when full), so the file is brought in line by
    deleting every row up to the last id that left.
    """

    def __init__(
        self,
        path: str | None,
        flush_every_s: float = 1.0,
        *,
        create: bool = True,
        limit: int = MAX_PENDING,
    ) -> None:
        self._path = path
        self._flush_every_s = flush_every_s
        self._create = create  # False: use the file only if it exists (nothing new to queue)
        self._limit = limit
        self._entries: deque[tuple[int, Entry]] = deque()
        self._next_id = 1
        self._gone_through = 0  # every entry up to this id left the queue
        self._deleted_through = 0  # ... and its row is deleted from the file
        self._unwritten: list[tuple[int, Entry]] = []
        self._unreadable: list[int] = []  # ids of rows to delete that were never loaded
        self._db: sqlite3.Connection | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: FileLock | None = None
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def durable(self) -> bool:
        """Whether the entries are written to a file."""
        return self._db is not None

    @property
    def path(self) -> str | None:
        return self._path

    # --- the queue in memory: no I/O, called on the hot path while the store is down

    def append(self, entry: Entry) -> None:
        item = (self._next_id, entry)
        self._next_id += 1
        self._push(item)
        if self._db is not None:
            self._unwritten.append(item)

    def _push(self, item: tuple[int, Entry]) -> None:
        entries = self._entries
        if len(entries) >= self._limit:
            self._gone_through = entries.popleft()[0]
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100_000 == 0:
                log.error(
                    "limits replay queue full (%d entries): %d oldest dropped so far; their usage "
                    "will not reach the limits store",
                    self._limit,
                    self.dropped,
                )
        entries.append(item)

    def head(self) -> tuple[int, Entry]:
        """The oldest entry and its id."""
        return self._entries[0]

    def replayed(self, entry_id: int) -> None:
        """The entry `entry_id` (from `head`) reached the store: it leaves the queue, unless it
        left already (dropped by a full queue while it was being replayed)."""
        entries = self._entries
        if entries and entries[0][0] == entry_id:
            entries.popleft()
            self._gone_through = entry_id

    def entries(self) -> list[Entry]:
        return [entry for _, entry in self._entries]

    # --- the file

    async def open(self) -> list[Entry]:
        """Open the file and load the entries it holds (returned, oldest first)."""
        if self._path is None or (not self._create and not Path(self._path).exists()):
            return []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-replay")
        loop = asyncio.get_running_loop()
        try:
            # The lock the embedded ledger takes too: one process per file, whatever its mode.
            self._lock = FileLock(self._path)
            self._lock.acquire()
            rows = await loop.run_in_executor(
                self._writer, open_usage_file, self._path, self._open_and_read, self._close_now
            )
        except UsageFileError as exc:
            log.error(
                "limits replay file %s unusable (%s); calls counted while the limits store is "
                "down are kept in memory only (give each instance a file of its own)",
                self._path,
                exc,
            )
            await self._close_db()
            return []
        for entry_id, row in rows:
            self._next_id = max(self._next_id, entry_id + 1)
            # Whatever is wrong with one row (not JSON, not UTF-8, a field missing or of the
            # wrong type) is skipped; the others are replayed.
            try:
                entry = decode(row)
            except Exception as exc:
                log.warning(
                    "limits replay file %s: unreadable row %d skipped (%s)",
                    self._path,
                    entry_id,
                    exc,
                )
                self._unreadable.append(entry_id)
                continue
            self._push((entry_id, entry))  # its id kept: the row it is deleted by
        if self._entries:
            log.warning(
                "limits replay file %s: %d entries (admissions and charges) counted while the "
                "limits store was down are waiting to reach it",
                self._path,
                len(self._entries),
            )
        self._task = loop.create_task(self._flush_periodically())
        return self.entries()

    def _close_now(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def _open_and_read(self) -> list[tuple[int, bytes]]:
        assert self._path is not None
        self._close_now()
        self._db = db = sqlite3.connect(self._path, timeout=LOCK_TIMEOUT_S, check_same_thread=False)
        # Exclusive before the first access, so WAL needs no shared memory and the lock taken
        # below is held until close: no other process can read or write the file meanwhile.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN EXCLUSIVE")
        db.execute(
            "CREATE TABLE IF NOT EXISTS replay (id INTEGER PRIMARY KEY, entry TEXT NOT NULL)"
        )
        db.commit()
        # Bytes, decoded row by row: one value that is not UTF-8 must not fail the whole query.
        db.text_factory = bytes
        try:
            return [
                (int(entry_id), row)
                for entry_id, row in db.execute("SELECT id, entry FROM replay ORDER BY id")
            ]
        finally:
            db.text_factory = str

    async def sync(self) -> None:
        """Write the entries appended and delete the rows of those gone since the last sync.

        Never raises for the file: a write that fails is logged and tried again next time."""
        try:
            await self._flush()
        except sqlite3.Error as exc:
            log.error("limits replay file %s: write failed: %s", self._path, exc)

    async def _flush(self) -> None:
        if self._db is None or self._writer is None:
            return
        gone = self._gone_through
        rows = [item for item in self._unwritten if item[0] > gone]
        self._unwritten = []
        unreadable, self._unreadable = self._unreadable, []
        delete = gone if gone > self._deleted_through else None
        if not rows and delete is None and not unreadable:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._writer, self._write, rows, delete, unreadable
            )
        except BaseException:
            # Written again next time, unless they left the queue meanwhile.
            self._unwritten[:0] = [item for item in rows if item[0] > self._gone_through]
            self._unreadable[:0] = unreadable
            raise
        if delete is not None:
            self._deleted_through = max(self._deleted_through, delete)

    def _write(
        self, rows: list[tuple[int, Entry]], delete_through: int | None, unreadable: list[int]
    ) -> None:
        assert self._db is not None
        encoded = [(entry_id, encode(entry)) for entry_id, entry in rows]
        with self._db:
            if encoded:
                self._db.executemany(
                    "INSERT OR REPLACE INTO replay (id, entry) VALUES (?, ?)", encoded
                )
            if delete_through is not None:
                self._db.execute("DELETE FROM replay WHERE id <= ?", (delete_through,))
            if unreadable:
                self._db.executemany(
                    "DELETE FROM replay WHERE id = ?", [(entry_id,) for entry_id in unreadable]
                )

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every_s)
            await self.sync()

    async def close(self) -> None:
        """Write what is pending, then close the file."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sync()
        await self._close_db()

    async def _close_db(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if self._db is not None:
            # On the writer thread, after any write still running there.
            await asyncio.get_running_loop().run_in_executor(writer, self._db.close)
            self._db = None
        writer.shutdown(wait=True)
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
