"""Token usage of a response: the last `usage` object of a JSON body or SSE stream.

Pure functions over bytes. Unlike DIAL's 2024 parser, a `usage` object with nested
`*_tokens_details` objects is read in full instead of being counted as zero (compatibility C28).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

USAGE = b'"usage"'
NULL_USAGE = b'"usage":null'  # as OpenAI writes it on every chunk of a stream that asked
WHOLE_PARSE_LIMIT = 16 * 1024
USAGE_HEAD = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*\{')
MAX_CLOSING_BRACES_TRIED = 64
MAX_CARRY = 16 * 1024 * 1024  # an SSE line longer than this cannot be the usage line we want
# The largest count any ledger keeps (tokens, requests, nano-dollars): within DIAL's Java `Long`
# (an upstream may report 1e30 tokens), and the largest double below 2^63, so the Redis scripts,
# which count in doubles, keep the same figure exactly (limits/lua/windows.lua, CAP).
USAGE_MAX = 2**63 - 1024


def clamp(count: int) -> int:
    """`count`, at most `USAGE_MAX`."""
    return count if count <= USAGE_MAX else USAGE_MAX


class Usage(NamedTuple):
    """Token counts of one response (a named tuple: one is built per call).

    As in OpenAI's usage (and DIAL's, whatever the API), `prompt_tokens` counts every token
    the model read: the cached reads (`cached_prompt_tokens`) and the tokens written to a
    prompt cache (`cache_write_tokens`) are parts of it; `reasoning_tokens` is a part of
    `completion_tokens`.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    @classmethod
    def from_object(cls, usage: dict[str, Any]) -> Usage:
        get = usage.get
        prompt = _count(get("prompt_tokens"))
        completion = _count(get("completion_tokens"))
        total = get("total_tokens")
        prompt_details = get("prompt_tokens_details")
        completion_details = get("completion_tokens_details")
        if type(prompt_details) is not dict:
            prompt_details = None
        return cls(
            prompt,
            completion,
            clamp(prompt + completion) if total is None else _count(total),
            0 if prompt_details is None else _count(prompt_details.get("cached_tokens")),
            (
                _count(completion_details.get("reasoning_tokens"))
                if type(completion_details) is dict
                else 0
            ),
            0 if prompt_details is None else _count(prompt_details.get("cache_write_tokens")),
        )


def _count(value: Any) -> int:
    """A token count, at most `USAGE_MAX`; anything that is not a whole number counts as zero."""
    if type(value) is int:
        return value if value <= USAGE_MAX else USAGE_MAX
    if type(value) is float and value.is_integer():
        return clamp(int(value))
    return 0


