"""Cost of a call (spec auth-limits 5.7, proxy 7.6 and 16.28, DIAL's ModelCostCalculatorTest)."""

from __future__ import annotations

import json
from decimal import Decimal, localcontext
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.config.schema import Pricing
from tollgate.limits.cost import (
    NANO,
    Prices,
    call_cost,
    char_cost,
    from_nano_usd,
    text_length,
    to_nano_usd,
    token_cost,
)
from tollgate.limits.usage import Usage

D = Decimal


def prices(
    unit: str = "token",
    prompt: str | None = "0.1",
    completion: str | None = "0.5",
    **cache: str | dict[str, Any],
) -> Prices:
    found = Prices.of(Pricing(unit=unit, prompt=prompt, completion=completion, **cache))
    assert found is not None
    return found


CHARS = prices("char_without_whitespace")

# DIAL's request: an empty system message and "How are you?" (10 characters without spaces).
CHAT_REQUEST: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "How are you?"},
    ],
    "max_tokens": 500,
    "temperature": 1,
}

CHAT_RESPONSE = json.dumps(
    {
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "A file is a named collection."},
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 343, "total_tokens": 347},
        "id": "fd3be95a-c208-4dca-90cf-67e5082a4e5b",
        "created": 1705319789,
        "object": "chat.completion",
    }
).encode()

ERROR = '{"error": { "message": "message", "type": "type", "param": "param", "code": "code" } }'


def chunk(delta: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-7VfCSOSOS1gYQbDFiEMyh71RJSy1m",
            "object": "chat.completion.chunk",
            "created": 1687780896,
            "model": "gpt-35-turbo",
            "choices": [{"index": 0, "finish_reason": None, "delta": delta}],
            "usage": None,
        },
        separators=(",", ":"),
    )


# DIAL's stream, spacing and blank lines included: `data:` followed by several spaces, a run of
# blank lines between two events, trailing blank lines after [DONE].
STREAM = (
    f"data:   {chunk({'role': 'assistant'})}\n\n"
    f"data:   {chunk({'content': 'this'})}\n\n"
    f"data: {chunk({'content': ' is '})}\n\n\n\n"
    f"data: {chunk({'content': 'a text'})}\n\n"
    "data: [DONE]\n\n\n"
).encode()

STREAM_WITH_ERROR = (
    f"data:   {chunk({'role': 'assistant'})}\n\n"
    f"data:   {chunk({'content': 'this'})}\n\n"
    f"data: {ERROR}\n\n\n\n"
    f"data: {chunk({'content': 'a text'})}\n\n"
    "data: [DONE]\n\n\n"
).encode()


def sse(*payloads: str) -> bytes:
    return "".join(f"data: {payload}\n\n" for payload in payloads).encode()


# --- DIAL's figures (spec proxy 16.28) -------------------------------------------------------


def test_token_cost_dial() -> None:
    assert token_cost(prices(), Usage(10, 10, 20)) == D("6.0")


def test_char_cost_chat_dial() -> None:
    assert char_cost(CHARS, CHAT_REQUEST, CHAT_RESPONSE, False, "chat/completions") == D("13.0")


def test_char_cost_chat_stream_dial() -> None:
    request = {**CHAT_REQUEST, "stream": True}
    assert char_cost(CHARS, request, STREAM, True, "chat/completions") == D("6.5")


def test_char_cost_chat_stream_error_event_skipped_dial() -> None:
    """ "this" + "a text" = 9 characters * 0.5 + 1.0 for the prompt."""
    request = {**CHAT_REQUEST, "stream": True}
    assert char_cost(CHARS, request, STREAM_WITH_ERROR, True, "chat/completions") == D("5.5")


def test_char_cost_chat_error_response_dial() -> None:
    """An `{"error": ...}` body has no completion: only the prompt part counts."""
    response = ERROR.encode()
    assert char_cost(CHARS, CHAT_REQUEST, response, False, "chat/completions") == D("1.0")


def test_char_cost_embeddings_list_dial() -> None:
    request = {"input": ["text", "123"]}
    assert char_cost(CHARS, request, b"{}", False, "embeddings") == D("0.7")


def test_char_cost_embeddings_string_dial() -> None:
    assert char_cost(CHARS, {"input": "text"}, b"{}", False, "embeddings") == D("0.4")


def test_no_cost_without_pricing_or_for_an_unknown_unit_dial() -> None:
    assert Prices.of(None) is None
    assert Prices.of(Pricing(unit="request", prompt="0.1", completion="0.5")) is None
    assert Prices.of(Pricing(prompt="0.1", completion="0.5")) is None
    assert call_cost(None, Usage(10, 10, 20), CHAT_REQUEST, b"", False, "chat/completions") is None


