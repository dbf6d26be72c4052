"""What every fake API shares: the ``X-Fake-*`` control headers, the reply, word counts, SSE."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

DEFAULT_REPLY: Final = "Hello from the fake model."
DEFAULT_MODEL: Final = "fake-model"

JSON: Final = "application/json"
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE_EVENT: Final = b"data: [DONE]\n\n"
_WORD_RE: Final = re.compile(r"\s*\S+")

UsageMode = Literal["always", "on-request", "never"]
"""When an answer reports usage: ``always`` (every answer, streamed chat and completions in
their last choice event: the fake's default), ``on-request`` (as OpenAI: a chat or completions
stream only when the request has ``stream_options.include_usage``), ``never`` (no usage in any
answer of any API)."""
USAGE_MODES: Final[tuple[UsageMode, ...]] = ("always", "on-request", "never")

ErrorShape = Literal["dial", "anthropic"]


class BadRequest(Exception):
    """A request the fake model refuses with 400."""


@dataclass(slots=True)
class Control:
    """Parsed ``X-Fake-*`` request headers."""

    status: int | None = None
    delay_ms: float = 0.0
    reply: str | None = None
    chunk_delay_ms: float = 0.0
    chunks: int | None = None
    drop_after: int | None = None
    usage: UsageMode | None = None  # None: the server's mode
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    delta_usage_full: bool = False  # Anthropic: message_delta repeats the input counters


@dataclass(slots=True)
class Answer:
    """What to send: one JSON body, or the events of a stream."""

    body: bytes | None = None
    events: list[bytes] | None = None
    content_chunks: int = 0  # number of content events, which follow the prelude
    prelude: int = 1  # events before the first content event (chat: the role event)
    stored: tuple[str, dict[str, Any]] | None = None  # a Responses object to keep for GET


def error_body(status: int, message: str, shape: ErrorShape = "dial") -> bytes:
    """An error in DIAL's (OpenAI-like) shape or in Anthropic's."""
    if shape == "anthropic":
        return orjson.dumps(
            {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
        )
    return orjson.dumps({"error": {"message": message, "code": str(status)}})


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status (``api_error`` for the unlisted ones)."""
    return _ANTHROPIC_ERROR_TYPES.get(status, "api_error")


def header_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_int(name: str, value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"fake model: bad {name} header") from None


def _parse_usage(value: bytes) -> UsageMode:
    text = value.strip().lower().decode("ascii", "replace")
    for mode in USAGE_MODES:
        if text == mode:
            return mode
    raise BadRequest("fake model: bad X-Fake-Usage header")


def parse_control(raw_headers: Iterable[tuple[bytes, bytes]]) -> Control | None:
    """Read the control headers in one pass; ``None`` when there are none (the fast path)."""
    ctl: Control | None = None
    for raw_name, value in raw_headers:
        if len(raw_name) < 8 or raw_name[:7].lower() != b"x-fake-":
            continue
        if ctl is None:
            ctl = Control()
        name = raw_name[7:].lower()
        if name == b"status":
            ctl.status = _parse_int("X-Fake-Status", value)
            if not 100 <= ctl.status <= 599:
                raise BadRequest("fake model: bad X-Fake-Status header")
        elif name == b"delay-ms":
            ctl.delay_ms = max(0, _parse_int("X-Fake-Delay-Ms", value))
        elif name == b"reply":
            ctl.reply = header_text(value)
        elif name == b"chunk-delay-ms":
            ctl.chunk_delay_ms = max(0, _parse_int("X-Fake-Chunk-Delay-Ms", value))
        elif name == b"chunks":
            ctl.chunks = max(0, _parse_int("X-Fake-Chunks", value))
        elif name == b"drop-after":
            ctl.drop_after = max(0, _parse_int("X-Fake-Drop-After", value))
        elif name == b"no-usage":
            if value.strip().lower() not in (b"", b"0", b"false", b"no"):
                ctl.usage = "never"
        elif name == b"usage":
            ctl.usage = _parse_usage(value)
        elif name == b"cached-tokens":
            ctl.cached_tokens = max(0, _parse_int("X-Fake-Cached-Tokens", value))
        elif name == b"cache-write-tokens":
            ctl.cache_write_tokens = max(0, _parse_int("X-Fake-Cache-Write-Tokens", value))
        elif name == b"reasoning-tokens":
            ctl.reasoning_tokens = max(0, _parse_int("X-Fake-Reasoning-Tokens", value))
        elif name == b"delta-usage":
            ctl.delta_usage_full = value.strip().lower() == b"full"
    return ctl


def usage_mode(ctl: Control | None, default: UsageMode) -> UsageMode:
    return default if ctl is None or ctl.usage is None else ctl.usage


def count_words(texts: Iterable[str]) -> int:
    return sum(len(text.split()) for text in texts)


def part_texts(content: Any, texts: list[str]) -> None:
    """Append the text of `content`: a string, or a list of parts that have a ``text``."""
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])


def message_texts(messages: Any) -> list[str]:
    """String contents of chat messages; text parts count too for multi-part content."""
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if isinstance(message, dict):
            part_texts(message.get("content"), texts)
    return texts


def reply_pieces(ctl: Control | None) -> list[str]:
    """The reply split into words, each with its leading whitespace, so pieces concatenate."""
    reply = DEFAULT_REPLY if ctl is None or ctl.reply is None else ctl.reply
    pieces: list[str] = _WORD_RE.findall(reply)
    if ctl is None or ctl.chunks is None:
        return pieces
    base = pieces or _WORD_RE.findall(DEFAULT_REPLY)
    # Repeat the reply to reach the requested count; later rounds need a separating space.
    looped = [piece if piece[:1].isspace() else " " + piece for piece in base]
    out = [(base if i < len(base) else looped)[i % len(base)] for i in range(ctl.chunks)]
    return out


def sse(obj: Any) -> bytes:
    """A data-only SSE event (OpenAI chat and completions)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def named_sse(name: str, obj: Any) -> bytes:
    """An SSE event with an ``event:`` line (Responses and Anthropic streams)."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def deployment_id(path: str) -> str | None:
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "deployments" and parts[i + 1]:
            return parts[i + 1]
    return None


def model_of(payload: dict[str, Any], path: str) -> str:
    model = payload.get("model")
    if isinstance(model, str) and model:
        return model
    return deployment_id(path) or DEFAULT_MODEL
