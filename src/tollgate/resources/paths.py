"""Resource URLs: `<group>/<bucket>/<path>`, parsed and checked as DIAL does (compatibility C84).

A resource URL is what follows `/v1/` (or `/v1/metadata/`) in a request, and what bodies and
answers carry (`conversations/<bucket>/folder/conversation`, a folder with a trailing `/`). Its
path segments are percent-encoded; the store keeps them decoded, under the bucket's location:
`<location><group>/<segment>/.../<name>`.

DIAL's rules and messages (400 each), in the order they are checked:

1. fewer than two segments: `Url has less than two segments: <url>`; exactly two without a
   trailing `/`: `Url must start with resource/bucket/, but: <url>`;
2. a group other than `files`, `conversations`, `prompts`, `applications`:
   `Unsupported resource type: <group>`;
3. a bucket that is neither `public` nor a name the cipher made: `Url has invalid bucket: <url>`;
4. a segment holding a query or a fragment (`?`, `#`): `Wrong path provided <segment>`;
5. a segment that is empty once decoded (`a//b`), or holds `/` (`%2F`), `{`, `}` or a control
   character: `Invalid path provided <path>`;
6. a key (without `storage.prefix`) longer than 900 UTF-8 bytes:
   `Resource path exceeds max allowed size: 900`;
7. writes only: a name or parent folder ending in `.`:
   `Resource name and/or parent folders must not end with .(dot)`.

Where DIAL leaves a gap, Tollgate refuses, with rule 5's message (spec section 12): `.` and
`..` segments, in any spelling (`%2e%2e`, `.%2E`), on reads as on writes; a backslash (`%5C`);
DEL and lone surrogates; a `%` not followed by two hex digits; bytes that are not UTF-8
(`%C0%AE`, the overlong `.`); and the store's reserved `.tollgate-` names. Segments are decoded
once and kept as given, with no Unicode normalisation: U+2025 (two dots in one character) and
U+FF0E (a full-width dot) are ordinary names, and `%252e` names the file `%2e`. So a parsed
path's storage key is always inside `<location><group>/`, and the store's `check_key` takes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tollgate.errors import GatewayError
from tollgate.resources.buckets import encode_segment, location_of, valid_segment
from tollgate.resources.encryption import BucketCipher
from tollgate.storage.store import InvalidKey, check_folder, check_key

# The URL groups exposed at /v1/ and DIAL's resource type of each (`resourceType` in metadata).
RESOURCE_TYPES = {
    "files": "FILE",
    "conversations": "CONVERSATION",
    "prompts": "PROMPT",
    "applications": "APPLICATION",
}
MAX_PATH_BYTES = 900
_BUCKET = re.compile(r"[A-Za-z0-9]+")  # DIAL's route: Base58 names and `public`
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_FORBIDDEN = frozenset("{}")


@dataclass(frozen=True, slots=True)
class ResourcePath:
    """A checked resource URL: its group, bucket name and location, and its decoded segments
    (none for the bucket's root folder)."""

    group: str
    bucket: str
    location: str
    segments: tuple[str, ...]
    is_folder: bool

    @property
    def resource_type(self) -> str:
        """DIAL's `resourceType`: `FILE`, `CONVERSATION`, `PROMPT` or `APPLICATION`."""
        return RESOURCE_TYPES[self.group]

    @property
    def is_root(self) -> bool:
        return not self.segments

    @property
    def url(self) -> str:
        """The canonical URL: each segment encoded as DIAL's Guava escaper does, a folder's
        with a trailing `/`."""
        path = "/".join(encode_segment(segment) for segment in self.segments)
        if self.is_folder and path:
            path += "/"
        return f"{self.group}/{self.bucket}/{path}"

    @property
    def storage_key(self) -> str:
        """The store's key: `<location><group>/<decoded segments>`. A folder's ends with `/` (a
        folder to list, which `check_folder` accepts); an item's passes `check_key`."""
        path = "/".join(self.segments)
        if self.is_folder and path:
            path += "/"
        return f"{self.location}{self.group}/{path}"

    @property
    def name(self) -> str | None:
        """The last segment, decoded; None for the root folder (DIAL's `name: null`)."""
        return self.segments[-1] if self.segments else None

    def covered_by(self, urls: frozenset[str]) -> bool:
        """Whether `urls` (canonical URLs, a folder's with its trailing `/`) holds this
        resource's URL or that of a folder above it, up to the bucket's root."""
        if self.url in urls:
            return True
        prefix = f"{self.group}/{self.bucket}/"
        if prefix in urls:
            return True
        for count in range(1, len(self.segments)):
            folder = "".join(f"{encode_segment(s)}/" for s in self.segments[:count])
            if prefix + folder in urls:
                return True
        return False

    @property
    def parent_path(self) -> str | None:
        """The parent folders, decoded and joined by `/`; None at the root and for its
        children (DIAL's `parentPath: null`)."""
        return "/".join(self.segments[:-1]) or None


def parse_url(url: str, cipher: BucketCipher, *, write: bool = False) -> ResourcePath:
    """`url` (`<group>/<bucket>/<path>`, percent-encoded) checked by DIAL's rules; `write`
    adds the rule for writes. Every refusal is a `GatewayError` 400 with DIAL's message."""
    if not isinstance(url, str):
        raise GatewayError(400, f"Invalid resource url provided: {url}")
    parts = url.split("/")
    while parts and not parts[-1]:
        parts.pop()  # Java's split drops trailing empty strings
    if len(parts) < 2:
        raise GatewayError(400, f"Url has less than two segments: {url}")
    if len(parts) == 2 and not url.endswith("/"):
        raise GatewayError(400, f"Url must start with resource/bucket/, but: {url}")
    group, bucket = parts[0], parts[1]
    if group not in RESOURCE_TYPES:
        raise GatewayError(400, f"Unsupported resource type: {group}")
    location = location_of(bucket, cipher) if _BUCKET.fullmatch(bucket) else None
    if location is None:
        raise GatewayError(400, f"Url has invalid bucket: {url}")
    relative = url[len(group) + len(bucket) + 2 :]
    segments, is_folder = _segments(relative)
    path = ResourcePath(group, bucket, location, segments, is_folder)
    key = path.storage_key
    if len(key.encode("utf-8")) > MAX_PATH_BYTES:
        raise GatewayError(400, f"Resource path exceeds max allowed size: {MAX_PATH_BYTES}")
    if write and any(segment.endswith(".") for segment in segments):
        # Azure cannot keep such names (compatibility C84).
        raise GatewayError(400, "Resource name and/or parent folders must not end with .(dot)")
    _check_inside(path, key, relative)
    return path


def _segments(relative: str) -> tuple[tuple[str, ...], bool]:
    if relative == "":
        return (), True  # the bucket's root folder
    is_folder = relative.endswith("/")
    body = relative[:-1] if is_folder else relative
    segments: list[str] = []
    for raw in body.split("/"):
        if "?" in raw or "#" in raw:
            raise GatewayError(400, f"Wrong path provided {raw}")
        segment = _decode(raw)
        if segment is None or not valid_segment(segment) or not _FORBIDDEN.isdisjoint(segment):
            raise GatewayError(400, f"Invalid path provided {relative}")
        segments.append(segment)
    return tuple(segments), is_folder


def _decode(raw: str) -> str | None:
    """`raw` percent-decoded once, strictly: None for a stray `%`, a lone surrogate or bytes
    that are not UTF-8 (overlong forms included)."""
    try:
        if "%" not in raw:
            raw.encode("utf-8")  # refuses lone surrogates
            return raw
        pieces = _ESCAPE.split(raw)
        data = bytearray()
        for index, piece in enumerate(pieces):
            if index % 2:
                data.append(int(piece, 16))
            elif "%" in piece:
                return None  # not followed by two hex digits
            else:
                data += piece.encode("utf-8")
        return data.decode("utf-8")
    except UnicodeError:
        return None


def _check_inside(path: ResourcePath, key: str, relative: str) -> None:
    """The last guard: the key lies inside the bucket's group folder, and the store takes it."""
    try:
        if path.is_folder:
            check_folder(key)
        else:
            check_key(key)
    except InvalidKey:
        raise GatewayError(400, f"Invalid path provided {relative}") from None
    if not key.startswith(f"{path.location}{path.group}/"):
        raise GatewayError(400, f"Invalid path provided {relative}")
