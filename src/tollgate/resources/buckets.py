"""Bucket locations and `GET /v1/bucket` (compatibility C83).

A bucket location is a folder of the resource store: `Keys/<project>/` for an API-key caller,
`Users/<user>/` for a DIAL user signed in with a JWT, `public/` for the public space. Tollgate
has no JWT users, so every caller is an API key; `Users/<user>/` locations are still accepted
in bucket names (DIAL may have made them with the same encryption pair).

DIAL gives each request three buckets:

- the initiator's: the root caller's, `Keys/<project>/` (a per-request key acts as its root
  caller, compatibility C39);
- the caller's own ("user bucket"): the initiator's, except for a per-request key, where it is
  the application's, `Keys/<deployment>/`;
- app data, per-request keys only: the folder `appdata/<deployment>/` in the initiator's
  bucket, where an application keeps what it makes for that user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from tollgate.resources.encryption import BucketCipher
from tollgate.security.principal import Principal
from tollgate.storage.store import RESERVED_SEGMENT_PREFIX

if TYPE_CHECKING:
    from tollgate.resources.paths import ResourcePath

PUBLIC_BUCKET = "public"  # both the name and, with `/`, the location of the public bucket
PUBLIC_LOCATION = "public/"
KEYS_PREFIX = "Keys/"
USERS_PREFIX = "Users/"
APPDATA_FOLDER = "appdata"
# Guava's `urlPathSegmentEscaper`: what a segment of a resource URL keeps unescaped.
SEGMENT_SAFE = "-._~!$'()*,;&=@:+"


def encode_segment(segment: str) -> str:
    """One path segment as DIAL writes it in a URL (UTF-8, `%XX` upper case)."""
    return quote(segment, safe=SEGMENT_SAFE)


def encode_path(path: str) -> str:
    """DIAL's `UrlUtil.encodePath`: each `/`-separated segment encoded, the `/` kept."""
    return "/".join(encode_segment(segment) for segment in path.split("/"))


def initiator_location(principal: Principal) -> str:
    """The root caller's bucket: `Keys/<project>/`."""
    return f"{KEYS_PREFIX}{principal.project}/"


def user_location(principal: Principal) -> str:
    """The caller's own bucket: the application's `Keys/<deployment>/` for a per-request key
    (the deployment that received it, as DIAL names it: `my-app`, or `applications/<bucket>/
    <path>` for a custom application), else the initiator's."""
    if principal.source_deployment is not None:
        return f"{KEYS_PREFIX}{principal.source_deployment}/"
    return initiator_location(principal)


def appdata_path(principal: Principal) -> str | None:
    """For a per-request key, the application's folder in the initiator's bucket as a URL path
    (`appdata/<deployment, encoded per segment>`, no trailing `/`); None for a project key."""
    if principal.source_deployment is None:
        return None
    return f"{APPDATA_FOLDER}/{encode_path(principal.source_deployment)}"


def in_appdata(principal: Principal, resource: ResourcePath) -> bool:
    """DIAL's rule 4: a per-request key's resource under `appdata/<deployment>/` (a resource
    in its root caller's bucket: the caller checks the location)."""
    if principal.source_deployment is None:
        return False
    folder = (APPDATA_FOLDER, *principal.source_deployment.split("/"))
    return resource.segments[: len(folder)] == folder and (
        len(resource.segments) > len(folder) or resource.is_folder
    )


def bucket_answer(principal: Principal, cipher: BucketCipher) -> dict[str, str]:
    """The body of DIAL's `GET /v1/bucket`: `{"bucket": <own bucket's name>}`, and for a
    per-request key `"appdata": "<initiator's bucket name>/appdata/<deployment>"`."""
    answer = {"bucket": cipher.encrypt(user_location(principal))}
    appdata = appdata_path(principal)
    if appdata is not None:
        answer["appdata"] = f"{cipher.encrypt(initiator_location(principal))}/{appdata}"
    return answer


def location_of(bucket: str, cipher: BucketCipher) -> str | None:
    """The location a bucket name stands for, or None if it stands for none.

    `public` is the public bucket. Any other name must decrypt, and to a location of the form
    `Keys/<x>/` or `Users/<x>/` whose segments could be a store's key (not empty, not `.` or
    `..`, no backslash or control character): text the cipher encrypts for other purposes, or
    a location no caller could have, is not a bucket. `<x>` may have several segments, as the
    bucket of a custom application (`Keys/applications/<bucket>/<path>/`) has in DIAL.
    """
    if bucket == PUBLIC_BUCKET:
        return PUBLIC_LOCATION
    location = cipher.decrypt(bucket)
    if location is None or not is_private_location(location):
        return None
    return location


def is_private_location(location: str) -> bool:
    """Whether `location` is `Keys/<x>/` or `Users/<x>/` with `<x>` made of valid segments."""
    if location.startswith(KEYS_PREFIX):
        rest = location[len(KEYS_PREFIX) :]
    elif location.startswith(USERS_PREFIX):
        rest = location[len(USERS_PREFIX) :]
    else:
        return False
    if not rest.endswith("/"):
        return False
    return all(valid_segment(segment) for segment in rest[:-1].split("/"))


def valid_segment(segment: str) -> bool:
    """A segment the resource store accepts in a key (tollgate.storage.store.check_key's rule)
    that is also valid UTF-8 text."""
    if segment in ("", ".", "..") or segment.startswith(RESERVED_SEGMENT_PREFIX):
        return False
    if "\\" in segment or "/" in segment:
        return False
    return not any(
        ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in segment
    )
