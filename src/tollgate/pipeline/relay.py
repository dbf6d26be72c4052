"""Step 6: an upstream's answer back to the client, as it arrives (compatibility C26-C27).

Every hop's answer comes through here (see `hop.HopEngine`): its status (never its reason
phrase, which the upstream controls), its headers minus the hop-by-hop ones, and its body,
either read whole (up to the hop's bound, then parsed for usage) or streamed chunk by chunk
with the write-stall watch. A client that goes away mid-stream does not stop usage counting.
A 200 answer of a hop that reads usage also keeps what it produced (`Produced`), so that the
call can be charged an estimate when the answer reports no usage (compatibility C71).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tollgate.limits.api_usage import ProducedText, UsageFormat
from tollgate.limits.usage import Usage
from tollgate.pipeline.include_usage import HideUsage
from tollgate.pipeline.upstream_client import UpstreamResponse

if TYPE_CHECKING:
    from tollgate.pipeline.budget import StreamBudget

log = logging.getLogger("tollgate.relay")

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
DROPPED_RESPONSE_HEADERS: Final = HOP_BY_HOP | {"content-length"}
# After a client disconnect, read on for the final usage at most this long (compatibility C29).
DRAIN_TIMEOUT_S: Final = 30.0
MAX_KEPT_STREAM: Final = 16 * 1024 * 1024  # a stream kept for pricing by characters
TAIL_BYTES: Final = 64 * 1024  # of a streamed body that is not an event stream: where usage is
# Of a 200 stream, kept by reference for an estimate of its usage; past it, the chunks of an event
# stream are read for their text and let go (compatibility C71).
KEEP_FOR_ESTIMATE: Final = 4 * 1024 * 1024


def nominated(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The header names a `Connection` header nominates as hop-by-hop (RFC 9110 7.6.1)."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(names)


def response_headers(upstream: CIMultiDictProxy[str], attempts: int) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones (and those its `Connection` names), plus
    `X-UPSTREAM-ATTEMPTS` (unless `attempts` is 0: a hop that is not retried).

    Copied whole and pruned: both are single calls into multidict's C code, cheaper than
    filtering header by header in Python.
    """
    headers = CIMultiDict(upstream)
    dropped = DROPPED_RESPONSE_HEADERS
    if "Connection" in headers:
        dropped = dropped | nominated(headers)
    for name in dropped:
        if name in headers:
            del headers[name]
    if attempts:
        headers["X-UPSTREAM-ATTEMPTS"] = str(attempts)
    return headers


class Produced:
    """What a 200 stream produced, kept in case it reports no usage (compatibility C71).

    Usage nearly always comes, so nothing is parsed while the stream is relayed: its chunks
    are kept by reference (a list append per chunk) up to `KEEP_FOR_ESTIMATE`. Past that, an
    event stream's chunks are read for their text (`UsageFormat.produced`) and let go, and of
    any other body only its size is kept. `text` reads what is left, once, when the stream
    ended without usage.
    """

    __slots__ = ("_parts", "_reader", "chunks", "event_stream", "kept", "spilled", "usage_format")

    def __init__(self, usage_format: UsageFormat, event_stream: bool) -> None:
        self.usage_format = usage_format
        self.event_stream = event_stream
        self.chunks: list[bytes] = []
        self.kept = 0  # bytes in `chunks` (kept up to date by whoever appends)
        self.spilled = 0  # bytes let go
        self._reader: ProducedText | None = None
        self._parts: list[str] = []

    def add(self, chunk: bytes) -> None:
        """One chunk (the relay's loop appends to `chunks` itself, inline)."""
        self.chunks.append(chunk)
        self.kept += len(chunk)
        if self.kept > KEEP_FOR_ESTIMATE:
            self.spill()

    def spill(self) -> int:
        """Let the kept chunks go: an event stream's are read for their text first. Returns
        the bytes kept now: 0."""
        chunks = self.chunks
        if self.event_stream:
            reader = self._reader
            if reader is None:
                reader = self._reader = self.usage_format.produced()
            self._parts.append(reader.feed(b"".join(chunks)))
        self.spilled += sum(map(len, chunks))
        chunks.clear()
        self.kept = 0
        return 0

    def size(self) -> int:
        """Bytes the upstream sent."""
        return self.spilled + sum(map(len, self.chunks))

    def text(self) -> str | None:
        """The text the stream produced; None when it cannot be read (a body that is not an
        event stream and not a JSON object, or one past the bound). Call once."""
        chunks = self.chunks
        if not self.event_stream:
            return None if self.spilled else self.usage_format.text(b"".join(chunks))
        reader = self._reader
        if reader is None:
            reader = self._reader = self.usage_format.produced()
        parts = self._parts
        if chunks:
            parts.append(reader.feed(b"".join(chunks)))
        parts.append(reader.end())
        return "".join(parts)


