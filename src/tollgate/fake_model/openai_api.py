"""OpenAI-style answers: chat completions, legacy completions and embeddings."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import orjson

from tollgate.fake_model.control import (
    DONE_EVENT,
    Answer,
    BadRequest,
    Control,
    UsageMode,
    count_words,
    message_texts,
    reply_pieces,
    sse,
    usage_mode,
)

EMBEDDING_SIZE: Final = 8


def _prompt_texts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [item for item in prompt if isinstance(item, str)]
    return []


def _usage(prompt_tokens: int, completion_tokens: int, ctl: Control | None) -> dict[str, Any]:
    # Cached prompt tokens are part of prompt_tokens, reasoning tokens part of
    # completion_tokens, as OpenAI counts them.
    cached = 0 if ctl is None else ctl.cached_tokens
    reasoning = 0 if ctl is None else ctl.reasoning_tokens
    prompt_tokens += cached
    completion_tokens += reasoning
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _include_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _stream_events(
    first: dict[str, Any],
    contents: list[dict[str, Any]],
    final: dict[str, Any],
    usage: dict[str, Any] | None,
    mode: UsageMode,
    payload: dict[str, Any],
) -> list[bytes]:
    """The events of a chat or completions stream, with usage placed as `mode` says."""
    if mode == "on-request" and _include_usage(payload):
        # OpenAI: every chunk says "usage": null, then one chunk without choices has the usage.
        chunks = [first, *contents, final]
        for chunk in chunks:
            chunk["usage"] = None
        usage_chunk = {key: value for key, value in final.items() if key != "choices"}
        usage_chunk["choices"] = []
        usage_chunk["usage"] = usage
        events = [sse(chunk) for chunk in chunks]
        events.append(sse(usage_chunk))
    else:
        if mode == "always" and usage is not None:
            final["usage"] = usage
        events = [sse(first)]
        events.extend(sse(chunk) for chunk in contents)
        events.append(sse(final))
    events.append(DONE_EVENT)
    return events


def chat_answer(
    payload: dict[str, Any], model: str, ctl: Control | None, stream: bool, mode: UsageMode
) -> Answer:
    mode = usage_mode(ctl, mode)
    prompt_tokens = max(1, count_words(message_texts(payload.get("messages"))))
    pieces = reply_pieces(ctl)
    usage = None if mode == "never" else _usage(prompt_tokens, len(pieces), ctl)
    ident = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    if not stream:
        message = {"role": "assistant", "content": "".join(pieces)}
        obj: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
        if usage is not None:
            obj["usage"] = usage
        return Answer(body=orjson.dumps(obj))

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    events = _stream_events(
        chunk({"role": "assistant", "content": ""}, None),
        [chunk({"content": piece}, None) for piece in pieces],
        chunk({}, "stop"),
        usage,
        mode,
        payload,
    )
    return Answer(events=events, content_chunks=len(pieces))


def completion_answer(
    payload: dict[str, Any], model: str, ctl: Control | None, stream: bool, mode: UsageMode
) -> Answer:
    mode = usage_mode(ctl, mode)
    prompt_tokens = max(1, count_words(_prompt_texts(payload.get("prompt"))))
    pieces = reply_pieces(ctl)
    usage = None if mode == "never" else _usage(prompt_tokens, len(pieces), ctl)
    ident = "cmpl-" + uuid.uuid4().hex
    created = int(time.time())

    def completion(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    if not stream:
        obj = completion("".join(pieces), "stop")
        if usage is not None:
            obj["usage"] = usage
        return Answer(body=orjson.dumps(obj))
    # Legacy streams have no role delta; an empty first event keeps the shape of chat streams.
    events = _stream_events(
        completion("", None),
        [completion(piece, None) for piece in pieces],
        completion("", "stop"),
        usage,
        mode,
        payload,
    )
    return Answer(events=events, content_chunks=len(pieces))


def _embedding(text: str, as_base64: bool) -> list[float] | str:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=EMBEDDING_SIZE).digest()
    values = [round(byte / 127.5 - 1.0, 6) for byte in digest]
    if as_base64:
        # Same layout as OpenAI's base64 format: little-endian float32.
        return base64.b64encode(struct.pack(f"<{EMBEDDING_SIZE}f", *values)).decode("ascii")
    return values


def embedding_answer(
    payload: dict[str, Any], model: str, ctl: Control | None, mode: UsageMode
) -> Answer:
    raw = payload.get("input")
    items: Sequence[Any]
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # one pre-tokenised input
    elif isinstance(raw, list):
        items = raw
    else:
        raise BadRequest("fake model: 'input' must be a string or a list")
    as_base64 = payload.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, item in enumerate(items):
        if isinstance(item, str):
            text, tokens = item, tokens + len(item.split())
        elif isinstance(item, list):
            text, tokens = " ".join(map(str, item)), tokens + len(item)
        else:
            raise BadRequest("fake model: bad 'input' item")
        data.append(
            {"object": "embedding", "index": index, "embedding": _embedding(text, as_base64)}
        )
    tokens = max(1, tokens)
    obj: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if usage_mode(ctl, mode) != "never":
        obj["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return Answer(body=orjson.dumps(obj))
