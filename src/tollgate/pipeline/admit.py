"""Step 4: may this call go ahead within the caller's limits (compatibility C17, C56).

Models are limited; applications and assistants are not (compatibility C14). A non-positive limit is
403 `Access denied`; an exceeded one is 429 with DIAL's message, `display_message` and
`Retry-After`. In `reserve` mode an estimate of the call's tokens and cost is reserved at
admission, so concurrent calls cannot all pass a check that only one of them fits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from tollgate.config.schema import Model
from tollgate.errors import GatewayError
from tollgate.limits import messages
from tollgate.limits.cost import Prices, to_nano_usd
from tollgate.limits.ledger import Ask, Ledger, Refusal, usd
from tollgate.limits.policy import COST_WINDOWS, REQUEST_WINDOWS, TOKEN_WINDOWS
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, Kind

if TYPE_CHECKING:
    from tollgate.pipeline.call import Call
    from tollgate.routing.routes import CompiledRoute

CHARS_PER_TOKEN = 4  # estimate: a prompt's JSON bytes / 4 over-counts its tokens, safely


def wall_clock_ms() -> int:
    """Milliseconds since the epoch: the clock limits are counted by (injectable for tests)."""
    return time.time_ns() // 1_000_000


def bucket_of(principal: Principal) -> str:
    """Whose counters: all keys of a project share them, per-request keys count for the root
    caller (compatibility C39)."""
    return f"Keys/{principal.project}"


@dataclass(slots=True)
class Ticket:
    """An admitted call, to be settled when its response is done."""

    ask: Ask  # what was admitted: bucket, entity, instant and reservation
    prices: Prices | None


class Admission:
    """The admission step: what to ask the ledger for a call, and the ticket or the refusal."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        reserve: bool,
        default_completion_tokens: int,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.ledger = ledger
        self.reserve = reserve
        self.default_completion_tokens = default_completion_tokens
        self.now_ms = now_ms
        # The ledger says whether it can be called without a coroutine (the embedded one).
        self.synchronous = ledger.synchronous
        # Told of every refusal (metrics: limit rejections by kind and window).
        self.on_refusal: Callable[[Ask, Refusal], None] | None = None

    async def admit(self, call: Call) -> Ticket | None:
        """The call's ticket; None when no limits apply. Raises the refusal."""
        ask = self.ask(call)
        if ask is None:
            return None
        return self._ticket(ask, await self.ledger.admit(ask), call.deployment)

    def admit_now(self, call: Call) -> Ticket | None:
        """`admit` without a coroutine, when the ledger is `synchronous`."""
        ask = self.ask(call)
        if ask is None:
            return None
        return self._ticket(ask, self.ledger.admit_now(ask), call.deployment)

    async def admit_route(self, call: Call, route: CompiledRoute) -> Ticket | None:
        """Request and cost limits on a route's name (newer DIAL, compatibility C45): a route
        produces no tokens and no cost, so only its requests are counted."""
        snapshot = call.snapshot
        limits = snapshot.limit_policy.limits(call.principal.role_set, route.name, route.user_roles)
        if limits.unlimited:
            return None  # a route no limit applies to is not counted at all
        if not limits.positive:
            raise GatewayError(403, "Access denied")
        ask = Ask(bucket_of(call.principal), route.name, limits, snapshot.clock.at(self.now_ms()))
        ledger = self.ledger
        refusal = ledger.admit_now(ask) if self.synchronous else await ledger.admit(ask)
        return self._ticket(ask, refusal, None)

    def _ticket(self, ask: Ask, refusal: Refusal | None, deployment: Deployment | None) -> Ticket:
        """The admitted call's ticket, or the refusal raised (and told to `on_refusal`)."""
        if refusal is not None:
            if self.on_refusal is not None:
                self.on_refusal(ask, refusal)
            raise rejection(refusal)
        return Ticket(ask, None if deployment is None else deployment.prices)

    def ask(self, call: Call) -> Ask | None:
        """What to ask the ledger for this call; None when no limits apply (not a model)."""
        deployment = call.deployment
        assert deployment is not None, "admitted after resolution"
        if deployment.kind is not Kind.MODEL:
            return None
        snapshot = call.snapshot
        principal = call.principal
        limits = snapshot.limit_policy.limits(
            principal.role_set, deployment.name, deployment.user_roles
        )
        if not limits.positive:
            raise GatewayError(403, "Access denied")
        now = snapshot.clock.at(self.now_ms())
        if not self.reserve:
            return Ask(bucket_of(principal), deployment.name, limits, now)
        tokens, cost_nano = self._estimate(deployment, call.api, call.body, call.parsed)
        # An estimate above a limit would refuse the call forever; capped, such a call is
        # admitted when nothing else is in flight (and overshoots, as under DIAL's rule).
        return Ask(
            bucket_of(principal),
            deployment.name,
            limits,
            now,
            reserve=True,
            tokens=min(tokens, *limits.tokens),
            cost_nano=min(cost_nano, *limits.cost_nano),
        )

    def _estimate(
        self, deployment: Deployment, api: str, body: bytes, request: dict[str, Any]
    ) -> tuple[int, int]:
        """Tokens (and their cost) the call may use: its body's size for the prompt, plus
        `max_tokens`, or the model's `maxCompletionTokens`, or the configured default."""
        prompt = math.ceil(len(body) / CHARS_PER_TOKEN)
        completion = 0
        if api != "embeddings":
            asked = request.get("max_completion_tokens", request.get("max_tokens"))
            if type(asked) is int and asked > 0:
                completion = asked
            else:
                model = deployment.spec
                configured = (
                    model.limits.max_completion_tokens
                    if isinstance(model, Model) and model.limits is not None
                    else None
                )
                completion = configured or self.default_completion_tokens
        prices = deployment.prices
        if prices is None:
            return prompt + completion, 0
        per_unit = CHARS_PER_TOKEN if prices.unit == "char_without_whitespace" else 1
        cost = Decimal(prompt * per_unit) * (prices.prompt or 0) + Decimal(
            completion * per_unit
        ) * (prices.completion or 0)
        return prompt + completion, to_nano_usd(cost)


def rejection(refusal: Refusal) -> GatewayError:
    """DIAL's 429 body, `display_message` and `Retry-After` (compatibility C18)."""
    if refusal.kind == "token":
        text = messages.token_message(
            dict(zip(TOKEN_WINDOWS, refusal.used, strict=True)),
            dict(zip(TOKEN_WINDOWS, refusal.limits, strict=True)),
        )
    elif refusal.kind == "request":
        text = messages.request_message(
            dict(zip(REQUEST_WINDOWS, refusal.used, strict=True)),
            dict(zip(REQUEST_WINDOWS, refusal.limits, strict=True)),
        )
    else:
        text = messages.cost_message(
            {w: usd(n) for w, n in zip(COST_WINDOWS, refusal.used, strict=True)},
            {w: _limit_usd(n) for w, n in zip(COST_WINDOWS, refusal.limits, strict=True)},
        )
    return GatewayError(
        429,
        text,
        display_message=messages.display_message(refusal.kind, refusal.exceeded),
        headers={"Retry-After": str(refusal.retry_after_s)},
    )


def _limit_usd(nano: int) -> Decimal:
    from tollgate.config.schema import UNLIMITED, UNLIMITED_COST

    return UNLIMITED_COST if nano >= UNLIMITED else usd(nano)
