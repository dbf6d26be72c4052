"""The upstream HTTP/1.1 client (pipeline/upstream_client.py) against servers on 127.0.0.1 that
each test scripts byte by byte."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tollgate.pipeline.hop import Failure, classify
from tollgate.pipeline.upstream_client import ConnectFailed, UpstreamClient, UpstreamProtocol

pytestmark = pytest.mark.inprocess

TIMEOUT = aiohttp.ClientTimeout(total=None, connect=2.0, sock_read=2.0)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def answer(body: bytes = b"hello", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body, or None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    """A scripted server: `handler(reader, writer, n)` runs for the n-th connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0  # connections whose client side closed (or that the handler ended)
        self.requests: list[tuple[bytes, bytes]] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def keep_alive(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        """Answer every request of the connection, then wait for the client to close."""
        while (request := await read_request(reader)) is not None:
            self.requests.append(request)
            writer.write(answer(b"answer %d" % len(self.requests)))
            await writer.drain()


@asynccontextmanager
async def serving(handler: Handler | None = None) -> AsyncIterator[Server]:
    server = Server(handler or (lambda r, w, n: server.keep_alive(r, w, n)))
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.005)


async def get(client: UpstreamClient, url: str, **options: Any) -> tuple[int, bytes]:
    async with await client.request(
        options.pop("method", "POST"),
        url,
        data=options.pop("data", b"{}"),
        headers=options.pop("headers", [("Content-Type", "application/json")]),
        timeout=options.pop("timeout", TIMEOUT),
    ) as response:
        return response.status, await response.read()


async def test_keep_alive_reuses_one_connection_and_writes_what_aiohttp_wrote() -> None:
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving() as server:
        assert await get(client, server.url + "/v1/x?a=b%20c") == (200, b"answer 1")
        assert await get(client, server.url + "/v1/x") == (200, b"answer 2")
        assert server.connections == 1
        head, body = server.requests[0]
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/x?a=b%20c HTTP/1.1"
        port = server.url.rsplit(":", 1)[1]
        assert lines[1] == f"Host: 127.0.0.1:{port}"
        names = {line.split(":", 1)[0].lower(): line for line in lines[1:] if line}
        assert names["content-length"] == "Content-Length: 2"
        assert names["content-type"] == "Content-Type: application/json"
        assert names["accept"] == "Accept: */*"
        assert names["user-agent"].startswith("User-Agent: Python/")
        assert "accept-encoding" in names
        assert body == b"{}"
    await client.close()


async def test_headers_that_would_add_a_line_are_refused() -> None:
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving() as server:
        with pytest.raises(ValueError):
            await get(client, server.url, headers=[("X-A", "1\r\nX-Injected: 2")])
    await client.close()


