"""Step 6a: a stream's running count against the caller's token and cost limits (compatibility C79).

With `limits.enforceDuringStream`, a 200 event stream of a limited model call is counted as it
is relayed: the prompt tokens of the request plus the completion tokens of the text relayed so
far (`limits.tokens`, the API family's `ProducedText`), priced with the model's `pricing`. The
count may grow up to what the call holds reserved in the ledger; past it, the ledger is asked
to extend the reservation by a block (`BLOCK_TOKENS` ahead, and their cost), atomically against
every token and cost window (`Ledger.extend`), so one call of a stream asks the ledger once per
block, never per chunk, and concurrent streams and instances on one Redis see each other's
reservations. A block refused is retried once with what the windows have left; when not even
the count so far fits, the stream is ended with an error event in the API's own format carrying
DIAL's 429 message, and the call is charged what was produced (`charged`).

The relay hands its chunks to `take`, which gives back whole events only (a partial one waits
for its end), so that the error event never lands inside an event the client has half read.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Final

import orjson

from tollgate.config.schema import UNLIMITED
from tollgate.errors import GatewayError
from tollgate.limits.api_usage import AnthropicStreamUsage
from tollgate.limits.cost import CHAR_APIS, Prices, char_cost, text_length, to_nano_usd, token_cost
from tollgate.limits.ledger import Ask, Ledger, Refusal
from tollgate.limits.tokens import count_messages, count_text
from tollgate.limits.usage import Usage, clamp
from tollgate.limits.windows import Instant
from tollgate.pipeline.admit import rejection
from tollgate.pipeline.estimate import PROMPT_APIS, tokenizer_of

if TYPE_CHECKING:
    from tollgate.limits.api_usage import ProducedText, UsageFormat
    from tollgate.pipeline.admit import Admission, Ticket
    from tollgate.pipeline.call import Call

log = logging.getLogger("tollgate.budget")

# Tokens reserved ahead of the count at each extension (measured: see CHANGELOG). A stream of
# n completion tokens asks the ledger about n / 256 times; concurrent streams of one caller may
# leave up to one block each unused below a limit, never above it.
BLOCK_TOKENS: Final = 256
CHARS_PER_TOKEN: Final = 4  # the block of a model priced by characters
# A partial event held longer than this is passed on as it is (an upstream that never ends one
# must not make Tollgate hold the whole answer).
MAX_HELD: Final = 1024 * 1024
NEVER: Final = math.inf
NANO_PER_USD: Final = Decimal(10**9)
_SEQUENCE: Final = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def _event_end(data: bytes) -> int:
    """Where the last whole event of `data` ends (after its blank line); 0 when none does."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def error_event(usage_format: str, error: GatewayError, sequence_number: int) -> bytes:
    """The last event of a stream Tollgate ends, in the API's own stream format:

    - chat and completions: DIAL's error body as a data event, then `data: [DONE]` (as DIAL
      SDK applications end a failed stream; the `openai` SDK raises `APIError` with its
      message);
    - Responses: the API's `error` event (`ResponseErrorEvent` in the `openai` SDK), code
      `rate_limit_exceeded` (`server_error` for a store that is down);
    - Anthropic Messages: the API's `error` event, type `rate_limit_error` (`api_error`); the
      `anthropic` SDK raises `APIStatusError` with that body.
    """
    limited = error.status == 429
    if usage_format == "responses":
        body = {
            "type": "error",
            "code": "rate_limit_exceeded" if limited else "server_error",
            "message": error.message,
            "param": None,
            "sequence_number": sequence_number,
        }
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
    if usage_format == "anthropic":
        anthropic = {
            "type": "error",
            "error": {
                "type": "rate_limit_error" if limited else "api_error",
                "message": error.message,
            },
        }
        return b"event: error\ndata: " + orjson.dumps(anthropic) + b"\n\n"
    return b"data: " + error.body() + b"\n\ndata: [DONE]\n\n"


