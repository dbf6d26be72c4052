"""DIAL's resource API: buckets and files (issue 14, in progress; compatibility C83, C84).

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

Conditions follow newest DIAL (spec 5.5) with unquoted ETags, as Tollgate's store gives them;
quoted and weak (`W/"..."`) tags are accepted. Access (spec 7.1): the caller's own bucket
(`user_location`) READ and WRITE; administrators (`access.admin.rules`, never a per-request
key) READ and WRITE everywhere; `public` READ for anyone; anything else 403
`You don't have an access to: <url>`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import BodyPartReader, web

from tollgate.errors import GatewayError
from tollgate.resources.buckets import PUBLIC_LOCATION, bucket_answer, user_location
from tollgate.resources.encryption import BucketCipher, bucket_cipher
from tollgate.resources.paths import ResourcePath, parse_url
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
DEFAULT_MAX_UPLOAD = 536870912  # DIAL's `storage.maxUploadedFileSize`
DEFAULT_BODY_TIMEOUT_S = 60.0
# What a multipart body may hold besides the file's bytes (boundaries, part headers) before a
# declared Content-Length alone says that the file is too large.
MULTIPART_SLACK = 65536
READ_CHUNK = 262144
DOWNLOAD_CHUNK = 262144
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
METADATA_MIME = "application/vnd.dial.metadata+json"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
READ, WRITE = "READ", "WRITE"
_ANY = "*"


def store_unavailable() -> GatewayError:
    return GatewayError(503, "Resource store is not available")


def not_found(url: str) -> GatewayError:
    return GatewayError(404, f"Not found: {url}")


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
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.store = store
        self._raw = raw_settings
        self._cipher: BucketCipher | None = None
        self.admins = admins if admins is not None else AdminRules(())
        self.max_upload_bytes = max_upload_bytes
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
        return (
            BUCKET.fullmatch(path) is not None
            or FILES.fullmatch(path) is not None
            or FILE_METADATA.fullmatch(path) is not None
        )

    async def handle(
        self, request: web.Request, principal: Principal, path: str
    ) -> web.StreamResponse:
        match = FILE_METADATA.fullmatch(path)
        if match is not None:
            if request.method != "GET":
                raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET"})
            return await self._metadata(request, principal, match[1])
        match = FILES.fullmatch(path)
        if match is not None:
            method = request.method
            try:
                if method == "GET":
                    return await self._download(request, principal, match[1])
                if method == "PUT":
                    return await self._upload(request, principal, match[1])
                if method == "DELETE":
                    return await self._delete(request, principal, match[1])
            except StorageError as exc:  # StoreUnavailable, or a key the store refused
                log.warning("files %s: %s", method, exc)
                raise store_unavailable() from None
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET, PUT, DELETE"})
        if request.method != "GET":
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET"})
        answer = bucket_answer(principal, await self.cipher())
        return web.Response(body=orjson.dumps(answer), content_type=JSON)

    # --- access

    def permissions(self, principal: Principal, resource: ResourcePath) -> frozenset[str]:
        """DIAL's rules 1 and 2 (own bucket, administrators) and public reads."""
        if resource.location == user_location(principal) or self.admins.allows(principal):
            return frozenset((READ, WRITE))
        if resource.location == PUBLIC_LOCATION:
            return frozenset((READ,))
        return frozenset()

    async def _resource(
        self, principal: Principal, url: str, needs: str, *, write: bool = False
    ) -> tuple[ResourcePath, frozenset[str]]:
        resource = parse_url(url, await self.cipher(), write=write)
        granted = self.permissions(principal, resource)
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
        key = resource.storage_key
        if_match, if_none_match = _condition_headers(request)
        current = await self.store.head(key) if if_match or if_none_match else None
        store_if_match = _check_write(resource.url, current, if_match, if_none_match)
        create_only = if_none_match == {_ANY}
        try:
            reader = await request.multipart()
            part = await self._file_part(reader)
            content_type = _part_type(part, resource.name)
            info = await self.store.put_stream(
                key,
                self._chunks(part),
                content_type=content_type,
                if_match=store_if_match,
                if_none_match=create_only,
                max_bytes=limit,
            )
        except TooLarge:
            raise too_large(limit) from None
        except PreconditionFailed:
            if create_only:
                raise GatewayError(412, "Resource already exists") from None
            latest = await self.store.head(key)
            etag = latest.etag if latest is not None else request.headers.get("If-Match", "")
            raise GatewayError(412, f"If-match condition is failed for etag: {etag}") from None
        except (ConnectionError, aiohttp.ClientError) as exc:  # the client went away
            log.info("files PUT %s: upload interrupted: %s", resource.url, exc)
            raise GatewayError(400, "Upload was interrupted") from None
        except (ValueError, AssertionError) as exc:  # a malformed multipart body
            log.info("files PUT: bad multipart body: %s", exc)
            raise GatewayError(400, "Invalid multipart body") from None
        etag = info.etag or ""
        body = _item(resource, info)
        return web.Response(
            body=orjson.dumps(body),
            content_type=JSON,
            headers={"ETag": etag, "Access-Control-Expose-Headers": "ETag"},
        )

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
        if_match, if_none_match = _condition_headers(request)
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
            if if_match and not _matches(if_match, etag):
                raise GatewayError(412, f"If-match condition is failed for etag: {etag}")
            if if_none_match and _matches(if_none_match, etag):
                return web.Response(status=304, headers=headers)
            response = web.StreamResponse(status=200, headers=headers)
            response.content_type = obj.info.content_type or _guess(resource.name)
            response.content_length = obj.size
            await response.prepare(request)
            try:
                async for chunk in obj:
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionError, StorageError) as exc:
                # The status is sent: the client sees a short body (Content-Length) and a
                # closed connection, never another answer on the same stream.
                log.info("files GET %s stopped: %s", resource.url, exc)
                if request.transport is not None:
                    request.transport.close()
            return response

    # --- DELETE

    async def _delete(self, request: web.Request, principal: Principal, url: str) -> web.Response:
        resource, _ = await self._resource(principal, url, WRITE)
        if resource.is_folder:
            raise GatewayError(400, "Can't delete a folder")
        key = resource.storage_key
        if_match, if_none_match = _condition_headers(request)
        store_if_match: str | None = None
        if if_match or if_none_match:
            current = await self.store.head(key)
            if current is None:
                raise not_found(resource.url)
            store_if_match = _check_write(resource.url, current, if_match, if_none_match)
        try:
            await self.store.delete(key, if_match=store_if_match)
        except NotFound:
            raise not_found(resource.url) from None
        except PreconditionFailed:
            latest = await self.store.head(key)
            if latest is None:
                raise not_found(resource.url) from None
            raise GatewayError(
                412, f"If-match condition is failed for etag: {latest.etag}"
            ) from None
        return web.Response(status=200)

    # --- metadata

    async def _metadata(self, request: web.Request, principal: Principal, url: str) -> web.Response:
        resource, granted = await self._resource(principal, url, READ)
        query = request.query
        limit = _limit(query.get("limit"))
        recursive = query.get("recursive", "false").lower() == "true"
        with_permissions = query.get("permissions", "false").lower() == "true"
        permissions = sorted(granted) if with_permissions else None
        try:
            if resource.is_folder:
                body = await self._folder(resource, limit, recursive, query.get("token"))
            else:
                info = await self.store.head(resource.storage_key)
                body = None if info is None else _item(resource, info)
        except StorageError as exc:
            log.warning("files metadata: %s", exc)
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

    async def _folder(
        self, resource: ResourcePath, limit: int, recursive: bool, token: str | None
    ) -> dict[str, Any] | None:
        folder = resource.storage_key
        after = _token_key(folder, token) if token else None
        page = await self.store.list(folder, recursive=recursive, limit=max(limit, 1), token=after)
        entries: list[tuple[str, ObjectInfo | None]] = [(o.key, o) for o in page.objects]
        entries += [(name, None) for name in page.folders]
        entries.sort(key=lambda entry: entry[0])
        if not entries and not resource.is_root and after is None:
            return None  # a folder is there only while something is in it
        items: list[dict[str, Any]] = []
        next_token = page.next_token
        if limit == 0:
            next_token = None
        else:
            for key, info in entries:
                child = _child(resource, key[len(folder) :])
                items.append(_folder_entry(child) if info is None else _item(child, info))
        body: dict[str, Any] = {
            "name": resource.name,
            "parentPath": resource.parent_path,
            "bucket": resource.bucket,
            "url": resource.url,
            "nodeType": "FOLDER",
            "resourceType": resource.resource_type,
            "items": items,
        }
        if next_token is not None:
            body["nextToken"] = _make_token(folder, next_token)
        return body


