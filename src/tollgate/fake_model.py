"""A small, fast fake OpenAI/DIAL model server.

Used by the quick-start example, by the test-suite as the LLM upstream and by the
benchmark as the reference upstream, so the common request is answered from
precomputed bytes and nothing is logged per request.

Endpoints (any path prefix, e.g. ``/v1/...`` or ``/openai/deployments/<id>/...``):

* ``POST .../chat/completions`` - chat, streaming or not;
* ``POST .../completions`` - legacy text completions, streaming or not;
* ``POST .../embeddings`` - eight deterministic floats per input;
* ``POST .../rate``, ``.../tokenize``, ``.../truncate_prompt`` and ``GET .../configuration`` -
  DIAL's feature endpoints (``PONG``; words per input; messages dropped to fit
  ``max_prompt_tokens``; a JSON schema);
* ``GET /health`` - ``ok``;
* ``GET /_fake/requests`` / ``DELETE /_fake/requests`` - the recorded requests;
* ``POST /_fake/faults`` / ``DELETE /_fake/faults`` - add a fault / clear them all.

Request headers steer the answer: ``X-Fake-Status``, ``X-Fake-Delay-Ms``,
``X-Fake-Reply``, ``X-Fake-Chunk-Delay-Ms``, ``X-Fake-Chunks``,
``X-Fake-Drop-After`` and ``X-Fake-No-Usage`` (see ``_Control``). On any other path, any
method, ``X-Fake-Echo-Path`` answers 200 with the raw path and query as text.

Faults make this server fail on command, as a DIAL model adapter does when the provider it
reaches fails. A fault is a JSON object: ``upstream`` (the ``X-UPSTREAM-ENDPOINT`` it applies
to; absent: every call), ``path`` (only calls to that path, which may be one no model serves),
``status`` with an optional ``retryAfter`` (answer that error),
``delayMs`` (wait first; without ``status`` the normal answer follows), ``bodyDelayMs`` (send
the error's headers, then its body that much later), ``disconnect`` (close the connection
without answering) and ``times`` (how many calls it hits; absent: until cleared). The first
fault that matches a call applies. Faults are checked before the ``X-Fake-*`` headers.

Tokens are whitespace-separated words. Answers to identical requests without
control headers are cached, so they repeat the same ``id`` and ``created``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import re
import signal
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = ["build_app", "main"]

DEFAULT_REPLY: Final = "Hello from the fake model."
DEFAULT_MODEL: Final = "fake-model"
MAX_RECORDED: Final = 200
EMBEDDING_SIZE: Final = 8

# Bounds for the answer cache: benchmark bodies are tiny and repeat, test bodies vary,
# so cache only small bodies and forget everything rather than track recency.
_CACHE_MAX_ENTRIES: Final = 1024
_CACHE_MAX_BODY: Final = 4096

_JSON: Final = "application/json"
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE_EVENT: Final = b"data: [DONE]\n\n"
_WORD_RE: Final = re.compile(r"\s*\S+")


class _BadRequest(Exception):
    """A request the fake model refuses with 400."""


@dataclass(slots=True)
class _Control:
    """Parsed ``X-Fake-*`` request headers."""

    status: int | None = None
    delay_ms: float = 0.0
    reply: str | None = None
    chunk_delay_ms: float = 0.0
    chunks: int | None = None
    drop_after: int | None = None
    no_usage: bool = False


@dataclass(slots=True)
class _Answer:
    """What to send: one JSON body, or the events of a stream."""

    body: bytes | None = None
    events: list[bytes] | None = None
    content_chunks: int = 0  # number of content events, which follow the role event


@dataclass(slots=True)
class _Fault:
    """One fault set through ``POST /_fake/faults`` (see the module docstring)."""

    upstream: str | None = None
    path: str | None = None  # only calls to this path (e.g. a route's upstream endpoint)
    status: int | None = None
    retry_after: str | None = None
    delay_ms: float = 0.0
    body_delay_ms: float = 0.0
    disconnect: bool = False
    times: int | None = None


class _State:
    """Per-application mutable state: recorded requests, the answer cache and the faults."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.records: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.cache: dict[tuple[str, bytes], _Answer] = {}
        self.faults: list[_Fault] = []

    def take_fault(
        self, upstream: str | None, path: str | None = None, *, path_only: bool = False
    ) -> _Fault | None:
        """The first fault for a call through `upstream` to `path`, one use of it counted;
        with `path_only`, only a fault set for that path."""
        for fault in self.faults:
            if fault.path is not None and fault.path != path:
                continue
            if path_only and fault.path is None:
                continue
            if fault.upstream is None or fault.upstream == upstream:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None


