"""Ledgers: where usage is counted, checked and charged, atomically (compatibility C17, C56, C58).

A ledger keeps, per caller bucket (`Keys/<project>`) and deployment: tokens per sliding minute
and per calendar day, week and month; requests per sliding hour and calendar day; the cost
attributed to that deployment; and, per bucket, the caller's total cost in the same windows as
tokens. Cost is counted in whole nano-dollars so stores can add it atomically.

`admit` checks every window and, only when all pass, counts the request and reserves the
estimate: one atomic step. `extend` grows an admitted call's reservation while its answer
streams, when every token and cost window still has room (compatibility C79). `settle` releases
the reservation and charges what was used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from tollgate.limits.cost import from_nano_usd
from tollgate.limits.policy import Limits
from tollgate.limits.windows import (
    Instant,
    Period,
    Sliding,
    seconds_until,
    sliding_retry_after_ms,
)

Kind = Literal["token", "request", "cost"]


# Ask and Charge are built for every call: plain slotted dataclasses (a frozen one pays for
# object.__setattr__ on each field); nothing mutates them.
@dataclass(slots=True)
class Ask:
    """Admit one call to `entity` for `bucket`, reserving `tokens` and `cost_nano` if given."""

    bucket: str
    entity: str
    limits: Limits
    now: Instant
    reserve: bool = False  # False: DIAL's rule (refuse once used >= limit)
    tokens: int = 0
    cost_nano: int = 0
    # Set by a ledger that admitted the call somewhere else than its usual store (the local
    # fallback of `ResilientLedger`): the reservation is released where it was made.
    local: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call was refused: which limit kind, the usage and limits of its windows."""

    kind: Kind
    used: tuple[int, ...]  # per window of the kind; cost in nano-dollars
    limits: tuple[int, ...]  # idem; UNLIMITED (or None for cost) where there is no limit
    exceeded: tuple[str, ...]
    retry_after_s: int


@dataclass(slots=True)
class Charge:
    """What a finished call used, and what its admission had reserved (released now)."""

    bucket: str
    entity: str
    now: Instant
    tokens: int
    cost_nano: int
    reserved_at: Instant | None = None
    reserved_tokens: int = 0
    reserved_cost_nano: int = 0
    reserved_locally: bool = False  # the admission's `Ask.local`: where to release it


@dataclass(slots=True)
class EntityUsage:
    tokens: tuple[int, int, int, int] = (0, 0, 0, 0)  # minute, day, week, month
    requests: tuple[int, int] = (0, 0)  # hour, day
    cost_nano: tuple[int, int, int, int] = (0, 0, 0, 0)  # attributed to this deployment

    @property
    def idle(self) -> bool:
        return not any(self.tokens) and not any(self.requests) and not any(self.cost_nano)


@dataclass(slots=True)
class BucketUsage:
    cost_nano: tuple[int, int, int, int] = (0, 0, 0, 0)  # the caller's total spend
    entities: dict[str, EntityUsage] = field(default_factory=dict)


def retry_after_s(
    exceeded: tuple[str, ...],
    slots: dict[int, int],
    window: Sliding,
    now: Instant,
    threshold: int,
) -> int:
    """The longest wait among the exceeded windows, in whole seconds (>= 1): until the sliding
    window's usage falls below `threshold`, or until a calendar period ends (compatibility C18)."""
    waits = []
    for name in exceeded:
        if name in ("minute", "hour"):
            wait_ms = sliding_retry_after_ms(slots, window, now.ms, threshold)
            waits.append(-(-wait_ms // 1000))
        else:
            period: Period = "day" if name == "day" else "week" if name == "week" else "month"
            waits.append(seconds_until(now, now.period_end(period)))
    return max(max(waits, default=1), 1)


def usd(nano: int) -> Decimal:
    return from_nano_usd(nano)


class Ledger(ABC):
    """One store of counters. Implementations: `MemoryLedger` (embedded), `RedisLedger`.

    A ledger that needs no I/O sets `synchronous` and implements `admit_now` / `settle_now`:
    callers then skip the coroutine (about 1 µs a call). Callers test the flag, never the type.
    """

    synchronous: bool = False

    def admit_now(self, ask: Ask) -> Refusal | None:
        """`admit` without a coroutine; only where `synchronous`."""
        raise NotImplementedError

    def settle_now(self, charge: Charge) -> None:
        """`settle` without a coroutine; only where `synchronous`."""
        raise NotImplementedError

    def extend_now(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        """`extend` without a coroutine; only where `synchronous`."""
        raise NotImplementedError

    @abstractmethod
    async def admit(self, ask: Ask) -> Refusal | None:
        """Check every window; when all pass, count the request and reserve. Atomic."""

    @abstractmethod
    async def extend(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        """Grow the reservation of the admitted call `ask` by `tokens` and `cost_nano`, when every
        token window of its entity and every cost window of its bucket has room for the call's
        whole reservation plus them (`used + reserved + extra <= limit`); else refuse, changing
        nothing. Atomic; no request is counted. Windows without a limit always have room, and
        a kind (tokens, cost) the extension adds nothing to is not checked.

        The reservation is moved to `now` as it grows (released where it was held, added at
        `now` whole), so that a long stream's reservation stays inside the sliding minute that
        its charge will land in. On success `ask` describes the reservation: `tokens` and
        `cost_nano` grown, `now` the instant it is held at (what `settle` releases). The
        refusal's `used` counts the call's reservation as held now, without the extension
        (compatibility C79)."""

    @abstractmethod
    async def settle(self, charge: Charge) -> None:
        """Release the reservation and charge the real usage."""

    @abstractmethod
    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        """Current usage of `bucket`: of the named entities, or of every entity it used."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections, load state."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release everything."""
