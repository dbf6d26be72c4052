"""`storage.provider: filesystem`: objects as files under one folder (compatibility C80).

The layout is jclouds' filesystem provider's, which DIAL uses: `<folder>/<bucket>/[<prefix>/]<key>`,
one file per object, folders as directories (they exist while they hold an object; a delete
removes the directories it empties). Several instances may share the folder over a mount.

- **Atomic**: a write goes to a temporary file in the object's own directory, is fsynced and
  then renamed over the object (`os.replace`), and the directory is fsynced; a reader holds the
  old file or the new one, never part of either.
- **Conditional**: the compare (the current ETag) and the rename happen under a lock that
  holds across threads (a lock per shard) and processes (an `fcntl` record lock on one of 256
  lock files, `<root>/.tollgate-locks/<xx>`, chosen by the key's SHA-256), which POSIX
  systems and NFS (v4, or v3 with lockd) honour. The lock is held only around compare and
  rename, never while the data is written.
- **ETag**: the lowercase hex MD5 of the content, DIAL's rule (compatibility C80) and S3's for
  a single-part upload, so an object keeps its ETag when it moves between providers. Writing
  the same bytes again keeps the ETag: a compare-and-set then succeeds against content equal to
  what the writer read, which loses nothing.
- **Safe paths**: keys are checked by `check_key` (no `..`, no absolute paths, NUL or
  backslashes) before they become paths, so no key reaches outside the root.

Every file operation runs in a worker thread (`asyncio.to_thread`): a slow disk never stalls
the event loop.

**Streams** (`put_stream`, `get_stream`): a streamed write runs in one worker thread that
writes the chunks the event loop hands it a batch (up to 1 MiB) at a time into the temporary
file, hashing them on the way, then fsyncs, takes the key's lock, checks the condition and
renames, exactly as `put`; a failure, `max_bytes` or a cancellation before the rename unlinks
the temporary file (a killed process leaves one, under the reserved `.tollgate-tmp-` name that
no listing shows). A read holds one open file (one inode: the version it started with, even if
a write replaces it meanwhile) and reads it a batch per worker-thread call.

**Metadata** lives in the object file's extended attributes, set on the temporary file before
the rename, so they are atomic with the content, never listed, and deleted with the file:
`user.tollgate.content_type`, `user.tollgate.created_at` (ISO 8601, UTC; kept from the object
a `put_stream` replaces: its own `created_at`, or its modification time if it has none) and
`user.tollgate.etag` (`<md5> <size> <mtime_ns>`: the MD5 computed while writing, trusted only
while the file's size and mtime still match, so `head` and `get_stream` of a large file need
not read it twice). A plain `put` writes a new file without attributes (its metadata is None,
its ETag computed from the content, as before). On a filesystem without user xattrs (some NFS
and FUSE mounts) the content is stored all the same and the metadata is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import stat as stat_module
import threading
import uuid
from collections.abc import AsyncIterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from tollgate.storage.store import (
    RESERVED_SEGMENT_PREFIX,
    BatchedChunks,
    Blob,
    ChunkPull,
    InvalidKey,
    NotFound,
    ObjectInfo,
    Page,
    PreconditionFailed,
    ResourceStore,
    StoreUnavailable,
    StreamedObject,
    check_key,
    page_of,
    run_stream_write,
)

LOCK_SHARDS = 256
LOCKS_DIR = RESERVED_SEGMENT_PREFIX + "locks"
TEMP_PREFIX = RESERVED_SEGMENT_PREFIX + "tmp-"
FILE_MODE = 0o600  # objects hold key hashes and users' files: the instance's user only
_MAKEDIRS_TRIES = 8  # a concurrent delete may remove an emptied directory under a write
XATTR_CONTENT_TYPE = "user.tollgate.content_type"
XATTR_CREATED_AT = "user.tollgate.created_at"
XATTR_ETAG = "user.tollgate.etag"
READ_BATCH_BYTES = 1 << 20  # bytes a streamed read takes from the file per worker-thread call
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSPC, errno.E2BIG)


def etag_of(data: bytes) -> str:
    """DIAL's ETag: the lowercase hex MD5 of the bytes (not a security digest)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _modified(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime_ns / 1e9, UTC)


def _get_xattr(fd: int, name: str) -> str | None:
    try:
        return os.getxattr(fd, name).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # ENODATA (none), ENOTSUP (a filesystem without xattrs)


