"""Token usage of a response: the last `usage` object of a JSON body or SSE stream (DECISIONS 6).

Pure functions over bytes. Unlike DIAL's 2024 parser, a `usage` object with nested
`*_tokens_details` objects is read in full instead of being counted as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

USAGE = b'"usage"'
WHITESPACE = b" \t\r\n"
MAX_CLOSING_BRACES_TRIED = 64
MAX_CARRY = 16 * 1024 * 1024  # an SSE line longer than this cannot be the usage line we want


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_object(cls, usage: dict[str, Any]) -> Usage:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens")) if "total_tokens" in usage else prompt + completion
        prompt_details = usage.get("prompt_tokens_details")
        completion_details = usage.get("completion_tokens_details")
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            cached_prompt_tokens=(
                _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
            ),
            reasoning_tokens=(
                _int(completion_details.get("reasoning_tokens"))
                if isinstance(completion_details, dict)
                else 0
            ),
        )


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return 0


def _object_at(data: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that starts at `data[start] == '{'`, or None if it does not parse.

    Tries each closing brace in turn: a usage object is small and has few nested objects.
    """
    end = start
    for _ in range(MAX_CLOSING_BRACES_TRIED):
        end = data.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            value = orjson.loads(data[start : end + 1])
        except orjson.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def last_usage(data: bytes) -> Usage | None:
    """The last `"usage": {...}` in `data`; `"usage": null` and `usage_per_model` are skipped."""
    position = len(data)
    while True:
        position = data.rfind(USAGE, 0, position)
        if position < 0:
            return None
        index = position + len(USAGE)
        while index < len(data) and data[index] in WHITESPACE:
            index += 1
        if index < len(data) and data[index] == 0x3A:  # ':'
            index += 1
            while index < len(data) and data[index] in WHITESPACE:
                index += 1
            if index < len(data) and data[index] == 0x7B:  # '{'
                found = _object_at(data, index)
                if found is not None:
                    return Usage.from_object(found)


class StreamUsage:
    """Follows an SSE stream chunk by chunk and keeps its last usage.

    Only complete lines are scanned, so a `usage` object split across network chunks is read
    whole; the partial last line is carried to the next chunk.
    """

    __slots__ = ("_carry", "usage")

    def __init__(self) -> None:
        self._carry = b""
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:] if len(data) - cut <= MAX_CARRY else b""
        if cut and USAGE in data:
            found = last_usage(data[:cut] if cut < len(data) else data)
            if found is not None:
                self.usage = found

    def finish(self) -> Usage | None:
        if self._carry:
            found = last_usage(self._carry)
            if found is not None:
                self.usage = found
            self._carry = b""
        return self.usage
