"""Asking for stream usage and hiding it from a client that did not ask (issue 12)."""

from __future__ import annotations

import itertools
import json
import timeit
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollgate.limits.usage import Usage
from tollgate.pipeline import include_usage
from tollgate.pipeline.include_usage import HideUsage, ask_for_usage

# --- ask_for_usage ---------------------------------------------------------------------------


def ask(request: dict[str, Any], body: bytes | None = None) -> dict[str, Any] | None:
    raw = json.dumps(request).encode() if body is None else body
    rewritten = ask_for_usage(raw, request)
    return None if rewritten is None else orjson.loads(rewritten)


def test_a_plain_stream_asks_for_usage_and_keeps_the_clients_bytes() -> None:
    body = b'{"model": "gpt-4o",\n "stream": true, "n": 1.50, "messages": []}'
    rewritten = ask_for_usage(body, orjson.loads(body))
    assert rewritten == (
        b'{"stream_options":{"include_usage":true},"model": "gpt-4o",\n'
        b' "stream": true, "n": 1.50, "messages": []}'
    )
    leading = b'  \n{"stream":true,"prompt":"x"}'
    assert ask_for_usage(leading, orjson.loads(leading)) == (
        b'  \n{"stream_options":{"include_usage":true},"stream":true,"prompt":"x"}'
    )


@pytest.mark.parametrize(
    "request_",
    [
        {"messages": []},
        {"stream": False, "messages": []},
        {"stream": "true", "messages": []},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": "yes"},
        {"stream": True, "stream_options": {"include_usage": "yes"}},
        {"stream": True, "stream_options": {"include_usage": 0}},
    ],
)
def test_nothing_to_change(request_: dict[str, Any]) -> None:
    assert ask(request_) is None


def test_other_stream_options_members_are_kept() -> None:
    found = ask({"stream": True, "stream_options": {"include_obfuscation": False}, "x": [1]})
    assert found == {
        "stream": True,
        "stream_options": {"include_obfuscation": False, "include_usage": True},
        "x": [1],
    }


def test_null_stream_options_and_an_explicit_false_are_overridden() -> None:
    """A client that said `include_usage: false` is asked for all the same (and the usage is
    hidden from it), or its call would go uncounted."""
    assert ask({"stream": True, "stream_options": None}) == {
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert ask({"stream": True, "stream_options": {"include_usage": False}}) == {
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_a_body_orjson_cannot_write_is_left_alone() -> None:
    assert ask({"stream": True, "stream_options": {}, "seed": 2**70}) is None


# --- HideUsage: samples ----------------------------------------------------------------------

HEAD = {
    "id": "chatcmpl-D0q8",
    "object": "chat.completion.chunk",
    "created": 1769092764,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_29330a9688",
}
USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 0},
}
EXPECTED_USAGE = Usage(19, 10, 29, 0, 3)
DELTAS: list[dict[str, Any]] = [
    {"role": "assistant", "content": "", "refusal": None},
    {"content": "Hello"},
    {"content": ' "usage": null, '},
    {"content": "caf\u00e9 \U0001f600"},
    {},
]


