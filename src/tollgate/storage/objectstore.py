"""`storage.provider: aws-s3 | s3 | google-cloud-storage | azureblob` through `obstore`.

One library speaks all three object stores (Rust's `object_store` under a typed Python API); its
blocking calls run in a thread pool, so the event loop never waits on the network. Writes are
single requests, atomic by the store's own guarantee; conditional writes use the store's
preconditions (obstore's `PutMode`):
`create` (`If-None-Match: *`) and an update of one version (S3 and Azure: `If-Match` with the
ETag; GCS: `x-goog-if-generation-match` with the object's generation, which is therefore the
ETag Tollgate reports on GCS). ETags are given without quotes; on S3 a single-part upload's ETag
is the hex MD5 of the content, as on the filesystem provider.

A delete with `if_match` reads the object's ETag and then deletes: obstore has no conditional
delete, so a write landing between the two is removed with it (compatibility C80).

**Streams.** `put_stream` collects up to `SINGLE_PART_BYTES` (8 MiB) first. An object that
ends within them goes up as `put` does: one request, atomic and conditional by the store
itself (`If-None-Match` / `If-Match`), its ETag the MD5 on S3. A larger one cannot: obstore
performs a conditional put only as a single request (its multipart upload is unconditional,
and a multipart object's S3 ETag is not the MD5 of its bytes). It is uploaded in 5 MiB parts
(at most 4 in flight: about 25 MB of buffers whatever its size) to a temporary key,
`.tollgate-tmp/<uuid>` under the store's prefix (a reserved segment: never a key, never
listed; an unfinished multipart upload is invisible), then copied server-side onto the key
(S3's CopyObject makes a single-part object: its ETag is the MD5 again, and it keeps the
Content-Type and user metadata) and the temporary object deleted. The copy is atomic (a
reader sees the old object or the whole new one); the condition, though, is checked
(`head`) before the upload starts and again just before the copy, not by the store during
it: two large writes with `if_none_match`/`if_match` that both pass the second check within
the few milliseconds before either copy lands can both succeed, the later one winning
(compatibility C80; small objects have no such window). An iterator's exception, `max_bytes`
or a cancellation before the copy abort the upload (and delete the temporary object); a
process killed after the upload and before the delete leaves a `.tollgate-tmp/` object (and a
killed multipart upload its parts): a lifecycle rule on that prefix and on incomplete
multipart uploads removes them. `created_at` is read from the replaced object before the
write (a check-then-write: a write landing in between may lose its `created_at`).

Metadata: the Content-Type attribute and the user metadata `created_at` (`x-amz-meta-created_at`
on S3); `head` and `get_stream` read them (`head` as a HEAD request through obstore's `get`),
a listing leaves them None.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
from obstore import exceptions as obstore_errors

from tollgate.storage.settings import StorageSettings
from tollgate.storage.store import (
    RESERVED_SEGMENT_PREFIX,
    BatchedChunks,
    Blob,
    ChunkPull,
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

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ObjectStore

# A store that does not answer must not hold a call for obstore's default of minutes.
CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "60s"}
RETRY_CONFIG: Any = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
OBSTORE_OVERRIDE = "obstore."
THREADS = 32  # object-store calls in flight at once per store (each waits on the network)
_T = TypeVar("_T")
_LIST_CHUNK = 1000  # objects per listing request (S3's maximum)
# obstore raises Python's FileNotFoundError for a missing object (its NotFoundError elsewhere).
_MISSING = (obstore_errors.NotFoundError, FileNotFoundError)
SINGLE_PART_BYTES = 8 << 20  # a streamed write up to this size is one conditional request
PART_BYTES = 5 << 20  # S3's smallest part
PARTS_IN_FLIGHT = 4
READ_CHUNK_BYTES = 1 << 20  # bytes obstore gathers per worker-thread call of a streamed read
TEMP_FOLDER = RESERVED_SEGMENT_PREFIX + "tmp"
META_CREATED_AT = "created_at"


def _reserved(key: str) -> bool:
    return any(segment.startswith(RESERVED_SEGMENT_PREFIX) for segment in key.split("/"))


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class _CloudChunks(BatchedChunks):
    """An object's chunks: obstore's stream, a batch per worker-thread call; dropping the
    stream (end, `aclose()`) closes the connection."""

    def __init__(self, owner: CloudStore, stream: Any, chunk_size: int) -> None:
        super().__init__(chunk_size)
        self._owner = owner
        self._stream: Any = stream

    async def _next_batch(self) -> bytes:
        while self._stream is not None:
            try:
                batch = await self._owner._run(next, self._stream, None)
            except (obstore_errors.BaseError, OSError) as exc:
                raise _unavailable("get", "stream", exc) from None
            if batch is None:
                return b""
            if batch:  # obstore may hand over an empty piece mid-stream
                return bytes(batch)
        return b""

    async def _release(self) -> None:
        self._stream = None  # obstore's stream (and its connection) goes with the last reference


def _unquote(tag: str) -> str:
    tag = tag.removeprefix("W/")
    return tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else tag


class CloudStore(ResourceStore):
    """A `ResourceStore` over an obstore store; `generation_tags`: the ETag is the object's
    version (GCS's generation), the precondition a store of that kind checks."""

    def __init__(self, store: ObjectStore, *, name: str, generation_tags: bool = False) -> None:
        self._store = store
        self._name = name
        self._generation_tags = generation_tags
        # obstore's blocking calls, each in a thread of this pool: its async calls complete
        # Python futures from Rust threads, which can abort the interpreter at exit (seen in
        # 3 of 40 runs of a short script); blocking calls never call back into Python.
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="tollgate-storage")

    async def _run(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(function, *args, **kwargs))

    async def close(self) -> None:
        await asyncio.to_thread(self._threads.shutdown, wait=True)

    def __repr__(self) -> str:  # never the store's credentials
        return f"CloudStore({self._name!r})"

    def _etag(self, meta: Any) -> str:
        if self._generation_tags and meta.get("version"):
            return str(meta["version"])
        tag = meta.get("e_tag")
        return _unquote(tag) if tag else "0"  # DIAL: "0" for an object without a stored ETag

    def _info(self, meta: ObjectMeta) -> ObjectInfo:
        return ObjectInfo(meta["path"], meta["size"], meta["last_modified"], self._etag(meta))

    async def get(self, key: str) -> Blob | None:
        check_key(key)
        try:
            data, meta = await self._run(self._get, key)
        except _MISSING:
            return None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("get", key, exc) from None
        return Blob(key, data, self._etag(meta), meta["last_modified"])

    def _get(self, key: str) -> tuple[bytes, ObjectMeta]:
        result = obstore.get(self._store, key)
        return bytes(result.bytes()), result.meta

    async def head(self, key: str) -> ObjectInfo | None:
        check_key(key)
        try:
            return await self._run(self._head, key)
        except _MISSING:
            return None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("head", key, exc) from None

    def _head(self, key: str) -> ObjectInfo:
        """A HEAD request (obstore's `head` gives no attributes; `get` with `head` does)."""
        result = obstore.get(self._store, key, options={"head": True})
        return self._full_info(key, result.meta, result.attributes)

    def _full_info(self, key: str, meta: Any, attributes: Any) -> ObjectInfo:
        content_type = attributes.get("Content-Type")
        return ObjectInfo(
            key,
            meta["size"],
            meta["last_modified"],
            self._etag(meta),
            content_type if isinstance(content_type, str) else None,
            _parse_time(attributes.get(META_CREATED_AT)),
        )

    def _head_or_none(self, key: str) -> ObjectInfo | None:
        try:
            return self._head(key)
        except _MISSING:
            return None

    async def get_stream(self, key: str, *, chunk_size: int = 65536) -> StreamedObject | None:
        check_key(key)
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        try:
            info, stream = await self._run(self._open_stream, key, chunk_size)
        except _MISSING:
            return None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("get", key, exc) from None
        return StreamedObject(info, _CloudChunks(self, stream, chunk_size))

    def _open_stream(self, key: str, chunk_size: int) -> tuple[ObjectInfo, Any]:
        result = obstore.get(self._store, key)
        info = self._full_info(key, result.meta, result.attributes)
        return info, result.stream(min_chunk_size=max(chunk_size, READ_CHUNK_BYTES))

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
        check_key(key)
        if if_match is not None and if_none_match:
            raise ValueError("if_match and if_none_match exclude each other")
        pull = ChunkPull(chunks, asyncio.get_running_loop(), max_bytes=max_bytes)
        try:
            return await run_stream_write(
                pull,
                lambda: self._run(
                    self._put_stream, key, pull, content_type, if_match, if_none_match
                ),
            )
        except (obstore_errors.AlreadyExistsError, obstore_errors.PreconditionError):
            raise PreconditionFailed(f"{key!r}: the condition did not hold") from None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("put", key, exc) from None

    def _check(self, key: str, if_match: str | None, if_none_match: bool) -> ObjectInfo | None:
        """The object there now, if the condition holds for it; else `PreconditionFailed`."""
        current = self._head_or_none(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key!r} already exists")
        if if_match is not None and (
            current is None or (if_match != "*" and current.etag != if_match)
        ):
            raise PreconditionFailed(f"{key!r} is not at ETag {if_match}")
        return current

    def _put_stream(
        self,
        key: str,
        pull: ChunkPull,
        content_type: str | None,
        if_match: str | None,
        if_none_match: bool,
    ) -> ObjectInfo:
        current = self._check(key, if_match, if_none_match)  # fail before uploading anything
        created_at = current.created_at or current.last_modified if current else None
        attributes: Any = {META_CREATED_AT: (created_at or datetime.now(UTC)).isoformat()}
        if content_type is not None:
            attributes["Content-Type"] = content_type
        digest = hashlib.md5(usedforsecurity=False)
        batches = pull.batches()
        head: builtins.list[bytes] = []
        held = 0
        for batch in batches:
            head.append(batch)
            held += len(batch)
            if held > SINGLE_PART_BYTES:
                break
        if held <= SINGLE_PART_BYTES:
            data = b"".join(head)
            del head
            if pull.aborted:
                raise asyncio.CancelledError("streamed write cancelled")
            return self._put_small(key, data, attributes, if_match, if_none_match, current)

        def hashed(parts: Iterator[bytes]) -> Iterator[bytes]:
            for part in parts:
                digest.update(part)
                yield part

        def upload_parts() -> Iterator[bytes]:
            yield from hashed(iter(head))
            head.clear()
            yield from hashed(batches)

        temp = f"{TEMP_FOLDER}/{uuid.uuid4().hex}"
        uploaded = False
        try:
            obstore.put(
                self._store,
                temp,
                upload_parts(),
                attributes=attributes,
                use_multipart=True,
                chunk_size=PART_BYTES,
                max_concurrency=PARTS_IN_FLIGHT,
            )
            uploaded = True
            self._check(key, if_match, if_none_match)  # again: the store checks nothing below
            if pull.aborted:
                raise asyncio.CancelledError("streamed write cancelled")
            obstore.copy(self._store, temp, key)
        finally:
            if uploaded:
                # If this fails, the lifecycle rule on the temporary prefix removes it.
                with contextlib.suppress(obstore_errors.BaseError, OSError):
                    obstore.delete(self._store, temp)
        info = self._head(key)
        return info

    def _put_small(
        self,
        key: str,
        data: bytes,
        attributes: Any,
        if_match: str | None,
        if_none_match: bool,
        current: ObjectInfo | None,
    ) -> ObjectInfo:
        mode: Any = "overwrite"
        if if_none_match:
            mode = "create"
        elif if_match is not None:
            if if_match == "*":  # the version checked just now
                assert current is not None and current.etag is not None
                if_match = current.etag
            mode = {"version": if_match} if self._generation_tags else {"e_tag": f'"{if_match}"'}
        try:
            result = obstore.put(
                self._store, key, data, mode=mode, attributes=attributes, use_multipart=False
            )
        except _MISSING:
            raise PreconditionFailed(f"{key!r} does not exist") from None
        return ObjectInfo(
            key,
            len(data),
            datetime.now(UTC),
            self._etag(result),
            attributes.get("Content-Type"),
            _parse_time(attributes[META_CREATED_AT]),
        )

    async def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        check_key(key)
        if if_match is not None and if_none_match:
            raise ValueError("if_match and if_none_match exclude each other")
        mode: Any = "overwrite"
        if if_none_match:
            mode = "create"
        elif if_match is not None:
            if if_match == "*":  # any version, as long as there is one: the one there now
                current = await self.head(key)
                if current is None or current.etag is None:
                    raise PreconditionFailed(f"{key!r} does not exist")
                if_match = current.etag
            mode = {"version": if_match} if self._generation_tags else {"e_tag": f'"{if_match}"'}
        try:
            # One request, never a multipart upload: atomic, and the ETag stays the MD5 on S3.
            result = await self._run(
                obstore.put, self._store, key, bytes(data), mode=mode, use_multipart=False
            )
        except (obstore_errors.AlreadyExistsError, obstore_errors.PreconditionError):
            raise PreconditionFailed(f"{key!r}: the condition did not hold") from None
        except _MISSING:
            # An update of a version that no longer exists (S3 answers 404, not 412).
            raise PreconditionFailed(f"{key!r} does not exist") from None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("put", key, exc) from None
        return self._etag(result)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        current = await self.head(key)
        if current is None:
            raise NotFound(key)
        if if_match is not None and if_match != "*" and current.etag != if_match:
            raise PreconditionFailed(f"{key!r} is not at ETag {if_match}")
        try:
            await self._run(obstore.delete, self._store, key)
        except _MISSING:
            raise NotFound(key) from None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("delete", key, exc) from None

    async def _page(self, folder: str, recursive: bool, limit: int, token: str | None) -> Page:
        prefix = folder.removesuffix("/") or None
        try:
            entries = await self._run(self._list, prefix, recursive, limit, token)
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("list", folder, exc) from None
        return page_of(entries[: limit + 1], limit)

    def _list(
        self, prefix: str | None, recursive: bool, limit: int, token: str | None
    ) -> builtins.list[tuple[str, ObjectInfo | None]]:
        entries: builtins.list[tuple[str, ObjectInfo | None]] = []
        if recursive:
            chunk_size = min(limit + 1, _LIST_CHUNK)
            for chunk in obstore.list(self._store, prefix, offset=token, chunk_size=chunk_size):
                entries.extend(
                    (meta["path"], self._info(meta))
                    for meta in chunk
                    if not _reserved(meta["path"])  # a streamed write's `.tollgate-tmp/`
                )
                if len(entries) > limit:
                    break
            return sorted(entries, key=lambda entry: entry[0])
        # One folder: obstore reads every page of it (folders are small next to buckets).
        result = obstore.list_with_delimiter(self._store, prefix)
        entries = [(meta["path"], self._info(meta)) for meta in result["objects"]]
        entries += [(name.rstrip("/") + "/", None) for name in result["common_prefixes"]]
        return sorted(e for e in entries if (token is None or e[0] > token) and not _reserved(e[0]))


