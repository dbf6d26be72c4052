"""DIAL's resource API: buckets, files and JSON resources (compatibility C83-C86, C88, C92,
C93).

`GET /v1/bucket` answers the caller's bucket name: DIAL's encryption of `Keys/<project>/` (and,
for a per-request key, the application's bucket and its `appdata` folder in the caller's).
The cipher comes from `encryption.secret` and `encryption.key`, or from the pair kept in the
resource store (made on the first start, shared by every instance on the store).

The Files API, on the resource store, for the caller's own bucket and `public`:

- `PUT /v1/files/{bucket}/{path}`: DIAL's multipart upload (the first file part, any field
  name), streamed into the store in bounded memory and committed atomically; at most
  `storage.maxUploadedFileSize` bytes (413). 200 with `ETag` and DIAL's FileMetadata.
- `GET /v1/files/{bucket}/{path}`: the bytes, streamed, with the stored `Content-Type`,
  `Content-Length` and `ETag`.
- `DELETE /v1/files/{bucket}/{path}`: 200, or 404 for a missing file (newest DIAL).
- `GET /v1/metadata/files/{bucket}/{path}`: a file's metadata, or a folder's listing
  (`limit`, `token`, `recursive`, `permissions`), DIAL's shapes.

JSON resources (compatibility C86), on the same store, with the same access and conditions:

- `PUT /v1/{conversations|prompts|applications}/{bucket}/{path}`: a JSON object of at most
  `resources.maxSize` bytes (413 `Request body is too large`), checked by `resources_json`
  and stored as `application/json`; 200 with `ETag` and DIAL's ResourceItemMetadata.
- `GET`: the stored JSON (a custom application, to a caller that may only read it: its
  ApplicationData); `DELETE`: 200, or 404; a folder URL: 400 `Folder not allowed: <url>`.
- `GET /v1/metadata/{type}/{bucket}/{path}`: the same listing as files' (`resources_common`),
  with DIAL's ResourceController message for bad query parameters.
Custom applications are callable as deployments (`http/custom_apps.py`, compatibility C92).

Conditions follow newest DIAL (spec 5.5) with unquoted ETags, as Tollgate's store gives them;
quoted and weak (`W/"..."`) tags are accepted. Access (spec 7.1) is `permissions`: the
caller's own bucket (`user_location`) and administrators (`access.admin.rules`, never a
per-request key) READ and WRITE; `public` READ for anyone (WRITE for administrators); a
per-request key's attachments READ and its `appdata` folder READ and WRITE (C93); what was
shared with the root caller (C88); anything else 403 `You don't have an access to: <url>`.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from tollgate.errors import GatewayError
from tollgate.http.resources_common import (
    ANY,
    DEFAULT_LIMIT,
    JSON,
    MAX_LIMIT,
    METADATA_MIME,
    READ,
    WRITE,
    check_write,
    condition_headers,
    folder_listing,
    guess_type,
    item_metadata,
    matches,
    not_found,
    store_unavailable,
)
from tollgate.http.resources_json import resource_body
from tollgate.pipeline.forward import read_body
from tollgate.resources.applications import application_data
from tollgate.resources.buckets import (
    PUBLIC_LOCATION,
    bucket_answer,
    in_appdata,
    initiator_location,
    user_location,
)
from tollgate.resources.encryption import BucketCipher, bucket_cipher
from tollgate.resources.events import ResourceEvents
from tollgate.resources.paths import ResourcePath, parse_url
from tollgate.resources.sharing import Sharing
from tollgate.security.admin import AdminRules
from tollgate.security.principal import Principal
from tollgate.settings import SettingsError
from tollgate.storage.store import (
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    ResourceStore,
    StorageError,
    TooLarge,
)

log = logging.getLogger("tollgate.resources")

BUCKET = re.compile(r"/+v1/bucket")
FILES = re.compile(r"/+v1/(files(?:/.*)?)")
FILE_METADATA = re.compile(r"/+v1/metadata/(files(?:/.*)?)")
_JSON_GROUPS = r"(?:conversations|prompts|applications)"
RESOURCES = re.compile(rf"/+v1/({_JSON_GROUPS}(?:/.*)?)")
RESOURCE_METADATA = re.compile(rf"/+v1/metadata/({_JSON_GROUPS}(?:/.*)?)")
DEFAULT_MAX_UPLOAD = 536870912  # DIAL's `storage.maxUploadedFileSize`
DEFAULT_MAX_BODY = 67108864  # DIAL's newest `resources.maxSize`
DEFAULT_BODY_TIMEOUT_S = 60.0
# What a multipart body may hold besides the file's bytes (boundaries, part headers) before a
# declared Content-Length alone says that the file is too large.
MULTIPART_SLACK = 65536
READ_CHUNK = 262144
DOWNLOAD_CHUNK = 262144
BOTH = frozenset((READ, WRITE))
ONLY_READ = frozenset((READ,))
NONE: frozenset[str] = frozenset()
BAD_QUERY = "Bad query parameters. Limit must be in [0, 1000] range. Recursive must be true/false"


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"File size exceeds the limit of {limit} bytes")


class ResourcesApi:
    """The resource endpoints; the bucket cipher is read (or made) once, at start or at the
    first call that needs it, so that an unreachable store at start-up heals by itself."""

    def __init__(
        self,
        store: ResourceStore,
        raw_settings: object,
        admins: AdminRules | None = None,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
        sharing: Sharing | None = None,
    ) -> None:
        self.store = store
        self.sharing = sharing
        # Set by the app: what happens to a deleted resource's shares (ResourceOps.forget).
        self.on_delete: Callable[[ResourcePath], Awaitable[None]] | None = None
        # Set by the app: where writes are announced to subscribers (C94).
        self.events: ResourceEvents | None = None
        self._raw = raw_settings
        self._cipher: BucketCipher | None = None
        self.admins = admins if admins is not None else AdminRules(())
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_body_bytes
        self._body_timeout_s = body_timeout_s

    async def start(self) -> None:
        try:
            await self.cipher()
        except GatewayError:
            log.error(
                "the bucket encryption pair could not be read from the resource store; "
                "GET /v1/bucket answers 503 until it can"
            )

    async def cipher(self) -> BucketCipher:
        if self._cipher is None:
            try:
                self._cipher = await bucket_cipher(self._raw, self.store)  # type: ignore[arg-type]
            except (StorageError, SettingsError) as exc:
                log.warning("bucket encryption pair: %s", exc)
                raise store_unavailable() from None
        return self._cipher

    @staticmethod
    def handles(path: str) -> bool:
        return any(
            pattern.fullmatch(path) is not None
            for pattern in (BUCKET, FILES, FILE_METADATA, RESOURCES, RESOURCE_METADATA)
        )

    async def handle(
        self, request: web.Request, principal: Principal, path: str
    ) -> web.StreamResponse:
        method = request.method
        match = FILE_METADATA.fullmatch(path) or RESOURCE_METADATA.fullmatch(path)
        if match is not None:
            if method != "GET":
                raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET"})
            return await self._metadata(request, principal, match[1])
        files = FILES.fullmatch(path)
        match = files or RESOURCES.fullmatch(path)
        if match is not None:
            url = match[1]
            try:
                if files is not None:
                    if method == "GET":
                        return await self._download(request, principal, url)
                    if method == "PUT":
                        return await self._upload(request, principal, url)
                    if method == "DELETE":
                        return await self._delete(request, principal, url, "Can't delete a folder")
                else:
                    if method == "GET":
                        return await self._get_resource(request, principal, url)
                    if method == "PUT":
                        return await self._put_resource(request, principal, url)
                    if method == "DELETE":
                        return await self._delete(
                            request, principal, url, "Folder not allowed: {url}"
                        )
            except StorageError as exc:  # StoreUnavailable, or a key the store refused
                log.warning("%s %s: %s", url.partition("/")[0], method, exc)
                raise store_unavailable() from None
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET, PUT, DELETE"})
        if method != "GET":
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET"})
        answer = bucket_answer(principal, await self.cipher())
        return web.Response(body=orjson.dumps(answer), content_type=JSON)

    # --- access

    async def permissions(self, principal: Principal, resource: ResourcePath) -> frozenset[str]:
        """DIAL's rules (spec 7.1) in its order: the own bucket and administrators (READ and
        WRITE); a per-request key's attachments, and what lies below an attached folder (READ;
        rule 3, compatibility C93); a per-request key's `appdata` folder in its root caller's
        bucket (READ and WRITE); public reads; what the root caller was shared (rule 5, from
        the owner's record: `tollgate.resources.sharing`)."""
        if resource.location == user_location(principal) or self.admins.allows(principal):
            return BOTH
        if resource.location == PUBLIC_LOCATION:
            return ONLY_READ
        attachments = principal.attachments
        attached = attachments is not None and resource.covered_by(attachments)
        initiator = initiator_location(principal)
        if resource.location == initiator and in_appdata(principal, resource):
            return BOTH
        if self.sharing is None:
            return ONLY_READ if attached else NONE
        granted = await self.sharing.granted(resource, initiator)
        if attached:
            return ONLY_READ.union(granted)
        return frozenset(granted) if granted else NONE

    async def _resource(
        self, principal: Principal, url: str, needs: str, *, write: bool = False
    ) -> tuple[ResourcePath, frozenset[str]]:
        resource = parse_url(url, await self.cipher(), write=write)
        granted = await self.permissions(principal, resource)
        if needs not in granted:
            raise GatewayError(403, f"You don't have an access to: {url}")
        return resource, granted

    # --- PUT

    async def _upload(self, request: web.Request, principal: Principal, url: str) -> web.Response:
        resource, _ = await self._resource(principal, url, WRITE, write=True)
        if resource.is_folder:
            raise GatewayError(400, "File name is missing")
        limit = self.max_upload_bytes
        length = request.content_length
        if length is not None and length > limit + MULTIPART_SLACK:
            raise too_large(limit)
        if not request.content_type.lower().startswith("multipart/form-data"):
            raise GatewayError(400, "Content-Type must be multipart/form-data")
        store_if_match, create_only = await self._preconditions(request, resource)
        try:
            reader = await request.multipart()
            part = await self._file_part(reader)
            content_type = _part_type(part, resource.name)
            info = await self._commit(
                request,
                resource,
                self._chunks(part),
                content_type,
                store_if_match,
                create_only,
                limit,
            )
        except TooLarge:
            raise too_large(limit) from None
        except (ConnectionError, aiohttp.ClientError) as exc:  # the client went away
            log.info("files PUT %s: upload interrupted: %s", resource.url, exc)
            raise GatewayError(400, "Upload was interrupted") from None
        except (ValueError, AssertionError, HttpProcessingError) as exc:  # a malformed form
            log.info("files PUT: bad multipart body: %s", exc)
            raise GatewayError(400, "Invalid multipart body") from None
        return _written(resource, info)

    async def _put_resource(
        self, request: web.Request, principal: Principal, url: str
    ) -> web.Response:
        """A conversation, prompt or application: a JSON object of at most `resources.maxSize`
        bytes, stored as sent (an application with DIAL's overrides)."""
        resource, _ = await self._resource(principal, url, WRITE, write=True)
        if resource.is_folder:
            raise GatewayError(400, f"Folder not allowed: {resource.url}")
        limit = self.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise GatewayError(413, "Request body is too large")
        store_if_match, create_only = await self._preconditions(request, resource)
        data = await read_body(request, self._body_timeout_s)
        if len(data) > limit:
            raise GatewayError(413, "Request body is too large")
        stored = resource_body(resource, data)
        try:
            info = await self._commit(
                request, resource, _one(stored), JSON, store_if_match, create_only, None
            )
        except TooLarge:  # pragma: no cover - no bound is given
            raise GatewayError(413, "Request body is too large") from None
        return _written(resource, info)

    async def _preconditions(
        self, request: web.Request, resource: ResourcePath
    ) -> tuple[str | None, bool]:
        """The conditions checked before the body is read: the ETag the commit must find, and
        whether it may only create."""
        if_match, if_none_match = condition_headers(request)
        current = await self.store.head(resource.storage_key) if if_match or if_none_match else None
        store_if_match = check_write(resource.url, current, if_match, if_none_match)
        return store_if_match, if_none_match == {ANY}

    async def _commit(
        self,
        request: web.Request,
        resource: ResourcePath,
        chunks: AsyncIterator[bytes],
        content_type: str,
        store_if_match: str | None,
        create_only: bool,
        max_bytes: int | None,
    ) -> ObjectInfo:
        """The store's atomic write, the conditions checked again at its commit (412); then
        its event for subscribers (C94)."""
        key = resource.storage_key
        started = datetime.now(UTC)
        try:
            info = await self.store.put_stream(
                key,
                chunks,
                content_type=content_type,
                if_match=store_if_match,
                if_none_match=create_only,
                max_bytes=max_bytes,
            )
            if self.events is not None:
                action = self.events.written(info.created_at, started)
                await self.events.publish(key, action, info.etag)
            return info
        except PreconditionFailed:
            if create_only:
                raise GatewayError(412, "Resource already exists") from None
            latest = await self.store.head(key)
            etag = latest.etag if latest is not None else request.headers.get("If-Match", "")
            raise GatewayError(412, f"If-match condition is failed for etag: {etag}") from None

    async def _file_part(self, reader: Any) -> BodyPartReader:
        """The first part with a file name (form fields before it are skipped)."""
        while True:
            part = await self._timed(reader.next())
            if part is None:
                raise GatewayError(400, "File part is missing in the multipart body")
            if isinstance(part, BodyPartReader) and part.filename is not None:
                return part
            await self._timed(part.release())

    async def _chunks(self, part: BodyPartReader) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._timed(part.read_chunk(READ_CHUNK))
            if not chunk:
                return
            yield chunk

    async def _timed(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self._body_timeout_s)
        except TimeoutError:
            raise GatewayError(408, "Request body was not received in time") from None

    # --- GET

    async def _download(
        self, request: web.Request, principal: Principal, url: str
    ) -> web.StreamResponse:
        resource, _ = await self._resource(principal, url, READ)
        if resource.is_folder:
            raise GatewayError(400, "Can't download a folder")
        return await self._send(request, resource, None)

    async def _get_resource(
        self, request: web.Request, principal: Principal, url: str
    ) -> web.StreamResponse:
        resource, granted = await self._resource(principal, url, READ)
        if resource.is_folder:
            raise GatewayError(400, f"Folder not allowed: {resource.url}")
        if resource.group == "applications" and WRITE not in granted:
            return await self._application_data(request, resource)
        return await self._send(request, resource, JSON)

    async def _application_data(self, request: web.Request, resource: ResourcePath) -> web.Response:
        """DIAL's `getApplicationData` (spec 6.2): a caller that may only read a custom
        application gets its ApplicationData, as the listing shows it, not the definition
        (with the stored version's ETag and conditions, as `_send`)."""
        if_match, if_none_match = condition_headers(request)
        blob = await self.store.get(resource.storage_key)
        body = None if blob is None else application_data(resource, blob.data)
        if blob is None or body is None:
            if if_match:
                raise GatewayError(412, "If-match condition is failed for etag: null")
            raise not_found(resource.url)
        etag = blob.etag or ""
        headers = {"ETag": etag, "Access-Control-Expose-Headers": "ETag"}
        if if_match and not matches(if_match, etag):
            raise GatewayError(412, f"If-match condition is failed for etag: {etag}")
        if if_none_match and matches(if_none_match, etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=orjson.dumps(body), content_type=JSON, headers=headers)

    async def _send(
        self, request: web.Request, resource: ResourcePath, content_type: str | None
    ) -> web.StreamResponse:
        """The stored bytes, streamed, with `content_type` (else the stored one) and `ETag`;
        newest DIAL's conditions (304, 412)."""
        if_match, if_none_match = condition_headers(request)
        obj = await self.store.get_stream(resource.storage_key, chunk_size=DOWNLOAD_CHUNK)
        if obj is None:
            if if_match:
                raise GatewayError(412, "If-match condition is failed for etag: null")
            raise not_found(resource.url)
        async with obj:
            etag = obj.etag or ""
            headers = {
                "ETag": etag,
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Expose-Headers": "ETag",
            }
            if if_match and not matches(if_match, etag):
                raise GatewayError(412, f"If-match condition is failed for etag: {etag}")
            if if_none_match and matches(if_none_match, etag):
                return web.Response(status=304, headers=headers)
            response = web.StreamResponse(status=200, headers=headers)
            response.content_type = (
                content_type or obj.info.content_type or guess_type(resource.name)
            )
            response.content_length = obj.size
            await response.prepare(request)
            try:
                async for chunk in obj:
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, StorageError) as exc:
                # The status is sent: the client sees a short body (Content-Length) and a
                # closed connection, never another answer on the same stream.
                log.info("GET %s stopped: %s", resource.url, exc)
                if request.transport is not None:
                    request.transport.close()
            return response

    # --- DELETE

    async def _delete(
        self, request: web.Request, principal: Principal, url: str, folder_message: str
    ) -> web.Response:
        resource, _ = await self._resource(principal, url, WRITE)
        if resource.is_folder:
            raise GatewayError(400, folder_message.format(url=resource.url))
        key = resource.storage_key
        if_match, if_none_match = condition_headers(request)
        store_if_match: str | None = None
        if if_match or if_none_match:
            current = await self.store.head(key)
            if current is None:
                raise not_found(resource.url)
            store_if_match = check_write(resource.url, current, if_match, if_none_match)
        try:
            await self.store.delete(key, if_match=store_if_match)
        except NotFound:
            # Its shares go all the same: a delete whose share clean-up failed (503) is
            # retried, and a resource made again at the URL must not inherit old grants.
            if self.on_delete is not None:
                await self.on_delete(resource)
            raise not_found(resource.url) from None
        except PreconditionFailed:
            latest = await self.store.head(key)
            if latest is None:
                raise not_found(resource.url) from None
            raise GatewayError(
                412, f"If-match condition is failed for etag: {latest.etag}"
            ) from None
        if self.events is not None:
            await self.events.publish(key, "DELETE")
        if self.on_delete is not None:
            await self.on_delete(resource)
        return web.Response(status=200)

    # --- metadata

    async def _metadata(self, request: web.Request, principal: Principal, url: str) -> web.Response:
        """An item's metadata or a folder's listing (spec 6.3), for files and JSON resources
        alike; only the message for bad query parameters differs."""
        resource, granted = await self._resource(principal, url, READ)
        query = request.query
        limit, recursive = _listing_query(resource, query.get("limit"), query.get("recursive"))
        with_permissions = query.get("permissions", "false").lower() == "true"
        permissions = sorted(granted) if with_permissions else None
        try:
            if resource.is_folder:
                body = await folder_listing(
                    self.store, resource, limit, recursive, query.get("token")
                )
            else:
                info = await self.store.head(resource.storage_key)
                body = None if info is None else item_metadata(resource, info)
        except StorageError as exc:
            log.warning("%s metadata: %s", resource.group, exc)
            raise store_unavailable() from None
        if body is None:
            raise not_found(resource.url)
        if permissions is not None:
            body["permissions"] = permissions
            for item in body.get("items") or ():
                item["permissions"] = permissions
        accept = request.headers.get("Accept", "")
        content_type = METADATA_MIME if METADATA_MIME in accept else JSON
        return web.Response(body=orjson.dumps(body), content_type=content_type)


