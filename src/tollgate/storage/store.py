"""The resource store: a small async interface over a folder or an object store (compatibility C80).

A key is a `/`-separated path (`Users/alice/files/report.pdf`, DIAL's storage key without
`storage.prefix`, which the store adds itself). Every write is atomic (a reader sees the old
object or the new one, never part of one) and may be conditional on the ETag the writer read,
so two instances never lose each other's update: `put(..., if_match=etag)` replaces only that
version, `put(..., if_none_match=True)` only creates, and a lost race raises
`PreconditionFailed`. ETags are opaque strings compared for equality (the hex MD5 of the content
on the filesystem and on S3; the provider's own tag on Azure, the object's generation on GCS).
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import concurrent.futures
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

MAX_KEY_BYTES = 1024  # S3's and GCS's limit on an object name, UTF-8
# Segments Tollgate keeps for itself on the filesystem (temporary files, lock files): never a key.
RESERVED_SEGMENT_PREFIX = ".tollgate-"
DEFAULT_PAGE_SIZE = 1000
_T = TypeVar("_T")


class StorageError(Exception):
    """A store operation that failed; subclasses say why."""


class InvalidKey(StorageError, ValueError):
    """A key or folder that does not name a place inside the store (`..`, `/x`, NUL, `\\`...)."""


class NotFound(StorageError):
    """The object does not exist (a delete of a missing key)."""


class PreconditionFailed(StorageError):
    """An `if_match` / `if_none_match` condition did not hold: another writer got there first."""


class StoreUnavailable(StorageError):
    """The store cannot be reached or refused the operation (network, disk, credentials)."""


class TooLarge(StorageError):
    """A streamed write went past its `max_bytes`: nothing was written."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """An object's metadata: what a listing or `head` gives."""

    key: str
    size: int
    last_modified: datetime  # UTC
    etag: str | None  # None where a listing does not carry it (the filesystem's)
    # What `put_stream` stored: `head` and `get_stream` give them, a listing leaves them None
    # (as does an object written by `put`, which stores no metadata).
    content_type: str | None = None
    created_at: datetime | None = None  # UTC; kept when `put_stream` replaces the object


@dataclass(frozen=True, slots=True)
class Blob:
    """An object as read: its bytes and the ETag a conditional write names."""

    key: str
    data: bytes = field(repr=False)
    etag: str
    last_modified: datetime  # UTC

    @property
    def size(self) -> int:
        return len(self.data)


class BatchedChunks(abc.ABC):
    """A streamed read's chunks: batches fetched by `_next_batch` (a worker-thread call each),
    handed out `chunk_size` bytes at a time. A provider says how a batch is read and how its
    source is released (`_release`, on the end, on `aclose()`, or on a failure)."""

    def __init__(self, chunk_size: int) -> None:
        self._chunk_size = chunk_size
        self._batch = b""
        self._at = 0
        self._done = False

    def __aiter__(self) -> BatchedChunks:
        return self

    async def __anext__(self) -> bytes:
        while self._at >= len(self._batch):
            if self._done:
                raise StopAsyncIteration
            try:
                batch = await self._next_batch()
            except BaseException:
                await self.aclose()
                raise
            if not batch:
                await self.aclose()
                raise StopAsyncIteration
            self._batch, self._at = batch, 0
        chunk = self._batch[self._at : self._at + self._chunk_size]
        self._at += len(chunk)
        return chunk

    async def aclose(self) -> None:
        self._batch = b""
        if not self._done:
            self._done = True
            await self._release()

    @abc.abstractmethod
    async def _next_batch(self) -> bytes:
        """The next bytes of the object; empty at its end. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def _release(self) -> None:
        """Let go of the file or the connection."""


@dataclass(frozen=True, slots=True)
class StreamedObject:
    """An object being read: its metadata and an iterator of its bytes in bounded chunks.

    The iterator holds a file or a connection until it is exhausted or closed: read it to the
    end, or `await obj.aclose()` (or use `async with obj:`) when stopping early.
    """

    info: ObjectInfo
    chunks: AsyncIterator[bytes] = field(repr=False)

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def etag(self) -> str | None:
        return self.info.etag

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks

    async def aclose(self) -> None:
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> StreamedObject:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, in key order: objects, sub-folders (non-recursive listings only,
    each ending in `/`), and the token of the next page (None on the last)."""

    objects: tuple[ObjectInfo, ...]
    folders: tuple[str, ...] = ()
    next_token: str | None = None


