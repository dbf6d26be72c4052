"""Streamed writes and reads of the resource store, and its per-object metadata, on both
providers (the filesystem folder and moto's S3 server through obstore; fixtures from
tests/test_storage.py). Nothing is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import test_storage
from tollgate.storage import PreconditionFailed, ResourceStore
from tollgate.storage.filesystem import FilesystemStore
from tollgate.storage.store import RESERVED_SEGMENT_PREFIX, TooLarge

pytestmark = pytest.mark.e2e  # a real S3 server process for the module
# tests/test_storage.py's fixtures: the providers, moto's server, a store per test.
provider = test_storage.provider
s3_server = test_storage.s3_server
settings_doc = test_storage.settings_doc
store = test_storage.store
MiB = 1 << 20


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def chunked(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def read_all(store: ResourceStore, key: str, chunk_size: int = 65536) -> bytes:
    streamed = await store.get_stream(key, chunk_size=chunk_size)
    assert streamed is not None
    parts = []
    async for chunk in streamed:
        assert 0 < len(chunk) <= chunk_size
        parts.append(chunk)
    return b"".join(parts)


def stray_files(store: ResourceStore) -> list[str]:
    """Files under the filesystem store's root outside the reserved names' folders, plus
    temporary files anywhere (the lock files are Tollgate's own)."""
    assert isinstance(store, FilesystemStore)
    found = []
    for directory, _, files in os.walk(store.root):
        if RESERVED_SEGMENT_PREFIX + "locks" in directory:
            continue
        found += [f for f in files if f.startswith(RESERVED_SEGMENT_PREFIX + "tmp-")]
    return found


@pytest.mark.parametrize("size", [0, 1, 5 * MiB + 1, 20 * MiB])
async def test_round_trip(store: ResourceStore, size: int) -> None:
    data = os.urandom(size)
    key = f"Users/alice/files/blob-{size}.bin"
    info = await store.put_stream(key, chunked(data), content_type="application/octet-stream")
    assert (info.key, info.size, info.etag) == (key, size, md5(data))
    assert await read_all(store, key) == data
    head = await store.head(key)
    assert head is not None and (head.size, head.etag) == (size, md5(data))
    assert head.content_type == "application/octet-stream"
    blob = await store.get(key)  # the existing methods see the same object
    assert blob is not None and blob.data == data and blob.etag == md5(data)
    streamed = await store.get_stream(key)
    assert streamed is not None and streamed.info.etag == md5(data) and streamed.size == size
    await streamed.aclose()
    listed = await store.list_all("Users/alice/files/")
    assert [o.key for o in listed] == [key]


async def test_get_stream_of_a_missing_key(store: ResourceStore) -> None:
    assert await store.get_stream("Users/alice/files/none") is None


async def test_conditions(store: ResourceStore) -> None:
    key = "Users/alice/files/c.txt"
    first = await store.put_stream(key, chunked(b"one"))
    with pytest.raises(PreconditionFailed):
        await store.put_stream(key, chunked(b"two"), if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_stream(key, chunked(b"two"), if_match=md5(b"other"))
    with pytest.raises(PreconditionFailed):
        await store.put_stream("Users/alice/files/none", chunked(b"x"), if_match=md5(b"x"))
    blob = await store.get(key)
    assert blob is not None and blob.data == b"one"
    second = await store.put_stream(key, chunked(b"two"), if_match=first.etag)
    assert second.etag == md5(b"two")
    new = await store.put_stream("Users/alice/files/new", chunked(b"n"), if_none_match=True)
    assert new.etag == md5(b"n")


async def test_conditions_on_a_large_object(store: ResourceStore) -> None:
    key = "Users/alice/files/large.bin"
    data = os.urandom(10 * MiB)
    first = await store.put_stream(key, chunked(data), if_none_match=True)
    assert first.etag == md5(data)
    with pytest.raises(PreconditionFailed):
        await store.put_stream(key, chunked(data[::-1]), if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await store.put_stream(key, chunked(data[::-1]), if_match="0123")
    assert (await read_all(store, key, 1 * MiB)) == data
    second = await store.put_stream(key, chunked(data[::-1]), if_match=first.etag)
    assert second.etag == md5(data[::-1])
    assert [o.key for o in await store.list_all()] == [key]  # no temporary object listed
    assert (await store.list("", recursive=False)).folders == ("Users/",)


@pytest.mark.parametrize("size", [3 * MiB, 12 * MiB])
async def test_a_failing_iterator_leaves_the_old_object(store: ResourceStore, size: int) -> None:
    key = "Users/alice/files/f.bin"
    await store.put(key, b"old")

    async def failing() -> AsyncIterator[bytes]:
        yield os.urandom(size // 2)
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        await store.put_stream(key, failing())
    blob = await store.get(key)
    assert blob is not None and blob.data == b"old"
    with pytest.raises(RuntimeError):
        await store.put_stream("Users/alice/files/other.bin", failing())
    assert await store.head("Users/alice/files/other.bin") is None
    assert [o.key for o in await store.list_all()] == [key]
    if isinstance(store, FilesystemStore):
        assert stray_files(store) == []
    later = await store.put_stream(key, chunked(b"new"))
    assert later.etag == md5(b"new")


@pytest.mark.parametrize("size", [2 * MiB, 12 * MiB])
async def test_max_bytes(store: ResourceStore, size: int) -> None:
    key = "Users/alice/files/big.bin"
    with pytest.raises(TooLarge):
        await store.put_stream(key, chunked(os.urandom(size)), max_bytes=size - 1)
    assert await store.head(key) is None
    assert await store.list_all() == []
    info = await store.put_stream(key, chunked(b"x" * size), max_bytes=size)
    assert info.size == size
    if isinstance(store, FilesystemStore):
        assert stray_files(store) == []


async def test_a_cancelled_write_leaves_the_old_object(store: ResourceStore) -> None:
    key = "Users/alice/files/cancel.bin"
    await store.put(key, b"old")
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield os.urandom(2 * MiB)
        started.set()
        await asyncio.sleep(60)
        yield b"never"

    task = asyncio.create_task(store.put_stream(key, slow()))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    blob = await store.get(key)
    assert blob is not None and blob.data == b"old"
    if isinstance(store, FilesystemStore):
        assert stray_files(store) == []


async def test_content_type_and_created_at_kept_across_an_overwrite(store: ResourceStore) -> None:
    key = "Users/alice/files/meta.txt"
    first = await store.put_stream(key, chunked(b"one"), content_type="text/plain")
    assert first.content_type == "text/plain" and first.created_at is not None
    head = await store.head(key)
    assert head is not None
    assert (head.content_type, head.created_at) == ("text/plain", first.created_at)
    await asyncio.sleep(1.1)  # S3's Last-Modified has a resolution of a second
    second = await store.put_stream(key, chunked(b"two"), content_type="application/json")
    assert second.created_at == first.created_at
    head = await store.head(key)
    assert head is not None
    assert (head.content_type, head.created_at) == ("application/json", first.created_at)
    assert head.last_modified > first.created_at
    streamed = await store.get_stream(key)
    assert streamed is not None
    assert (streamed.info.content_type, streamed.info.created_at) == (
        "application/json",
        first.created_at,
    )
    await streamed.aclose()
    large = await store.put_stream(key, chunked(os.urandom(9 * MiB)), content_type="video/mp4")
    head = await store.head(key)
    assert head is not None and head.etag == large.etag
    assert (head.content_type, head.created_at) == ("video/mp4", first.created_at)
    # A listing leaves them None; a plain put stores none.
    (listed,) = await store.list_all()
    assert (listed.content_type, listed.created_at) == (None, None)
    await store.put("Users/alice/files/plain.txt", b"p")
    plain = await store.head("Users/alice/files/plain.txt")
    assert plain is not None and plain.created_at is None
    if isinstance(store, FilesystemStore):
        assert plain.content_type is None  # S3 gives its default, binary/octet-stream


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_early_aclose_releases_the_file(store: ResourceStore) -> None:
    key = "Users/alice/files/long.bin"
    data = os.urandom(3 * MiB)
    await store.put_stream(key, chunked(data))
    before = open_fds()
    for _ in range(20):
        streamed = await store.get_stream(key, chunk_size=4096)
        assert streamed is not None
        first = await anext(aiter(streamed))
        assert first == data[:4096]
        await streamed.aclose()
    unread = [await store.get_stream(key) for _ in range(5)]  # closed without a read
    for streamed in unread:
        assert streamed is not None
        await streamed.aclose()
    async with await store.get_stream(key) as streamed:  # type: ignore[union-attr]
        await anext(aiter(streamed))
    await asyncio.sleep(0.2)
    if isinstance(store, FilesystemStore):
        assert open_fds() == before
    else:
        assert open_fds() <= before + 2  # a connection or two stays in the pool
    assert await read_all(store, key) == data  # exhausted: released as well
    if isinstance(store, FilesystemStore):
        assert open_fds() == before


@pytest.mark.parametrize("size", [100_000, 1 * MiB])
async def test_concurrent_creates_one_wins(store: ResourceStore, size: int) -> None:
    key = "Users/alice/files/race.bin"
    payloads = [os.urandom(size), os.urandom(size)]
    results = await asyncio.gather(
        *(store.put_stream(key, chunked(p, 64 * 1024), if_none_match=True) for p in payloads),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, PreconditionFailed)]
    assert (len(wins), len(losses)) == (1, 1), results
    blob = await store.get(key)
    assert blob is not None and blob.etag == wins[0].etag and blob.data in payloads


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_one_gib_streams_in_bounded_memory(tmp_path: Path) -> None:
    """1 GiB in and out of the filesystem store: the peak RSS grows by less than 100 MB."""
    total, chunk = 1 << 30, MiB
    fs = FilesystemStore(tmp_path / "big")
    pattern = os.urandom(chunk + 4096)
    expected = hashlib.md5()

    async def generate() -> AsyncIterator[bytes]:
        for i in range(total // chunk):
            offset = (i * 7919) % 4096
            piece = pattern[offset : offset + chunk]
            expected.update(piece)
            yield piece

    before = peak_rss_kib()
    started = time.monotonic()
    info = await fs.put_stream("Users/alice/files/huge.bin", generate())
    up_s = time.monotonic() - started
    assert (info.size, info.etag) == (total, expected.hexdigest())
    started = time.monotonic()
    streamed = await fs.get_stream("Users/alice/files/huge.bin", chunk_size=MiB)
    assert streamed is not None and streamed.etag == expected.hexdigest()
    digest, size = hashlib.md5(), 0
    async for piece in streamed:
        digest.update(piece)
        size += len(piece)
    down_s = time.monotonic() - started
    assert (size, digest.hexdigest()) == (total, expected.hexdigest())
    head = await fs.head("Users/alice/files/huge.bin")
    assert head is not None and head.etag == expected.hexdigest()
    grown_mb = (peak_rss_kib() - before) * 1024 / 1e6
    print(
        f"1 GiB: up {total / up_s / 1e6:.0f} MB/s, down {total / down_s / 1e6:.0f} MB/s, "
        f"peak RSS {before / 1024:.0f} MiB before, grew {grown_mb:.1f} MB"
    )
    assert grown_mb < 100
    await fs.close()


async def test_two_stores_of_one_process_on_one_folder_exclude_each_other(tmp_path: Path) -> None:
    """Record locks belong to the process: stores on one folder share theirs, so of eight
    create-only writes from eight stores exactly one wins, and closing one store leaves the
    others' locks alone."""
    from tollgate.storage.filesystem import FilesystemStore

    stores = [FilesystemStore(tmp_path / "shared") for _ in range(8)]
    try:
        results = await asyncio.gather(
            *(s.put("race/key", f"{i}".encode(), if_none_match=True) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
        assert sum(1 for r in results if isinstance(r, str)) == 1
        assert all(isinstance(r, str | PreconditionFailed) for r in results)
        await stores[0].close()
        etag = await stores[1].put("race/other", b"x")
        assert await stores[2].put("race/other", b"y", if_match=etag)
    finally:
        for store in stores[1:]:
            await store.close()
