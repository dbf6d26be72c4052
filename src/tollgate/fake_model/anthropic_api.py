"""Anthropic Messages API answers: ``POST .../v1/messages`` plain and streamed, and
``POST .../v1/messages/count_tokens``."""

from __future__ import annotations

import uuid
from typing import Any, Final

import orjson

from tollgate.fake_model.control import (
    Answer,
    Control,
    UsageMode,
    count_words,
    named_sse,
    part_texts,
    reply_pieces,
    usage_mode,
)

# Events of a stream before the first content_block_delta: message_start,
# content_block_start, ping.
_PRELUDE: Final = 3


def _input_texts(payload: dict[str, Any]) -> list[str]:
    """The words the model reads: ``system`` and the text blocks of ``messages``
    (``tool_result`` contents included)."""
    texts: list[str] = []
    part_texts(payload.get("system"), texts)
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        part_texts(content, texts)
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    part_texts(block.get("content"), texts)
    return texts


def input_tokens(payload: dict[str, Any]) -> int:
    return max(1, count_words(_input_texts(payload)))


def _usage(input_count: int, output_tokens: int, ctl: Control | None) -> dict[str, Any]:
    # Anthropic's input_tokens leave out the cached ones, which have their own two counters.
    write = 0 if ctl is None else ctl.cache_write_tokens
    read = 0 if ctl is None else ctl.cached_tokens
    return {
        "input_tokens": input_count,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def messages_answer(
    payload: dict[str, Any], model: str, ctl: Control | None, stream: bool, mode: UsageMode
) -> Answer:
    mode = usage_mode(ctl, mode)
    pieces = reply_pieces(ctl)
    count = input_tokens(payload)
    ident = "msg_" + uuid.uuid4().hex
    message: dict[str, Any] = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
    }
    if not stream:
        if mode != "never":
            message["usage"] = _usage(count, len(pieces), ctl)
        return Answer(body=orjson.dumps(message))
    start = {**message, "content": [], "stop_reason": None}
    if mode != "never":
        # The output count of message_start is a placeholder; message_delta has the real one.
        start["usage"] = _usage(count, 1, ctl)
    block = {"type": "text", "text": ""}
    events = [
        named_sse("message_start", {"type": "message_start", "message": start}),
        named_sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        named_sse("ping", {"type": "ping"}),
    ]
    events.extend(
        named_sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in pieces
    )
    events.append(named_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if mode != "never":
        full = _usage(count, len(pieces), ctl)
        if ctl is not None and ctl.delta_usage_full:
            # Newer API versions repeat the input and cache counters here (cumulative values).
            delta["usage"] = {key: full[key] for key in _DELTA_FULL_KEYS}
        else:
            delta["usage"] = {"output_tokens": full["output_tokens"]}
    events.append(named_sse("message_delta", delta))
    events.append(named_sse("message_stop", {"type": "message_stop"}))
    return Answer(events=events, content_chunks=len(pieces), prelude=_PRELUDE)


_DELTA_FULL_KEYS: Final = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def count_tokens_answer(payload: dict[str, Any]) -> Answer:
    return Answer(body=orjson.dumps({"input_tokens": input_tokens(payload)}))
