"""Token usage of the OpenAI Responses API and the Anthropic Messages API, and the text a stream
produced so far.

Pure functions and small classes over bytes, shaped like `limits.usage`: a whole body gives a
`Usage`; a stream tracker takes the relayed chunks (`feed`) and gives the final `Usage`
(`finish`), so it fits wherever a `usage.StreamUsage` does. Both map their vendor's counts to
the OpenAI-style `Usage` as DIAL does:

- Responses: `input_tokens` is the prompt (its `input_tokens_details.cached_tokens` a part of
  it), `output_tokens` the completion, `total_tokens` as reported.
- Anthropic: its `input_tokens` excludes the cache counters, so the prompt is
  `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`, the cached part is
  the cache reads, the total is prompt + completion.

The tokens written to a prompt cache (Anthropic's `cache_creation_input_tokens`, the Responses
`input_tokens_details.cache_write_tokens`) are `Usage.cache_write_tokens`, a part of the prompt
count as the cached reads are; `limits.cost` prices both (compatibility C72).

An Anthropic `count_tokens` answer (`{"input_tokens": N}`) is no usage: that endpoint is neither
limited nor charged, so `anthropic_body_usage` finds none in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from tollgate.limits.usage import (
    MAX_CARRY,
    USAGE,
    USAGE_HEAD,
    WHOLE_PARSE_LIMIT,
    StreamUsage,
    Usage,
    body_usage,
    clamp,
    last_usage_object,
    line_cut,
    line_end,
    line_start,
    top_level_usage_object,
)


def _tokens(value: Any) -> int:
    """A token count, clamped as `limits.usage` clamps; anything but a whole number, and a
    negative one (no upstream can credit a caller), counts as zero."""
    if type(value) is int:
        return clamp(value) if value > 0 else 0
    if type(value) is float and value.is_integer():
        return clamp(int(value)) if value > 0 else 0
    return 0


def _detail(usage: dict[str, Any], details: str, name: str) -> int:
    found = usage.get(details)
    return _tokens(found.get(name)) if type(found) is dict else 0


# --- OpenAI Responses ------------------------------------------------------------------------


def responses_usage(usage: dict[str, Any]) -> Usage:
    """A Responses `usage` object as a `Usage` (missing counts are 0)."""
    prompt = _tokens(usage.get("input_tokens"))
    completion = _tokens(usage.get("output_tokens"))
    total = usage.get("total_tokens")
    return Usage(
        prompt,
        completion,
        clamp(prompt + completion) if total is None else _tokens(total),
        _detail(usage, "input_tokens_details", "cached_tokens"),
        _detail(usage, "output_tokens_details", "reasoning_tokens"),
        _detail(usage, "input_tokens_details", "cache_write_tokens"),
    )


def responses_body_usage(body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) Responses body: its top-level `usage`, else the last
    `usage` object in it (a large or broken body is scanned from the end)."""
    found = _body_usage_object(body)
    return None if found is None else responses_usage(found)


def _terminal_usage_object(event: object) -> dict[str, Any] | None:
    """`response.usage` of a Responses event (`response.completed`, `.incomplete`, `.failed`),
    or a top-level `usage`."""
    if type(event) is not dict:
        return None
    response = event.get("response")
    usage = response.get("usage") if type(response) is dict else event.get("usage")
    return usage if type(usage) is dict else None


class ResponsesStreamUsage(StreamUsage):
    """Follows a Responses SSE stream and keeps the usage of its last event that has one.

    The terminal event (`response.completed`, `response.incomplete` or `response.failed`)
    carries the whole response, its `usage` included; `response.created` and
    `response.in_progress` carry `"usage": null`, which is skipped. Lines are handled as in
    `StreamUsage`; the block holding the last usage is parsed once, by `finish`.
    """

    __slots__ = ()

    def finish(self) -> Usage | None:
        """The last usage seen."""
        if self._carry and USAGE_HEAD.search(self._carry) is not None:
            self._usage_block = self._carry
        self._carry = b""
        block = self._usage_block
        found = _last_event_usage(block, _terminal_usage_object) if block else None
        return None if found is None else responses_usage(found)