# --- helpers


def _condition_headers(request: web.Request) -> tuple[set[str] | None, set[str] | None]:
    return _tags(request.headers.get("If-Match")), _tags(request.headers.get("If-None-Match"))


def _tags(value: str | None) -> set[str] | None:
    """A condition header's tags, quotes and `W/` stripped; `{"*"}` for any; None if absent
    or empty (no condition)."""
    if value is None:
        return None
    tags = set()
    for raw in value.split(","):
        tag = raw.strip()
        if tag.startswith(("W/", "w/")):
            tag = tag[2:]
        tag = tag.strip().strip('"')
        if tag:
            tags.add(tag)
    return tags or None


def _matches(tags: set[str], etag: str) -> bool:
    return _ANY in tags or etag in tags


def _check_write(
    url: str,
    current: ObjectInfo | None,
    if_match: set[str] | None,
    if_none_match: set[str] | None,
) -> str | None:
    """Newest DIAL's conditions for a PUT or DELETE, checked against the current version; the
    ETag the store's write must still find (None: no condition at commit)."""
    if if_match:
        if current is None:
            raise GatewayError(412, "If-match condition is failed for etag: null")
        etag = current.etag or ""
        if not _matches(if_match, etag):
            raise GatewayError(412, f"If-match condition is failed for etag: {etag}")
        return current.etag
    if if_none_match and current is not None:
        etag = current.etag or ""
        if _ANY in if_none_match:
            raise GatewayError(412, "Resource already exists")
        if etag in if_none_match:
            raise GatewayError(412, f"if-none-match condition is failed for etag: {etag}")
    return None


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if not 0 <= limit <= MAX_LIMIT:
        raise GatewayError(400, f"Limit is out of allowed range: [0, {MAX_LIMIT}]")
    return limit