def _set_xattr(fd: int, name: str, value: str) -> bool:
    """Whether the attribute was set (False: the filesystem keeps no user xattrs)."""
    try:
        os.setxattr(fd, name, value.encode("utf-8"))
    except OSError as exc:
        if exc.errno not in _NO_XATTRS:
            raise
        return False
    return True


def _created_at(fd: int) -> datetime | None:
    text = _get_xattr(fd, XATTR_CREATED_AT)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _file_etag(fd: int, stat: os.stat_result) -> str:
    """The open file's ETag: the cached MD5 while size and mtime match, else read it."""
    cached = _get_xattr(fd, XATTR_ETAG)
    if cached is not None:
        parts = cached.split(" ")
        if len(parts) == 3 and parts[1:] == [str(stat.st_size), str(stat.st_mtime_ns)]:
            return parts[0]
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while chunk := os.pread(fd, READ_BATCH_BYTES, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _info_of(key: str, fd: int) -> ObjectInfo:
    stat = os.fstat(fd)
    return ObjectInfo(
        key,
        stat.st_size,
        _modified(stat),
        _file_etag(fd, stat),
        _get_xattr(fd, XATTR_CONTENT_TYPE),
        _created_at(fd),
    )


class _FileChunks(BatchedChunks):
    """A file's chunks: `os.pread` of about 1 MiB per worker-thread call; the file is closed at
    the end, on `aclose()`, or when collected."""

    def __init__(self, fd: int, chunk_size: int) -> None:
        super().__init__(chunk_size)
        self._fd: int | None = fd
        self._offset = 0
        self._batch_size = max(READ_BATCH_BYTES // chunk_size, 1) * chunk_size

    async def _next_batch(self) -> bytes:
        fd = self._fd
        if fd is None:
            return b""
        try:
            batch = await asyncio.to_thread(os.pread, fd, self._batch_size, self._offset)
        except OSError as exc:
            raise StoreUnavailable(f"cannot read: {exc.strerror}") from None
        self._offset += len(batch)
        return batch

    async def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)

    def __del__(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class FilesystemStore(ResourceStore):
    """Objects under `root` (the bucket's folder, with `storage.prefix` already joined)."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        root = Path(os.path.abspath(root))
        try:
            if create:
                root.mkdir(parents=True, exist_ok=True)
            elif not root.is_dir():
                raise StoreUnavailable(f"storage folder {root} does not exist")
            (root / LOCKS_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"storage folder {root}: {exc.strerror}") from None
        self._root = root
        self._locks = _RootLocks.acquire(root)
        self._closed = False

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self._root)!r})"

    @property
    def root(self) -> Path:
        return self._root

    # --- the interface: each call in a worker thread ----------------------------------------

    async def get(self, key: str) -> Blob | None:
        path = self._path(key)
        return await asyncio.to_thread(self._get, key, path)

    async def get_many(self, keys: list[str]) -> list[Blob | None]:
        """The objects in one worker-thread call: a scan of many small objects (100,000 keys
        at start-up) pays one thread hop per batch, not per object."""
        paths = [(key, self._path(key)) for key in keys]
        return await asyncio.to_thread(lambda: [self._get(key, path) for key, path in paths])

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, its ETag read in 1 MiB steps (or cached): never whole in memory."""
        path = self._path(key)
        return await asyncio.to_thread(self._head, key, path)

    async def get_stream(self, key: str, *, chunk_size: int = 65536) -> StreamedObject | None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        path = self._path(key)
        opened = await asyncio.to_thread(self._open_for_stream, key, path)
        if opened is None:
            return None
        info, fd = opened
        return StreamedObject(info, _FileChunks(fd, chunk_size))

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
        path = self._path(key)
        pull = ChunkPull(chunks, asyncio.get_running_loop(), max_bytes=max_bytes)
        return await run_stream_write(
            pull,
            lambda: asyncio.to_thread(
                self._put_stream, key, path, pull, content_type, if_match, if_none_match
            ),
        )

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        path = self._path(key)
        return await asyncio.to_thread(self._put, key, path, bytes(data), if_match, if_none_match)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._delete, key, path, if_match)

    async def _page(self, folder: str, recursive: bool, limit: int, token: str | None) -> Page:
        return await asyncio.to_thread(self._list, folder, recursive, limit, token)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._locks.release()

    # --- blocking parts -------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        # check_key leaves only plain segments: the joined path cannot leave the root.
        return self._root.joinpath(*check_key(key).split("/"))

    def _get(self, key: str, path: Path) -> Blob | None:
        try:
            with open(path, "rb") as file:
                stat = os.fstat(file.fileno())
                data = file.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key!r}: {exc.strerror}") from None
        return Blob(key, data, etag_of(data), _modified(stat))

    def _current_etag(self, path: Path) -> str | None:
        try:
            with open(path, "rb") as file:
                return _file_etag(file.fileno(), os.fstat(file.fileno()))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _head(self, key: str, path: Path) -> ObjectInfo | None:
        opened = self._open_for_stream(key, path)
        if opened is None:
            return None
        info, fd = opened
        os.close(fd)
        return info

    def _open_for_stream(self, key: str, path: Path) -> tuple[ObjectInfo, int] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {key!r}: {exc.strerror}") from None
        try:
            if not stat_module.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None  # a folder
            return _info_of(key, fd), fd
        except OSError as exc:
            os.close(fd)
            raise StoreUnavailable(f"cannot read {key!r}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    def _put_stream(
        self,
        key: str,
        path: Path,
        pull: ChunkPull,
        content_type: str | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        temp: Path | None
        try:
            temp, fd = self._open_temp(path.parent)
        except NotADirectoryError:
            raise InvalidKey(f"a parent of {key!r} is an object, not a folder") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key!r}: {exc.strerror}") from None
        try:
            digest = hashlib.md5(usedforsecurity=False)
            for batch in pull.batches():
                view = memoryview(batch)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                digest.update(batch)
            os.fsync(fd)
            stat = os.fstat(fd)
            etag = digest.hexdigest()
            has_xattrs = _set_xattr(fd, XATTR_ETAG, f"{etag} {stat.st_size} {stat.st_mtime_ns}")
            if content_type is not None:
                _set_xattr(fd, XATTR_CONTENT_TYPE, content_type)
            with self._lock(key):
                self._check_write(key, path, if_match, if_none_match)
                created_at = self._replaced_created_at(path)
                if created_at is None:
                    created_at = datetime.now(UTC)
                _set_xattr(fd, XATTR_CREATED_AT, created_at.isoformat())
                if pull.aborted:
                    raise asyncio.CancelledError("streamed write cancelled")
                try:
                    os.replace(temp, path)
                except IsADirectoryError:
                    raise InvalidKey(f"{key!r} is a folder") from None
                temp = None
            self._sync_dir(path.parent)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key!r}: {exc.strerror}") from None
        finally:
            os.close(fd)
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        return ObjectInfo(
            key,
            stat.st_size,
            _modified(stat),
            etag,
            content_type if has_xattrs else None,
            created_at if has_xattrs else None,
        )

    @staticmethod
    def _replaced_created_at(path: Path) -> datetime | None:
        """The `created_at` a write over `path` keeps: the object's own, else its mtime."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            stat = os.fstat(fd)
            return _created_at(fd) or _modified(stat)
        finally:
            os.close(fd)

    def _put(
        self, key: str, path: Path, data: bytes, if_match: str | None, if_none_match: bool
    ) -> str:
        temp: Path | None
        try:
            temp = self._write_temp(path.parent, data)
        except NotADirectoryError:
            raise InvalidKey(f"a parent of {key!r} is an object, not a folder") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key!r}: {exc.strerror}") from None
        try:
            with self._lock(key):
                self._check_write(key, path, if_match, if_none_match)
                try:
                    os.replace(temp, path)
                except IsADirectoryError:
                    raise InvalidKey(f"{key!r} is a folder") from None
                temp = None
            self._sync_dir(path.parent)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {key!r}: {exc.strerror}") from None
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
        return etag_of(data)

    def _open_temp(self, directory: Path) -> tuple[Path, int]:
        """A new temporary file beside the object, open for writing."""
        temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        for attempt in range(_MAKEDIRS_TRIES):
            directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
                return temp, fd
            except FileNotFoundError:
                # A delete pruned the directory we just made: make it again.
                if attempt == _MAKEDIRS_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _write_temp(self, directory: Path, data: bytes) -> Path:
        """`data` in a new fsynced file beside the object, ready to be renamed over it."""
        temp, fd = self._open_temp(directory)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _check_write(self, key: str, path: Path, if_match: str | None, if_none_match: bool) -> None:
        """A write's conditions, under the key's lock: `PreconditionFailed` if one fails."""
        if if_none_match and os.path.lexists(path):
            raise PreconditionFailed(f"{key!r} already exists")
        if if_match is not None:
            current = self._current_etag(path)
            if current is None or (if_match != "*" and current != if_match):
                raise PreconditionFailed(f"{key!r} is not at ETag {if_match}")

    def _delete(self, key: str, path: Path, if_match: str | None) -> None:
        try:
            with self._lock(key):
                if if_match is not None:
                    current = self._current_etag(path)
                    if current is None:
                        raise NotFound(key)
                    if if_match != "*" and current != if_match:
                        raise PreconditionFailed(f"{key!r} is not at ETag {if_match}")
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise NotFound(key) from None
            self._sync_dir(path.parent)
            self._prune(path.parent)
        except OSError as exc:
            raise StoreUnavailable(f"cannot delete {key!r}: {exc.strerror}") from None

    def _prune(self, directory: Path) -> None:
        """Remove the directories a delete emptied (folders are virtual, as in DIAL)."""
        while directory != self._root and self._root in directory.parents:
            try:
                os.rmdir(directory)
            except OSError:
                return  # not empty (or already gone): a folder that still holds objects
            directory = directory.parent

    @staticmethod
    def _sync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as exc:  # some filesystems (and mounts) cannot fsync a directory
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Hold the key's shard: against other threads here, and other processes (fcntl)."""
        shard = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[0]
        with self._locks.threads[shard]:
            fd = self._locks.fd(shard)
            # POSIX record locks belong to the process: the thread lock above keeps two threads
            # of this process from both "holding" it.
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def _list(self, folder: str, recursive: bool, limit: int, token: str | None) -> Page:
        directory = (
            self._root.joinpath(*folder.removesuffix("/").split("/")) if folder else self._root
        )
        entries: list[tuple[str, ObjectInfo | None]] = []
        try:
            walk = self._walk(directory, folder, token or "", recursive)
            for entry in walk:
                entries.append(entry)
                if len(entries) > limit:
                    break
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {folder!r}: {exc.strerror}") from None
        return page_of(entries, limit)

    def _walk(
        self, directory: Path, prefix: str, after: str, recursive: bool
    ) -> Iterator[tuple[str, ObjectInfo | None]]:
        """Objects (and, not recursive, folders) below `directory` in key order, after `after`.

        A directory's entries sort as `name/` and files as `name`, which is the order of the
        keys they hold; a sub-tree wholly before `after` is skipped without being read.
        """
        try:
            with os.scandir(directory) as scan:
                items = [
                    (entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name, entry)
                    for entry in scan
                    if not entry.name.startswith(RESERVED_SEGMENT_PREFIX)
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        items.sort(key=lambda item: item[0])
        for name, entry in items:
            key = prefix + name
            if name.endswith("/"):
                if after and key < after and not after.startswith(key):
                    continue  # every key below sorts before `after`
                if recursive:
                    yield from self._walk(Path(entry.path), key, after, recursive)
                elif key > after and self._holds_objects(Path(entry.path)):
                    yield key, None
            elif key > after:
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield key, ObjectInfo(key, stat.st_size, _modified(stat), None)

    @staticmethod
    def _holds_objects(directory: Path) -> bool:
        try:
            with os.scandir(directory) as scan:
                return any(not e.name.startswith(RESERVED_SEGMENT_PREFIX) for e in scan)
        except OSError:
            return False


class _RootLocks:
    """The locks of one folder, shared by every store of this process on it.

    POSIX record locks belong to the process, not to a file descriptor: two stores of one
    process on one folder (two gateways in a test, or the keys and the buckets of one
    gateway) would both "hold" the same `fcntl` lock, and closing either's descriptor would
    drop the other's lock. So one set of thread locks and one descriptor per shard serve
    every store on a folder, and the descriptors are closed with the last store.
    """

    _registry: dict[Path, _RootLocks] = {}
    _registry_guard = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.root = root
        self.threads = [threading.Lock() for _ in range(LOCK_SHARDS)]
        self._fds: dict[int, int] = {}
        self._guard = threading.Lock()
        self._users = 0

    @classmethod
    def acquire(cls, root: Path) -> _RootLocks:
        with cls._registry_guard:
            locks = cls._registry.get(root)
            if locks is None:
                locks = cls._registry[root] = cls(root)
            locks._users += 1
            return locks

    def release(self) -> None:
        with self._registry_guard:
            self._users -= 1
            if self._users > 0:
                return
            del self._registry[self.root]
        with self._guard:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def fd(self, shard: int) -> int:
        with self._guard:
            fd = self._fds.get(shard)
            if fd is None:
                path = self.root / LOCKS_DIR / f"{shard:02x}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
                self._fds[shard] = fd
            return fd