_STATE_KEY: Final = web.AppKey("fake_model_state", _State)


def _error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "code": str(status)}})


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=_error_body(status, message), content_type=_JSON)


_NOT_FOUND_BODY: Final = _error_body(404, "fake model: unknown path")


def _header_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_int(name: str, value: bytes) -> int:
    try:
        return int(value)
    except ValueError:
        raise _BadRequest(f"fake model: bad {name} header") from None


def _parse_control(raw_headers: Iterable[tuple[bytes, bytes]]) -> _Control | None:
    """Read the control headers in one pass; ``None`` when there are none (the fast path)."""
    ctl: _Control | None = None
    for raw_name, value in raw_headers:
        if len(raw_name) < 8 or raw_name[:7].lower() != b"x-fake-":
            continue
        if ctl is None:
            ctl = _Control()
        name = raw_name[7:].lower()
        if name == b"status":
            ctl.status = _parse_int("X-Fake-Status", value)
            if not 100 <= ctl.status <= 599:
                raise _BadRequest("fake model: bad X-Fake-Status header")
        elif name == b"delay-ms":
            ctl.delay_ms = max(0, _parse_int("X-Fake-Delay-Ms", value))
        elif name == b"reply":
            ctl.reply = _header_text(value)
        elif name == b"chunk-delay-ms":
            ctl.chunk_delay_ms = max(0, _parse_int("X-Fake-Chunk-Delay-Ms", value))
        elif name == b"chunks":
            ctl.chunks = max(0, _parse_int("X-Fake-Chunks", value))
        elif name == b"drop-after":
            ctl.drop_after = max(0, _parse_int("X-Fake-Drop-After", value))
        elif name == b"no-usage":
            ctl.no_usage = value.strip().lower() not in (b"", b"0", b"false", b"no")
    return ctl


def _count_words(texts: Iterable[str]) -> int:
    return sum(len(text.split()) for text in texts)


def _message_texts(messages: Any) -> list[str]:
    """String contents of chat messages; text parts count too for multi-part content."""
    texts: list[str] = []
    if not isinstance(messages, list):
        return texts
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return texts


def _prompt_texts(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [item for item in prompt if isinstance(item, str)]
    return []


def _reply_pieces(ctl: _Control | None) -> list[str]:
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _deployment_id(path: str) -> str | None:
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "deployments" and parts[i + 1]:
            return parts[i + 1]
    return None


def _model_of(payload: dict[str, Any], path: str) -> str:
    model = payload.get("model")
    if isinstance(model, str) and model:
        return model
    return _deployment_id(path) or DEFAULT_MODEL


def _chat_answer(
    payload: dict[str, Any], model: str, ctl: _Control | None, stream: bool
) -> _Answer:
    prompt_tokens = max(1, _count_words(_message_texts(payload.get("messages"))))
    pieces = _reply_pieces(ctl)
    usage = None if ctl is not None and ctl.no_usage else _usage(prompt_tokens, len(pieces))
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
        return _Answer(body=orjson.dumps(obj))

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }

    events = [_sse(chunk({"role": "assistant", "content": ""}, None))]
    events.extend(_sse(chunk({"content": piece}, None)) for piece in pieces)
    final = chunk({}, "stop")
    if usage is not None:
        final["usage"] = usage
    events.append(_sse(final))
    events.append(_DONE_EVENT)
    return _Answer(events=events, content_chunks=len(pieces))


def _completion_answer(
    payload: dict[str, Any], model: str, ctl: _Control | None, stream: bool
) -> _Answer:
    prompt_tokens = max(1, _count_words(_prompt_texts(payload.get("prompt"))))
    pieces = _reply_pieces(ctl)
    usage = None if ctl is not None and ctl.no_usage else _usage(prompt_tokens, len(pieces))
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
        return _Answer(body=orjson.dumps(obj))
    # Legacy streams have no role delta; an empty first event keeps the shape of chat streams.
    events = [_sse(completion("", None))]
    events.extend(_sse(completion(piece, None)) for piece in pieces)
    final = completion("", "stop")
    if usage is not None:
        final["usage"] = usage
    events.append(_sse(final))
    events.append(_DONE_EVENT)
    return _Answer(events=events, content_chunks=len(pieces))