def chunk(delta: dict[str, Any], with_usage: bool, finish: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        **HEAD,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        event["usage"] = None
    event["obfuscation"] = "ZGF"
    return event


def openai_stream(with_usage: bool, newline: bytes = b"\n") -> bytes:
    """What OpenAI sends for a streamed chat call, with or without `include_usage`."""
    events = [
        chunk(delta, with_usage, "stop" if n == len(DELTAS) - 1 else None)
        for n, delta in enumerate(DELTAS)
    ]
    if with_usage:
        events.append({**HEAD, "choices": [], "usage": USAGE, "obfuscation": "xy"})
    lines = [b"data: " + orjson.dumps(event) for event in events]
    lines.append(b"data: [DONE]")
    return b"".join(line + newline + newline for line in lines)


def hide(data: bytes, *cuts: int) -> tuple[bytes, Usage | None]:
    hider = HideUsage()
    bounds = [0, *cuts, len(data)]
    out = b"".join(hider.filter(data[start:end]) for start, end in itertools.pairwise(bounds))
    return out + hider.end(), hider.usage


NEWLINES = [b"\n", b"\r\n", b"\r"]


@pytest.mark.parametrize("newline", NEWLINES, ids=["lf", "crlf", "cr"])
def test_the_client_sees_the_stream_without_include_usage(newline: bytes) -> None:
    asked = openai_stream(True, newline)
    plain = openai_stream(False, newline)
    assert hide(asked) == (plain, EXPECTED_USAGE)


@pytest.mark.parametrize("newline", NEWLINES, ids=["lf", "crlf", "cr"])
def test_split_at_every_byte(newline: bytes) -> None:
    asked = openai_stream(True, newline)
    plain = openai_stream(False, newline)
    for cut in range(len(asked) + 1):
        assert hide(asked, cut) == (plain, EXPECTED_USAGE), cut


def test_fed_byte_by_byte() -> None:
    asked = openai_stream(True)
    assert hide(asked, *range(1, len(asked))) == (openai_stream(False), EXPECTED_USAGE)


@given(st.lists(st.integers(min_value=0, max_value=len(openai_stream(True, b"\r\n")))))
def test_split_anywhere_many_times(cuts: list[int]) -> None:
    asked = openai_stream(True, b"\r\n")
    assert hide(asked, *sorted(cuts)) == (openai_stream(False, b"\r\n"), EXPECTED_USAGE)


def test_whole_events_without_usage_pass_as_they_are() -> None:
    hider = HideUsage()
    event = openai_stream(False).split(b"\n\n")[1] + b"\n\n"
    assert hider.filter(event) is event
    assert hider.filter(event.replace(b"\n", b"\r\n")) == event.replace(b"\n", b"\r\n")


def test_an_upstream_that_ignored_the_option_is_unchanged() -> None:
    plain = openai_stream(False)
    for cut in range(0, len(plain) + 1, 7):
        assert hide(plain, cut) == (plain, None)


def test_usage_on_a_chunk_with_choices_is_left_alone() -> None:
    """DIAL's adapters put usage on the last chunk with choices, asked or not."""
    data = (
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
        b'"usage":{"total_tokens":3}}\n\n'
    )
    assert hide(data) == (data, None)


def test_null_usage_anywhere_in_the_object_and_any_spacing() -> None:
    cases = {
        b'data: {"usage":null,"choices":[{"delta":{"content":"a"}}]}\n\n': (
            b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        ),
        b'data: {"id": "x", "usage": null, "choices": []}\n\n': (
            b'data: {"id": "x", "choices": []}\n\n'
        ),
        b'data: {"id": "x", "choices": [], "usage" : null }\n\n': (
            b'data: {"id": "x", "choices": [] }\n\n'
        ),
        b'data:{"usage":null}\n\n': b"data:{}\n\n",
        # a nested "usage": null is the content's business, the top-level one goes
        b'data: {"choices":[{"delta":{"x":{"usage":null}}}],"usage":null,"z":{"a":1}}\n\n': (
            b'data: {"choices":[{"delta":{"x":{"usage":null}}}],"z":{"a":1}}\n\n'
        ),
    }
    for asked, plain in cases.items():
        assert hide(asked) == (plain, None)


@pytest.mark.parametrize(
    "data",
    [
        b': a comment with "usage": null\n\n',
        b'data: not json "usage": {"total_tokens": 1}\n\n',
        b'data: {"usage": 5, "choices": []}\n\n',
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"total_tokens":1}\n\n',
        b'event: usage\ndata: {"usage": "none"}\n\n',
        b'data: ["usage", null]\n\n',
        b"\xff\xfe\x00\n\n",
        b'data: {"usage":{"total_tokens":1}',
    ],
)
def test_garbage_passes_unchanged(data: bytes) -> None:
    for cut in range(len(data) + 1):
        assert hide(data, cut) == (data, None)


def test_the_usage_event_goes_whole_with_its_other_lines() -> None:
    data = (
        b'id: 7\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'id: 8\nevent: chunk\ndata: {"choices":[],"usage":{"total_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )
    expected = b'id: 7\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n'
    for cut in range(len(data) + 1):
        assert hide(data, cut) == (expected, Usage(0, 0, 4)), cut


def test_a_usage_event_without_choices_is_also_the_usage_only_event() -> None:
    assert hide(b'data: {"usage":{"total_tokens":4}}\n\ndata: [DONE]\n\n') == (
        b"data: [DONE]\n\n",
        Usage(0, 0, 4),
    )


def test_a_truncated_stream_flushes_what_it_held() -> None:
    asked = openai_stream(True)
    cut = asked.index(b'"content":"Hello"') + 3
    out, usage = hide(asked[:cut])
    assert out == openai_stream(False)[: len(out)]
    assert out.endswith(asked[asked.rfind(b"\n\n", 0, cut) + 2 : cut])
    assert usage is None
    # the usage-only event without its blank line, then nothing: still hidden
    end = asked.index(b"data: [DONE]") - 2
    assert hide(asked[:end]) == (
        openai_stream(False).removesuffix(b"data: [DONE]\n\n"),
        EXPECTED_USAGE,
    )


def test_events_are_held_only_until_they_end() -> None:
    hider = HideUsage()
    event = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
    assert hider.filter(event[:10]) == b""
    assert hider.filter(event[10:-1]) == b""
    assert hider.filter(event[-1:]) == b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    # a CR at the very end may be half of a CRLF: the event waits for the next byte
    assert hider.filter(b'data: {"usage":null}\r\n\r') == b""
    assert hider.filter(b"\n") == b"data: {}\r\n\r\n"
    assert hider.end() == b""


def test_an_overlong_event_is_passed_on_as_it_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(include_usage, "MAX_EVENT", 64)
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * 200 + b'"}}],"usage":null}\n\n'
    after = b'data: {"choices":[],"usage":{"total_tokens":2}}\n\ndata: [DONE]\n\n'
    hider = HideUsage()
    first = hider.filter(big[:100])
    assert first == big[:100]
    rest = hider.filter(big[100:150]) + hider.filter(big[150:] + after) + hider.end()
    assert first + rest == big + b"data: [DONE]\n\n"
    assert hider.usage == Usage(0, 0, 2)


def test_pass_through_is_cheap() -> None:
    """A typical chunk without usage costs a few substring checks (report, not a hard limit)."""
    hider = HideUsage()
    event = openai_stream(False).split(b"\n\n")[1] + b"\n\n"
    per_call = min(timeit.repeat(lambda: hider.filter(event), number=2000, repeat=3)) / 2000
    assert per_call < 50e-6


USAGE_ONLY = (
    b'data: {"id":"x","usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7},'
    b'"choices":[]}'
)
NULL_USAGE = b'data: {"id":"x","choices":[{"delta":{"content":"a"}}],"usage":null}'
WITHOUT = b'data: {"id":"x","choices":[{"delta":{"content":"a"}}]}'


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            NULL_USAGE + b"\n\n" + USAGE_ONLY + b"\n\ndata: [DONE]\n\n",
            WITHOUT + b"\n\ndata: [DONE]\n\n",
        ),
        (NULL_USAGE + b"\n\n" + USAGE_ONLY, WITHOUT + b"\n\n"),
        (USAGE_ONLY, b""),
        (NULL_USAGE + b"\n\n\n" + USAGE_ONLY + b"\n\n", WITHOUT + b"\n\n\n"),
    ],
    ids=["whole-stream", "last-event-without-blank-line", "usage-event-alone", "extra-newline"],
)
def test_a_whole_stream_in_one_read_is_cut_event_by_event(block: bytes, expected: bytes) -> None:
    hide = HideUsage()
    assert hide.filter(block) + hide.end() == expected
    assert hide.usage is not None and hide.usage.total_tokens == 7


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # OpenAI's chunk as the fake model writes it: the quickest cut.
        (
            b'data: {"id":"c","choices":[{"delta":{"content":"Hi"}}],"usage":null}\n\n',
            b'data: {"id":"c","choices":[{"delta":{"content":"Hi"}}]}\n\n',
        ),
        # With OpenAI's `obfuscation` after it.
        (
            b'data: {"id":"c","choices":[],"usage":null,"obfuscation":"x1y2"}\n\n',
            b'data: {"id":"c","choices":[],"obfuscation":"x1y2"}\n\n',
        ),
        # Content that merely mentions the member is not touched.
        (
            b'data: {"choices":[{"delta":{"content":"\\"usage\\":null"}}],"usage":null}\n\n',
            b'data: {"choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n',
        ),
        # Not the last member, nor followed only by `obfuscation`: the general path cuts it.
        (
            b'data: {"choices":[],"usage":null,"meta":{"a":1}}\n\n',
            b'data: {"choices":[],"meta":{"a":1}}\n\n',
        ),
        # A chunk of two events is never cut as one.
        (
            b'data: {"choices":[],"usage":{"total_tokens":3}}\n\n'
            b'data: {"choices":[{"delta":{}}],"usage":null}\n\n',
            b'data: {"choices":[{"delta":{}}]}\n\n',
        ),
    ],
)
def test_the_quick_cuts_give_what_the_general_path_gives(event: bytes, expected: bytes) -> None:
    assert HideUsage().filter(event) == expected
    slow = HideUsage()
    assert slow.filter(event[:3]) + slow.filter(event[3:]) + slow.end() == expected


def test_the_usage_only_event_is_dropped_by_the_quick_cut_and_its_usage_kept() -> None:
    hide = HideUsage()
    event = (
        b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,'
        b'"total_tokens":5}}\n\n'
    )
    assert hide.filter(event) == b""
    assert hide.usage == Usage(2, 3, 5)
    assert hide.filter(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
