"""A shared ledger that survives its store going away (compatibility C58, C59).

Wraps the shared (Redis) ledger. While the store answers, every call goes to it. When a call
fails, the store is marked down (loudly, once) and, by `limits.onStoreFailure`:
- `local` (default): calls are admitted and charged on this instance's embedded ledger, and
  every admission and charge is also queued; when the store answers again the queue is
  replayed into it, so the usage counted meanwhile is not lost;
- `closed`: limited calls are refused with 503 until the store is back.
A background probe checks the store every second while it is down.

The queue (`ReplayQueue`) is written to `limits.embedded.file`, so a restart or a crash while
the store is down loses nothing either: at start the entries found in the file are counted
again on the embedded ledger (its limits hold across the restart) and replayed into the store
as soon as it answers, in the background. See `tollgate.limits.replay` for the file, its
bound and what a crash in the middle of a replay costs (at most one batch counted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Literal

from tollgate.errors import GatewayError, store_errors
from tollgate.limits.ledger import Ask, BucketUsage, Charge, Ledger, Refusal
from tollgate.limits.replay import NO_LIMITS, REPLAY_BATCH, Entry, ReplayQueue
from tollgate.limits.windows import HOUR, Instant

log = logging.getLogger("tollgate.limits")

PROBE_EVERY_S = 1.0
SHUTDOWN_REPLAY_S = 5.0  # with a replay file, what is left after this waits for the next start


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _ended(entry: Entry, now_ms: int) -> bool:
    """Whether every window `entry` counts in has ended (its day, week and month, and the
    sliding hour). Replaying such an entry could do nothing but harm: a calendar counter in the
    store holds one period, and an older period id starts it over."""
    at = entry.now
    return (
        now_ms >= max(at.day_end, at.week_end, at.month_end) * 1000
        and now_ms - at.ms >= HOUR.slots * HOUR.width_ms
    )


def _unreserved(charge: Charge) -> Charge:
    return replace(
        charge, reserved_at=None, reserved_tokens=0, reserved_cost_nano=0, reserved_locally=False
    )


class ResilientLedger(Ledger):
    def __init__(
        self,
        shared: Ledger,
        local: Ledger,
        on_failure: Literal["local", "closed"],
        ping: Callable[[], Awaitable[object]],
        queue: ReplayQueue | None = None,
        now_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.shared = shared
        self.local = local
        self.on_failure = on_failure
        self._ping = ping
        self._now_ms = now_ms
        self.healthy = True
        self._errors = store_errors()
        # Calls admitted locally and charges settled locally, to replay into the store.
        self._queue = queue if queue is not None else ReplayQueue(None)
        # The probe while the store is down, or the replay of entries loaded at start.
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Entries the full queue dropped: usage that will not reach the store."""
        return self._queue.dropped

    async def start(self) -> None:
        await self.local.start()
        restored = await self._queue.open()
        if self.on_failure == "local":
            # What this instance counted before it stopped, counted again here: its limits
            # keep holding while the store is still down.
            for entry in restored:
                if isinstance(entry, Ask):
                    await self.local.admit(entry)  # as loaded: unlimited, the request only
                else:
                    await self.local.settle(_unreserved(entry))
        try:
            await self.shared.start()
            # Checked now, not at the first call: a wrong address starts degraded, saying so
            # once, and /health reports it from the start.
            await self._ping()
        except self._errors as exc:
            self._down(exc, "at start-up ")
        if self._queue and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._recover())

    async def close(self) -> None:
        self._closing = True
        self._closed.set()
        if self._task is not None:
            # It stops after the batch in flight: no entry is left half replayed.
            await self._task
        if self._queue and self.healthy:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SHUTDOWN_REPLAY_S if self._queue.durable else None
            try:
                await self._replay(lambda: deadline is None or loop.time() < deadline)
            except self._errors as exc:
                log.error("limits store failed during the replay at shutdown: %s", exc)
        if self._queue:
            log.error(
                "limits store not up to date at shutdown: %d entries (admissions and charges) "
                "counted on this instance only%s",
                len(self._queue),
                f", kept in {self._queue.path} for the next start"
                if self._queue.durable
                else " are lost (no limits.embedded.file)",
            )
        await self._queue.close()
        await self.shared.close()
        await self.local.close()

    def _down(self, exc: BaseException, when: str = "") -> None:
        self.failures += 1
        if self.healthy:
            self.healthy = False
            log.error(
                "limits store unreachable %s(%s: %s); %s",
                when,
                type(exc).__name__,
                exc,
                "counting on this instance until it returns"
                if self.on_failure == "local"
                else "refusing limited calls until it returns",
            )
            if self._task is None and not self._closing:
                self._task = asyncio.get_running_loop().create_task(self._recover())

    def _refuse(self) -> GatewayError:
        return GatewayError(503, "Limits store is unavailable")

    async def admit(self, ask: Ask) -> Refusal | None:
        if self.healthy:
            try:
                return await self.shared.admit(ask)
            except self._errors as exc:
                self._down(exc)
        if self.on_failure == "closed":
            raise self._refuse()
        refusal = await self.local.admit(ask)
        if refusal is None:
            # A copy: `extend` moves the ticket's reservation (its `now`) while the call
            # streams, and the queue must replay the admission at its own instant.
            self._queue.append(replace(ask))
            # The ticket remembers where it was admitted: its release belongs to the local
            # ledger even if the store is back when it settles.
            ask.local = True
        return refusal

    async def extend(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        """Where the call's reservation is held (compatibility C79). A reservation the store
        holds cannot be grown while the store is down: `closed` ends the stream with 503, and
        `local` lets it go on unreserved (the local ledger does not hold the call's
        reservation, so it could not check it); the call is charged at its end as any call
        settled while the store is down."""
        if ask.local:
            return await self.local.extend(ask, tokens, cost_nano, now)
        if self.healthy:
            try:
                return await self.shared.extend(ask, tokens, cost_nano, now)
            except self._errors as exc:
                self._down(exc)
        if self.on_failure == "closed":
            raise self._refuse()
        return None

    async def settle(self, charge: Charge) -> None:
        reserved_locally = charge.reserved_locally
        if reserved_locally:
            # Each ledger releases only the reservation it holds: this one is the local one's,
            # and the store (now, or at the replay) gets the charge alone.
            await self.local.settle(charge)
            charge = _unreserved(charge)
        if self.healthy:
            try:
                await self.shared.settle(charge)
                return
            except self._errors as exc:
                self._down(exc)
        if not reserved_locally:
            await self.local.settle(_unreserved(charge))
        self._queue.append(charge)

    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        if self.healthy:
            try:
                return await self.shared.usage(bucket, entities, now)
            except self._errors as exc:
                self._down(exc)
        if self.on_failure == "closed":
            raise self._refuse()
        return await self.local.usage(bucket, entities, now)

    async def _pause(self) -> None:
        """Wait `PROBE_EVERY_S`, or less if the ledger closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), PROBE_EVERY_S)

    async def _recover(self) -> None:
        """Until the store answers and the queue is replayed: ping (when down), replay."""
        try:
            while not self._closing:
                if not self.healthy:
                    await self._pause()
                    if self._closing:
                        return
                try:
                    if not self.healthy:
                        await self._ping()
                    await self._replay(lambda: not self._closing)
                except self._errors as exc:
                    if self.healthy:  # replaying entries loaded at start, the store went down
                        self._down(exc)
                    continue
                if self._queue:  # stopped by close
                    return
                if not self.healthy:
                    # No await since the queue emptied: nothing was counted locally meanwhile.
                    self.healthy = True
                    log.warning("limits store reachable again; shared counting resumed")
                if self.dropped:
                    log.error(
                        "limits store: %d entries dropped from the full replay queue so far never "
                        "reached it",
                        self.dropped,
                    )
                return
        finally:
            self._task = None

    async def _replay(self, keep_going: Callable[[], bool]) -> None:
        """Push what was counted locally into the store, oldest first, while `keep_going()`.

        An admission is replayed as an unlimited admission at its own instant (it counts the
        request; nothing is reserved, the local charge that follows says what was used). A
        charge is replayed as it was settled, at its own instant. An entry whose windows have
        all ended (a file left for weeks) is dropped instead. Replayed entries are deleted from
        the replay file after every batch, and when the replay stops (the store failed).
        """
        queue = self._queue
        ended = 0
        try:
            while queue and keep_going():
                for _ in range(REPLAY_BATCH):
                    if not queue:
                        break
                    entry_id, entry = queue.head()
                    if _ended(entry, self._now_ms()):
                        ended += 1
                    else:
                        await self._send(entry)
                    queue.replayed(entry_id)
                await queue.sync()
        finally:
            await queue.sync()
            if ended:
                log.warning(
                    "limits replay: %d entries not replayed, every window they count in has ended",
                    ended,
                )

    async def _send(self, entry: Entry) -> None:
        if isinstance(entry, Ask):
            await self.shared.admit(replace(entry, limits=NO_LIMITS, tokens=0, cost_nano=0))
        else:
            await self.shared.settle(entry)
