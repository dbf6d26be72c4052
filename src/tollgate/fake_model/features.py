"""DIAL's feature endpoints, as aidial-sdk serves them (compatibility C43): rate, tokenize,
truncate_prompt and configuration."""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from tollgate.fake_model.control import JSON, BadRequest, count_words, message_texts

# Feature suffix → method.
_FEATURES: Final = {
    "rate": "POST",
    "tokenize": "POST",
    "truncate_prompt": "POST",
    "configuration": "GET",
}
FAKE_CONFIGURATION: Final = {
    "type": "object",
    "properties": {"temperature": {"type": "number", "minimum": 0, "maximum": 2}},
}


def feature_of(path: str, method: str) -> str | None:
    feature = path.rpartition("/")[2]
    return feature if _FEATURES.get(feature) == method else None


def _tokens_of_input(item: Any) -> int:
    """Words of one tokenize input: `{"type": "request", "value": <chat request>}` or
    `{"type": "string", "value": <text>}` (aidial-sdk's `TokenizeInput`)."""
    kind, value = (item.get("type"), item.get("value")) if isinstance(item, dict) else (None, None)
    if kind == "string" and isinstance(value, str):
        return count_words([value])
    if kind == "request" and isinstance(value, dict):
        return count_words(message_texts(value.get("messages")))
    raise BadRequest("fake model: bad tokenize input")


def _discarded(chat: Any) -> list[int]:
    """Indices of the oldest non-system messages dropped until the words fit
    `max_prompt_tokens` (the last message is always kept)."""
    if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
        raise BadRequest("fake model: bad truncate_prompt input")
    messages = chat["messages"]
    limit = chat.get("max_prompt_tokens")
    total = count_words(message_texts(messages))
    discarded: list[int] = []
    if type(limit) is not int:
        return discarded
    for index, message in enumerate(messages[:-1]):
        if total <= limit:
            break
        if isinstance(message, dict) and message.get("role") != "system":
            discarded.append(index)
            total -= count_words(message_texts([message]))
    return discarded


def feature_answer(feature: str, body: bytes) -> web.Response:
    if feature == "rate":
        return web.Response(text="PONG")  # what DIAL's own feature tests expect
    if feature == "configuration":
        return web.Response(body=orjson.dumps(FAKE_CONFIGURATION), content_type=JSON)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("fake model: body is not valid JSON") from None
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(inputs, list):
        raise BadRequest("fake model: 'inputs' must be a list")
    if feature == "tokenize":
        outputs: list[dict[str, Any]] = [
            {"status": "success", "token_count": _tokens_of_input(item)} for item in inputs
        ]
    else:
        outputs = [{"status": "success", "discarded_messages": _discarded(c)} for c in inputs]
    return web.Response(body=orjson.dumps({"outputs": outputs}), content_type=JSON)