# --- helpers


def _part_type(part: BodyPartReader, name: str | None) -> str:
    declared = part.headers.get("Content-Type")
    if declared:
        return declared
    guessed = mimetypes.guess_type(part.filename, strict=False)[0] if part.filename else None
    return guessed or guess_type(name)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _written(resource: ResourcePath, info: ObjectInfo) -> web.Response:
    """A PUT's answer: 200, `ETag` and DIAL's metadata of the item."""
    return web.Response(
        body=orjson.dumps(item_metadata(resource, info)),
        content_type=JSON,
        headers={"ETag": info.etag or "", "Access-Control-Expose-Headers": "ETag"},
    )


def _listing_query(
    resource: ResourcePath, limit_value: str | None, recursive_value: str | None
) -> tuple[int, bool]:
    """`limit` (0..1000, default 100) and `recursive`. Files: DIAL's FileMetadataController
    (a bad limit has its message, `recursive` is true or else false); JSON resources: DIAL's
    ResourceController (one message, `recursive` must be true or false)."""
    try:
        limit = DEFAULT_LIMIT if limit_value is None else int(limit_value)
    except ValueError:
        limit = -1
    recursive = (recursive_value or "false").lower()
    if resource.group == "files":
        if not 0 <= limit <= MAX_LIMIT:
            raise GatewayError(400, f"Limit is out of allowed range: [0, {MAX_LIMIT}]")
        return limit, recursive == "true"
    if not 0 <= limit <= MAX_LIMIT or recursive not in ("true", "false"):
        raise GatewayError(400, BAD_QUERY)
    return limit, recursive == "true"