# --- Anthropic Messages ----------------------------------------------------------------------

ANTHROPIC_COUNTERS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
THINKING = "thinking_tokens"


def anthropic_usage(usage: dict[str, Any]) -> Usage:
    """An Anthropic `usage` object (or merged counters) as a `Usage`.

    Anthropic's `input_tokens` excludes the cache counters; the prompt is all three.
    """
    read = _tokens(usage.get("cache_read_input_tokens"))
    write = _tokens(usage.get("cache_creation_input_tokens"))
    prompt = clamp(_tokens(usage.get("input_tokens")) + read + write)
    completion = _tokens(usage.get("output_tokens"))
    thinking = _detail(usage, "output_tokens_details", THINKING)
    return Usage(prompt, completion, clamp(prompt + completion), read, thinking, write)


def anthropic_body_usage(body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) Messages body: its top-level `usage`."""
    found = _body_usage_object(body)
    return None if found is None else anthropic_usage(found)


def _event_usage_object(event: object) -> dict[str, Any] | None:
    """`usage` of `message_delta` (top level) or `message_start` (`message.usage`)."""
    if type(event) is not dict:
        return None
    usage = event.get("usage")
    if usage is None:
        message = event.get("message")
        usage = message.get("usage") if type(message) is dict else None
    return usage if type(usage) is dict else None


class AnthropicStreamUsage(StreamUsage):
    """Follows a Messages SSE stream and merges the usage of its events.

    `message_start` carries the input and cache counts (and the output so far); each
    `message_delta` carries the cumulative `output_tokens` and may repeat the others. A count
    an event leaves out keeps its last value; a count it has replaces the last, never adds.
    Only the few events with a `"usage": {` are parsed, as they pass.

    A block is not split into lines: the `"usage"` in it are found in C, and only the line
    around each is cut out and parsed, so the other events of a stream (`ping`, the content
    blocks and their deltas) cost nothing but that search.
    """

    __slots__ = ("_counters",)

    def __init__(self) -> None:
        super().__init__()
        self._counters: dict[str, Any] | None = None

    def _lines(self, block: bytes) -> None:
        position = block.find(USAGE)
        while position >= 0:
            if USAGE_HEAD.match(block, position) is None:  # "usage": null and the like
                position = block.find(USAGE, position + len(USAGE))
                continue
            end = line_end(block, position)
            usage = _event_usage_object(_data_payload(block[line_start(block, position) : end]))
            if usage is not None:
                self._merge(usage)
            position = block.find(USAGE, end)  # on the next line: each line is parsed once

    def _merge(self, usage: dict[str, Any]) -> None:
        counters = self._counters
        if counters is None:
            counters = self._counters = {}
        for name in ANTHROPIC_COUNTERS:
            value = usage.get(name)
            if value is not None:
                counters[name] = _tokens(value)
        details = usage.get("output_tokens_details")
        if type(details) is dict and details.get(THINKING) is not None:
            counters["output_tokens_details"] = {THINKING: _tokens(details[THINKING])}

    def finish(self) -> Usage | None:
        """The merged usage."""
        if self._carry:
            self._lines(self._carry)
            self._carry = b""
        counters = self._counters
        return None if counters is None else anthropic_usage(counters)


# --- Shared helpers --------------------------------------------------------------------------


def _data_payload(line: bytes) -> object:
    """The parsed JSON of an SSE `data:` line, or None."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        return orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return None


def _body_usage_object(body: bytes) -> dict[str, Any] | None:
    if len(body) <= WHOLE_PARSE_LIMIT:
        found = top_level_usage_object(body)
        if found is not None:
            return found
    return last_usage_object(body)