def _make_token(folder: str, key: str) -> str:
    """An opaque page token: the last key, relative to the folder (the store's keys hold the
    bucket's location, which bucket names are encrypted to hide)."""
    relative = key[len(folder) :] if key.startswith(folder) else key
    return base64.urlsafe_b64encode(relative.encode("utf-8")).decode("ascii").rstrip("=")


def _token_key(folder: str, token: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        relative = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise GatewayError(400, f"Invalid token: {token}") from None
    return folder + relative


def _child(parent: ResourcePath, relative: str) -> ResourcePath:
    """The path of a listed key (relative to `parent`'s folder; a sub-folder ends in `/`)."""
    is_folder = relative.endswith("/")
    segments = tuple(segment for segment in relative.split("/") if segment)
    return ResourcePath(
        parent.group, parent.bucket, parent.location, parent.segments + segments, is_folder
    )


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _guess(name: str | None) -> str:
    guessed = mimetypes.guess_type(name, strict=False)[0] if name else None
    return guessed or OCTET_STREAM


def _part_type(part: BodyPartReader, name: str | None) -> str:
    declared = part.headers.get("Content-Type")
    if declared:
        return declared
    guessed = mimetypes.guess_type(part.filename, strict=False)[0] if part.filename else None
    return guessed or _guess(name)


def _item(resource: ResourcePath, info: ObjectInfo) -> dict[str, Any]:
    """DIAL's FileMetadata of an item: null fields other than name and parentPath omitted."""
    body: dict[str, Any] = {
        "name": resource.name,
        "parentPath": resource.parent_path,
        "bucket": resource.bucket,
        "url": resource.url,
        "nodeType": "ITEM",
        "resourceType": resource.resource_type,
    }
    updated = _ms(info.last_modified)
    if info.created_at is not None:
        # The store stamps a new object's creation at its commit, a little after its mtime.
        created = _ms(info.created_at)
        updated = max(updated, created)
        body["createdAt"] = created
    body["updatedAt"] = updated
    if info.etag is not None:
        body["etag"] = info.etag
    body["contentLength"] = info.size
    body["contentType"] = info.content_type or _guess(resource.name)
    return body


def _folder_entry(resource: ResourcePath) -> dict[str, Any]:
    return {
        "name": resource.name,
        "parentPath": resource.parent_path,
        "bucket": resource.bucket,
        "url": resource.url,
        "nodeType": "FOLDER",
        "resourceType": resource.resource_type,
        "items": None,
    }