def _embedding(text: str, as_base64: bool) -> list[float] | str:
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=EMBEDDING_SIZE).digest()
    values = [round(byte / 127.5 - 1.0, 6) for byte in digest]
    if as_base64:
        # Same layout as OpenAI's base64 format: little-endian float32.
        return base64.b64encode(struct.pack(f"<{EMBEDDING_SIZE}f", *values)).decode("ascii")
    return values


def _embedding_answer(payload: dict[str, Any], model: str, ctl: _Control | None) -> _Answer:
    raw = payload.get("input")
    items: Sequence[Any]
    if isinstance(raw, str):
        items = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # one pre-tokenised input
    elif isinstance(raw, list):
        items = raw
    else:
        raise _BadRequest("fake model: 'input' must be a string or a list")
    as_base64 = payload.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, item in enumerate(items):
        if isinstance(item, str):
            text, tokens = item, tokens + len(item.split())
        elif isinstance(item, list):
            text, tokens = " ".join(map(str, item)), tokens + len(item)
        else:
            raise _BadRequest("fake model: bad 'input' item")
        data.append(
            {"object": "embedding", "index": index, "embedding": _embedding(text, as_base64)}
        )
    tokens = max(1, tokens)
    obj: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if ctl is None or not ctl.no_usage:
        obj["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return _Answer(body=orjson.dumps(obj))


def _endpoint(path: str) -> str | None:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/completions"):
        return "completions"
    return None


def _compute(endpoint: str, path: str, body: bytes, ctl: _Control | None) -> _Answer:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _BadRequest("fake model: body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise _BadRequest("fake model: body must be a JSON object")
    model = _model_of(payload, path)
    if endpoint == "embeddings":
        return _embedding_answer(payload, model, ctl)
    stream = payload.get("stream") is True
    if endpoint == "chat":
        return _chat_answer(payload, model, ctl, stream)
    return _completion_answer(payload, model, ctl, stream)


def _record(request: web.Request, body: bytes) -> None:
    request.app[_STATE_KEY].records.append(
        {
            "method": request.method,
            "path": request.path,
            "query_string": request.query_string,
            "raw_path": request.raw_path,  # as sent: path and query undecoded
            "client_port": _client_port(request),  # tells a reused connection from a new one
            "headers": [[_header_text(k), _header_text(v)] for k, v in request.raw_headers],
            "body": body.decode("utf-8", "replace"),
        }
    )


def _client_port(request: web.Request) -> int | None:
    transport = request.transport
    peer = None if transport is None else transport.get_extra_info("peername")
    return peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None


def _parse_fault(value: Any) -> _Fault:
    if not isinstance(value, dict):
        raise _BadRequest("fake model: a fault is a JSON object")
    fault = _Fault()
    for name, item in value.items():
        if name == "upstream" and isinstance(item, str):
            fault.upstream = item
        elif name == "path" and isinstance(item, str):
            fault.path = item
        elif name == "status" and type(item) is int and 100 <= item <= 599:
            fault.status = item
        elif name == "retryAfter" and isinstance(item, str | int) and type(item) is not bool:
            fault.retry_after = str(item)
        elif name in ("delayMs", "bodyDelayMs") and type(item) in (int, float) and item >= 0:
            if name == "delayMs":
                fault.delay_ms = float(item)
            else:
                fault.body_delay_ms = float(item)
        elif name == "disconnect" and isinstance(item, bool):
            fault.disconnect = item
        elif name == "times" and type(item) is int and item > 0:
            fault.times = item
        else:
            raise _BadRequest(f"fake model: bad fault field {name!r}")
    return fault


async def _apply_fault(request: web.Request, fault: _Fault) -> web.StreamResponse | None:
    """Answer as `fault` says; None when the normal answer follows (a mere delay)."""
    if fault.delay_ms:
        await asyncio.sleep(fault.delay_ms / 1000.0)
    if fault.disconnect:
        transport = request.transport
        if transport is not None:
            transport.abort()  # no answer at all: the caller sees the connection drop
        raise asyncio.CancelledError  # aiohttp ends the handler quietly, writing nothing
    if fault.status is None:
        return None
    headers = {"Content-Type": _JSON}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    body = _error_body(fault.status, "fake fault")
    if not fault.body_delay_ms:
        return web.Response(status=fault.status, body=body, headers=headers)
    # Headers now, the body later (chunked): a caller that does not read it cannot reuse the
    # connection.
    resp = web.StreamResponse(status=fault.status, headers=headers)
    await resp.prepare(request)
    await asyncio.sleep(fault.body_delay_ms / 1000.0)
    await resp.write(body)
    await resp.write_eof()
    return resp


async def _send_stream(
    request: web.Request, answer: _Answer, ctl: _Control | None
) -> web.StreamResponse:
    events = answer.events
    assert events is not None
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    chunk_delay = 0.0 if ctl is None else ctl.chunk_delay_ms / 1000.0
    drop_after = None if ctl is None else ctl.drop_after
    try:
        await resp.prepare(request)
        for i, event in enumerate(events):
            if drop_after is not None and i > drop_after:
                # The role event plus drop_after content events are out: vanish mid-stream,
                # leaving the chunked body unterminated, as a crashed upstream would.
                transport = request.transport
                if transport is not None:
                    transport.close()
                return resp  # aiohttp swallows the ConnectionError of finishing it
            if chunk_delay and i:
                await asyncio.sleep(chunk_delay)
            # aiohttp hands each write straight to the transport (one send per event), so the
            # client sees a real stream; write() also waits while the socket is backed up.
            await resp.write(event)
    except ConnectionError:
        return resp  # the client left mid-stream (wrk does at the end of a run): nothing to do
    await resp.write_eof()
    return resp


# DIAL feature endpoints, as aidial-sdk serves them (compatibility C43): suffix → method.
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


def _feature_of(path: str, method: str) -> str | None:
    feature = path.rpartition("/")[2]
    return feature if _FEATURES.get(feature) == method else None


def _tokens_of_input(item: Any) -> int:
    """Words of one tokenize input: `{"type": "request", "value": <chat request>}` or
    `{"type": "string", "value": <text>}` (aidial-sdk's `TokenizeInput`)."""
    kind, value = (item.get("type"), item.get("value")) if isinstance(item, dict) else (None, None)
    if kind == "string" and isinstance(value, str):
        return _count_words([value])
    if kind == "request" and isinstance(value, dict):
        return _count_words(_message_texts(value.get("messages")))
    raise _BadRequest("fake model: bad tokenize input")


def _discarded(chat: Any) -> list[int]:
    """Indices of the oldest non-system messages dropped until the words fit
    `max_prompt_tokens` (the last message is always kept)."""
    if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
        raise _BadRequest("fake model: bad truncate_prompt input")
    messages = chat["messages"]
    limit = chat.get("max_prompt_tokens")
    total = _count_words(_message_texts(messages))
    discarded: list[int] = []
    if type(limit) is not int:
        return discarded
    for index, message in enumerate(messages[:-1]):
        if total <= limit:
            break
        if isinstance(message, dict) and message.get("role") != "system":
            discarded.append(index)
            total -= _count_words(_message_texts([message]))
    return discarded


def _feature_answer(feature: str, body: bytes) -> web.Response:
    if feature == "rate":
        return web.Response(text="PONG")  # what DIAL's own feature tests expect
    if feature == "configuration":
        return web.Response(body=orjson.dumps(FAKE_CONFIGURATION), content_type=_JSON)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _BadRequest("fake model: body is not valid JSON") from None
    inputs = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(inputs, list):
        raise _BadRequest("fake model: 'inputs' must be a list")
    if feature == "tokenize":
        outputs: list[dict[str, Any]] = [
            {"status": "success", "token_count": _tokens_of_input(item)} for item in inputs
        ]
    else:
        outputs = [{"status": "success", "discarded_messages": _discarded(c)} for c in inputs]
    return web.Response(body=orjson.dumps({"outputs": outputs}), content_type=_JSON)


async def _handle_feature(request: web.Request, feature: str, body: bytes) -> web.StreamResponse:
    """rate (`PONG`), tokenize (words per input), truncate_prompt (messages dropped to fit),
    configuration (a JSON schema); faults, `X-Fake-Status` and `X-Fake-Delay-Ms` apply."""
    state = request.app[_STATE_KEY]
    if state.faults:
        fault = state.take_fault(request.headers.get("X-UPSTREAM-ENDPOINT"))
        if fault is not None:
            faulty = await _apply_fault(request, fault)
            if faulty is not None:
                return faulty
    try:
        ctl = _parse_control(request.raw_headers)
        if ctl is not None:
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000.0)
            if ctl.status is not None:
                return _error(ctl.status, "fake failure")
        return _feature_answer(feature, body)
    except _BadRequest as exc:
        return _error(400, str(exc))


async def _handle_other(request: web.Request, path: str) -> web.StreamResponse:
    """A path no model serves: a fault set for that path, else the echo of its raw path (and
    query) that `X-Fake-Echo-Path` asks for (as DIAL's route tests' upstream), else 404."""
    state = request.app[_STATE_KEY]
    if state.faults:
        upstream = request.headers.get("X-UPSTREAM-ENDPOINT")
        fault = state.take_fault(upstream, path, path_only=True)
        if fault is not None:
            faulty = await _apply_fault(request, fault)
            if faulty is not None:
                return faulty
    if "X-Fake-Echo-Path" in request.headers:
        return web.Response(text=request.raw_path)
    return web.Response(status=404, body=_NOT_FOUND_BODY, content_type=_JSON)


async def _handle_model(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    state = request.app[_STATE_KEY]
    if state.record:
        _record(request, body)
    path = request.path
    endpoint = _endpoint(path)
    if endpoint is None or request.method != "POST":
        feature = _feature_of(path, request.method)
        if feature is not None:  # off the chat path: it costs the benchmark nothing
            return await _handle_feature(request, feature, body)
        if state.faults or "X-Fake-Echo-Path" in request.headers:
            return await _handle_other(request, path)
        return web.Response(status=404, body=_NOT_FOUND_BODY, content_type=_JSON)
    if state.faults:
        fault = state.take_fault(request.headers.get("X-UPSTREAM-ENDPOINT"), path)
        if fault is not None:
            faulty = await _apply_fault(request, fault)
            if faulty is not None:
                return faulty
    try:
        ctl = _parse_control(request.raw_headers)
        if ctl is None:
            # Fast path: an identical request was answered before, reuse its bytes.
            key = (path, body)
            answer = state.cache.get(key)
            if answer is None:
                answer = _compute(endpoint, path, body, None)
                if len(body) <= _CACHE_MAX_BODY:
                    if len(state.cache) >= _CACHE_MAX_ENTRIES:
                        state.cache.clear()
                    state.cache[key] = answer
        else:
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000.0)
            if ctl.status is not None:
                return _error(ctl.status, "fake failure")
            answer = _compute(endpoint, path, body, ctl)
    except _BadRequest as exc:
        return _error(400, str(exc))
    if answer.body is not None:
        return web.Response(body=answer.body, content_type=_JSON)
    return await _send_stream(request, answer, ctl)


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _list_records(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(list(request.app[_STATE_KEY].records)), content_type=_JSON
    )


async def _clear_records(request: web.Request) -> web.Response:
    request.app[_STATE_KEY].records.clear()
    return web.Response(status=204)


async def _add_fault(request: web.Request) -> web.Response:
    try:
        try:
            value = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise _BadRequest("fake model: a fault is a JSON object") from None
        fault = _parse_fault(value)
    except _BadRequest as exc:
        return _error(400, str(exc))
    request.app[_STATE_KEY].faults.append(fault)
    return web.Response(status=204)


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[_STATE_KEY].faults.clear()
    return web.Response(status=204)


def build_app(*, record: bool = True) -> web.Application:
    """Build the fake model application; ``record`` keeps the last 200 requests in memory."""
    app = web.Application()
    app[_STATE_KEY] = _State(record)
    # Control endpoints are not recorded, so polling them does not disturb what tests inspect.
    app.router.add_get("/health", _health, allow_head=False)
    app.router.add_get("/_fake/requests", _list_records, allow_head=False)
    app.router.add_delete("/_fake/requests", _clear_records)
    app.router.add_post("/_fake/faults", _add_fault)
    app.router.add_delete("/_fake/faults", _clear_faults)
    app.router.add_route("*", "/{tail:.*}", _handle_model)
    return app


async def _serve(host: str, port: int, record: bool) -> None:
    runner = web.AppRunner(build_app(record=record), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        print(f"fake model listening on http://{host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (e.g. on Windows); asyncio works, only slower
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the fake model server until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="tollgate fake-model", description="Fake OpenAI/DIAL model server."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=9001, help="port to bind, 0 for any (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not keep recent requests")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(args.host, args.port, not args.no_record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