def _last_event_usage(
    block: bytes, pick: Callable[[object], dict[str, Any] | None]
) -> dict[str, Any] | None:
    """The usage of the last event in `block` that has a `"usage": {`: its `data:` line is
    parsed whole and `pick` reads the usage from it; a line that does not parse is scanned."""
    position = len(block)
    while True:
        position = block.rfind(USAGE, 0, position)
        if position < 0:
            return None
        if USAGE_HEAD.match(block, position) is None:
            continue
        line = block[line_start(block, position) : line_end(block, position)]
        found = pick(_data_payload(line))
        return found if found is not None else last_usage_object(line)


# --- Text produced so far --------------------------------------------------------------------

# Responses events whose `delta` string is produced text (audio deltas are not).
RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
    }
)
# Anthropic delta types and the member holding their text (`signature_delta` is no output).
ANTHROPIC_TEXT_DELTAS = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}


def chat_text(event: object) -> str:
    """Text of a chat or legacy completions stream event: for each choice, `delta.content`,
    `delta.refusal`, `delta.reasoning_content`, tool calls' `function.arguments`, or `text`."""
    if type(event) is not dict:
        return ""
    choices = event.get("choices")
    if type(choices) is not list:
        return ""
    parts: list[str] = []
    for choice in choices:
        if type(choice) is not dict:
            continue
        text = choice.get("text")
        if type(text) is str:
            parts.append(text)
        delta = choice.get("delta")
        if type(delta) is not dict:
            continue
        for name in ("content", "refusal", "reasoning_content"):
            text = delta.get(name)
            if type(text) is str:
                parts.append(text)
        calls = delta.get("tool_calls")
        if type(calls) is list:
            for call in calls:
                function = call.get("function") if type(call) is dict else None
                arguments = function.get("arguments") if type(function) is dict else None
                if type(arguments) is str:
                    parts.append(arguments)
    return "".join(parts)


def responses_text(event: object) -> str:
    """Text of a Responses stream event: the `delta` of the text-producing `*.delta` events."""
    if type(event) is not dict or event.get("type") not in RESPONSES_TEXT_DELTAS:
        return ""
    delta = event.get("delta")
    return delta if type(delta) is str else ""


def anthropic_text(event: object) -> str:
    """Text of an Anthropic stream event: a `content_block_delta`'s text, thinking or partial
    JSON of a tool's input."""
    if type(event) is not dict or event.get("type") != "content_block_delta":
        return ""
    delta = event.get("delta")
    if type(delta) is not dict:
        return ""
    kind = delta.get("type")
    member = ANTHROPIC_TEXT_DELTAS.get(kind) if type(kind) is str else None
    text = delta.get(member) if member is not None else None
    return text if type(text) is str else ""


class ProducedText:
    """The text a relayed stream produced, chunk by chunk (for a running token count).

    `feed` returns the text of the events completed in the chunk; a partial last line waits
    for the next chunk. A line is parsed only when it holds the API's marker (`"choices"`,
    `.delta"`, `content_block_delta`), so `ping`, `event:` and bookkeeping lines cost one
    substring search.
    """

    __slots__ = ("_carry", "_extract", "_marker")

    def __init__(self, marker: bytes, extract: Callable[[object], str]) -> None:
        self._marker = marker
        self._extract = extract
        self._carry = b""

    @classmethod
    def chat(cls) -> ProducedText:
        """For chat/completions and legacy completions streams."""
        return cls(b'"choices"', chat_text)

    @classmethod
    def responses(cls) -> ProducedText:
        return cls(b'.delta"', responses_text)

    @classmethod
    def anthropic(cls) -> ProducedText:
        return cls(b"content_block_delta", anthropic_text)

    def feed(self, chunk: bytes) -> str:
        data = self._carry + chunk if self._carry else chunk
        cut = line_cut(data)
        self._carry = data[cut:] if len(data) - cut <= MAX_CARRY else b""
        if not cut or self._marker not in data:
            return ""
        return self._read(data[:cut] if cut < len(data) else data)

    def end(self) -> str:
        """The text of a last line that had no line end."""
        carry, self._carry = self._carry, b""
        return self._read(carry) if carry and self._marker in carry else ""

    def _read(self, block: bytes) -> str:
        marker = self._marker
        extract = self._extract
        parts = [extract(_data_payload(line)) for line in block.splitlines() if marker in line]
        return "".join(parts)