# --- Prices ----------------------------------------------------------------------------------


def test_prices_parse_rates_once() -> None:
    found = Prices.of(
        Pricing.model_validate(
            {"unit": "token", "prompt": "0.000003", "completion": "1e-5", "cacheRead": "0"}
        )
    )
    assert found == Prices("token", D("0.000003"), D("0.00001"), D("0"), None)


def test_unit_is_case_sensitive() -> None:
    """DIAL switches on the exact string."""
    assert Prices.of(Pricing(unit="Token", prompt="0.1")) is None


def test_prices_without_any_rate_are_none() -> None:
    assert Prices.of(Pricing(unit="token")) is None


def test_a_decision_tree_rate_counts_as_not_set() -> None:
    tree = {"test": {"field": "promptTokens", "operator": "GT", "value": 1}, "ifTrue": "1"}
    assert Prices.of(Pricing(unit="token", prompt=tree)) is None
    found = prices(cache_read=tree)
    assert found.cache_read is None
    # ... so cached tokens fall back to the prompt rate.
    assert token_cost(found, Usage(10, 0, 10, cached_prompt_tokens=4)) == D("1.0")


# --- token_cost ------------------------------------------------------------------------------


def test_cache_read_defaults_to_the_prompt_rate() -> None:
    assert token_cost(prices(), Usage(10, 10, 20, cached_prompt_tokens=4)) == D("6.0")


def test_cache_read_rate() -> None:
    """(10 - 4) * 0.1 + 4 * 0.01 + 10 * 0.5."""
    cost = token_cost(prices(cache_read="0.01"), Usage(10, 10, 20, cached_prompt_tokens=4))
    assert cost == D("5.64")


def test_explicit_zero_cache_read_rate() -> None:
    """DIAL's ExplicitZeroCacheReadRate: 6 * 0.1 + 4 * 0 + 10 * 0.5 = 5.6."""
    cost = token_cost(prices(cache_read="0"), Usage(10, 10, 20, cached_prompt_tokens=4))
    assert cost == D("5.6")


def test_cache_write_defaults_to_the_prompt_rate() -> None:
    """Without cache rates, written and read cache tokens cost what other prompt tokens do."""
    usage = Usage(10, 10, 20, cached_prompt_tokens=4, cache_write_tokens=3)
    assert token_cost(prices(), usage) == D("6.0")


def test_cache_write_rate() -> None:
    """DIAL's rule: (10 - 4 - 3) * 0.1 + 10 * 0.5 + 4 * 0.01 + 3 * 0.125."""
    usage = Usage(10, 10, 20, cached_prompt_tokens=4, cache_write_tokens=3)
    cost = token_cost(prices(cache_read="0.01", cache_write="0.125"), usage)
    assert cost == D("0.3") + D("5.0") + D("0.04") + D("0.375")
    assert cost == D("5.715")


def test_cache_write_rate_without_a_read_rate() -> None:
    """cacheRead missing: the reads at the prompt rate, the writes at their own."""
    usage = Usage(10, 0, 10, cached_prompt_tokens=4, cache_write_tokens=3)
    assert token_cost(prices(cache_write="1"), usage) == D("0.3") + D("0.4") + D("3")


def test_cache_rates_priced_from_the_config() -> None:
    """`cacheRead` and `cacheWrite` as a model's `pricing` spells them."""
    pricing = Pricing.model_validate(
        {"unit": "token", "prompt": "0.000003", "completion": "0.000015",
         "cacheRead": "0.0000003", "cacheWrite": "0.00000375"}
    )  # fmt: skip
    rates = Prices.of(pricing)
    assert rates is not None
    # Anthropic's example: 25 uncached + 2048 read + 100 written, 15 out.
    usage = Usage(2173, 15, 2188, cached_prompt_tokens=2048, cache_write_tokens=100)
    expected = (
        D(25) * D("0.000003")
        + D(15) * D("0.000015")
        + D(2048) * D("0.0000003")
        + D(100) * D("0.00000375")
    )
    assert token_cost(rates, usage) == expected


def test_a_term_without_a_rate_is_zero() -> None:
    assert token_cost(prices(prompt=None), Usage(10, 10, 20)) == D("5.0")
    assert token_cost(prices(completion=None), Usage(10, 10, 20)) == D("1.0")


