"""Usage parsing: the last `usage` object of a body or stream (DECISIONS 6, spec proxy 16)."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from tollgate.limits.usage import StreamUsage, Usage, body_usage, last_usage


def sse(*events: object) -> bytes:
    lines = [
        f"data: {json.dumps(e)}\n\n" if not isinstance(e, str) else f"data: {e}\n\n" for e in events
    ]
    return "".join(lines).encode()


STREAM = sse(
    {"choices": [{"delta": {"content": "a"}}], "usage": None},
    {
        "choices": [{"delta": {}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 10, "prompt_tokens": 20, "total_tokens": 30},
    },
    {"statistics": {"usage_per_model": [{"index": 0, "model": "m", "total_tokens": 99}]}},
    "[DONE]",
)


def test_junk_fields_and_whitespace() -> None:
    """DIAL's TokenUsageParserTest body: scalars of every kind inside `usage`."""
    body = (
        b'{"id":"x","usage" \t\r\n : \t\r\n {"a":null,"b":true,"c":"s","d":1.5,'
        b'"completion_tokens":33,"prompt_tokens":19,"total_tokens":52},"z":1}'
    )
    assert last_usage(body) == Usage(19, 33, 52)


def test_nested_token_details_count() -> None:
    body = json.dumps(
        {
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 50,
                "total_tokens": 150,
                "prompt_tokens_details": {"cached_tokens": 40, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 12,
                    "accepted_prediction_tokens": 0,
                },
            }
        }
    ).encode()
    assert last_usage(body) == Usage(100, 50, 150, cached_prompt_tokens=40, reasoning_tokens=12)


def test_chat_cache_write_tokens_are_read() -> None:
    """`prompt_tokens_details.cache_write_tokens` of an OpenAI-style usage, when present, is
    the part of the prompt written to a cache (compatibility C72)."""
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 30},
    }
    found = body_usage(json.dumps({"usage": usage}).encode())
    assert found == Usage(100, 5, 105, cached_prompt_tokens=40, cache_write_tokens=30)
    assert Usage.from_object({"prompt_tokens": 3}).cache_write_tokens == 0


def test_last_usage_wins_and_nulls_and_statistics_are_skipped() -> None:
    assert last_usage(STREAM) == Usage(20, 10, 30)


def test_cumulative_usage_in_every_chunk() -> None:
    stream = sse(
        *[
            {"usage": {"prompt_tokens": 226, "completion_tokens": n, "total_tokens": 226 + n}}
            for n in range(1, 27)
        ],
        "[DONE]",
    )
    assert last_usage(stream) == Usage(226, 26, 252)


def test_missing_total_is_the_sum() -> None:
    assert last_usage(b'{"usage":{"prompt_tokens":2,"completion_tokens":3}}') == Usage(2, 3, 5)


def test_no_usage() -> None:
    assert last_usage(b'{"choices":[]}') is None
    assert last_usage(b'{"usage": null}') is None
    assert last_usage(b'{"usage": "lots"}') is None
    assert last_usage(b'{"usage": {"prompt_tokens": 1') is None  # cut off


def test_string_containing_usage_text() -> None:
    body = b'{"content":"the \\"usage\\" of words","usage":{"total_tokens":4}}'
    assert last_usage(body) == Usage(0, 0, 4)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_stream_split_anywhere(cuts: list[int]) -> None:
    """Network chunks may break a line, a JSON object or a UTF-8 sequence anywhere."""
    tracker = StreamUsage()
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        tracker.feed(STREAM[start:end])
    assert tracker.finish() == Usage(20, 10, 30)


@given(st.text(), st.integers(min_value=0, max_value=10**9))
def test_arbitrary_content_before_usage(content: str, tokens: int) -> None:
    body = json.dumps(
        {"choices": [{"message": {"content": content}}], "usage": {"total_tokens": tokens}}
    ).encode()
    assert last_usage(body) == Usage(0, 0, tokens)


def test_stream_without_trailing_newline() -> None:
    tracker = StreamUsage()
    tracker.feed(b'data: {"usage": {"total_tokens": 7}}')
    assert tracker.finish() == Usage(0, 0, 7)


def test_body_usage_reads_the_top_level_usage_of_small_and_large_bodies() -> None:
    small = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    assert body_usage(small) == Usage(1, 2, 3)
    large = json.dumps(
        {"data": [{"embedding": [0.5] * 4096}], "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    ).encode()
    assert len(large) > 16 * 1024
    assert body_usage(large) == Usage(9, 0, 9)
    assert body_usage(b'not json, but "usage": {"total_tokens": 3}') == Usage(0, 0, 3)
    assert body_usage(b'{"usage": null}') is None


def test_stream_usage_in_an_event_that_is_not_plain_sse() -> None:
    tracker = StreamUsage()
    tracker.feed(b'event: x\n{"usage": {"total_tokens": 5}}\n')
    assert tracker.finish() == Usage(0, 0, 5)


def test_stream_with_null_usage_after_the_real_one() -> None:
    tracker = StreamUsage()
    tracker.feed(b'data: {"usage": {"total_tokens": 5}}\n\n')
    tracker.feed(b'data: {"usage": null}\n\ndata: [DONE]\n\n')
    assert tracker.finish() == Usage(0, 0, 5)
