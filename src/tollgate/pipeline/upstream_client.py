"""The HTTP/1.1 client of upstream hops: a keep-alive pool per upstream on asyncio protocols.

Every hop (`hop.HopEngine`) sends through one `UpstreamClient`. It does what the hop needs of
an HTTP client and nothing more, which is what makes it cheaper per call than aiohttp's
`ClientSession` (no request and response objects of a general client, no cookie jar, no
middleware, no per-call timer objects):

- a pool per (scheme, host, port), bounded overall (`server.maxConnections`-style
  `max_connections`) and per upstream (`max_connections_per_upstream`, compatibility C68) as
  aiohttp's connector bounds it: connections in use or being opened count, idle ones do not;
  a caller that gets no connection within the connect timeout fails as a connect timeout;
- keep-alive reuse (the most recently used connection first), idle connections closed after
  15 s; a connection whose answer was not read to its end, or that broke, is closed;
- the request written as one buffer (request line, headers, body);
- the answer parsed by aiohttp's parser (its C build when there is one), its body an aiohttp
  `StreamReader`, relayed as it comes: no decompression (compatibility C25, C26);
- aiohttp's timeouts as `hop.Timeouts` gives them: `connect` bounds getting a connection,
  `sock_read` the upstream's silence while its answer is awaited or read;
- a pooled connection the server closed while it was idle is never used, and an idempotent
  request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) on a reused connection that fails before
  any byte of an answer is sent once more on a new one, as aiohttp does; a POST is not: the
  upstream may have acted on it (a model call would run, and be billed, twice).

Failures are aiohttp's exception classes (`ClientError` and `TimeoutError` subclasses), so
`hop.classify` maps them as it mapped aiohttp's: `ConnectFailed` (a `ClientConnectorError`
in spirit) is a connect failure, `ConnectionTimeoutError` and `SocketTimeoutError` timeouts,
everything else broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from time import monotonic
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

if TYPE_CHECKING:
    from aiohttp.http_parser import RawResponseMessage

KEEPALIVE_S: Final = 15.0  # an idle connection is closed after this long (as aiohttp's)
DNS_TTL_S: Final = 300.0  # resolved addresses are reused this long (aiohttp's ttl_dns_cache)
READ_BUFSIZE: Final = 2**16  # the body buffer's limit before reading pauses (aiohttp's)
MAX_LINE_SIZE: Final = 8190  # aiohttp's default bounds of the status line and header lines
MAX_FIELD_SIZE: Final = 8190
LARGE_BODY: Final = 64 * 1024  # written after the head rather than copied into one buffer
# As aiohttp's ClientRequest sends them when a hop's headers do not name them.
USER_AGENT: Final = aiohttp.http.SERVER_SOFTWARE
DEFAULT_ACCEPT_ENCODING: Final = aiohttp.ClientRequest.DEFAULT_HEADERS[aiohttp.hdrs.ACCEPT_ENCODING]
BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CONTENT_TYPED_METHODS: Final = frozenset({"PATCH", "POST", "PUT"})
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

PoolKey = tuple[str, str, int]  # scheme, host, port


class ConnectFailed(aiohttp.ClientConnectionError):
    """No connection could be opened to the upstream (refused, unreachable, TLS, DNS)."""


class InvalidAnswer(aiohttp.ClientConnectionError):
    """The upstream's status line or headers are not HTTP/1.1 (or exceed the bounds)."""