def test_cost_is_exact() -> None:
    """No float on the way: 3 * 0.1 is exactly 0.3, and a tiny rate keeps every digit."""
    assert token_cost(prices(completion=None), Usage(3, 0, 3)) == D("0.3")
    big = token_cost(prices(prompt="0.000000123456789", completion=None), Usage(987654321, 0, 0))
    assert big == D(987654321) * D("0.000000123456789")
    assert str(big) == "121.932631112635269"


RATES = st.decimals(
    min_value=0, max_value=1000, places=9, allow_nan=False, allow_infinity=False
).map(str)
COUNTS = st.integers(min_value=0, max_value=10**12)


@given(RATES, RATES, RATES, RATES, COUNTS, COUNTS, COUNTS, COUNTS, COUNTS)
def test_token_cost_is_linear_in_the_counts(
    prompt: str,
    completion: str,
    cache: str,
    write: str,
    p1: int,
    c1: int,
    p2: int,
    c2: int,
    k: int,
) -> None:
    rates = prices(prompt=prompt, completion=completion, cache_read=cache, cache_write=write)
    cached1, cached2 = p1 // 3, p2 // 5
    written1, written2 = p1 // 4, p2 // 7
    one = Usage(p1, c1, p1 + c1, cached1, 0, written1)
    two = Usage(p2, c2, p2 + c2, cached2, 0, written2)
    both = Usage(p1 + p2, c1 + c2, 0, cached1 + cached2, 0, written1 + written2)
    scaled = Usage(p1 * k, c1 * k, 0, cached1 * k, 0, written1 * k)
    with localcontext(prec=100):  # the test's own sums and products must be exact too
        assert token_cost(rates, both) == token_cost(rates, one) + token_cost(rates, two)
        assert token_cost(rates, scaled) == token_cost(rates, one) * k


@given(RATES, RATES, COUNTS, COUNTS)
def test_token_cost_formula(prompt: str, completion: str, p: int, c: int) -> None:
    cached = p // 2
    cost = token_cost(prices(prompt=prompt, completion=completion), Usage(p, c, p + c, cached))
    with localcontext(prec=100):
        assert cost == D(p) * D(prompt) + D(c) * D(completion)


@given(RATES, RATES, RATES, RATES, COUNTS, COUNTS)
def test_token_cost_with_cache_rates(
    prompt: str, completion: str, read: str, write: str, p: int, c: int
) -> None:
    cached, written = p // 2, p // 3
    rates = prices(prompt=prompt, completion=completion, cache_read=read, cache_write=write)
    cost = token_cost(rates, Usage(p, c, p + c, cached, 0, written))
    with localcontext(prec=100):
        assert cost == (
            D(p - cached - written) * D(prompt)
            + D(c) * D(completion)
            + D(cached) * D(read)
            + D(written) * D(write)
        )


# --- char_cost -------------------------------------------------------------------------------


def test_only_the_ascii_space_is_skipped() -> None:
    """Tabs, newlines and a no-break space are characters; a non-BMP one is two, as in Java."""
    assert text_length("a b\tc\nd\u00a0e") == 8
    assert text_length("  ") == 0
    assert text_length("é 😀") == 3
    assert text_length(None) == 0
    assert text_length(12) == 0


def test_chat_content_parts_count_their_text() -> None:
    request = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "How are"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": " you?"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    }
    assert char_cost(CHARS, request, b"{}", False, "chat/completions") == D("1.0")


def test_odd_request_shapes_count_zero() -> None:
    for request in ({}, {"messages": "x"}, {"messages": ["x", {"content": 1}]}):
        assert char_cost(CHARS, request, b"{}", False, "chat/completions") == 0
    assert char_cost(CHARS, {"input": [[1, 2], 3]}, b"{}", False, "embeddings") == 0


def test_embedding_response_counts_zero() -> None:
    response = json.dumps({"data": [{"embedding": [0.1]}], "choices": [{"text": "xx"}]}).encode()
    assert char_cost(CHARS, {"input": "ab"}, response, False, "embeddings") == D("0.2")


def test_legacy_completions() -> None:
    body = json.dumps({"choices": [{"text": "a b"}, {"text": "ignored"}]}).encode()
    assert char_cost(CHARS, {"prompt": "abc"}, body, False, "completions") == D("1.3")
    assert char_cost(CHARS, {"prompt": ["ab", "c"]}, body, False, "completions") == D("1.3")
    stream = sse(
        json.dumps({"choices": [{"text": "ab"}]}),
        json.dumps({"choices": [{"text": "c"}]}),
        "[DONE]",
    )
    assert char_cost(CHARS, {"prompt": "abc"}, stream, True, "completions") == D("1.8")


