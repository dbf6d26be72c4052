"""The cost of one call in USD, in exact decimals (compatibility C20).

Pure functions: the settle step hands in the parsed request, the relayed response bytes and the
usage it parsed; nothing here reads the network or the clock. Costs are `Decimal`s computed in a
context wide enough that no product or sum is ever rounded; ledgers store them as whole
nano-dollars (`to_nano_usd`) so that Redis can add them atomically.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Any, Literal

import orjson

from tollgate.config.schema import Pricing
from tollgate.limits.usage import Usage

Unit = Literal["token", "char_without_whitespace"]
UNITS: dict[str | None, Unit] = {
    "token": "token",
    "char_without_whitespace": "char_without_whitespace",
}

# 100 significant digits: a token count times a configured rate never comes close, so every
# product and sum below is exact whatever the calling thread's decimal context says.
EXACT = Context(prec=100)
ZERO = Decimal(0)
NANO = Decimal("1e-9")

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
CHAR_APIS = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})


def _rate(value: str | dict[str, Any] | None) -> Decimal | None:
    # DIAL >= 0.49 allows a decision tree per rate; Tollgate does not evaluate them yet, so such
    # a rate counts as not set (and a cache rate then falls back to the prompt rate).
    return Decimal(value) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Prices:
    """A model's per-unit USD rates, parsed once when the config is loaded."""

    unit: Unit
    prompt: Decimal | None
    completion: Decimal | None
    cache_read: Decimal | None
    cache_write: Decimal | None

    @classmethod
    def of(cls, pricing: Pricing | None) -> Prices | None:
        """The rates of `pricing`, or None when no cost can be computed from it.

        DIAL computes no cost for a missing `pricing` or any unit other than `token` and
        `char_without_whitespace` (compared case-sensitively, as DIAL's `switch` does;
        compatibility C20); a pricing without a single usable rate is treated the same way.
        """
        if pricing is None:
            return None
        unit = UNITS.get(pricing.unit)
        if unit is None:
            return None
        prices = cls(
            unit,
            _rate(pricing.prompt),
            _rate(pricing.completion),
            _rate(pricing.cache_read),
            _rate(pricing.cache_write),
        )
        if (
            prices.prompt is None
            and prices.completion is None
            and prices.cache_read is None
            and prices.cache_write is None
        ):
            return None
        return prices


def _times(count: int, rate: Decimal | None) -> Decimal:
    return ZERO if rate is None else EXACT.multiply(Decimal(count), rate)


def token_cost(prices: Prices, usage: Usage) -> Decimal:
    """DIAL's rule (compatibility C72): (prompt - cached - written) * prompt
    + completion * completion + cached * cacheRead + written * cacheWrite.

    `cached` are the prompt tokens read from a cache, `written` those written to one; both
    are parts of the prompt count, whatever the API (Anthropic's are converted so by
    `limits.api_usage`). A term whose rate is not set is 0. `cacheRead` and `cacheWrite`
    default to the prompt rate, as in newer DIAL (compatibility C20), so without cache pricing
    this is DIAL 2024's prompt * prompt + completion * completion. Like DIAL, the uncached
    count is not clamped at 0 (it is negative only when an upstream reports more cache tokens
    than prompt tokens).
    """
    cached = usage.cached_prompt_tokens
    written = usage.cache_write_tokens
    prompt = prices.prompt
    cost = _times(usage.prompt_tokens - cached - written, prompt)
    if cached:
        cost = EXACT.add(
            cost, _times(cached, prompt if prices.cache_read is None else prices.cache_read)
        )
    if written:
        cost = EXACT.add(
            cost, _times(written, prompt if prices.cache_write is None else prices.cache_write)
        )
    return EXACT.add(cost, _times(usage.completion_tokens, prices.completion))


def text_length(text: object) -> int:
    """Characters of `text` other than the ASCII space; 0 for anything that is not a string.

    DIAL skips only `' '`: tabs and newlines count (compatibility C20). It counts Java
    `char`s, i.e. UTF-16 code units, so a character outside the BMP (most emoji) counts 2;
    Tollgate does the same so that a budget means the same in both gateways.
    """
    if type(text) is not str:
        return 0
    units = len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2
    return units - text.count(" ")


def _texts_length(value: object) -> int:
    """A string, or the strings of a list of strings (`input`, `prompt`); other items count 0."""
    if type(value) is list:
        return sum(text_length(item) for item in value)
    return text_length(value)