def check_key(key: str) -> str:
    """`key` if it names an object inside the store, else `InvalidKey`.

    Refused: empty keys and segments (`a//b`, a trailing `/`), `.` and `..`, a leading `/`,
    NUL and other control characters, backslashes (a path separator on Windows and a way round
    a check of `/`), Tollgate's reserved `.tollgate-*` names, and more than 1024 UTF-8 bytes.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("empty key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidKey(f"key longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise InvalidKey(f"key with a backslash or a control character: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"key with an empty, '.' or '..' segment: {key!r}")
        if segment.startswith(RESERVED_SEGMENT_PREFIX):
            raise InvalidKey(f"key with a reserved segment: {key!r}")
    return key


def check_folder(folder: str) -> str:
    """A folder to list: `""` (the root) or a valid key followed by `/` (added when missing)."""
    if folder == "":
        return folder
    if not isinstance(folder, str):
        raise InvalidKey("folder must be a string")
    check_key(folder.removesuffix("/"))
    return folder if folder.endswith("/") else folder + "/"


class ResourceStore(abc.ABC):
    """A key-value store of bytes with ETags, atomic and conditional writes, paged listings."""

    @abc.abstractmethod
    async def get(self, key: str) -> Blob | None:
        """The object, or None if there is none."""

    async def get_many(self, keys: builtins.list[str]) -> builtins.list[Blob | None]:
        """`get` of each key, in order (a provider may read them in one go)."""
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's metadata with its ETag, or None if there is none."""

    @abc.abstractmethod
    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Store `data` at `key` atomically and return its new ETag.

        `if_match`: only if the object exists with that ETag. `if_none_match`: only if no object
        exists. Either condition failing (a missing object for `if_match` included) raises
        `PreconditionFailed` and writes nothing.
        """

    @abc.abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
        max_bytes: int | None = None,
    ) -> ObjectInfo:
        """Store the bytes `chunks` yields at `key` and return the new object's info (its
        ETag as `put` gives it, its size, `content_type`, and the `created_at` of the object
        it replaced, or now for a new one).

        Memory stays bounded whatever the object's size. Atomic as `put` is: an exception from
        `chunks`, more than `max_bytes` (`TooLarge`), a cancellation or a killed process leave
        the old object as it was and no part of the new one visible. Conditions as in `put`
        (what each provider guarantees for large objects: its module's docstring).
        """

    @abc.abstractmethod
    async def get_stream(self, key: str, *, chunk_size: int = 65536) -> StreamedObject | None:
        """The object's info and its bytes in chunks of at most `chunk_size` (the last may be
        shorter), or None if there is none. The bytes are those of the version the info
        describes; the iterator releases its file or connection when exhausted or closed."""

    @abc.abstractmethod
    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object; `NotFound` if there is none, `PreconditionFailed` if `if_match`
        names another version."""

    async def list(
        self,
        folder: str = "",
        *,
        recursive: bool = True,
        limit: int = DEFAULT_PAGE_SIZE,
        token: str | None = None,
    ) -> Page:
        """A page of the objects under `folder` (`""` or `a/b/`), in key order, after `token`
        (the previous page's `next_token`). Recursive: every object below; otherwise the
        objects in the folder and its sub-folders' names (each counts towards `limit`)."""
        folder = check_folder(folder)
        if limit < 1:
            raise ValueError("limit must be positive")
        return await self._page(folder, recursive, limit, token)

    @abc.abstractmethod
    async def _page(self, folder: str, recursive: bool, limit: int, token: str | None) -> Page:
        """`list` of a checked folder (`""` or ending in `/`) and a positive limit."""

    async def close(self) -> None:  # noqa: B027 (a store without resources needs no close)
        """Release connections and threads."""

    async def list_all(
        self, folder: str = "", *, limit: int = DEFAULT_PAGE_SIZE
    ) -> builtins.list[ObjectInfo]:
        """Every object below `folder`, page after page."""
        objects: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            page = await self.list(folder, recursive=True, limit=limit, token=token)
            objects.extend(page.objects)
            if page.next_token is None:
                return objects
            token = page.next_token


