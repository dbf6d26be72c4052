"""A small pipelined Redis client for the hot path: one connection, every command pipelined.

Every limited call makes two or three Redis round trips (publish the hop's key, admit, settle).
redis-py's asyncio client spends about 50 µs of CPU on each (a pooled connection checked out
and back, a lock, a buffered reader per command): more than the rest of the gateway's work on a
call. This client writes each command into one shared connection at once, flushes everything
queued once per event-loop iteration (one `write` for all calls in flight) and matches replies
to callers in order (Redis answers a connection's commands in the order sent), parsed by
hiredis in C: a few µs per command.

It speaks what the gateway uses (EVALSHA, EVAL, SET, GET, DEL, SMEMBERS, PING) to a single
server; Redis Cluster keeps redis-py's cluster client, which routes by slot and follows
failovers. Errors are redis-py's exception classes, so callers handle both clients alike.

Failures: a connection that breaks fails every command in flight (`ConnectionError`); the next
command opens a new one. A command unanswered after `timeout_s` fails with every other command
of its connection (`TimeoutError`), and the connection is closed: replies can no longer be
matched once one is abandoned. Checking that takes one timer per connection, not one per call.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import ssl
import time
from typing import Any, cast

import hiredis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

Arg = str | bytes | int | float


class _ReplyError(Exception):
    """What hiredis hands back for an error reply (`-ERR ...`), turned into redis-py's."""


def _error(reply: _ReplyError) -> RedisError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return AuthenticationError(text)
    return ResponseError(text)


def _encode(args: tuple[Arg, ...]) -> bytes:
    """A command in RESP: an array of bulk strings (hiredis's encoder: ~3x faster than one in
    Python, which cost ~5 µs for a script call's two dozen arguments)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # stub: 1-tuple
    return packed


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; commands go out in batches, replies come back in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader(replyError=_ReplyError)
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._queued: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        self._watchdog = self._loop.call_later(self._timeout_s / 4, self._check_timeouts)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(ConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:  # an answer nobody asked for: the stream is out of step
                self._fail(ConnectionError("Redis sent an unexpected reply"))
                return
            future, _ = pending.popleft()
            if future.done():  # its caller was cancelled; the reply is still consumed
                continue
            if isinstance(reply, _ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("Redis connection lost"))

    # --- commands --------------------------------------------------------------------------

    def send(self, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        if self.closed:
            raise ConnectionError("Redis connection closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append((future, time.monotonic()))
        self._queued.append(_encode(args))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._queued and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._queued))
        self._queued.clear()

    def _check_timeouts(self) -> None:
        if self.closed:
            return
        if self._pending and time.monotonic() - self._pending[0][1] > self._timeout_s:
            self._fail(TimeoutError("Timeout reading from Redis"))
            return
        self._watchdog = self._loop.call_later(self._timeout_s / 4, self._check_timeouts)

    def _fail(self, error: Exception) -> None:
        """Close, and fail every command in flight: their replies can no longer be matched."""
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._transport is not None:
            self._transport.abort()
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        self._queued.clear()

    def close(self) -> None:
        self._fail(ConnectionError("Redis client closed"))


class PipelinedRedis:
    """The commands the gateway sends to a single Redis server, pipelined on one connection."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout_s: float = 1.0,
        connect_timeout_s: float = 1.0,
    ) -> None:
        self._host = host
        self._port = port
        self._db = db
        self._username = username
        self._password = password
        self._tls = tls
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    def __repr__(self) -> str:  # never the password
        return f"PipelinedRedis({self._host}:{self._port}, db={self._db})"

    async def execute(self, *args: Arg) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.send(args)

    async def _connect(self) -> _Connection:
        # One connection attempt at a time, shared by every command that needs it.
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self._tls else None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._timeout_s),
                    self._host,
                    self._port,
                    ssl=context,
                    server_hostname=self._host if context else None,
                )
                try:
                    if self._password is not None:
                        credentials: tuple[Arg, ...] = (
                            (self._username, self._password)
                            if self._username
                            else (self._password,)
                        )
                        await connection.send(("AUTH", *credentials))
                    if self._db:
                        await connection.send(("SELECT", self._db))
                except BaseException:
                    connection.close()
                    raise
        except TimeoutError:
            raise TimeoutError(f"Timeout connecting to Redis {self._host}:{self._port}") from None
        except OSError as exc:
            raise ConnectionError(
                f"Cannot connect to Redis {self._host}:{self._port}: {exc.strerror or exc}"
            ) from None
        self._connection = connection
        return connection

    # --- the commands, named and shaped as redis-py's ---------------------------------------

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVAL", script, numkeys, *keys_and_args)

    async def set(self, name: str, value: Arg, px: int | None = None) -> bool:
        if px is None:
            return bool(await self.execute("SET", name, value))
        return bool(await self.execute("SET", name, value, "PX", px))

    async def get(self, name: str) -> bytes | None:
        value: bytes | None = await self.execute("GET", name)
        return value

    async def delete(self, *names: str) -> int:
        deleted: int = await self.execute("DEL", *names)
        return deleted

    async def smembers(self, name: str) -> builtins.set[bytes]:
        return set(await self.execute("SMEMBERS", name))

    async def ping(self) -> bool:
        return bool(await self.execute("PING"))

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
            self._connecting = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