def _content_length(content: object) -> int:
    """A chat message's `content`: a string, or the `text` of its parts of type "text"."""
    if type(content) is list:
        return sum(
            text_length(part.get("text"))
            for part in content
            if type(part) is dict and part.get("type") == "text"
        )
    return text_length(content)


def _prompt_length(request: dict[str, Any], api: str) -> int:
    if api == CHAT:
        messages = request.get("messages")
        if type(messages) is not list:
            return 0
        return sum(
            _content_length(message.get("content")) for message in messages if type(message) is dict
        )
    return _texts_length(request.get("input" if api == EMBEDDINGS else "prompt"))


def _first_choice(document: object) -> dict[str, Any] | None:
    """`choices[0]` of a response document or stream event, if it has one.

    DIAL skips a document without `choices` (an `{"error": ...}` body or event;
    compatibility C20). Tollgate also skips an event whose `choices` is empty (the usage-only
    last event of `stream_options.include_usage`), where DIAL would fail and record no cost.
    """
    if type(document) is not dict or document.get("error") is not None:
        return None
    choices = document.get("choices")
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        return None
    return choices[0]


def _stream_events(stream: bytes) -> Iterator[object]:
    """The parsed JSON of each `data:` line of an SSE stream, up to `data: [DONE]`.

    Lines that are not `data:` lines (comments, `event:`, blank separators) and payloads that
    do not parse are skipped.
    """
    for line in stream.removeprefix(b"\xef\xbb\xbf").splitlines():
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload.startswith(b"[DONE]"):
            return
        try:
            yield orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue


def _completion_length(response: bytes, streamed: bool, api: str) -> int:
    if api == EMBEDDINGS:
        return 0  # DIAL: an embedding response has no completion part (compatibility C20)
    if streamed:
        total = 0
        for event in _stream_events(response):
            choice = _first_choice(event)
            if choice is not None:
                total += _choice_length(choice, "delta", api)
        return total
    try:
        document = orjson.loads(response)
    except orjson.JSONDecodeError:
        return 0
    choice = _first_choice(document)
    return 0 if choice is None else _choice_length(choice, "message", api)


def _choice_length(choice: dict[str, Any], part: str, api: str) -> int:
    """Length of a choice's text: `text` for completions, `message`/`delta.content` for chat."""
    if api == COMPLETIONS:
        return text_length(choice.get("text"))
    message = choice.get(part)
    return text_length(message.get("content")) if type(message) is dict else 0


def char_cost(
    prices: Prices, request: dict[str, Any], response: bytes, streamed: bool, api: str
) -> Decimal:
    """Prompt chars * prompt + completion chars * completion (unit char_without_whitespace).

    Prompt characters come from the request (`messages[*].content` for chat, `input` for
    embeddings, `prompt` for legacy completions); completion characters from `choices[0]` of
    the response or of every event of a streamed one, events carrying an error skipped.
    Only `choices[0]` is read, as in DIAL. Raises ValueError for an api it cannot count.
    """
    if api not in CHAR_APIS:
        raise ValueError(f"no character pricing for the {api!r} api")
    cost = _times(_prompt_length(request, api), prices.prompt)
    if prices.completion is None:
        return cost
    return EXACT.add(cost, _times(_completion_length(response, streamed, api), prices.completion))


def call_cost(
    prices: Prices | None,
    usage: Usage | None,
    request: dict[str, Any],
    response: bytes,
    streamed: bool,
    api: str,
) -> Decimal | None:
    """The cost of one call, or None when none can be computed.

    None without prices, for per-token prices without usage (DIAL charges no cost when it
    finds no usage), and for per-character prices on an api whose text is not
    known. The caller charges only a positive cost (compatibility C20).
    """
    if prices is None:
        return None
    if prices.unit == "token":
        return None if usage is None else token_cost(prices, usage)
    if api not in CHAR_APIS:
        return None
    return char_cost(prices, request, response, streamed, api)


def to_nano_usd(cost: Decimal) -> int:
    """`cost` in whole nano-dollars, rounded half-up (away from zero at exactly a half).

    Ledgers keep integers so that Redis can add them atomically (INCRBY), which it cannot do
    with decimal text; they cap what they count at `limits.usage.USAGE_MAX`.
    """
    return int(cost.quantize(NANO, ROUND_HALF_UP, EXACT).scaleb(9, EXACT))


def from_nano_usd(n: int) -> Decimal:
    """`n` nano-dollars in USD, exactly."""
    return Decimal(n).scaleb(-9, EXACT)
