"""The fake model's HTTP side: routing by path suffix, faults, the request log, streaming."""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from tollgate.fake_model.anthropic_api import count_tokens_answer, messages_answer
from tollgate.fake_model.control import (
    JSON,
    SSE_HEADERS,
    USAGE_MODES,
    Answer,
    BadRequest,
    Control,
    ErrorShape,
    UsageMode,
    error_body,
    header_text,
    model_of,
    parse_control,
)
from tollgate.fake_model.features import feature_answer, feature_of
from tollgate.fake_model.openai_api import chat_answer, completion_answer, embedding_answer
from tollgate.fake_model.responses_api import cancelled, responses_answer, stream_events

MAX_RECORDED: Final = 200
MAX_STORED_RESPONSES: Final = 1000

# Bounds for the answer cache: benchmark bodies are tiny and repeat, test bodies vary,
# so cache only small bodies and forget everything rather than track recency.
_CACHE_MAX_ENTRIES: Final = 1024
_CACHE_MAX_BODY: Final = 4096

_RESPONSE_ITEM_RE: Final = re.compile(r"/responses/([^/]+)(/cancel)?$")


@dataclass(slots=True)
class Fault:
    """One fault set through ``POST /_fake/faults`` (see the package docstring)."""

    upstream: str | None = None
    path: str | None = None  # only calls to this path (e.g. a route's upstream endpoint)
    status: int | None = None
    retry_after: str | None = None
    delay_ms: float = 0.0
    body_delay_ms: float = 0.0
    disconnect: bool = False
    times: int | None = None


class State:
    """Per-application mutable state: recorded requests, the answer cache, the faults and the
    stored Responses objects."""

    def __init__(self, record: bool, usage: UsageMode = "always") -> None:
        self.record = record
        self.usage: UsageMode = usage
        self.records: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.cache: dict[tuple[str, bytes], Answer] = {}
        self.faults: list[Fault] = []
        self.responses: dict[str, dict[str, Any]] = {}

    def take_fault(
        self, upstream: str | None, path: str | None = None, *, path_only: bool = False
    ) -> Fault | None:
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

    def keep(self, stored: tuple[str, dict[str, Any]]) -> None:
        """Remember a Responses object for GET, DELETE and cancel; the oldest go first."""
        ident, value = stored
        self.responses.pop(ident, None)
        if len(self.responses) >= MAX_STORED_RESPONSES:
            del self.responses[next(iter(self.responses))]
        self.responses[ident] = value


STATE_KEY: Final = web.AppKey("fake_model_state", State)


def _error(status: int, message: str, shape: ErrorShape = "dial") -> web.Response:
    return web.Response(status=status, body=error_body(status, message, shape), content_type=JSON)


_NOT_FOUND_BODY: Final = error_body(404, "fake model: unknown path")


def _endpoint(path: str) -> str | None:
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/messages"):
        return "messages"
    if path.endswith("/messages/count_tokens"):
        return "count_tokens"
    return None


def _shape_of(endpoint: str) -> ErrorShape:
    return "anthropic" if endpoint in ("messages", "count_tokens") else "dial"