def page_of(entries: list[tuple[str, ObjectInfo | None]], limit: int) -> Page:
    """A page from up to `limit + 1` entries in key order: `(key, info)` for an object,
    `(folder/, None)` for a sub-folder; the extra entry only says that more follow."""
    if limit < 1:
        raise ValueError("limit must be positive")
    more = len(entries) > limit
    entries = entries[:limit]
    objects = tuple(info for _, info in entries if info is not None)
    folders = tuple(name for name, info in entries if info is None)
    return Page(objects, folders, entries[-1][0] if more and entries else None)


STREAM_BATCH_BYTES = 1 << 20  # bytes handed to a worker thread at once by a streamed write


class ChunkPull:
    """The bytes of an async iterator, pulled from a worker thread in batches.

    A streamed write runs in one worker thread (the file's writes and fsync, obstore's upload);
    `batches()` hands it the chunks the event loop collects, up to `batch_bytes` at a time (a
    1 GiB upload is about a thousand thread hops, not a million), counting them against
    `max_bytes` (`TooLarge`). `abort()` (from the loop, on a cancellation) makes the thread's
    next or pending pull raise, so the write stops and cleans up after itself.
    """

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        loop: asyncio.AbstractEventLoop,
        *,
        max_bytes: int | None = None,
        batch_bytes: int = STREAM_BATCH_BYTES,
    ) -> None:
        self._chunks = aiter(chunks)
        self._loop = loop
        self._max_bytes = max_bytes
        self._batch_bytes = batch_bytes
        self._pending: concurrent.futures.Future[bytes | None] | None = None
        self._aborted = False
        self._done = False
        self.size = 0

    async def _next(self) -> bytes | None:
        parts: builtins.list[bytes] = []
        collected = 0
        while collected < self._batch_bytes:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._done = True
                break
            if not chunk:
                continue
            collected += len(chunk)
            if self._max_bytes is not None and self.size + collected > self._max_bytes:
                raise TooLarge(f"more than {self._max_bytes} bytes")
            parts.append(bytes(chunk))
        self.size += collected
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def batches(self) -> Iterator[bytes]:
        """In the worker thread: the batches, until the iterator ends (or raises)."""
        while not self._done:
            if self._aborted:
                raise asyncio.CancelledError("streamed write cancelled")
            future = asyncio.run_coroutine_threadsafe(self._next(), self._loop)
            self._pending = future
            if self._aborted:  # abort() ran before _pending was set
                future.cancel()
            try:
                batch = future.result()
            except concurrent.futures.CancelledError:
                raise asyncio.CancelledError("streamed write cancelled") from None
            finally:
                self._pending = None
            if batch is None:
                return
            yield batch

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        self._aborted = True
        pending = self._pending
        if pending is not None:
            pending.cancel()


async def run_stream_write(pull: ChunkPull, run: Callable[[], Awaitable[_T]]) -> _T:
    """Await the worker-thread write `run()` starts; on a cancellation, abort its pulls and wait
    for the thread to stop (so nothing is committed after this returns) before re-raising."""
    future = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        pull.abort()
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({future})
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise
