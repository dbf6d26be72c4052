"""Usage of the Responses and Anthropic Messages APIs, and the text a stream produced (issue 12)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from decimal import Decimal

import pytest

from tollgate.config.schema import Pricing
from tollgate.limits.api_usage import (
    ANTHROPIC,
    OPENAI,
    RESPONSES,
    AnthropicStreamUsage,
    ProducedText,
    ResponsesStreamUsage,
    UsageFormat,
    anthropic_body_text,
    anthropic_body_usage,
    anthropic_text,
    chat_body_text,
    chat_text,
    responses_body_text,
    responses_body_usage,
    responses_text,
)
from tollgate.limits.cost import Prices, token_cost
from tollgate.limits.usage import USAGE_MAX, Usage
from tollgate.pipeline.relay import Produced


def event(name: str | None, data: object, newline: str = "\n") -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {name}{newline}" if name is not None else ""
    return f"{head}data: {payload}{newline}{newline}"


def stream(*events: str, crlf: bool = False) -> bytes:
    text = "".join(events)
    return (text.replace("\n", "\r\n") if crlf else text).encode()


# --- Responses -------------------------------------------------------------------------------

RESPONSES_USAGE = {
    "input_tokens": 12033,
    "input_tokens_details": {"cached_tokens": 11904},
    "output_tokens": 44,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 12077,
}
RESPONSES_EXPECTED = Usage(12033, 44, 12077, cached_prompt_tokens=11904, reasoning_tokens=7)


def response(status: str, usage: object, text: str = "Hi there") -> dict[str, object]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1741290958,
        "status": status,
        "model": "gpt-4.1",
        "output": [
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "metadata": {"usage": "a caller's own tag"},
        "usage": usage,
    }


def responses_stream(terminal: str = "response.completed", crlf: bool = False) -> bytes:
    status = {"response.completed": "completed", "response.incomplete": "incomplete"}.get(
        terminal, "failed"
    )
    deltas = [
        event(
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": 4 + n,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            },
        )
        for n, piece in enumerate(["Hi", " there", ' "usage": {"x": 1}'])
    ]
    return stream(
        event(
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": response("in_progress", None),
            },
        ),
        event(
            "response.in_progress",
            {
                "type": "response.in_progress",
                "sequence_number": 1,
                "response": response("in_progress", None),
            },
        ),
        *deltas,
        event(
            "response.output_text.done",
            {"type": "response.output_text.done", "sequence_number": 7, "text": "Hi there"},
        ),
        event(
            terminal,
            {"type": terminal, "sequence_number": 8, "response": response(status, RESPONSES_USAGE)},
        ),
        crlf=crlf,
    )


def test_responses_body_usage_maps_the_details() -> None:
    body = json.dumps(response("completed", RESPONSES_USAGE)).encode()
    assert responses_body_usage(body) == RESPONSES_EXPECTED


def test_responses_body_without_total_sums_and_reads_cache_writes() -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 5,
        "input_tokens_details": {"cache_write_tokens": 4},
    }
    body = json.dumps(response("completed", usage)).encode()
    assert responses_body_usage(body) == Usage(10, 5, 15, cache_write_tokens=4)


def test_responses_large_body_is_scanned_from_the_end() -> None:
    body = json.dumps(response("completed", RESPONSES_USAGE, text="x" * 100_000)).encode()
    assert responses_body_usage(body) == RESPONSES_EXPECTED


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1,2]", b'{"usage": null}', b'{"usage": "lots"}', b'{"usage": {"input_to'],
)
def test_responses_body_without_usage(body: bytes) -> None:
    assert responses_body_usage(body) is None


def test_huge_and_odd_counts_are_clamped_or_zero() -> None:
    usage = {
        "input_tokens": 10**30,
        "output_tokens": -5,
        "total_tokens": 1e40,
        "input_tokens_details": {"cached_tokens": "3"},
    }
    found = responses_body_usage(json.dumps({"usage": usage}).encode())
    assert found == Usage(USAGE_MAX, 0, USAGE_MAX, 0, 0, 0)


def feed_split(
    tracker_type: Callable[[], ResponsesStreamUsage | AnthropicStreamUsage], data: bytes, *cuts: int
) -> Usage | None:
    tracker = tracker_type()
    bounds = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(bounds):
        tracker.feed(data[start:end])
    return tracker.finish()


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
@pytest.mark.parametrize("crlf", [False, True])
def test_responses_stream_split_at_every_byte(terminal: str, crlf: bool) -> None:
    data = responses_stream(terminal, crlf)
    expected = RESPONSES_EXPECTED
    assert feed_split(ResponsesStreamUsage, data) == expected
    for cut in range(len(data) + 1):
        assert feed_split(ResponsesStreamUsage, data, cut) == expected, cut


def test_responses_stream_fed_byte_by_byte() -> None:
    data = responses_stream()
    assert feed_split(ResponsesStreamUsage, data, *range(1, len(data))) == RESPONSES_EXPECTED


def test_responses_stream_truncated_before_the_end_has_no_usage() -> None:
    data = responses_stream()
    cut = data.index(b"event: response.completed")
    assert feed_split(ResponsesStreamUsage, data[:cut]) is None
    # cut inside the terminal event's usage object: no usage rather than a wrong one
    inside = data.index(b'"total_tokens"')
    assert feed_split(ResponsesStreamUsage, data[:inside]) is None


def test_responses_stream_without_final_newline() -> None:
    data = responses_stream().rstrip(b"\n")
    assert feed_split(ResponsesStreamUsage, data) == RESPONSES_EXPECTED


@pytest.mark.parametrize(
    "chunks",
    [
        [b"\xff\xfe\x00garbage", b'data: {"usage": {', b"\n\n"],
        [b'data: {"usage": {"input_tokens": 1\n\n', b"event: x\r\r\n"],
        [b"\n" * 10, b"data: [DONE]\n\n"],
        [b'data: {"type":"response.completed","response":{"usage":[1]}}\n\n'],
    ],
)
def test_responses_stream_garbage_never_raises(chunks: list[bytes]) -> None:
    tracker = ResponsesStreamUsage()
    for chunk in chunks:
        tracker.feed(chunk)
    assert tracker.finish() is None


def test_responses_error_event_after_usage_keeps_the_usage() -> None:
    data = responses_stream() + stream(
        event("error", {"type": "error", "code": "x", "message": "m"})
    )
    assert feed_split(ResponsesStreamUsage, data) == RESPONSES_EXPECTED


# --- Anthropic -------------------------------------------------------------------------------


def anthropic_stream(
    *,
    delta_usage: dict[str, object] | None = None,
    crlf: bool = False,
    cache_creation: int = 0,
) -> bytes:
    start_usage = {
        "input_tokens": 25,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": 2048,
        "output_tokens": 1,
    }
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-x",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    return stream(
        event("message_start", {"type": "message_start", "message": message}),
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        event("ping", {"type": "ping"}),
        event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
        ),
        event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": '"usage": {}'},
            },
        ),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": delta_usage if delta_usage is not None else {"output_tokens": 15},
            },
        ),
        event("message_stop", {"type": "message_stop"}),
        crlf=crlf,
    )


ANTHROPIC_EXPECTED = Usage(2073, 15, 2088, cached_prompt_tokens=2048)


@pytest.mark.parametrize("crlf", [False, True])
def test_anthropic_stream_split_at_every_byte(crlf: bool) -> None:
    data = anthropic_stream(crlf=crlf)
    expected = ANTHROPIC_EXPECTED
    for cut in range(len(data) + 1):
        assert feed_split(AnthropicStreamUsage, data, cut) == expected, cut


def test_anthropic_stream_fed_byte_by_byte() -> None:
    data = anthropic_stream()
    assert feed_split(AnthropicStreamUsage, data, *range(1, len(data))) == ANTHROPIC_EXPECTED


def test_anthropic_message_delta_overwrites_the_counts_it_repeats() -> None:
    """Newer API versions repeat input and cache counts in `message_delta`: they replace."""
    data = anthropic_stream(
        delta_usage={
            "input_tokens": 30,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": None,
            "output_tokens": 40,
            "output_tokens_details": {"thinking_tokens": 12},
        }
    )
    prompt = 30 + 2048 + 100  # the cache read count was null: it keeps message_start's value
    usage = Usage(
        prompt,
        40,
        prompt + 40,
        cached_prompt_tokens=2048,
        reasoning_tokens=12,
        cache_write_tokens=100,
    )
    assert feed_split(AnthropicStreamUsage, data) == usage


def test_anthropic_stream_with_cache_reads_and_writes_is_priced_by_dial_rule() -> None:
    """prompt = input + cache reads + cache creation, total = prompt + output, and the cost
    (prompt - read - written) * prompt + output * completion + read * cacheRead
    + written * cacheWrite (compatibility C72)."""
    data = anthropic_stream(cache_creation=300)
    usage = feed_split(AnthropicStreamUsage, data, len(data) // 2)
    assert usage == Usage(
        25 + 2048 + 300, 15, 25 + 2048 + 300 + 15, cached_prompt_tokens=2048, cache_write_tokens=300
    )
    rates = Prices.of(
        Pricing.model_validate(
            {"unit": "token", "prompt": "0.000003", "completion": "0.000015",
             "cacheRead": "0.0000003", "cacheWrite": "0.00000375"}
        )
    )  # fmt: skip
    assert rates is not None
    assert usage is not None
    expected = (
        25 * Decimal("0.000003")
        + 15 * Decimal("0.000015")
        + 2048 * Decimal("0.0000003")
        + 300 * Decimal("0.00000375")
    )
    assert token_cost(rates, usage) == expected == Decimal("0.0020394")
    # Without cache rates every prompt token costs the prompt rate.
    plain = Prices.of(Pricing(unit="token", prompt="0.000003", completion="0.000015"))
    assert plain is not None
    assert token_cost(plain, usage) == 2373 * Decimal("0.000003") + 15 * Decimal("0.000015")


def test_anthropic_several_message_deltas_are_cumulative_not_added() -> None:
    data = anthropic_stream() + stream(
        event(
            "message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 20}}
        )
    )
    assert feed_split(AnthropicStreamUsage, data) == Usage(2073, 20, 2093, 2048)


def test_anthropic_stream_cut_after_message_start_counts_what_it_had() -> None:
    data = anthropic_stream()
    cut = data.index(b"event: content_block_start")
    assert feed_split(AnthropicStreamUsage, data[:cut]) == Usage(2073, 1, 2074, 2048)


def test_anthropic_stream_without_usage_and_garbage() -> None:
    tracker = AnthropicStreamUsage()
    for chunk in (
        b"\x00\xff",
        b'data: {"usage": {"input_tok',
        b"\r\n",
        b'data: "usage": {}\n',
        b"event: ping\n",
    ):
        tracker.feed(chunk)
    assert tracker.finish() is None


def test_anthropic_body_usage_is_converted_to_openai_semantics() -> None:
    body = json.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "Hello"}],
            "model": "claude-x",
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 25,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 2048,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 300,
                    "ephemeral_1h_input_tokens": 0,
                },
                "output_tokens": 15,
                "service_tier": "standard",
            },
        }
    ).encode()
    usage = Usage(2373, 15, 2388, cached_prompt_tokens=2048, cache_write_tokens=300)
    assert anthropic_body_usage(body) == usage


def test_anthropic_huge_counts_are_clamped() -> None:
    body = json.dumps(
        {"usage": {"input_tokens": 2**70, "cache_read_input_tokens": 2**70, "output_tokens": 2**70}}
    )
    assert anthropic_body_usage(body.encode()) == Usage(USAGE_MAX, USAGE_MAX, USAGE_MAX, USAGE_MAX)


def test_count_tokens_answer_is_not_usage() -> None:
    """`count_tokens` is neither limited nor charged: its answer yields no usage."""
    assert anthropic_body_usage(b'{"input_tokens": 2095}') is None


# --- Text produced so far --------------------------------------------------------------------


def chat_stream() -> bytes:
    chunks: list[dict[str, object]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo \u00e9\U0001f600"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"index": 0, "text": "legacy"}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    ]
    return stream(*(event(None, chunk) for chunk in chunks), event(None, "[DONE]"))


def anthropic_tool_stream() -> bytes:
    deltas = [
        {"type": "thinking_delta", "thinking": "Let me"},
        {"type": "signature_delta", "signature": "EqQBCgIYAh"},
        {"type": "text_delta", "text": "Sure"},
        {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
    ]
    return anthropic_stream() + stream(
        *(
            event("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": d})
            for d in deltas
        )
    )


def produced(factory: Callable[[], ProducedText], data: bytes, *cuts: int) -> str:
    counter = factory()
    bounds = [0, *cuts, len(data)]
    parts = [counter.feed(data[start:end]) for start, end in itertools.pairwise(bounds)]
    return "".join(parts) + counter.end()


@pytest.mark.parametrize(
    ("factory", "data", "text"),
    [
        (ProducedText.chat, chat_stream(), 'Hello \u00e9\U0001f600{"a":hmmlegacy'),
        (ProducedText.responses, responses_stream(), 'Hi there "usage": {"x": 1}'),
        (
            ProducedText.anthropic,
            anthropic_tool_stream(),
            'Hello"usage": {}Let meSure{"city": "Pa',
        ),
    ],
)
def test_produced_text_split_at_every_byte(
    factory: Callable[[], ProducedText], data: bytes, text: str
) -> None:
    assert produced(factory, data) == text
    assert produced(factory, data.replace(b"\n", b"\r\n")) == text
    for cut in range(len(data) + 1):
        assert produced(factory, data, cut) == text, cut


def test_produced_text_is_returned_as_events_complete() -> None:
    counter = ProducedText.chat()
    line = b'data: {"choices":[{"delta":{"content":"abc"}}]}\n\n'
    assert counter.feed(line[:20]) == ""
    assert counter.feed(line[20:]) == "abc"
    assert counter.feed(b"data: not json\n\n: comment\n\n") == ""
    assert counter.end() == ""


def test_event_text_functions_ignore_odd_shapes() -> None:
    for odd in (None, 1, "x", [], {"choices": "x"}, {"choices": [1, {"delta": 2}]}):
        assert chat_text(odd) == ""
    assert responses_text({"type": "response.audio.delta", "delta": "AAAA"}) == ""
    assert responses_text({"type": "response.output_text.delta", "delta": 5}) == ""
    assert (
        anthropic_text(
            {"type": "content_block_delta", "delta": {"type": "signature_delta", "signature": "s"}}
        )
        == ""
    )
    assert anthropic_text({"type": "content_block_delta", "delta": {"type": 3}}) == ""


def test_cr_framed_streams() -> None:
    """SSE also allows a lone CR as the line end."""
    responses = responses_stream().replace(b"\n", b"\r")
    anthropic = anthropic_stream().replace(b"\n", b"\r")
    for cut in range(0, len(responses) + 1, 5):
        assert feed_split(ResponsesStreamUsage, responses, cut) == RESPONSES_EXPECTED, cut
    for cut in range(len(anthropic) + 1):
        assert feed_split(AnthropicStreamUsage, anthropic, cut) == ANTHROPIC_EXPECTED, cut
    assert produced(ProducedText.anthropic, anthropic, 100) == 'Hello"usage": {}'


# --- Text of a whole answer (an estimate's completion, compatibility C71) ---------------------


def test_chat_body_text() -> None:
    body = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello",
                        "refusal": None,
                        "reasoning_content": " thought",
                        "tool_calls": [
                            {"type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
                        ],
                    },
                },
                {"index": 1, "message": {"content": [{"type": "text", "text": " two"}]}},
                {"index": 2, "text": " legacy"},
            ],
            "usage": None,
        }
    ).encode()
    assert chat_body_text(body) == 'Hello thought{"a":1} two legacy'
    assert chat_body_text(b'{"choices": []}') == ""
    assert chat_body_text(b'{"error": {"message": "x"}}') == ""
    assert chat_body_text(b"not json") is None
    assert chat_body_text(b"[1]") is None


def test_responses_body_text() -> None:
    body = {
        "id": "resp_1",
        "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan. "}]},
            {
                "type": "message",
                "content": [
                    {"type": "output_text", "text": "Hi", "annotations": []},
                    {"type": "refusal", "refusal": " no"},
                ],
            },
            {"type": "function_call", "name": "f", "arguments": '{"x":2}'},
            {"type": "custom_tool_call", "input": " raw"},
        ],
    }
    assert responses_body_text(json.dumps(body).encode()) == 'Plan. Hi no{"x":2} raw'
    assert responses_body_text(b'{"output": null}') == ""
    assert responses_body_text(b"{") is None


def test_anthropic_body_text() -> None:
    body = {
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "Hmm. ", "signature": "sig"},
            {"type": "text", "text": "Sure"},
            {"type": "tool_use", "id": "t", "name": "get", "input": {"city": "Paris"}},
            {"type": "redacted_thinking", "data": "opaque"},
        ],
    }
    assert anthropic_body_text(json.dumps(body).encode()) == 'Hmm. Sure{"city":"Paris"}'
    assert anthropic_body_text(b'{"content": "odd"}') == ""
    assert anthropic_body_text(b"") is None


@pytest.mark.parametrize(
    ("usage_format", "data", "text"),
    [
        (OPENAI, chat_stream, 'Hello \u00e9\U0001f600{"a":hmmlegacy'),
        (RESPONSES, responses_stream, 'Hi there "usage": {"x": 1}'),
        (ANTHROPIC, anthropic_tool_stream, 'Hello"usage": {}Let meSure{"city": "Pa'),
    ],
)
def test_a_kept_stream_gives_the_text_it_produced(
    usage_format: UsageFormat, data: Callable[[], bytes], text: str
) -> None:
    """What the relay keeps of a 200 stream (`relay.Produced`) reads back as the text it
    produced, however the stream was cut into chunks and whether or not it passed the bound
    past which chunks are read as they come."""
    stream_bytes = data()
    for cut in range(0, len(stream_bytes) + 1, 7):
        kept = Produced(usage_format, event_stream=True)
        kept.add(stream_bytes[:cut])
        kept.add(stream_bytes[cut:])
        assert kept.size() == len(stream_bytes)
        assert kept.text() == text, cut
        spilled = Produced(usage_format, event_stream=True)
        spilled.add(stream_bytes[:cut])
        spilled.spill()
        spilled.add(stream_bytes[cut:])
        assert spilled.size() == len(stream_bytes)
        assert spilled.text() == text, cut


def test_a_kept_body_that_is_not_an_event_stream() -> None:
    body = json.dumps({"choices": [{"message": {"content": "whole"}}]}).encode()
    kept = Produced(OPENAI, event_stream=False)
    kept.add(body[:10])
    kept.add(body[10:])
    assert kept.text() == "whole"
    past = Produced(OPENAI, event_stream=False)
    past.add(body)
    past.spill()  # past the bound: only its size is known
    assert past.text() is None
    assert past.size() == len(body)