def _unavailable(operation: str, key: str, exc: BaseException) -> StoreUnavailable:
    # obstore's messages name the URL and the store's answer, never the credentials.
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StoreUnavailable(f"storage {operation} {key!r}: {first_line}")


def open_cloud_store(settings: StorageSettings) -> CloudStore:
    """The obstore store for `settings.provider` (not `filesystem`), with DIAL's settings mapped."""
    from obstore.store import AzureStore, GCSStore, S3Store

    overrides = settings.overrides
    config: Any = {
        name.removeprefix(OBSTORE_OVERRIDE): value
        for name, value in overrides.items()
        if name.startswith(OBSTORE_OVERRIDE)
    }
    client_options: Any = dict(CLIENT_OPTIONS)
    if settings.endpoint is not None and settings.endpoint.startswith("http://"):
        client_options["allow_http"] = True
    prefix = settings.prefix
    name = f"{settings.provider}:{settings.bucket}" + (f"/{prefix}" if prefix else "")
    secret = settings.secret
    store: Any
    if settings.provider in ("aws-s3", "s3"):
        config.setdefault("conditional_put", "etag")
        if settings.endpoint is not None:
            config["endpoint"] = settings.endpoint
        region = overrides.get("jclouds.regions")
        if region:
            config["region"] = region.split(",")[0].strip()
        elif settings.endpoint is not None:
            config.setdefault("region", "us-east-1")  # S3-compatible servers ignore it
        if settings.identity is not None:
            config["access_key_id"] = settings.identity
        if secret is not None:
            config["secret_access_key"] = secret
        store = S3Store(
            settings.bucket,
            prefix=prefix,
            config=config,
            client_options=client_options,
            retry_config=RETRY_CONFIG,
        )
        return CloudStore(store, name=name)
    if settings.provider == "google-cloud-storage":
        if settings.endpoint is not None:
            config["base_url"] = settings.endpoint
        if secret is not None:
            if overrides.get("jclouds.oauth.credential-type") == "bearerTokenCredentials":
                config["bearer_token"] = secret
            elif secret.lstrip().startswith("{"):
                config["service_account_key"] = secret  # a service account's JSON key
            else:  # jclouds' form: the account's e-mail and its PEM private key
                key = {"client_email": settings.identity or "", "private_key": secret}
                config["service_account_key"] = json.dumps(key)
        store = GCSStore(
            settings.bucket,
            prefix=prefix,
            config=config,
            client_options=client_options,
            retry_config=RETRY_CONFIG,
        )
        return CloudStore(store, name=name, generation_tags=True)
    # azureblob
    if settings.identity is not None:
        config["account_name"] = settings.identity
    if secret is not None and overrides.get("jclouds.azureblob.auth") != "azureAd":
        config["account_key"] = secret
    if settings.endpoint is not None:
        config["endpoint"] = settings.endpoint
    store = AzureStore(
        settings.bucket,
        prefix=prefix,
        config=config,
        client_options=client_options,
        retry_config=RETRY_CONFIG,
    )
    return CloudStore(store, name=name)
