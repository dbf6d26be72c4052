"""Step 7: charge what the call used, release what its admission reserved (compatibility C17).

Only a successful (200) response of a model is charged: its `total_tokens`, and its cost from
the model's `pricing`. Settling happens after the response is relayed, also when the client
went away mid-stream (the relay drained the upstream first, compatibility C29).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from tollgate.limits.cost import call_cost, to_nano_usd
from tollgate.limits.ledger import Charge, Ledger
from tollgate.limits.windows import Clock
from tollgate.pipeline.admit import Ticket

if TYPE_CHECKING:
    from tollgate.pipeline.call import Call

log = logging.getLogger("tollgate.settle")

# Settles running in the background at most; past it, a finished call waits for its own.
MAX_SETTLING: Final = 4096


def charge_for(call: Call, ticket: Ticket, clock: Clock, now_ms: int) -> Charge:
    """What to charge for a finished call, at `now_ms` by `clock`: the current snapshot's
    clock, not the one the call was admitted under. A reload that changed `rateLimitSchedule`
    while the call was in flight would otherwise have it charged to a period that is no longer
    the current one, and the ledger, seeing an older period id, would start that counter over
    and drop what calls admitted under the new schedule had already counted."""
    relayed = call.relayed
    tokens = cost_nano = 0
    if relayed is not None and relayed.response.status == 200:
        usage = relayed.usage
        if usage is not None and usage.total_tokens > 0:
            tokens = usage.total_tokens
        if ticket.prices is not None:
            cost = call_cost(
                ticket.prices, usage, call.parsed, relayed.body, relayed.streamed, call.api
            )
            if cost is not None and cost > 0:
                cost_nano = to_nano_usd(cost)
    ask = ticket.ask
    return Charge(
        ask.bucket,
        ask.entity,
        clock.at(now_ms),
        tokens,
        cost_nano,
        ask.now,  # reserved_at
        ask.tokens,  # reserved_tokens
        ask.cost_nano,  # reserved_cost_nano
        ask.local,  # reserved_locally
    )


class Settler:
    """Settles finished calls: at once on a synchronous ledger, else in the background (the
    caller has its whole answer and need not wait one more round trip). Pending settles are
    awaited by `drain` when the gateway stops, so none is lost on shutdown."""

    __slots__ = ("_clock", "_ledger", "_now_ms", "_settling")

    def __init__(self, ledger: Ledger, clock: Callable[[], Clock], now_ms: Callable[[], int]):
        self._ledger = ledger
        self._clock = clock  # the current snapshot's: see `charge_for`
        self._now_ms = now_ms
        self._settling: set[asyncio.Task[None]] = set()

    def settle(self, call: Call, ticket: Ticket) -> Coroutine[Any, Any, None] | None:
        """Settled whatever happened: a failed call releases its reservation. Returns what the
        caller must await, when the store is too far behind to settle in the background."""
        charge = charge_for(call, ticket, self._clock(), self._now_ms())
        if call.note is not None:
            call.note.cost_nano = charge.cost_nano
        ledger = self._ledger
        if ledger.synchronous:
            ledger.settle_now(charge)
        elif len(self._settling) < MAX_SETTLING:
            task = asyncio.get_running_loop().create_task(ledger.settle(charge))
            self._settling.add(task)
            task.add_done_callback(self._settled)
        else:  # the store is that far behind: this caller waits for it
            return ledger.settle(charge)
        return None

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The resilient ledger handles store failures itself; anything else is a bug.
            log.error("settling a call failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for every settle in flight (at shutdown: calls that finished are charged)."""
        while self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
