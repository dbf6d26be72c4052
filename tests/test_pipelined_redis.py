"""PipelinedRedis against a real redis-server: replies matched in order, failures, auth."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    ResponseError,
    TimeoutError,
)

from harness import free_port
from redis_server import RedisServer, start_redis_server, stop_redis_server
from tollgate.limits.pipelined_redis import PipelinedRedis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis-pipelined"))
    yield server
    stop_redis_server(server)


@pytest_asyncio.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[PipelinedRedis]:
    connection = PipelinedRedis("127.0.0.1", redis_server.port)
    yield connection
    await connection.aclose()


async def test_commands(client: PipelinedRedis) -> None:
    assert await client.ping()
    assert await client.set("pr:a", "1", px=60_000)
    assert await client.get("pr:a") == b"1"
    assert await client.get("pr:missing") is None
    assert await client.delete("pr:a") == 1
    assert await client.get("pr:a") is None
    assert (
        await client.eval(
            "return redis.call('SADD', KEYS[1], ARGV[1], ARGV[2])", 1, "pr:s", "x", "y"
        )
        == 2
    )
    assert await client.smembers("pr:s") == {b"x", b"y"}
    assert await client.eval("return {ARGV[1], tonumber(ARGV[2]) + 1}", 0, "a", 41) == [b"a", 42]


async def test_unknown_script_is_noscript_error(client: PipelinedRedis) -> None:
    with pytest.raises(NoScriptError):
        await client.evalsha("0" * 40, 0)
    assert await client.ping()  # the connection is still in step


async def test_concurrent_commands_each_get_their_own_reply(client: PipelinedRedis) -> None:
    await asyncio.gather(*(client.set(f"pr:n{i}", str(i)) for i in range(500)))
    values = await asyncio.gather(*(client.get(f"pr:n{i}") for i in range(500)))
    assert values == [str(i).encode() for i in range(500)]


async def test_an_error_reply_does_not_shift_the_others(client: PipelinedRedis) -> None:
    await client.set("pr:text", "not a number")

    async def incr_text() -> object:
        with contextlib.suppress(ResponseError):
            return await client.execute("INCR", "pr:text")
        return "refused"

    results = await asyncio.gather(
        client.set("pr:e1", "one"),
        incr_text(),
        client.get("pr:e1"),
        incr_text(),
        client.execute("INCRBY", "pr:counter", 5),
    )
    assert results[1:4] == ["refused", b"one", "refused"]
    assert isinstance(results[4], int)


async def test_a_cancelled_caller_does_not_shift_the_others(client: PipelinedRedis) -> None:
    await client.set("pr:c1", "first")
    await client.set("pr:c2", "second")
    doomed = asyncio.ensure_future(client.get("pr:c1"))
    survivor = asyncio.ensure_future(client.get("pr:c2"))
    await asyncio.sleep(0)  # both sent
    doomed.cancel()
    assert await survivor == b"second"
    assert await client.get("pr:c1") == b"first"


async def test_redis_restart_fails_calls_in_flight_then_reconnects(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path)
    client = PipelinedRedis("127.0.0.1", server.port, timeout_s=2.0)
    try:
        assert await client.ping()
        stop_redis_server(server)
        with pytest.raises(ConnectionError):
            await client.ping()  # the lost connection, then a refused new one
        server = start_redis_server(tmp_path, port=server.port)
        assert await client.ping()  # a new connection, with no restart of the client
    finally:
        await client.aclose()
        stop_redis_server(server)


async def test_a_server_that_never_answers_times_out() -> None:
    """A listener that accepts and stays silent: every command in flight fails together."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PipelinedRedis("127.0.0.1", port, timeout_s=0.3)
    try:
        started = time.monotonic()
        results = await asyncio.gather(client.ping(), client.get("x"), return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert waited < 5  # bounded by the timeout, not left hanging (no exact timing asserted)
        with pytest.raises(TimeoutError):  # a new connection, just as silent
            await client.ping()
        assert len(accepted) == 2
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_nothing_listening_is_a_connection_error() -> None:
    client = PipelinedRedis("127.0.0.1", free_port(), connect_timeout_s=1.0)
    with pytest.raises(ConnectionError):
        await client.ping()
    await client.aclose()


async def test_password_and_database(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path, password="s3cret-pass")
    try:
        anonymous = PipelinedRedis("127.0.0.1", server.port)
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()

        wrong = PipelinedRedis("127.0.0.1", server.port, password="nope")
        with pytest.raises(AuthenticationError):
            await wrong.ping()
        await wrong.aclose()

        client = PipelinedRedis("127.0.0.1", server.port, password="s3cret-pass", db=3)
        assert "s3cret" not in repr(client)
        await client.set("pr:db", "three")
        await client.aclose()
        with redis.Redis(port=server.port, password="s3cret-pass", db=3) as check:
            assert check.get("pr:db") == b"three"
        with redis.Redis(port=server.port, password="s3cret-pass", db=0) as check:
            assert check.get("pr:db") is None
    finally:
        stop_redis_server(server)
