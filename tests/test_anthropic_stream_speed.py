"""The stream usage parsers' scans (issue 12): the Anthropic parser cuts out and parses only
the lines around a `"usage": {`, the OpenAI and Responses trackers look for one from a block's
end; each reads what the parser it replaced read."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from tollgate.limits.api_usage import (
    ANTHROPIC_COUNTERS,
    THINKING,
    AnthropicStreamUsage,
    ResponsesStreamUsage,
    _data_payload,
    _event_usage_object,
    anthropic_usage,
)
from tollgate.limits.usage import (
    NULL_USAGE,
    USAGE,
    USAGE_HEAD,
    StreamUsage,
    Usage,
    line_cut,
    line_start,
)


class LineByLine(AnthropicStreamUsage):
    """The parser as it was before the scan: every complete line looked at in Python."""

    __slots__ = ()

    def _lines(self, block: bytes) -> None:
        for line in block.splitlines():
            if USAGE not in line or USAGE_HEAD.search(line) is None:
                continue
            usage = _event_usage_object(_data_payload(line))
            if usage is not None:
                self._merge(usage)


class Recording(AnthropicStreamUsage):
    """Keeps every usage object merged."""

    __slots__ = ("merged",)

    def __init__(self) -> None:
        super().__init__()
        self.merged: list[dict[str, Any]] = []

    def _merge(self, usage: dict[str, Any]) -> None:
        self.merged.append(usage)
        super()._merge(usage)


def event(name: str, data: object, newline: str = "\n") -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {name}{newline}data: {payload}{newline}{newline}"


def delta(text: str) -> str:
    return event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


def message_start(usage: dict[str, Any] | None) -> str:
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant"}
    if usage is not None:
        message["usage"] = usage
    return event("message_start", {"type": "message_start", "message": message})


def message_delta(usage: dict[str, Any] | None) -> str:
    body: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if usage is not None:
        body["usage"] = usage
    return event("message_delta", body)


PING = event("ping", {"type": "ping"})
STOP = event("message_stop", {"type": "message_stop"})
START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 7,
    "cache_read_input_tokens": 2048,
    "output_tokens": 1,
}


def feed(tracker: StreamUsage, data: bytes, cuts: list[int]) -> Usage | None:
    for start, end in itertools.pairwise([0, *cuts, len(data)]):
        tracker.feed(data[start:end])
    return tracker.finish()


def both(data: bytes, cuts: list[int] | None = None) -> Usage | None:
    """What the scan reads, asserted equal to what the line-by-line parser reads."""
    found = feed(AnthropicStreamUsage(), data, cuts or [])
    assert found == feed(LineByLine(), data, cuts or []), cuts
    return found


def test_usage_in_message_delta_only() -> None:
    data = (message_start(None) + delta("Hi") + message_delta({"output_tokens": 9}) + STOP).encode()
    assert both(data) == Usage(0, 9, 9)
    for cut in range(len(data) + 1):
        assert both(data, [cut]) == Usage(0, 9, 9)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_an_event_split_across_chunks_at_every_byte(newline: str) -> None:
    text = message_start(START_USAGE) + PING + delta("Hello") + message_delta({"output_tokens": 5})
    data = (text + STOP).replace("\n", newline).encode()
    expected = Usage(2080, 5, 2085, 2048, 0, 7)
    assert both(data) == expected
    for cut in range(len(data) + 1):
        assert both(data, [cut]) == expected
    assert both(data, list(range(1, len(data)))) == expected  # byte by byte


def test_the_word_usage_in_text_and_tool_input_is_no_usage() -> None:
    tool = {
        "type": "content_block_start",
        "index": 1,
        # A real `"usage": {` key, but of a tool's input: no usage of the message.
        "content_block": {"type": "tool_use", "id": "t", "name": "n", "input": {"usage": {"a": 1}}},
    }
    data = (
        message_start(START_USAGE)
        + delta('the "usage": {"output_tokens": 999} of it')  # escaped in the JSON string
        + event("content_block_start", tool)
        + event("usage", {"type": "usage", "note": "usage"})  # an event named usage
        + message_delta({"output_tokens": 3})
        + STOP
    ).encode()
    assert b'"usage":{"a":1}' in data
    assert both(data) == Usage(2080, 3, 2083, 2048, 0, 7)


def test_several_usage_objects_on_one_line_parse_it_once() -> None:
    line = {
        "type": "message_delta",
        "delta": {"usage": None, "stop_reason": "end_turn"},
        "context": {"usage": {"output_tokens": 77}},  # nested: not the event's usage
        "usage": {"output_tokens": 4},
    }
    data = (message_start(START_USAGE) + event("message_delta", line) + STOP).encode()
    tracker = Recording()
    tracker.feed(data)
    assert [usage.get("output_tokens") for usage in tracker.merged] == [1, 4]
    assert both(data) == Usage(2080, 4, 2084, 2048, 0, 7)


def test_the_last_count_wins_and_thinking_is_kept() -> None:
    data = (
        message_start(START_USAGE)
        + message_delta({"output_tokens": 3, "input_tokens": 30})
        + message_delta(
            {"output_tokens": 8, "output_tokens_details": {THINKING: 2}, "input_tokens": None}
        )
        + STOP
    ).encode()
    assert both(data) == Usage(2085, 8, 2093, 2048, 2, 7)


def test_a_broken_usage_line_is_skipped_and_the_next_read() -> None:
    data = (
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":5\n\n'
        b'data: {"usage": null}\n\n'
        b'data:{"type":"message_delta","usage" : {"output_tokens":2}}\n\n'
        b'  data: {"type":"message_delta","usage":\t{"output_tokens":3}}  \n\n'
    )
    assert both(data) == Usage(0, 3, 3)
    assert both(data, [7, 60, 61, 100]) == Usage(0, 3, 3)


def test_line_start() -> None:
    data = b"ab\ncd\r\nef\rgh"
    assert [line_start(data, i) for i in (0, 1, 3, 4, 7, 8, 10, 11)] == [0, 0, 3, 3, 7, 7, 10, 10]
    for i in range(len(data) + 1):  # where the line holding `data[i]` begins
        assert line_start(data, i) == line_cut(data[:i])


def random_stream(rng: random.Random) -> bytes:
    """A Messages stream with usage in any of its events, or none."""

    def usage() -> dict[str, Any] | None:
        if rng.random() < 0.3:
            return None
        names = [name for name in ANTHROPIC_COUNTERS if rng.random() < 0.6]
        found: dict[str, Any] = {
            name: rng.choice([0, 1, 5, 2**70, -3, 2.0, None]) for name in names
        }
        if rng.random() < 0.2:
            found["output_tokens_details"] = {THINKING: rng.randrange(5)}
        return found

    parts = [message_start(usage())]
    for _ in range(rng.randrange(6)):
        parts.append(rng.choice([PING, delta(rng.choice(["x", '"usage": {', "usage"]))]))
    for _ in range(rng.randrange(3)):
        parts.append(message_delta(usage()))
    parts.append(STOP)
    newline = rng.choice(["\n", "\r\n", "\r"])
    text = "".join(parts).replace("\n", newline)
    if rng.random() < 0.2:
        text = text.rstrip(newline)  # no line end at the end
    return text.encode()


def test_reads_what_the_line_by_line_parser_read() -> None:
    rng = random.Random(12)
    for _ in range(400):
        data = random_stream(rng)
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(min(12, len(data) - 1))))
        both(data)
        both(data, cuts)


def test_the_fake_models_stream_in_one_chunk_and_event_by_event() -> None:
    usage = {
        "input_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
        "service_tier": "standard",
    }
    events = [
        message_start(usage),
        event("content_block_start", {"type": "content_block_start", "index": 0}),
        PING,
        *(delta(word) for word in ("Hello", " from", " the", " fake", " model.")),
        event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        message_delta({"output_tokens": 5}),
        STOP,
    ]
    data = "".join(events).encode()
    expected = anthropic_usage({"input_tokens": 2, "output_tokens": 5})
    assert both(data) == expected
    ends = list(itertools.accumulate(len(part.encode()) for part in events))[:-1]
    assert both(data, ends) == expected


# --- OpenAI and Responses: the block holding the last usage ---------------------------------


def counted_then_searched(tracker: StreamUsage, block: bytes) -> None:
    """`StreamUsage._lines` as it was: `"usage":null` counted, then the whole block searched."""
    nulls = block.count(NULL_USAGE)
    if nulls and nulls == block.count(USAGE):
        return
    if USAGE_HEAD.search(block) is not None:
        tracker._usage_block = block


class CountedOpenAI(StreamUsage):
    __slots__ = ()
    _lines = counted_then_searched


class CountedResponses(ResponsesStreamUsage):
    __slots__ = ()
    _lines = counted_then_searched


def chat_event(rng: random.Random) -> str:
    usage = rng.choice(
        [
            '"usage":null',
            '"usage": null',
            '"usage":{"prompt_tokens":' + str(rng.randrange(9)) + ',"completion_tokens":3}',
            '"usage" :\n{"prompt_tokens":1}',  # the pattern across a line end: no usage
            '"usage":[1]',
            '"usage_per_model":{"a":1}',
            '"text":"\\"usage\\": {\\"prompt_tokens\\": 50}"',  # escaped: no usage
        ]
    )
    return f'data: {{"choices":[{{"delta":{{"content":"x"}}}}],{usage}}}\n\n'


def responses_event(rng: random.Random) -> str:
    usage = rng.choice(["null", '{"input_tokens":' + str(rng.randrange(9)) + ',"output_tokens":2}'])
    kind = rng.choice(["response.created", "response.output_text.delta", "response.completed"])
    return f'event: {kind}\ndata: {{"type":"{kind}","response":{{"usage":{usage}}}}}\n\n'


@pytest.mark.parametrize(
    ("tracker", "reference", "make"),
    [
        (StreamUsage, CountedOpenAI, chat_event),
        (ResponsesStreamUsage, CountedResponses, responses_event),
    ],
)
def test_the_last_usage_block_is_the_one_the_counting_tracker_kept(
    tracker: type[StreamUsage], reference: type[StreamUsage], make: Any
) -> None:
    rng = random.Random(70)
    for _ in range(400):
        text = "".join(make(rng) for _ in range(rng.randrange(1, 8)))
        if rng.random() < 0.3:
            text = text.replace("\n", "\r\n")
        data = text.encode()
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(min(10, len(data) - 1))))
        for split in ([], cuts):
            found = feed(tracker(), data, split)
            assert found == feed(reference(), data, split), (data, split)


def test_a_block_of_nulls_before_the_usage_object_keeps_the_block() -> None:
    block = (
        b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
        + b'data: {"choices":[],"usage":null}\n\n' * 3
    )
    tracker = StreamUsage()
    tracker.feed(block)
    assert tracker.finish() == Usage(4, 2, 6)
    only_nulls = StreamUsage()
    only_nulls.feed(b'data: {"usage":null}\n\ndata: {"usage": null}\n\n')
    assert only_nulls.finish() is None