class UpstreamProtocol(BaseProtocol):
    """One connection: the answer of the request in flight parsed as its bytes arrive.

    `BaseProtocol` is aiohttp's: the body's `StreamReader` pauses and resumes reading through
    it (and, in newer aiohttp, the parser with it), exactly as in aiohttp's own client.
    """

    __slots__ = (
        "_headers_waiter",
        "_payload",
        "_read_timeout",
        "_timer",
        "idle_since",
        "key",
        "last_read",
        "received",
        "should_close",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: PoolKey) -> None:
        super().__init__(loop)
        self.key = key
        self._headers_waiter: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._read_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.received = False  # a byte of the current answer came
        self.should_close = False
        self.idle_since = 0.0

    # --- one exchange --------------------------------------------------------------------

    def send(
        self, data: bytes, body: bytes | None, head_only: bool, read_timeout: float | None
    ) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        """Write the request; the future is the answer's head and body once its head came."""
        assert self.transport is not None
        self._parser = HttpResponseParser(
            self,
            self._loop,
            READ_BUFSIZE,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=not head_only,
            read_until_eof=True,  # a body of no stated length ends with the connection
            auto_decompress=False,
        )
        self.received = False
        self._payload = None
        waiter = self._headers_waiter = self._loop.create_future()
        self.transport.write(data)
        if body is not None:
            self.transport.write(body)
        self._read_timeout = read_timeout
        if read_timeout:
            self._arm(read_timeout)
        return waiter

    @property
    def done(self) -> bool:
        """The answer in flight was read to its end (or none is in flight)."""
        payload = self._payload
        return self._headers_waiter is None and (payload is None or payload.is_eof())

    def reusable(self) -> bool:
        payload = self._payload
        return (
            not self.should_close
            and self.transport is not None
            and not self.transport.is_closing()
            and self._headers_waiter is None
            and (payload is None or (payload.is_eof() and payload.exception() is None))
        )

    def close(self) -> None:
        self.should_close = True
        self._drop_timer()
        transport = self.transport
        if transport is not None:
            transport.close()

    # --- the read timeout: one timer per connection, moved on only when it fires ----------

    def _arm(self, timeout: float) -> None:
        now = self._loop.time()
        self.last_read = now
        timer = self._timer
        if timer is not None:
            if timer.when() <= now + timeout:
                return  # fires in time; it re-arms itself for the rest
            timer.cancel()
        self._timer = self._loop.call_at(now + timeout, self._check_read)

    def _check_read(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if not timeout or self.done or self._reading_paused:
            return  # nothing awaited from the upstream (a paused read waits for our reader)
        now = self._loop.time()
        if self._paused:  # the upstream is still taking our request body: not silent
            self.last_read = now
        deadline = self.last_read + timeout
        if deadline > now + 0.001:
            self._timer = self._loop.call_at(deadline, self._check_read)
            return
        self._fail(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
        self.close()

    def _drop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        self.should_close = True
        waiter = self._headers_waiter
        if waiter is not None:
            self._headers_waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(exc)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data:
            self.last_read = self._loop.time()
            self.received = True
        parser = self._parser
        if parser is None or (self.done and data):
            if data:  # bytes nobody asked for: the connection cannot be trusted any more
                self.close()
            return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail(
                aiohttp.ClientPayloadError(f"Response payload is not completed: {exc!r}")
                if self._payload is not None
                else InvalidAnswer(f"{type(exc).__name__}: {exc.message}")
            )
            self.close()
            return
        except Exception as exc:
            self._fail(InvalidAnswer(repr(exc)))
            self.close()
            return
        if upgraded:
            self.should_close = True
        for message, payload in messages:
            if message.should_close:
                self.should_close = True
            code = message.code
            if 100 <= code < 200 and code != 101:
                continue  # an interim answer (100 Continue): the final one follows
            waiter = self._headers_waiter
            if waiter is None:  # a second answer to one request
                self.close()
                return
            self._headers_waiter = None
            if code in EMPTY_BODY_STATUS_CODES:
                payload = EMPTY_PAYLOAD
            self._payload = payload
            if not waiter.done():
                waiter.set_result((message, payload))

    def eof_received(self) -> bool | None:
        return None  # closes the transport: connection_lost does the rest

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.last_read = self._loop.time()
        super().resume_reading(resume_parser)
        if self._read_timeout and self._timer is None and not self.done:
            self._arm(self._read_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.should_close = True
        self._drop_timer()
        parser = self._parser
        self._parser = None
        payload = self._payload
        if parser is not None and payload is not None and not payload.is_eof():
            try:
                parser.feed_eof()  # a body read to the end of the connection ends here
            except Exception as underlying:
                payload.set_exception(
                    aiohttp.ClientPayloadError(f"Response payload is not completed: {underlying!r}")
                )
            if not payload.is_eof() and payload.exception() is None:
                payload.set_exception(aiohttp.ClientPayloadError("Response payload not completed"))
        waiter = self._headers_waiter
        if waiter is not None:
            self._headers_waiter = None
            if not waiter.done():
                waiter.set_exception(
                    aiohttp.ClientOSError(*exc.args)
                    if isinstance(exc, OSError)
                    else aiohttp.ServerDisconnectedError()
                )
        super().connection_lost(exc)


class UpstreamResponse:
    """What the hop reads of an answer (the part of `aiohttp.ClientResponse` it uses)."""

    __slots__ = ("_client", "_conn", "content", "content_length", "headers", "status")

    def __init__(
        self,
        client: UpstreamClient,
        conn: UpstreamProtocol,
        message: RawResponseMessage,
        content: StreamReader,
    ) -> None:
        self._client = client
        self._conn: UpstreamProtocol | None = conn
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = content
        length = message.headers.get("Content-Length")
        self.content_length: int | None = int(length) if length else None
        if content is EMPTY_PAYLOAD:
            self.release()

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        try:
            body = await self.content.read()
        except BaseException:
            self.release()
            raise
        self.release()
        return body

    def release(self) -> None:
        """Back to the pool when the answer was read to its end, else closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._client.release(conn)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Upstream:
    """The connections of one (scheme, host, port)."""

    __slots__ = ("busy", "idle", "waiters")

    def __init__(self) -> None:
        self.idle: list[UpstreamProtocol] = []  # the most recently used last
        self.busy = 0  # in use or being opened
        self.waiters: deque[asyncio.Future[None]] = deque()


RequestHook = Callable[[CIMultiDict[str]], None]


class UpstreamClient:
    """The pool of upstream connections of one gateway process."""

    __slots__ = (
        "_busy",
        "_closed",
        "_dns",
        "_loop",
        "_open_conns",
        "_ssl",
        "_sweeper",
        "_upstreams",
        "_waiting",
        "limit",
        "limit_per_upstream",
        "on_request",
    )

    def __init__(
        self,
        *,
        limit: int,
        limit_per_upstream: int,
        on_request: RequestHook | None = None,
    ) -> None:
        self.limit = limit  # 0: unbounded (as aiohttp's)
        self.limit_per_upstream = limit_per_upstream
        # Called with each request's headers before they are written (tracing adds its context).
        self.on_request = on_request
        self._loop = asyncio.get_running_loop()
        self._upstreams: dict[PoolKey, _Upstream] = {}
        self._open_conns: set[UpstreamProtocol] = set()
        self._busy = 0
        self._waiting: dict[PoolKey, _Upstream] = {}  # upstreams with callers waiting
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # --- a request -----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: URL | str,
        *,
        data: bytes | None,
        headers: Iterable[tuple[str, str]],
        timeout: aiohttp.ClientTimeout,
    ) -> UpstreamResponse:
        if isinstance(url, str):
            url = URL(url)
        scheme = url.scheme
        host = url.raw_host
        if scheme not in ("http", "https") or not host:
            raise aiohttp.InvalidURL(url)
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        head = self._head(method, url, data, headers)
        body: bytes | None = None
        if data:
            if len(data) >= LARGE_BODY:
                body = data
            else:
                head += data
        head_only = method == "HEAD"
        read_timeout = timeout.sock_read
        conn, reused = await self._acquire(key, timeout.connect)
        while True:
            try:
                message, payload = await conn.send(head, body, head_only, read_timeout)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                self.release(conn)
                if not reused or conn.received or method not in IDEMPOTENT_METHODS:
                    raise
                # A kept-alive connection the upstream closed as we sent: once more on a new one.
                conn, reused = await self._acquire(key, timeout.connect, fresh=True)
                continue
            except BaseException:
                conn.close()  # cancelled or timed out mid-answer: never reused
                self.release(conn)
                raise
            return UpstreamResponse(self, conn, message, payload)

    def _head(
        self, method: str, url: URL, data: bytes | None, headers: Iterable[tuple[str, str]]
    ) -> bytes:
        """The request line and headers, with what aiohttp's ClientRequest adds."""
        hook = self.on_request
        if hook is not None:
            traced = CIMultiDict(headers)
            hook(traced)
            headers = traced.items()
        lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n"]
        named: set[str] = set()
        host_given = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == "host":
                host_given = True
            named.add(lowered)
            lines.append(f"{name}: {value}\r\n")
        if not host_given:
            lines.insert(1, f"Host: {url.host_port_subcomponent}\r\n")
        if "accept" not in named:
            lines.append("Accept: */*\r\n")
        if "accept-encoding" not in named:
            lines.append(f"Accept-Encoding: {DEFAULT_ACCEPT_ENCODING}\r\n")
        if "user-agent" not in named:
            lines.append(f"User-Agent: {USER_AGENT}\r\n")
        if "authorization" not in named and (url.raw_user or url.raw_password):
            auth = aiohttp.BasicAuth(url.user or "", url.password or "")
            lines.append(f"Authorization: {auth.encode()}\r\n")
        if "content-length" not in named and "transfer-encoding" not in named:
            if data is not None:
                lines.append(f"Content-Length: {len(data)}\r\n")
            elif method not in BODYLESS_METHODS:
                lines.append("Content-Length: 0\r\n")
        if "content-type" not in named and method in CONTENT_TYPED_METHODS:
            lines.append("Content-Type: application/octet-stream\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            # As aiohttp's writer: a header must not smuggle a line of its own.
            raise ValueError("Newline or carriage return character detected in HTTP header")
        return text.encode()

    # --- the pool --------------------------------------------------------------------------

    async def _acquire(
        self, key: PoolKey, connect_s: float | None, fresh: bool = False
    ) -> tuple[UpstreamProtocol, bool]:
        upstream = self._upstreams.get(key)
        if upstream is None:
            upstream = self._upstreams[key] = _Upstream()
        held = not upstream.waiters and self._free(upstream)
        if held:
            upstream.busy += 1
            self._busy += 1
            if not fresh:
                conn = self._idle(upstream)
                if conn is not None:
                    return conn, True  # the common case: no timer, no await
        try:
            async with asyncio.timeout(connect_s):
                if not held:
                    await self._wait(key, upstream)
                    held = True
                    if not fresh:
                        conn = self._idle(upstream)
                        if conn is not None:
                            return conn, True
                conn = await self._open(key)
        except BaseException as exc:
            if held:
                self._unbusy(upstream)
            raise self._timed_out(exc, key) from None
        self._open_conns.add(conn)
        return conn, False

    def _timed_out(self, exc: BaseException, key: PoolKey) -> BaseException:
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
            return aiohttp.ConnectionTimeoutError(f"Connection timeout to host {key[1]}:{key[2]}")
        return exc

    def _free(self, upstream: _Upstream) -> bool:
        return (not self.limit or self._busy < self.limit) and (
            not self.limit_per_upstream or upstream.busy < self.limit_per_upstream
        )

    async def _wait(self, key: PoolKey, upstream: _Upstream) -> None:
        """Until a slot of the pool is this caller's (counted busy when this returns)."""
        waiter = self._loop.create_future()
        upstream.waiters.append(waiter)
        self._waiting[key] = upstream
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._unbusy(upstream)  # handed a slot as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    upstream.waiters.remove(waiter)
            raise

    def _idle(self, upstream: _Upstream) -> UpstreamProtocol | None:
        idle = upstream.idle
        expired = monotonic() - KEEPALIVE_S
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing() and conn.idle_since > expired:
                return conn
            self._drop(conn)  # closed by the server while idle, or too old: never reused
        return None

    async def _open(self, key: PoolKey) -> UpstreamProtocol:
        scheme, host, port = key
        loop = self._loop
        addresses = await self._resolve(host, port)
        context = self._context() if scheme == "https" else None
        error: OSError | None = None
        for address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: UpstreamProtocol(loop, key),
                    address,
                    port,
                    ssl=context,
                    server_hostname=host.rstrip(".") if context is not None else None,
                )
                return conn
            except OSError as exc:  # ssl.SSLError and certificate errors included
                error = exc
        raise ConnectFailed(f"Cannot connect to host {host}:{port} [{error}]")

    async def _resolve(self, host: str, port: int) -> list[str]:
        cached = self._dns.get((host, port))
        now = monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectFailed(f"Cannot connect to host {host}:{port} [{exc}]") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL_S, addresses)
        return addresses

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # verified, as aiohttp's default
        return self._ssl

    def release(self, conn: UpstreamProtocol) -> None:
        """A connection's answer is done with: pooled when read to its end, else closed."""
        upstream = self._upstreams[conn.key]
        if conn.reusable() and not self._closed:
            conn._parser = None
            conn._payload = None
            conn.idle_since = monotonic()
            upstream.idle.append(conn)
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(KEEPALIVE_S, self._sweep)
        else:
            self._drop(conn)
        self._unbusy(upstream)

    def _drop(self, conn: UpstreamProtocol) -> None:
        conn.close()
        self._open_conns.discard(conn)

    def _unbusy(self, upstream: _Upstream) -> None:
        upstream.busy -= 1
        self._busy -= 1
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiting callers, their upstream's first, in arrival order."""
        for key, upstream in list(self._waiting.items()):
            waiters = upstream.waiters
            while waiters and self._free(upstream):
                waiter = waiters.popleft()
                if not waiter.done():
                    upstream.busy += 1
                    self._busy += 1
                    waiter.set_result(None)
            if not waiters:
                del self._waiting[key]
            if self.limit and self._busy >= self.limit:
                return

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive time."""
        self._sweeper = None
        expired = monotonic() - KEEPALIVE_S
        left = False
        for upstream in self._upstreams.values():
            idle = upstream.idle
            if idle:
                keep = [conn for conn in idle if conn.idle_since > expired]
                for conn in idle:
                    if conn.idle_since <= expired:
                        self._drop(conn)
                upstream.idle = keep
                left = left or bool(keep)
        if left and not self._closed:
            self._sweeper = self._loop.call_later(KEEPALIVE_S, self._sweep)

    async def close(self) -> None:
        """Close every connection (as aiohttp's connector does, those in use too)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for upstream in self._upstreams.values():
            upstream.idle.clear()
        for conn in self._open_conns:
            conn.close()
        self._open_conns.clear()