async def test_the_request_hook_sees_and_changes_the_headers() -> None:
    def hook(headers: CIMultiDict[str]) -> None:
        headers.popall("traceparent", None)
        headers["traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

    client = UpstreamClient(limit=10, limit_per_upstream=10, on_request=hook)
    async with serving() as server:
        await get(client, server.url, headers=[("traceparent", "client's")])
        head = server.requests[0][0].decode()
        assert "traceparent: 00-111" in head and "client's" not in head
    await client.close()


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def one_answer(r: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(r)
        writer.write(answer(b"conn %d" % n))  # keep-alive, then closes anyway
        await writer.drain()

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(one_answer) as server:
        assert await get(client, server.url) == (200, b"conn 1")
        await until(lambda: server.closed == 1)
        await asyncio.sleep(0.05)  # the FIN reaches the client
        assert await get(client, server.url) == (200, b"conn 2")
    await client.close()


async def closes_on_second(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    await read_request(reader)
    writer.write(answer(b"conn %d" % n))
    await writer.drain()
    await read_request(reader)  # the second request: closed without an answer


async def test_a_reused_connection_that_fails_before_an_answer_is_retried_once() -> None:
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(closes_on_second) as server:
        assert await get(client, server.url, method="GET", data=None) == (200, b"conn 1")
        assert await get(client, server.url, method="GET", data=None) == (200, b"conn 2")
        assert server.connections == 2
    await client.close()


async def test_a_post_is_not_sent_twice() -> None:
    # The upstream may have acted on it before it closed (as aiohttp, which retries only
    # idempotent methods).
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(closes_on_second) as server:
        assert await get(client, server.url) == (200, b"conn 1")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await get(client, server.url)
        assert server.connections == 1
        assert await get(client, server.url) == (200, b"conn 2")
    await client.close()


async def test_a_new_connection_that_fails_before_an_answer_is_not_retried() -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(closes) as server:
        with pytest.raises(aiohttp.ServerDisconnectedError) as caught:
            await get(client, server.url)
        assert classify(caught.value) is Failure.BROKEN
        assert server.connections == 1
    await client.close()


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-mid-chunk"],
)
async def test_a_server_that_closes_mid_body_breaks_the_answer(partial: bytes) -> None:
    async def breaks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(partial)
        await writer.drain()

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(breaks) as server:
        with pytest.raises(aiohttp.ClientPayloadError) as caught:
            await get(client, server.url)
        assert classify(caught.value) is Failure.BROKEN
        with pytest.raises(aiohttp.ClientPayloadError):  # on a new connection, not the broken one
            await get(client, server.url)
        assert server.connections == 2
    await client.close()


async def test_connect_refused_is_a_connect_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    with pytest.raises(ConnectFailed) as caught:
        await get(client, f"http://127.0.0.1:{port}/x")
    assert classify(caught.value) is Failure.CONNECT
    await client.close()


async def test_a_url_without_a_host_is_a_connect_failure() -> None:
    client = UpstreamClient(limit=10, limit_per_upstream=10)
    with pytest.raises(aiohttp.InvalidURL) as caught:
        await get(client, "ftp://x/y")
    assert classify(caught.value) is Failure.CONNECT
    await client.close()


@pytest.mark.parametrize("before_headers", [True, False], ids=["no-answer", "stalled-body"])
async def test_silence_longer_than_sock_read_is_a_timeout(before_headers: bool) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if not before_headers:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            await writer.drain()
        await asyncio.sleep(5)

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    timeout = aiohttp.ClientTimeout(total=None, connect=1.0, sock_read=0.2)
    async with serving(silent) as server:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError) as caught:
            await get(client, server.url, timeout=timeout)
        assert 0.15 < asyncio.get_running_loop().time() - started < 1.5
        assert classify(caught.value) is Failure.TIMEOUT
        assert isinstance(caught.value, aiohttp.SocketTimeoutError)
    await client.close()


async def test_a_slow_answer_within_sock_read_is_read_whole() -> None:
    async def trickles(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):  # 0.6 s in all, 0.1 s apart: each gap under sock_read
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await read_request(reader)

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    timeout = aiohttp.ClientTimeout(total=None, connect=1.0, sock_read=0.3)
    async with serving(trickles) as server:
        assert await get(client, server.url, timeout=timeout) == (200, b"xxxxxx")
    await client.close()


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'f\r\ndata: {"a":1}\n\n\r\n'
    b"10\r\ndata: [DONE]\n\n\n\n\r\n"
    b"0\r\n\r\n"
)
CHUNKED_BODY = b'data: {"a":1}\n\ndata: [DONE]\n\n\n\n'


async def exchange(pieces: list[bytes]) -> tuple[UpstreamProtocol, bytes]:
    protocol = UpstreamProtocol(asyncio.get_running_loop(), ("http", "u", 80))
    protocol.connection_made(FakeTransport())
    waiter = protocol.send(b"GET / HTTP/1.1\r\n\r\n", None, False, None)
    for piece in pieces:
        protocol.data_received(piece)
    message, payload = await waiter
    assert message.code == 200
    return protocol, await payload.read()