def _compute(endpoint: str, path: str, body: bytes, ctl: Control | None, mode: UsageMode) -> Answer:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("fake model: body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("fake model: body must be a JSON object")
    model = model_of(payload, path)
    if endpoint == "embeddings":
        return embedding_answer(payload, model, ctl, mode)
    if endpoint == "count_tokens":
        return count_tokens_answer(payload)
    stream = payload.get("stream") is True
    if endpoint == "chat":
        return chat_answer(payload, model, ctl, stream, mode)
    if endpoint == "responses":
        return responses_answer(payload, model, ctl, stream, mode)
    if endpoint == "messages":
        return messages_answer(payload, model, ctl, stream, mode)
    return completion_answer(payload, model, ctl, stream, mode)


def _record(request: web.Request, body: bytes) -> None:
    request.app[STATE_KEY].records.append(
        {
            "method": request.method,
            "path": request.path,
            "query_string": request.query_string,
            "raw_path": request.raw_path,  # as sent: path and query undecoded
            "client_port": _client_port(request),  # tells a reused connection from a new one
            "headers": [[header_text(k), header_text(v)] for k, v in request.raw_headers],
            "body": body.decode("utf-8", "replace"),
        }
    )


def _client_port(request: web.Request) -> int | None:
    transport = request.transport
    peer = None if transport is None else transport.get_extra_info("peername")
    return peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None


def parse_fault(value: Any) -> Fault:
    if not isinstance(value, dict):
        raise BadRequest("fake model: a fault is a JSON object")
    fault = Fault()
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
            raise BadRequest(f"fake model: bad fault field {name!r}")
    return fault


async def _apply_fault(
    request: web.Request, fault: Fault, shape: ErrorShape = "dial"
) -> web.StreamResponse | None:
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
    headers = {"Content-Type": JSON}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    body = error_body(fault.status, "fake fault", shape)
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
    request: web.Request, events: list[bytes], ctl: Control | None, prelude: int = 1
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    chunk_delay = 0.0 if ctl is None else ctl.chunk_delay_ms / 1000.0
    drop_at = None if ctl is None or ctl.drop_after is None else prelude + ctl.drop_after
    try:
        await resp.prepare(request)
        for i, event in enumerate(events):
            if drop_at is not None and i >= drop_at:
                # The prelude plus drop_after content events are out: vanish mid-stream,
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


async def _fault_answer(
    request: web.Request, state: State, path: str, shape: ErrorShape = "dial"
) -> web.StreamResponse | None:
    fault = state.take_fault(request.headers.get("X-UPSTREAM-ENDPOINT"), path)
    return None if fault is None else await _apply_fault(request, fault, shape)


async def _handle_feature(request: web.Request, feature: str, body: bytes) -> web.StreamResponse:
    """rate (`PONG`), tokenize (words per input), truncate_prompt (messages dropped to fit),
    configuration (a JSON schema); faults, `X-Fake-Status` and `X-Fake-Delay-Ms` apply."""
    state = request.app[STATE_KEY]
    if state.faults:
        fault = state.take_fault(request.headers.get("X-UPSTREAM-ENDPOINT"))
        if fault is not None:
            faulty = await _apply_fault(request, fault)
            if faulty is not None:
                return faulty
    try:
        ctl = parse_control(request.raw_headers)
        if ctl is not None:
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000.0)
            if ctl.status is not None:
                return _error(ctl.status, "fake failure")
        return feature_answer(feature, body)
    except BadRequest as exc:
        return _error(400, str(exc))


async def _handle_response_item(
    request: web.Request, ident: str, cancel: bool
) -> web.StreamResponse:
    """`GET .../responses/{id}` (JSON, or SSE with `stream=true` and `starting_after`),
    `DELETE .../responses/{id}` and `POST .../responses/{id}/cancel`."""
    state = request.app[STATE_KEY]
    if state.faults:
        faulty = await _fault_answer(request, state, request.path)
        if faulty is not None:
            return faulty
    try:
        ctl = parse_control(request.raw_headers)
        if ctl is not None:
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000.0)
            if ctl.status is not None:
                return _error(ctl.status, "fake failure")
        stored = state.responses.get(ident)
        if stored is None:
            return _error(404, f"Response with id '{ident}' not found.")
        if cancel:
            result = cancelled(stored)
            if result is None:
                return _error(400, "fake model: only a background response can be cancelled")
            return web.Response(body=orjson.dumps(result), content_type=JSON)
        if request.method == "DELETE":
            del state.responses[ident]
            deleted = {"id": ident, "object": "response", "deleted": True}
            return web.Response(body=orjson.dumps(deleted), content_type=JSON)
        if request.query.get("stream") == "true":
            after = request.query.get("starting_after", "-1")
            try:
                events = stream_events(stored, int(after))
            except ValueError:
                raise BadRequest("fake model: bad starting_after") from None
            return await _send_stream(request, events, ctl)
        return web.Response(body=orjson.dumps(stored["response"]), content_type=JSON)
    except BadRequest as exc:
        return _error(400, str(exc))


async def _handle_other(request: web.Request, path: str) -> web.StreamResponse:
    """A path no model serves: a fault set for that path, else the echo of its raw path (and
    query) that `X-Fake-Echo-Path` asks for (as DIAL's route tests' upstream), else 404."""
    state = request.app[STATE_KEY]
    if state.faults:
        upstream = request.headers.get("X-UPSTREAM-ENDPOINT")
        fault = state.take_fault(upstream, path, path_only=True)
        if fault is not None:
            faulty = await _apply_fault(request, fault)
            if faulty is not None:
                return faulty
    if "X-Fake-Echo-Path" in request.headers:
        return web.Response(text=request.raw_path)
    return web.Response(status=404, body=_NOT_FOUND_BODY, content_type=JSON)