class StreamBudget:
    """The running count of one streamed call and the reservation it may grow into."""

    __slots__ = (
        "_admission",
        "_by_chars",
        "_carry",
        "_chars_until",
        "_clock",
        "_count",
        "_granted_cost",
        "_granted_tokens",
        "_ledger",
        "_pending",
        "_prompt_cost",
        "_prompt_first",
        "_rate",
        "_sent",
        "_text",
        "_tokens_until",
        "ask",
        "chars",
        "completion",
        "cost_limited",
        "cut",
        "due",
        "prices",
        "prompt",
        "token_limited",
        "usage_format",
    )

    def __init__(
        self,
        ledger: Ledger,
        ask: Ask,
        *,
        usage_format: UsageFormat,
        prompt: int,
        count: Callable[[str], int],
        prices: Prices | None,
        prompt_cost: Decimal,
        clock: Callable[[], Instant],
        admission: Admission | None = None,
    ) -> None:
        limits = ask.limits
        self._ledger = ledger
        self.ask = ask
        self.usage_format = usage_format.name
        self._text: ProducedText = usage_format.produced()
        self._count = count
        self._clock = clock
        self._admission = admission
        self.prompt = prompt
        self.completion = 0  # tokens of the text relayed (or cut) so far
        self.chars = 0  # its characters, counted only for a model priced by them
        self.token_limited = min(limits.tokens) < UNLIMITED
        # Cost is counted when a cost limit could stop the call and the model has prices.
        self.cost_limited = min(limits.cost_nano) < UNLIMITED and prices is not None
        self.prices = prices
        self._by_chars = self.cost_limited and prices is not None and prices.unit != "token"
        rate = prices.completion if prices is not None else None
        self._rate = rate or Decimal(0)  # USD per completion unit (token or character)
        self._prompt_cost = prompt_cost
        # What the call holds reserved: the admission's reservation, then each extension.
        self._granted_tokens = ask.tokens
        self._granted_cost = ask.cost_nano
        self._tokens_until: float = NEVER
        self._chars_until: float = NEVER
        self._carry = b""
        self._sent = b""  # the last whole events handed on (a Responses error's sequence)
        self._pending = b""
        self.due = False  # the count passed what is reserved: `extend` before going on
        self.cut: GatewayError | None = None  # why the stream was ended
        self._prompt_first = self.usage_format == "anthropic"  # see `_reported_prompt`
        self._thresholds()

    # --- the relay's side: per chunk, no I/O --------------------------------------------------

    def take(self, chunk: bytes) -> bytes:
        """The whole events of what came so far (what may be sent on); counts their text and
        sets `due` when the count passed the reservation."""
        data = self._carry + chunk if self._carry else chunk
        end = _event_end(data)
        if end < len(data) and len(data) - end <= MAX_HELD:
            self._carry = data[end:]
            if not end:
                return b""
            data = data[:end]
        else:
            self._carry = b""
        if self._prompt_first and b"message_start" in data:
            self._reported_prompt(data)
        text = self._text.feed(data)
        if text:
            self.completion += self._count(text)
            if self._by_chars:
                self.chars += text_length(text)
        if self.completion > self._tokens_until or self.chars > self._chars_until:
            self.due = True
        # Handed on unless the stream is cut here: the events before it were.
        self._sent, self._pending = self._pending, data
        return data

    def _reported_prompt(self, data: bytes) -> None:
        """An Anthropic stream reports its prompt first (`message_start`): the count takes it
        instead of Tollgate's own, so that the count and the charge agree."""
        self._prompt_first = False
        reader = AnthropicStreamUsage()
        reader.feed(data)
        reported = reader.finish()
        if reported is None or not reported.prompt_tokens:
            return
        self.prompt = reported.prompt_tokens
        prices = self.prices
        if prices is not None and prices.unit == "token":
            self._prompt_cost = token_cost(prices, Usage(self.prompt, 0, self.prompt))
        self._thresholds()
        if self.completion > self._tokens_until or self.chars > self._chars_until:
            self.due = True

    def end(self) -> bytes:
        """What is held when the stream ends (a last event without its blank line)."""
        carry, self._carry = self._carry, b""
        return carry

    def error_event(self) -> bytes:
        """The event that ends a stream cut by `extend`."""
        assert self.cut is not None
        sequence = 0
        if self.usage_format == "responses":
            found = _SEQUENCE.findall(self._sent)
            sequence = int(found[-1]) + 1 if found else 0
        return error_event(self.usage_format, self.cut, sequence)

    # --- at a block boundary: the ledger -------------------------------------------------------

    async def extend(self) -> bool:
        """Reserve the next block; False (and `cut` set) when the limits leave no room for the
        count so far."""
        self.due = False
        need_tokens = want_tokens = need_cost = want_cost = 0
        if self.token_limited:
            need_tokens = max(self.prompt + self.completion - self._granted_tokens, 0)
            want_tokens = need_tokens + BLOCK_TOKENS
        if self.cost_limited:
            need_cost = max(self._cost(0) - self._granted_cost, 0)
            want_cost = max(self._cost(BLOCK_TOKENS) - self._granted_cost, 0)
        ledger = self._ledger
        refusal: Refusal | None = None
        for _ in range(3):
            try:
                now = self._clock()
                refusal = (
                    ledger.extend_now(self.ask, want_tokens, want_cost, now)
                    if ledger.synchronous
                    else await ledger.extend(self.ask, want_tokens, want_cost, now)
                )
            except GatewayError as error:  # the store is down and `limits.onStoreFailure: closed`
                self.cut = error
                return False
            except Exception:
                # A bug must not end every stream: this block goes unreserved, the call is
                # still charged what it used.
                log.exception("extending a stream's reservation failed")
                refusal = None
            if refusal is None:
                self._granted_tokens += want_tokens
                self._granted_cost += want_cost
                self._thresholds()
                return True
            room = min(
                (
                    limit - used
                    for used, limit in zip(refusal.used, refusal.limits, strict=True)
                    if limit < UNLIMITED
                ),
                default=0,
            )
            # Room for the count so far, but not for a whole block: the rest of the room. (A
            # count that only just fits, with no room past it, ends here: the next event
            # would not fit either.)
            if refusal.kind == "token":
                if room < max(need_tokens, 1) or room >= want_tokens:
                    break
                want_tokens = room
            else:
                if room < max(need_cost, 1) or room >= want_cost:
                    break
                want_cost = room
        assert refusal is not None
        admission = self._admission
        if admission is not None and admission.on_refusal is not None:
            admission.on_refusal(self.ask, refusal)
        self.cut = rejection(refusal)
        return False

    def charged(self, reported: Usage | None) -> Usage:
        """What a cut call is charged: what the upstream reported before the cut where it
        counted more than Tollgate did (Anthropic reports the prompt first), else the count."""
        counted = Usage(self.prompt, self.completion, clamp(self.prompt + self.completion))
        if reported is None:
            return counted
        if reported.total_tokens >= counted.total_tokens:
            return reported
        prompt = reported.prompt_tokens or self.prompt
        completion = max(reported.completion_tokens, self.completion)
        return reported._replace(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=clamp(prompt + completion),
        )

    # --- arithmetic -------------------------------------------------------------------------

    def _cost(self, ahead: int) -> int:
        """Nano-dollars of the count so far plus `ahead` more completion tokens."""
        prices = self.prices
        if prices is None:
            return 0
        if prices.unit == "token":
            completion = self.completion + ahead
            cost = token_cost(prices, Usage(self.prompt, completion, self.prompt + completion))
        else:
            units = self.chars + ahead * CHARS_PER_TOKEN
            cost = self._prompt_cost + Decimal(units) * self._rate
        return to_nano_usd(cost)

    def _thresholds(self) -> None:
        """The completion counts past which the reservation no longer covers the call: each
        completion unit (a token, or a character) costs `_rate` over the prompt's cost."""
        self._tokens_until = self._granted_tokens - self.prompt if self.token_limited else NEVER
        if not self.cost_limited:
            return
        left = Decimal(self._granted_cost) / NANO_PER_USD - self._prompt_cost
        if self._rate:
            until: float = math.floor(left / self._rate)
        else:
            until = NEVER if left >= 0 else -1
        if self._by_chars:
            self._chars_until = until
        else:
            self._tokens_until = min(self._tokens_until, until)