async def test_a_chunked_body_split_at_every_byte_is_read_whole() -> None:
    for cut in range(1, len(CHUNKED)):
        protocol, body = await exchange([CHUNKED[:cut], CHUNKED[cut:]])
        assert body == CHUNKED_BODY, cut
        assert protocol.reusable()
    protocol, body = await exchange([CHUNKED[i : i + 1] for i in range(len(CHUNKED))])
    assert body == CHUNKED_BODY
    assert protocol.reusable()


async def test_bytes_after_the_answer_make_the_connection_unusable() -> None:
    protocol, _ = await exchange([CHUNKED])
    protocol.data_received(b"HTTP/1.1 200 OK\r\n")
    assert not protocol.reusable()


async def test_the_pool_is_bounded_per_upstream_and_overall() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            await release.wait()
            writer.write(answer())
            await writer.drain()

    async with serving(held) as one, serving(held) as other:
        # Per upstream: 2 connections to `one`, a third caller waits for one of them.
        client = UpstreamClient(limit=10, limit_per_upstream=2)
        calls = [asyncio.create_task(get(client, one.url)) for _ in range(3)]
        await until(lambda: one.connections == 2)
        await asyncio.sleep(0.1)
        assert one.connections == 2 and not any(call.done() for call in calls)
        release.set()
        assert [await call for call in calls] == [(200, b"hello")] * 3
        assert one.connections == 2
        await client.close()

        # Overall: 2 connections in all, across two upstreams.
        release.clear()
        client = UpstreamClient(limit=2, limit_per_upstream=10)
        calls = [asyncio.create_task(get(client, server.url)) for server in (one, other, other)]
        await until(lambda: one.connections + other.connections == 4)
        await asyncio.sleep(0.1)
        assert (one.connections, other.connections) == (3, 1)  # 2 from before on `one`
        assert not any(call.done() for call in calls)
        release.set()
        assert [await call for call in calls] == [(200, b"hello")] * 3
        await client.close()


async def test_a_caller_that_gets_no_connection_in_time_times_out_as_a_connect() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await release.wait()
        writer.write(answer())
        await writer.drain()

    client = UpstreamClient(limit=10, limit_per_upstream=1)
    timeout = aiohttp.ClientTimeout(total=None, connect=0.2, sock_read=5.0)
    async with serving(held) as server:
        first = asyncio.create_task(get(client, server.url))
        await until(lambda: server.connections == 1)
        with pytest.raises(aiohttp.ConnectionTimeoutError) as caught:
            await get(client, server.url, timeout=timeout)
        assert classify(caught.value) is Failure.TIMEOUT
        release.set()
        assert await first == (200, b"hello")
        # The slot the timed-out caller waited for is free again.
        assert client._busy == 0
    await client.close()


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(b"x" * 1_000_000))
            await writer.drain()

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(large) as server:
        async with await client.request(
            "GET", server.url, data=None, headers=[], timeout=TIMEOUT
        ) as response:
            assert response.content_length == 1_000_000
            assert await response.content.readany()
        await until(lambda: server.closed == 1)  # closed, not pooled
        assert await get(client, server.url, method="GET", data=None) == (200, b"x" * 1_000_000)
        assert server.connections == 2
        assert await get(client, server.url, method="GET", data=None) == (200, b"x" * 1_000_000)
        assert server.connections == 2  # read whole: pooled and reused
    await client.close()


async def test_a_head_answer_and_a_204_have_no_body_and_keep_the_connection() -> None:
    async def bodiless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n")  # HEAD: no body follows
        await read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await read_request(reader)
        writer.write(answer(b"after"))
        await read_request(reader)

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(bodiless) as server:
        assert await get(client, server.url, method="HEAD", data=None) == (200, b"")
        assert await get(client, server.url) == (204, b"")
        assert await get(client, server.url) == (200, b"after")
        assert server.connections == 1
    await client.close()


async def test_an_answer_of_no_stated_length_ends_with_its_connection() -> None:
    async def until_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    client = UpstreamClient(limit=10, limit_per_upstream=10)
    async with serving(until_close) as server:
        assert await get(client, server.url) == (200, b"all of it")
        assert await get(client, server.url) == (200, b"all of it")
        assert server.connections == 2
    await client.close()
