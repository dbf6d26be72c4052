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
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
from obstore import exceptions as obstore_errors

from tollgate.storage.settings import StorageSettings
from tollgate.storage.store import (
    Blob,
    NotFound,
    ObjectInfo,
    Page,
    PreconditionFailed,
    ResourceStore,
    StoreUnavailable,
    check_key,
    page_of,
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
            meta = await self._run(obstore.head, self._store, key)
        except _MISSING:
            return None
        except (obstore_errors.BaseError, OSError) as exc:
            raise _unavailable("head", key, exc) from None
        return ObjectInfo(key, meta["size"], meta["last_modified"], self._etag(meta))

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
                entries.extend((meta["path"], self._info(meta)) for meta in chunk)
                if len(entries) > limit:
                    break
            return sorted(entries, key=lambda entry: entry[0])
        # One folder: obstore reads every page of it (folders are small next to buckets).
        result = obstore.list_with_delimiter(self._store, prefix)
        entries = [(meta["path"], self._info(meta)) for meta in result["objects"]]
        entries += [(name.rstrip("/") + "/", None) for name in result["common_prefixes"]]
        return sorted(e for e in entries if token is None or e[0] > token)


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