def stream_budget(
    call: Call, ticket: Ticket, admission: Admission, usage_format: UsageFormat
) -> StreamBudget | None:
    """The budget of a streamed call, or None when no token or cost limit could stop it."""
    ask = ticket.ask
    limits = ask.limits
    if min(limits.tokens) >= UNLIMITED and min(limits.cost_nano) >= UNLIMITED:
        return None
    deployment = call.deployment
    assert deployment is not None
    hint = tokenizer_of(deployment)
    api = PROMPT_APIS.get(call.api)
    prompt = count_messages(call.parsed, model_hint=hint, api=api, load=False)
    prices = ticket.prices
    if prices is not None and prices.unit != "token" and call.api not in CHAR_APIS:
        prices = None  # no cost is charged for characters of these APIs (compatibility C20)
    prompt_cost = Decimal(0)
    if prices is not None:
        if prices.unit == "token":
            prompt_cost = token_cost(prices, Usage(prompt, 0, prompt))
        else:  # the characters of the request's messages (or prompt)
            prompt_cost = char_cost(prices, call.parsed, b"", True, call.api)

    def count(text: str) -> int:
        return count_text(hint, text, load=False)

    snapshot = call.snapshot
    now_ms = admission.now_ms
    return StreamBudget(
        admission.ledger,
        ask,
        usage_format=usage_format,
        prompt=prompt,
        count=count,
        prices=prices,
        prompt_cost=prompt_cost,
        clock=lambda: snapshot.clock.at(now_ms()),
        admission=admission,
    )