class Relayed(NamedTuple):
    response: web.StreamResponse
    usage: Usage | None  # of a 200 answer of a hop that reads usage
    body: bytes  # the whole body; of a stream only when asked to keep it
    streamed: bool
    # How the answer reports usage (its API family); None when the hop reads none.
    usage_format: UsageFormat | None = None
    produced: Produced | None = None  # of a 200 stream of a hop that reads usage
    estimated: bool = False  # `usage` is Tollgate's estimate (pipeline/estimate.py)


def streams(upstream: UpstreamResponse, buffer_limit: int, method: str) -> bool:
    """Relay chunk by chunk when the upstream streams (SSE), sends a body of unknown size, or
    one larger than the hop reads whole; a HEAD answer has no body to stream."""
    if method == "HEAD":
        return False
    length = upstream.content_length
    return (
        length is None
        or length > buffer_limit
        or upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    )


async def relay_whole(
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    usage_format: UsageFormat | None,
) -> Relayed:
    """The whole answer at once; its length is known and within the hop's bound (`streams`).

    `usage_format`: how the answer reports usage, or None when the hop reads none."""
    body = await upstream.read()
    response = web.Response(status=upstream.status, body=body, headers=headers)
    usage = usage_format.body(body) if usage_format is not None and upstream.status == 200 else None
    return Relayed(response, usage, body, False, usage_format)


