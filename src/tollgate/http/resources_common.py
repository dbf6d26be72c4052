"""What the Files API and the JSON resources share (compatibility C85, C86): DIAL's conditions
(spec 5.5), its metadata shapes and the one folder listing (spec 6.3), page tokens, errors."""

from __future__ import annotations

import base64
import binascii
import mimetypes
from datetime import datetime
from typing import Any

from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.resources.paths import ResourcePath
from tollgate.storage.store import ObjectInfo, ResourceStore

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
METADATA_MIME = "application/vnd.dial.metadata+json"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
READ, WRITE = "READ", "WRITE"
ANY = "*"


def store_unavailable() -> GatewayError:
    return GatewayError(503, "Resource store is not available")


def not_found(url: str) -> GatewayError:
    return GatewayError(404, f"Not found: {url}")


# --- conditions


def condition_headers(request: web.Request) -> tuple[set[str] | None, set[str] | None]:
    return tags_of(request.headers.get("If-Match")), tags_of(request.headers.get("If-None-Match"))


def tags_of(value: str | None) -> set[str] | None:
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


def matches(tags: set[str], etag: str) -> bool:
    return ANY in tags or etag in tags


def check_write(
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
        if not matches(if_match, etag):
            raise GatewayError(412, f"If-match condition is failed for etag: {etag}")
        return current.etag
    if if_none_match and current is not None:
        etag = current.etag or ""
        if ANY in if_none_match:
            raise GatewayError(412, "Resource already exists")
        if etag in if_none_match:
            raise GatewayError(412, f"if-none-match condition is failed for etag: {etag}")
    return None


# --- metadata


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def guess_type(name: str | None) -> str:
    guessed = mimetypes.guess_type(name, strict=False)[0] if name else None
    return guessed or OCTET_STREAM


def item_metadata(
    resource: ResourcePath, info: ObjectInfo, *, listed: bool = False
) -> dict[str, Any]:
    """DIAL's metadata of an item: FileMetadata for a file, ResourceItemMetadata for a JSON
    resource (no size, no type; no `etag` in a listing); null fields other than name and
    parentPath omitted."""
    body = node(resource)
    updated = ms(info.last_modified)
    if info.created_at is not None:
        # The store stamps a new object's creation at its commit, a little after its mtime.
        created = ms(info.created_at)
        updated = max(updated, created)
        body["createdAt"] = created
    body["updatedAt"] = updated
    is_file = resource.group == "files"
    if info.etag is not None and not listed:  # listing items carry none (spec 6.3)
        body["etag"] = info.etag
    if is_file:
        body["contentLength"] = info.size
        body["contentType"] = info.content_type or guess_type(resource.name)
    return body


def node(resource: ResourcePath) -> dict[str, Any]:
    """What every metadata node of DIAL starts with, in its order; a folder's `items` null."""
    body: dict[str, Any] = {
        "name": resource.name,
        "parentPath": resource.parent_path,
        "bucket": resource.bucket,
        "url": resource.url,
        "nodeType": "FOLDER" if resource.is_folder else "ITEM",
        "resourceType": resource.resource_type,
    }
    if resource.is_folder:
        body["items"] = None
    return body


def child_of(parent: ResourcePath, relative: str) -> ResourcePath:
    """The path of a listed key (relative to `parent`'s folder; a sub-folder ends in `/`)."""
    is_folder = relative.endswith("/")
    segments = tuple(segment for segment in relative.split("/") if segment)
    return ResourcePath(
        parent.group, parent.bucket, parent.location, parent.segments + segments, is_folder
    )


async def folder_listing(
    store: ResourceStore, resource: ResourcePath, limit: int, recursive: bool, token: str | None
) -> dict[str, Any] | None:
    """DIAL's folder node of `resource` (a folder) with one page of its items; None for an
    empty folder other than the bucket's root (a folder is there only while something is in
    it)."""
    folder = resource.storage_key
    after = token_key(folder, token) if token else None
    page = await store.list(folder, recursive=recursive, limit=max(limit, 1), token=after)
    entries: list[tuple[str, ObjectInfo | None]] = [(o.key, o) for o in page.objects]
    entries += [(name, None) for name in page.folders]
    entries.sort(key=lambda entry: entry[0])
    if not entries and not resource.is_root and after is None:
        return None
    items: list[dict[str, Any]] = []
    next_token = page.next_token
    if limit == 0:
        next_token = None
    else:
        for key, info in entries:
            child = child_of(resource, key[len(folder) :])
            if info is None:
                items.append(node(child))
            else:
                items.append(item_metadata(child, info, listed=True))
    body = node(resource)
    body["items"] = items
    if next_token is not None:
        body["nextToken"] = make_token(folder, next_token)
    return body


def make_token(folder: str, key: str) -> str:
    """An opaque page token: the last key, relative to the folder (the store's keys hold the
    bucket's location, which bucket names are encrypted to hide)."""
    relative = key[len(folder) :] if key.startswith(folder) else key
    return base64.urlsafe_b64encode(relative.encode("utf-8")).decode("ascii").rstrip("=")


def token_key(folder: str, token: str) -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        relative = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise GatewayError(400, f"Invalid token: {token}") from None
    return folder + relative