# --- Text of a whole answer ------------------------------------------------------------------


def _document(body: bytes) -> dict[str, Any] | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if type(document) is dict else None


def _strings(parts: list[str], value: object, *names: str) -> None:
    """Append `value[name]` for each of `names` that is a string."""
    if type(value) is dict:
        for name in names:
            text = value.get(name)
            if type(text) is str:
                parts.append(text)


def _content_parts(parts: list[str], content: object) -> None:
    """A message's `content`: a string, or the `text` (`refusal`) of each of its parts."""
    if type(content) is str:
        parts.append(content)
    elif type(content) is list:
        for part in content:
            _strings(parts, part, "text", "refusal")


def chat_body_text(body: bytes) -> str | None:
    """Text of a whole chat or legacy completions answer: for each choice, `text`, or its
    `message`'s `content`, `refusal`, `reasoning_content` and tool calls' `arguments`.
    None when the body is not a JSON object."""
    document = _document(body)
    if document is None:
        return None
    choices = document.get("choices")
    parts: list[str] = []
    for choice in choices if type(choices) is list else ():
        if type(choice) is not dict:
            continue
        _strings(parts, choice, "text")
        message = choice.get("message")
        if type(message) is not dict:
            continue
        _content_parts(parts, message.get("content"))
        _strings(parts, message, "refusal", "reasoning_content")
        calls = message.get("tool_calls")
        for call in calls if type(calls) is list else ():
            _strings(parts, call.get("function") if type(call) is dict else None, "arguments")
        _strings(parts, message.get("function_call"), "arguments")
    return "".join(parts)


def responses_body_text(body: bytes) -> str | None:
    """Text of a whole Responses answer: the items of its `output`: a message's text and
    refusals, a function or tool call's `arguments` (`input`, `code`), a reasoning item's
    summary and text. None when the body is not a JSON object."""
    document = _document(body)
    if document is None:
        return None
    output = document.get("output")
    parts: list[str] = []
    for item in output if type(output) is list else ():
        if type(item) is not dict:
            continue
        _strings(parts, item, "arguments", "input", "code")
        for member in ("content", "summary"):
            _content_parts(parts, item.get(member))
    return "".join(parts)


def anthropic_body_text(body: bytes) -> str | None:
    """Text of a whole Messages answer: its `content` blocks' text and thinking, and a tool
    call's `input` as compact JSON. None when the body is not a JSON object."""
    document = _document(body)
    if document is None:
        return None
    content = document.get("content")
    parts: list[str] = []
    for block in content if type(content) is list else ():
        if type(block) is not dict:
            continue
        _strings(parts, block, "text", "thinking")
        if "input" in block and block.get("type") in ("tool_use", "server_tool_use"):
            parts.append(orjson.dumps(block["input"], option=orjson.OPT_NON_STR_KEYS).decode())
    return "".join(parts)


# --- The usage format of each API family -----------------------------------------------------


class UsageFormat(NamedTuple):
    """How one API family reports usage: what reads a whole answer, what follows a stream,
    what collects the text a stream produced, and what reads the text of a whole answer (None
    when it is not a JSON object); the last two serve an estimate when no usage came
    (compatibility C71)."""

    name: str
    body: Callable[[bytes], Usage | None]  # a whole answer, or the tail of a long one
    stream: Callable[[], StreamUsage]  # an event stream
    produced: Callable[[], ProducedText]
    text: Callable[[bytes], str | None]


OPENAI = UsageFormat("openai", body_usage, StreamUsage, ProducedText.chat, chat_body_text)
RESPONSES = UsageFormat(
    "responses",
    responses_body_usage,
    ResponsesStreamUsage,
    ProducedText.responses,
    responses_body_text,
)
ANTHROPIC = UsageFormat(
    "anthropic",
    anthropic_body_usage,
    AnthropicStreamUsage,
    ProducedText.anthropic,
    anthropic_body_text,
)
