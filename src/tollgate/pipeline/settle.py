"""Step 7: charge what the call used, release what its admission reserved (spec 5.2, 5.7).

Only a successful (200) response of a model is charged: its `total_tokens`, and its cost from
the model's `pricing`. Settling happens after the response is relayed, also when the client
went away mid-stream (the relay drained the upstream first, DECISIONS 9).
"""

from __future__ import annotations

import time
from typing import Any

from tollgate.limits.cost import call_cost, to_nano_usd
from tollgate.limits.ledger import Charge
from tollgate.limits.usage import Usage
from tollgate.limits.windows import Clock
from tollgate.pipeline.admit import Ticket


def charge_for(
    ticket: Ticket,
    status: int,
    usage: Usage | None,
    request: dict[str, Any],
    response: bytes,
    streamed: bool,
    api: str,
    clock: Clock,
) -> Charge:
    """What to charge for a finished call, at `clock`'s now: the current snapshot's clock, not
    the one the call was admitted under. A reload that changed `rateLimitSchedule` while the
    call was in flight would otherwise have it charged to a period that is no longer the
    current one, and the ledger, seeing an older period id, would start that counter over and
    drop what calls admitted under the new schedule had already counted."""
    tokens = cost_nano = 0
    if status == 200:
        if usage is not None and usage.total_tokens > 0:
            tokens = usage.total_tokens
        if ticket.prices is not None:
            cost = call_cost(ticket.prices, usage, request, response, streamed, api)
            if cost is not None and cost > 0:
                cost_nano = to_nano_usd(cost)
    ask = ticket.ask
    return Charge(
        ask.bucket,
        ask.entity,
        clock.at(time.time_ns() // 1_000_000),
        tokens,
        cost_nano,
        ask.now,  # reserved_at
        ask.tokens,  # reserved_tokens
        ask.cost_nano,  # reserved_cost_nano
        ask.local,  # reserved_locally
    )