def _object_at(data: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that starts at `data[start] == '{'`, or None if it does not parse.

    The object ends at the first closing brace that balances the braces before it (counted in
    C, without slicing); only that candidate is parsed. A brace inside a string can unbalance
    the count, so a failed parse moves on to the next candidate.
    """
    end = start
    for _ in range(MAX_CLOSING_BRACES_TRIED):
        end = data.find(b"}", end + 1)
        if end < 0:
            return None
        if data.count(b"{", start, end) != data.count(b"}", start, end + 1):
            continue
        try:
            value = orjson.loads(data[start : end + 1])
        except orjson.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def last_usage_object(data: bytes) -> dict[str, Any] | None:
    """The last `"usage": {...}` object in `data`, as parsed (every API family's fields);
    `"usage": null` and `usage_per_model` are skipped."""
    position = len(data)
    while True:
        position = data.rfind(USAGE, 0, position)
        if position < 0:
            return None
        head = USAGE_HEAD.match(data, position)
        if head is not None:
            found = _object_at(data, head.end() - 1)
            if found is not None:
                return found


def last_usage(data: bytes) -> Usage | None:
    """The last `"usage": {...}` in `data`, as OpenAI-style usage."""
    found = last_usage_object(data)
    return None if found is None else Usage.from_object(found)


def body_usage(body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) response body.

    A small JSON body is parsed once and its top-level `usage` read; anything else (a large
    body such as many embeddings, a body that is not a JSON object) is scanned from the end.
    """
    if len(body) <= WHOLE_PARSE_LIMIT:
        found = _top_level_usage(body)
        if found is not None:
            return found
    return last_usage(body)


def top_level_usage_object(document: bytes) -> dict[str, Any] | None:
    """The `usage` object at the top of a JSON document, if it is one, as parsed."""
    try:
        value = orjson.loads(document)
    except orjson.JSONDecodeError:
        return None
    if type(value) is dict:
        usage = value.get("usage")
        if type(usage) is dict:
            return usage
    return None


def _top_level_usage(document: bytes) -> Usage | None:
    found = top_level_usage_object(document)
    return None if found is None else Usage.from_object(found)


def _event_usage(block: bytes) -> Usage | None:
    """Usage of the last SSE event in `block` that has a `usage` object.

    That event's `data:` line is parsed whole, once; anything unusual falls back to the scan.
    """
    position = len(block)
    while True:
        position = block.rfind(USAGE, 0, position)
        if position < 0:
            return None
        if USAGE_HEAD.match(block, position) is None:
            continue  # "usage": null and the like
        start = block.rfind(b"\n", 0, position) + 1
        end = block.find(b"\n", position)
        line = block[start : len(block) if end < 0 else end].strip()
        found = _top_level_usage(line[5:]) if line.startswith(b"data:") else None
        return found if found is not None else last_usage(block)


def line_end(data: bytes, position: int) -> int:
    """The index of the first CR or LF at or after `position`, or `len(data)`."""
    lf = data.find(b"\n", position)
    cr = data.find(b"\r", position, len(data) if lf < 0 else lf)
    if cr >= 0:
        return cr
    return len(data) if lf < 0 else lf


def line_start(data: bytes, position: int) -> int:
    """The index just after the last CR or LF before `position`, or 0."""
    lf = data.rfind(b"\n", 0, position)
    return max(lf, data.rfind(b"\r", lf + 1, position)) + 1


def line_cut(data: bytes) -> int:
    """Where the complete lines of `data` end (after its last LF or CR)."""
    if data.endswith(b"\n"):
        return len(data)
    return max(data.rfind(b"\n"), data.rfind(b"\r")) + 1


class StreamUsage:
    """Follows an SSE stream chunk by chunk and keeps its last usage.

    Per chunk it only looks for a `"usage": {` (in C); the event carrying the last one is parsed
    once, when the stream ends. Only complete lines are kept, so a `usage` object split across
    network chunks is read whole; the partial last line is carried to the next chunk.

    Other APIs' trackers (`api_usage`) share the line handling and override `_lines`, what
    is done with complete lines that hold a `"usage"`, and `finish`.
    """

    __slots__ = ("_carry", "_usage_block")

    def __init__(self) -> None:
        self._carry = b""
        self._usage_block = b""

    def feed(self, chunk: bytes) -> None:
        if not self._carry and chunk.endswith(b"\n"):  # whole lines: nearly every chunk
            if USAGE in chunk:
                self._lines(chunk)
            return
        data = self._carry + chunk if self._carry else chunk
        cut = line_cut(data)
        self._carry = data[cut:] if len(data) - cut <= MAX_CARRY else b""
        if cut and USAGE in data:
            self._lines(data[:cut] if cut < len(data) else data)

    def _lines(self, block: bytes) -> None:
        """Complete lines with a `"usage"` in them: the last block holding a usage object is
        kept, to be parsed once by `finish`.

        The `"usage"` are looked for from the block's end, where a stream's usage is (its
        last events), so a block that has one is searched no further; OpenAI's
        `"usage":null` members (compatibility C70) are passed over without the pattern.
        """
        position = len(block)
        while True:
            position = block.rfind(USAGE, 0, position)
            if position < 0:
                return
            if block.startswith(NULL_USAGE, position):
                continue
            if USAGE_HEAD.match(block, position) is not None:
                self._usage_block = block
                return

    def finish(self) -> Usage | None:
        """The last usage seen; call once, when the stream has ended."""
        if self._carry and USAGE_HEAD.search(self._carry) is not None:
            self._usage_block = self._carry
        self._carry = b""
        return _event_usage(self._usage_block) if self._usage_block else None
