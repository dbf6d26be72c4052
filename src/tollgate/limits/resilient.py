"""A shared ledger that survives its store going away (DECISIONS 10).

Wraps the shared (Redis) ledger. While the store answers, every call goes to it. When a call
fails, the store is marked down (loudly, once) and, by `limits.onStoreFailure`:
- `local` (default): calls are admitted and charged on this instance's embedded ledger, and
  every charge is also queued; when the store answers again the queue is replayed into it, so
  the usage counted meanwhile is not lost;
- `closed`: limited calls are refused with 503 until the store is back.
A background probe checks the store every second while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Literal

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST
from tollgate.errors import GatewayError
from tollgate.limits.ledger import Ask, BucketUsage, Charge, Ledger, Refusal
from tollgate.limits.policy import Limits
from tollgate.limits.windows import Instant

log = logging.getLogger("tollgate.limits")

PROBE_EVERY_S = 1.0
MAX_PENDING = 1_000_000  # charges kept for replay while the store is down
NO_LIMITS = Limits(tokens=(UNLIMITED,) * 4, requests=(UNLIMITED,) * 2, cost=(UNLIMITED_COST,) * 4)
STORE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def store_errors() -> tuple[type[BaseException], ...]:
    """What a store failure looks like: socket errors, and redis-py's own errors."""
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a dependency
        return STORE_ERRORS
    return (*STORE_ERRORS, redis.exceptions.RedisError)


class ResilientLedger(Ledger):
    def __init__(
        self,
        shared: Ledger,
        local: Ledger,
        on_failure: Literal["local", "closed"],
        ping: Callable[[], Awaitable[object]],
    ) -> None:
        self.shared = shared
        self.local = local
        self.on_failure = on_failure
        self._ping = ping
        self.healthy = True
        self._errors = store_errors()
        # Calls admitted locally and charges settled locally, to replay into the store.
        self._pending: deque[tuple[Ask | None, Charge | None]] = deque(maxlen=MAX_PENDING)
        self._probe_task: asyncio.Task[None] | None = None
        # Admissions reserved on the local ledger, by the identity of their instant (a ticket
        # keeps that object alive until it settles): their release belongs to the local one.
        self._local_reservations: set[int] = set()
        self.failures = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        await self.local.start()
        try:
            await self.shared.start()
        except self._errors as exc:
            self._down(exc)

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self._pending and self.healthy:
            await self._replay()
        if self._pending:
            log.error(
                "limits store still down at shutdown: %d calls counted on this instance only",
                len(self._pending),
            )
        await self.shared.close()
        await self.local.close()

    def _down(self, exc: BaseException) -> None:
        self.failures += 1
        if self.healthy:
            self.healthy = False
            log.error(
                "limits store unreachable (%s: %s); %s",
                type(exc).__name__,
                exc,
                "counting on this instance until it returns"
                if self.on_failure == "local"
                else "refusing limited calls until it returns",
            )
            self._probe_task = asyncio.get_running_loop().create_task(self._probe())

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
            self._pending.append((ask, None))
            self._local_reservations.add(id(ask.now))
        return refusal

    async def settle(self, charge: Charge) -> None:
        reserved_locally = id(charge.reserved_at) in self._local_reservations
        self._local_reservations.discard(id(charge.reserved_at))
        if self.healthy and not reserved_locally:
            try:
                await self.shared.settle(charge)
                return
            except self._errors as exc:
                self._down(exc)
        unreserved = replace(charge, reserved_at=None, reserved_tokens=0, reserved_cost_nano=0)
        # Each ledger releases only the reservation it holds.
        await self.local.settle(charge if reserved_locally else unreserved)
        self._pending.append((None, unreserved if reserved_locally else charge))

    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        if self.healthy:
            try:
                return await self.shared.usage(bucket, entities, now)
            except self._errors as exc:
                self._down(exc)
        if self.on_failure == "closed":
            raise self._refuse()
        return await self.local.usage(bucket, entities, now)

    async def _probe(self) -> None:
        while not self.healthy:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await self._ping()
                await self._replay()
            except self._errors:
                continue
            self.healthy = True
            log.warning("limits store reachable again; shared counting resumed")
        self._probe_task = None

    async def _replay(self) -> None:
        """Push what was counted locally into the store, oldest first.

        An admission is replayed as an unlimited admission at its own instant (it counts the
        request; nothing is reserved, the local charge that follows says what was used).
        """
        while self._pending:
            ask, charge = self._pending[0]
            if ask is not None:
                await self.shared.admit(replace(ask, limits=NO_LIMITS, tokens=0, cost_nano=0))
            elif charge is not None:
                await self.shared.settle(charge)
            self._pending.popleft()