class ChunkFilter(Protocol):
    """Changes a stream on its way: `filter` returns what may be sent now (b"": hold it),
    `end` what is still held when the stream ends."""

    def filter(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class UsageTracker(Protocol):
    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Usage | None: ...


class TailUsage:
    """Usage of a streamed body that is not an event stream: the last `usage` object in its
    last `TAIL_BYTES` (where the APIs put it in a whole answer), in bounded memory."""

    __slots__ = ("_read", "_tail")

    def __init__(self, read: Callable[[bytes], Usage | None]) -> None:
        self._read = read
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        tail = self._tail + chunk
        self._tail = tail[-TAIL_BYTES:] if len(tail) > TAIL_BYTES else tail

    def finish(self) -> Usage | None:
        return self._read(self._tail)


class _NoUsage:
    __slots__ = ()

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> Usage | None:
        return None


NO_USAGE: Final = _NoUsage()


async def relay_stream(
    request: web.Request,
    upstream: UpstreamResponse,
    headers: CIMultiDict[str],
    *,
    usage_format: UsageFormat | None,
    stalls: StallWatch,
    keep: bool = False,
    hide_usage: bool = False,
    on_client_gone: Callable[[], None] | None = None,
    rewrite: ChunkFilter | None = None,
    budget: StreamBudget | None = None,
) -> Relayed:
    """Write each chunk as it arrives; the client going away does not stop usage counting.

    `usage_format`: how the answer reports usage (its API family), or None when the hop reads
    none.
    With `keep`, the stream is also kept (up to 16 MiB) for pricing by characters. With
    `hide_usage`, what Tollgate's `stream_options.include_usage` added to an event stream is
    taken out of what the client gets (`HideUsage`); usage is still read from the upstream's
    bytes (compatibility C70).
    `on_client_gone` runs as soon as the client is found gone, before the upstream is drained.
    `rewrite` changes a 2xx event stream's bytes on their way (Responses ids, compatibility
    C78); usage is read from the upstream's bytes all the same.
    `stalls`: a client that takes none of the answer for its interval while some waits for it is
    disconnected (see `StallWatch`), and counted as gone.
    `budget` (`limits.enforceDuringStream`) counts a 200 event stream against the caller's
    token and cost limits, event by event; when they leave no room, the stream ends with the
    API's error event, the upstream is closed and the call is charged what was produced
    (compatibility C79).
    """
    # Sent before the handler returns, so the edge cannot add it later (compatibility C21).
    headers["Access-Control-Allow-Origin"] = "*"
    response = web.StreamResponse(status=upstream.status, headers=headers)
    tracker: UsageTracker = NO_USAGE
    hide: ChunkFilter | None = None  # what changes the bytes the client gets
    produced: Produced | None = None
    chunks: list[bytes] | None = None  # produced.chunks, appended to inline: the cheapest way
    event_stream = headers.get("Content-Type", "").startswith("text/event-stream")
    if upstream.status == 200 and (usage_format is not None or hide_usage):
        if usage_format is not None:
            tracker = usage_format.stream() if event_stream else TailUsage(usage_format.body)
            produced = Produced(usage_format, event_stream)
            chunks = produced.chunks
        if hide_usage and event_stream:
            hide = HideUsage()
    if rewrite is not None and 200 <= upstream.status < 300 and event_stream:
        hide = rewrite
    if budget is not None and (upstream.status != 200 or usage_format is None or not event_stream):
        budget = None  # only a 200 event stream is counted as it goes
    kept = bytearray() if keep else None
    kept_size = 0  # bytes in `chunks`
    content = upstream.content
    watch = stalls.watch(request.transport)
    try:
        await response.prepare(request)
        async for chunk in content.iter_any():
            tracker.feed(chunk)
            if chunks is not None:
                chunks.append(chunk)
                kept_size += len(chunk)
                if kept_size > KEEP_FOR_ESTIMATE and produced is not None:
                    produced.kept = kept_size
                    kept_size = produced.spill()
            if kept is not None and len(kept) < MAX_KEPT_STREAM:
                kept += chunk
            if budget is not None:
                chunk = budget.take(chunk)  # whole events only
                if budget.due and not await budget.extend():
                    break  # the limits leave no room for these events
                if not chunk:
                    continue
            if hide is not None:
                chunk = hide.filter(chunk)
                if not chunk:  # a partial event, held until its end
                    continue
            await response.write(chunk)
            if watch is not None:
                watch.written += 1
        if budget is not None and budget.cut is not None:
            # What a filter still holds is part of the events not sent; the upstream's
            # connection is closed, not read on (compatibility C79).
            upstream.release()
            await response.write(budget.error_event())
        else:
            if budget is not None and (rest := budget.end()):
                rest = hide.filter(rest) if hide is not None else rest
                if rest:
                    await response.write(rest)
            if hide is not None and (rest := hide.end()):
                await response.write(rest)
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        # The client left: read on (bounded) so the tokens already produced are counted.
        if on_client_gone is not None:
            on_client_gone()
        if tracker is not NO_USAGE or kept is not None:
            if produced is not None:
                produced.kept = kept_size
            await _drain(content, tracker, kept, produced, budget)
            if budget is not None and budget.cut is not None:
                upstream.release()
    except (TimeoutError, aiohttp.ClientError) as exc:
        # The upstream broke off mid-stream: what was counted so far stands, and the client must
        # not mistake the truncated stream for a complete one, so its connection is cut too.
        log.warning("upstream stream ended abnormally: %s", type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
    finally:
        stalls.forget(watch)
    usage = tracker.finish()
    body = bytes(kept) if kept else b""
    if budget is not None and budget.cut is not None:
        counted = budget.charged(usage)
        return Relayed(response, counted, body, True, usage_format, produced, counted is not usage)
    return Relayed(response, usage, body, True, usage_format, produced)


class Watched:
    """One stream under a `StallWatch`: its connection and how many chunks were written."""

    __slots__ = ("seen", "transport", "written")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.written = 0
        self.seen = -1  # not looked at yet: the first look only notes where the stream is


class StallWatch:
    """Disconnects clients that stopped reading a stream.

    Without it, a client that reads nothing holds its call, its upstream connection and the
    chunks waiting in memory for as long as it stays connected (aiohttp's writes have no
    timeout). Every `stall_s` one timer looks at every stream being relayed: one that had no
    chunk written since the last look while bytes wait in its connection's buffer is aborted;
    its blocked write then fails as a disconnect does (the upstream is drained for usage, the
    call charged). So a stalled client is cut after between one and two intervals. One timer
    for all streams rather than one per stream: a stream costs a set insertion, not a timer.
    """

    __slots__ = ("_streams", "_timer", "stall_s")

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._streams: set[Watched] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, transport: asyncio.Transport | None) -> Watched | None:
        if transport is None:  # the client is already gone
            return None
        watched = Watched(transport)
        self._streams.add(watched)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.stall_s, self._look)
        return watched

    def forget(self, watched: Watched | None) -> None:
        if watched is not None:
            self._streams.discard(watched)

    def _look(self) -> None:
        stalled = [
            watched
            for watched in self._streams
            if watched.written == watched.seen and watched.transport.get_write_buffer_size() > 0
        ]
        for watched in self._streams:
            watched.seen = watched.written
        for watched in stalled:
            log.warning(
                "client took none of a stream for %.0f s: disconnected (server.writeStallTimeout)",
                self.stall_s,
            )
            self._streams.discard(watched)
            watched.transport.abort()
        self._timer = (
            asyncio.get_running_loop().call_later(self.stall_s, self._look)
            if self._streams
            else None
        )

    def stop(self) -> None:
        """At shutdown: no look after the loop closes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def _drain(
    content: aiohttp.StreamReader,
    tracker: UsageTracker,
    kept: bytearray | None,
    produced: Produced | None,
    budget: StreamBudget | None = None,
) -> None:
    if budget is not None and budget.cut is not None:
        return  # the stream was ended at the limits: its upstream is closed
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for chunk in content.iter_any():
                tracker.feed(chunk)
                if produced is not None:
                    produced.add(chunk)
                if kept is not None and len(kept) < MAX_KEPT_STREAM:
                    kept += chunk
                # The client left, the limits still hold: the upstream is not read (and
                # charged) past them (compatibility C79).
                if budget is not None:
                    budget.take(chunk)
                    if budget.due and not await budget.extend():
                        return
    except (TimeoutError, aiohttp.ClientError):
        pass
