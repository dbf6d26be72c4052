"""Step 6: the upstream response back to the client, streamed as it arrives (spec proxy 7)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tollgate.limits.usage import StreamUsage, Usage, body_usage

log = logging.getLogger("tollgate.relay")

DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# DECISIONS 9: after a client disconnect, read on for the final usage at most this long.
DRAIN_TIMEOUT_S = 30.0


def response_headers(upstream: CIMultiDictProxy[str], attempts: int) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones, plus `X-UPSTREAM-ATTEMPTS` (unless
    `attempts` is 0: an interceptor's answer keeps the header of the call it relays).

    Copied whole and pruned: both are single calls into multidict's C code, cheaper than
    filtering header by header in Python.
    """
    headers = CIMultiDict(upstream)
    for name in DROPPED_RESPONSE_HEADERS:
        if name in headers:
            del headers[name]
    if attempts:
        headers["X-UPSTREAM-ATTEMPTS"] = str(attempts)
    return headers


def is_stream(upstream: aiohttp.ClientResponse) -> bool:
    """Relay chunk by chunk when the upstream streams (SSE) or sends a body of unknown size."""
    headers = upstream.headers
    return (
        headers.get("Content-Type", "").startswith("text/event-stream")
        or "Content-Length" not in headers
    )


class Relayed(NamedTuple):
    response: web.StreamResponse
    usage: Usage | None  # of a 200 response only
    body: bytes  # the whole body; of a stream only when asked to keep it
    streamed: bool


MAX_KEPT_STREAM = 16 * 1024 * 1024


async def relay_whole(upstream: aiohttp.ClientResponse, attempts: int) -> Relayed:
    body = await upstream.read()
    response = web.Response(
        status=upstream.status,
        reason=upstream.reason,
        body=body,
        headers=response_headers(upstream.headers, attempts),
    )
    return Relayed(response, body_usage(body) if upstream.status == 200 else None, body, False)


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    attempts: int,
    *,
    keep: bool = False,
    on_client_gone: Callable[[], None] | None = None,
    stall_s: float | None = None,
) -> Relayed:
    """Write each chunk as it arrives; the client going away does not stop usage counting.

    With `keep`, the stream is also kept (up to 16 MiB) for pricing by characters.
    `on_client_gone` runs as soon as the client is found gone, before the upstream is drained.
    `stall_s`: a client that takes none of the answer for that long while some waits for it is
    disconnected (see `_StallWatch`), and counted as gone.
    """
    headers = response_headers(upstream.headers, attempts)
    # Sent before the handler returns, so the edge cannot add it later (spec proxy 2).
    headers["Access-Control-Allow-Origin"] = "*"
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    tracker = StreamUsage()
    kept = bytearray() if keep else None
    content = upstream.content
    watch = None if stall_s is None else _StallWatch(request.transport, stall_s)
    try:
        await response.prepare(request)
        async for chunk in content.iter_any():
            tracker.feed(chunk)
            if kept is not None and len(kept) < MAX_KEPT_STREAM:
                kept += chunk
            await response.write(chunk)
            if watch is not None:
                watch.written += 1
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        # The client left: read on (bounded) so the tokens already produced are counted.
        if on_client_gone is not None:
            on_client_gone()
        await _drain(content, tracker, kept)
    except (TimeoutError, aiohttp.ClientError) as exc:
        # The upstream broke off mid-stream: what was counted so far stands, and the client must
        # not mistake the truncated stream for a complete one, so its connection is cut too.
        log.warning("upstream stream ended abnormally: %s", type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
    finally:
        if watch is not None:
            watch.stop()
    usage = tracker.finish() if upstream.status == 200 else None
    body = bytes(kept) if kept else b""
    return Relayed(response, usage, body, True)


class _StallWatch:
    """Disconnects a client that stopped reading a stream.

    Without it, a client that reads nothing holds its call, its upstream connection and the
    chunks waiting in memory for as long as it stays connected (aiohttp's writes have no
    timeout). Every `stall_s` the watch looks: no chunk was written since the last look while
    bytes wait in the connection's buffer → the connection is aborted; the blocked write then
    fails as a disconnect does (the upstream is drained for usage, the call charged). One timer
    per stream, not one per chunk.
    """

    __slots__ = ("_seen", "_stall_s", "_timer", "_transport", "written")

    def __init__(self, transport: asyncio.Transport | None, stall_s: float) -> None:
        self._transport = transport
        self._stall_s = stall_s
        self.written = 0
        self._seen = 0
        self._timer = (
            None
            if transport is None
            else asyncio.get_running_loop().call_later(stall_s, self._look)
        )

    def _look(self) -> None:
        transport = self._transport
        assert transport is not None
        if self.written == self._seen and transport.get_write_buffer_size() > 0:
            log.warning(
                "client took none of a stream for %.0f s: disconnected (server.writeStallTimeout)",
                self._stall_s,
            )
            self._timer = None
            transport.abort()
            return
        self._seen = self.written
        self._timer = asyncio.get_running_loop().call_later(self._stall_s, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _drain(
    content: aiohttp.StreamReader, tracker: StreamUsage, kept: bytearray | None
) -> None:
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for chunk in content.iter_any():
                tracker.feed(chunk)
                if kept is not None and len(kept) < MAX_KEPT_STREAM:
                    kept += chunk
    except (TimeoutError, aiohttp.ClientError):
        pass