def _response_item(path: str, method: str) -> tuple[str, bool] | None:
    """(id, is a cancel) for a Responses item path and method, else None."""
    match = _RESPONSE_ITEM_RE.search(path)
    if match is None:
        return None
    cancel = match.group(2) is not None
    if cancel:
        return (match.group(1), True) if method == "POST" else None
    return (match.group(1), False) if method in ("GET", "DELETE") else None


async def _handle_model(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    state = request.app[STATE_KEY]
    if state.record:
        _record(request, body)
    path = request.path
    endpoint = _endpoint(path)
    if endpoint is None or request.method != "POST":
        feature = feature_of(path, request.method)
        if feature is not None:  # off the chat path: it costs the benchmark nothing
            return await _handle_feature(request, feature, body)
        item = _response_item(path, request.method)
        if item is not None:
            return await _handle_response_item(request, *item)
        if state.faults or "X-Fake-Echo-Path" in request.headers:
            return await _handle_other(request, path)
        return web.Response(status=404, body=_NOT_FOUND_BODY, content_type=JSON)
    shape = _shape_of(endpoint)
    if state.faults:
        faulty = await _fault_answer(request, state, path, shape)
        if faulty is not None:
            return faulty
    try:
        ctl = parse_control(request.raw_headers)
        if ctl is None:
            # Fast path: an identical request was answered before, reuse its bytes.
            key = (path, body)
            answer = state.cache.get(key)
            if answer is None:
                answer = _compute(endpoint, path, body, None, state.usage)
                if len(body) <= _CACHE_MAX_BODY:
                    if len(state.cache) >= _CACHE_MAX_ENTRIES:
                        state.cache.clear()
                    state.cache[key] = answer
        else:
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000.0)
            if ctl.status is not None:
                return _error(ctl.status, "fake failure", shape)
            answer = _compute(endpoint, path, body, ctl, state.usage)
    except BadRequest as exc:
        return _error(400, str(exc), shape)
    if answer.stored is not None:
        state.keep(answer.stored)
    if answer.body is not None:
        return web.Response(body=answer.body, content_type=JSON)
    assert answer.events is not None
    return await _send_stream(request, answer.events, ctl, answer.prelude)


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _list_records(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(list(request.app[STATE_KEY].records)), content_type=JSON)


async def _clear_records(request: web.Request) -> web.Response:
    request.app[STATE_KEY].records.clear()
    return web.Response(status=204)


async def _add_fault(request: web.Request) -> web.Response:
    try:
        try:
            value = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise BadRequest("fake model: a fault is a JSON object") from None
        fault = parse_fault(value)
    except BadRequest as exc:
        return _error(400, str(exc))
    request.app[STATE_KEY].faults.append(fault)
    return web.Response(status=204)


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[STATE_KEY].faults.clear()
    return web.Response(status=204)


def build_app(*, record: bool = True, usage: UsageMode = "always") -> web.Application:
    """Build the fake model application; ``record`` keeps the last 200 requests in memory,
    ``usage`` says when answers report usage (``X-Fake-Usage`` overrides it per request)."""
    if usage not in USAGE_MODES:
        raise ValueError(f"usage must be one of {USAGE_MODES}")
    app = web.Application()
    app[STATE_KEY] = State(record, usage)
    # Control endpoints are not recorded, so polling them does not disturb what tests inspect.
    app.router.add_get("/health", _health, allow_head=False)
    app.router.add_get("/_fake/requests", _list_records, allow_head=False)
    app.router.add_delete("/_fake/requests", _clear_records)
    app.router.add_post("/_fake/faults", _add_fault)
    app.router.add_delete("/_fake/faults", _clear_faults)
    app.router.add_route("*", "/{tail:.*}", _handle_model)
    return app


async def _serve(host: str, port: int, record: bool, usage: UsageMode) -> None:
    app = build_app(record=record, usage=usage)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
        prog="tollgate fake-model",
        description="Fake model server: OpenAI chat, completions, embeddings and Responses, "
        "Anthropic Messages, DIAL's feature endpoints.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=9001, help="port to bind, 0 for any (default: %(default)s)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not keep recent requests")
    parser.add_argument(
        "--usage",
        choices=USAGE_MODES,
        default="always",
        help="when answers report usage: always; on-request (as OpenAI: a chat or completions "
        "stream only with stream_options.include_usage); never (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(args.host, args.port, not args.no_record, args.usage))
    return 0
