"""OpenAI Responses API answers: ``POST .../responses`` plain and streamed, and the stored
responses that ``GET``, ``DELETE`` and ``POST .../cancel`` address by id."""

from __future__ import annotations

import time
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

# Events of a stream before the first output_text.delta: created, in_progress,
# output_item.added, content_part.added.
_PRELUDE: Final = 4


def _input_texts(payload: dict[str, Any]) -> list[str]:
    """The words the model reads: ``instructions`` and every text of ``input``."""
    texts: list[str] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    raw = payload.get("input")
    if isinstance(raw, str):
        texts.append(raw)
    elif isinstance(raw, list):
        for item in raw:
            if not isinstance(item, dict):
                continue
            part_texts(item.get("content"), texts)
            for key in ("output", "arguments"):  # function_call_output, function_call
                if isinstance(item.get(key), str):
                    texts.append(item[key])
    return texts


def _usage(input_tokens: int, output_tokens: int, ctl: Control | None) -> dict[str, Any]:
    # Cached tokens are part of input_tokens and reasoning tokens part of output_tokens, as
    # OpenAI counts them.
    cached = 0 if ctl is None else ctl.cached_tokens
    reasoning = 0 if ctl is None else ctl.reasoning_tokens
    input_tokens += cached
    output_tokens += reasoning
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def _response(
    payload: dict[str, Any],
    ident: str,
    created: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    def given(name: str, default: Any) -> Any:
        value = payload.get(name)
        return default if value is None else value

    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": payload.get("background") is True,
        "error": None,
        "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": payload.get("store") is not False,
        "temperature": given("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": given("tool_choice", "auto"),
        "tools": given("tools", []),
        "top_p": given("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": given("metadata", {}),
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def stream_events(stored: dict[str, Any], starting_after: int = -1) -> list[bytes]:
    """The SSE events of a stored response, from sequence number ``starting_after + 1``."""
    final: dict[str, Any] = stored["response"]
    pieces: list[str] = stored["pieces"]
    item_id: str = stored["item_id"]
    text = "".join(pieces)
    begun = {**final, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": begun}),
        ("response.in_progress", {"response": begun}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _message(item_id, "in_progress", [])},
        ),
        ("response.content_part.added", {**where, "part": _text_part("")}),
    ]
    events.extend(
        ("response.output_text.delta", {**where, "delta": piece, "logprobs": []})
        for piece in pieces
    )
    events.append(("response.output_text.done", {**where, "text": text, "logprobs": []}))
    events.append(("response.content_part.done", {**where, "part": _text_part(text)}))
    done = _message(item_id, "completed", [_text_part(text)])
    events.append(("response.output_item.done", {"output_index": 0, "item": done}))
    events.append(("response.completed", {"response": final}))
    return [
        named_sse(name, {"type": name, "sequence_number": number, **fields})
        for number, (name, fields) in enumerate(events)
        if number > starting_after
    ]


def responses_answer(
    payload: dict[str, Any], model: str, ctl: Control | None, stream: bool, mode: UsageMode
) -> Answer:
    mode = usage_mode(ctl, mode)
    pieces = reply_pieces(ctl)
    input_tokens = max(1, count_words(_input_texts(payload)))
    usage = None if mode == "never" else _usage(input_tokens, len(pieces), ctl)
    ident = "resp_" + uuid.uuid4().hex
    item_id = "msg_" + uuid.uuid4().hex
    created = int(time.time())
    output = [_message(item_id, "completed", [_text_part("".join(pieces))])]
    final = _response(payload, ident, created, model, "completed", output, usage)
    stored = {"response": final, "pieces": pieces, "item_id": item_id}
    if stream:
        events = stream_events(stored)
        return Answer(
            events=events, content_chunks=len(pieces), prelude=_PRELUDE, stored=(ident, stored)
        )
    if payload.get("background") is True:
        # A background job: queued now, done by the time anyone asks (GET returns `final`).
        queued = _response(payload, ident, created, model, "queued", [], None)
        return Answer(body=orjson.dumps(queued), stored=(ident, stored))
    return Answer(body=orjson.dumps(final), stored=(ident, stored))


def cancelled(stored: dict[str, Any]) -> dict[str, Any] | None:
    """The response after a cancel, or None when it cannot be cancelled (not a background job)."""
    final: dict[str, Any] = stored["response"]
    if not final.get("background"):
        return None
    result = {**final, "status": "cancelled", "output": [], "usage": None}
    stored["response"] = result
    stored["pieces"] = []
    return result