def test_only_the_first_choice_counts() -> None:
    body = json.dumps(
        {"choices": [{"message": {"content": "ab"}}, {"message": {"content": "cdef"}}]}
    ).encode()
    assert char_cost(CHARS, {"messages": []}, body, False, "chat/completions") == D("1.0")


def test_unparseable_or_odd_responses_count_zero() -> None:
    for body in (b"", b"not json", b"[1, 2]", b'{"choices": []}', b'{"choices": [{"message": 1}]}'):
        assert char_cost(CHARS, CHAT_REQUEST, body, False, "chat/completions") == D("1.0")


def test_stream_skips_what_it_cannot_read_and_stops_at_done() -> None:
    stream = b"\xef\xbb\xbf: a comment\r\nevent: message\r\n" + sse(
        "{not json",
        chunk({"content": "ab"}),
        json.dumps({"choices": [], "usage": {"total_tokens": 3}}),
        json.dumps({"choices": [{"delta": {"content": None}}]}),
        json.dumps({"choices": [{"delta": {"content": "c"}}], "error": None}),
        json.dumps({"error": {"message": "x"}, "choices": [{"delta": {"content": "zz"}}]}),
        "[DONE]",
        chunk({"content": "after done"}),
    ).replace(b"\n", b"\r\n")
    assert char_cost(CHARS, {"messages": []}, stream, True, "chat/completions") == D("1.5")


def test_a_json_error_body_on_a_streamed_request_counts_zero() -> None:
    assert char_cost(CHARS, CHAT_REQUEST, ERROR.encode(), True, "chat/completions") == D("1.0")


def test_char_cost_without_one_rate() -> None:
    no_completion = prices("char_without_whitespace", completion=None)
    assert char_cost(no_completion, CHAT_REQUEST, CHAT_RESPONSE, False, "chat/completions") == D(1)
    no_prompt = prices("char_without_whitespace", prompt=None)
    assert char_cost(no_prompt, CHAT_REQUEST, CHAT_RESPONSE, False, "chat/completions") == D(12)


def test_char_cost_refuses_an_unknown_api() -> None:
    with pytest.raises(ValueError, match="responses"):
        char_cost(CHARS, {}, b"{}", False, "responses")


# --- call_cost -------------------------------------------------------------------------------


def test_call_cost_per_token() -> None:
    cost = call_cost(prices(), Usage(10, 10, 20), CHAT_REQUEST, b"", False, "chat/completions")
    assert cost == D("6.0")


def test_call_cost_per_token_needs_usage() -> None:
    assert call_cost(prices(), None, CHAT_REQUEST, CHAT_RESPONSE, False, "chat/completions") is None


def test_call_cost_per_character_ignores_usage() -> None:
    for usage in (None, Usage(1, 1, 2)):
        cost = call_cost(CHARS, usage, CHAT_REQUEST, CHAT_RESPONSE, False, "chat/completions")
        assert cost == D("13.0")


def test_call_cost_per_character_for_an_unknown_api() -> None:
    assert call_cost(CHARS, None, {}, b"{}", False, "responses") is None


# --- nano-dollars ----------------------------------------------------------------------------


def test_nano_usd() -> None:
    assert D("0.000000001") == NANO
    assert to_nano_usd(D("6.0")) == 6_000_000_000
    assert to_nano_usd(D("0.0000000015")) == 2
    assert to_nano_usd(D("0.0000000014999")) == 1
    assert to_nano_usd(D("0.0000000025")) == 3  # half-up, not half-even
    assert to_nano_usd(D("-0.0000000025")) == -3
    assert to_nano_usd(D(0)) == 0
    assert from_nano_usd(6_000_000_000) == D(6)
    assert from_nano_usd(1) == NANO


def test_nano_usd_of_the_unlimited_sentinel_is_exact() -> None:
    """28 significant digits: more than the default decimal context's precision allows."""
    sentinel = D(9223372036854775807)
    assert to_nano_usd(sentinel) == 9223372036854775807 * 10**9
    assert from_nano_usd(to_nano_usd(sentinel)) == sentinel


@given(st.decimals(min_value=-(10**12), max_value=10**12, allow_nan=False, allow_infinity=False))
def test_nano_usd_round_trips_within_half_a_nano(cost: Decimal) -> None:
    back = from_nano_usd(to_nano_usd(cost))
    with localcontext(prec=100):
        assert abs(back - cost) <= NANO / 2


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_whole_nanos_round_trip_exactly(n: int) -> None:
    assert to_nano_usd(from_nano_usd(n)) == n
