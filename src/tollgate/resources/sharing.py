"""Sharing: who may use whose resources, and the invitations that grant it (compatibility C88).

What is kept, per bucket location, in the resource store (two JSON objects, each written only by
a conditional write over the version read, so every change is atomic on every provider and
across any number of instances on one store):

- the owner's record, `<owner>shared_by_me/share`: for each shared resource URL the recipients
  (`Keys/<project>/` locations) with their permissions, the share limit snapshotted when the
  resource was last shared, and the owner's invitations;
- the recipient's index, `<recipient>shared_with_me/share`: the URLs it accepted, so that
  "shared with me" can be listed without reading every owner's record.

The owner's record is the truth: access (DIAL's rule 5) is read from it, so a revoke, a discard
or a deleted resource takes effect on the next call everywhere, and an index entry the owner's
record no longer backs is ignored (and dropped at the next change of the index). Accepting an
invitation is one conditional write of the owner's record: the limits are checked against the
version being replaced, so however many callers accept at once, on however many instances, no
write can admit more recipients than the limit (DIAL checks under a Redis lock per bucket; a
lost race here reads again and checks again).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from tollgate.errors import GatewayError
from tollgate.resources.buckets import encode_segment, is_private_location
from tollgate.resources.encryption import BucketCipher
from tollgate.resources.paths import ResourcePath
from tollgate.storage.store import PreconditionFailed, ResourceStore

READ, WRITE = "READ", "WRITE"
PERMISSIONS = (READ, WRITE)
OWNER_KEY = "shared_by_me/share"
INDEX_KEY = "shared_with_me/share"
INVITATIONS = "invitations"
ID_ALPHABET = string.ascii_letters + string.digits + "-_"
ID_LENGTH = 32
WRITE_RETRIES = 200
HOUR_MS = 3_600_000
UNLIMITED = 2_147_483_647  # DIAL's Integer.MAX_VALUE
# Newest DIAL's defaults per resource type (compatibility C87): recipients, TTL in hours.
DEFAULT_LIMITS = {
    "APPLICATION": (10, 72),
    "TOOL_SET": (10, 72),
    "CREDENTIALS": (10, 72),
    "SKILL": (10, 72),
    "CONVERSATION": (UNLIMITED, 72),
    "FILE": (UNLIMITED, 72),
    "PROMPT": (UNLIMITED, 72),
}

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Limit:
    """One resource type's effective share limit: recipients per resource, invitation TTL."""

    max_accepted_users: int
    ttl_ms: int


def effective_limit(
    roles: Mapping[str, Any], names: Iterable[str], resource_type: str, default_ttl_ms: int | None
) -> Limit:
    """DIAL's `ShareService.getLimit`: the first of the caller's roles with `share.<type>`,
    then per field the largest with each later one; `-1` (or absent) stands for the type's
    default, which so takes part in the largest. No role with the type: the default.
    `default_ttl_ms` (from `invitations.ttlInSeconds`) replaces the default TTL when set."""
    default = DEFAULT_LIMITS.get(resource_type)
    if default is None:
        raise GatewayError(400, f"Unsupported resource type: {resource_type}")
    default_users = default[0]
    default_ttl = default[1] * HOUR_MS if default_ttl_ms is None else default_ttl_ms
    users: int | None = None
    ttl: int | None = None
    for name in names:
        role = roles.get(name)
        share = getattr(role, "share", None) if role is not None else None
        entry = share.get(resource_type) if share else None
        if entry is None:
            continue
        role_users = default_users if entry.max_accepted_users < 0 else entry.max_accepted_users
        role_ttl = default_ttl if entry.invitation_ttl < 0 else entry.invitation_ttl * HOUR_MS
        users = role_users if users is None else max(users, role_users)
        ttl = role_ttl if ttl is None else max(ttl, role_ttl)
    return Limit(default_users if users is None else users, default_ttl if ttl is None else ttl)


# --- the records


@dataclass(slots=True)
class Shared:
    """One shared resource in its owner's record."""

    users: dict[str, list[str]] = field(default_factory=dict)  # location → permissions
    limit: int | None = None  # max accepted users, snapshotted at the last share

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"users": self.users}
        if self.limit is not None:
            body["maxAcceptedUsers"] = self.limit
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Shared:
        return cls(dict(body.get("users") or {}), body.get("maxAcceptedUsers"))


@dataclass(slots=True)
class Invitation:
    id: str
    resources: list[dict[str, Any]]  # {"url": ..., "permissions": [...]}
    created_at: int
    expire_at: int
    author: str
    max_accepted_users: int | None = None
    accepted: list[str] = field(default_factory=list)  # recipients' locations

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "resources": self.resources,
            "createdAt": self.created_at,
            "expireAt": self.expire_at,
            "author": self.author,
        }
        if self.max_accepted_users is not None:
            body["maxAcceptedUsers"] = self.max_accepted_users
        body["acceptedUserLocations"] = self.accepted
        return body

    def answer(self, for_owner: bool) -> dict[str, Any]:
        """DIAL's Invitation; who accepted it is the owner's to see (the locations name the
        recipients' projects)."""
        body = self.to_json()
        if not for_owner:
            del body["acceptedUserLocations"]
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Invitation:
        return cls(
            body["id"],
            list(body["resources"]),
            body["createdAt"],
            body["expireAt"],
            body.get("author", ""),
            body.get("maxAcceptedUsers"),
            list(body.get("acceptedUserLocations") or ()),
        )


@dataclass(slots=True)
class OwnerRecord:
    resources: dict[str, Shared] = field(default_factory=dict)
    invitations: dict[str, Invitation] = field(default_factory=dict)  # by the id's random part

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "resources": {url: shared.to_json() for url, shared in self.resources.items()},
                "invitations": {
                    name: invitation.to_json() for name, invitation in self.invitations.items()
                },
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes | None) -> OwnerRecord:
        if not data:
            return cls()
        body = orjson.loads(data)
        return cls(
            {url: Shared.from_json(item) for url, item in body.get("resources", {}).items()},
            {
                name: Invitation.from_json(item)
                for name, item in body.get("invitations", {}).items()
            },
        )

    def granted(self, urls: Iterable[str], location: str) -> set[str]:
        """The permissions `location` holds on any of `urls` (a resource and its folders)."""
        held: set[str] = set()
        for url in urls:
            shared = self.resources.get(url)
            if shared is not None:
                held.update(shared.users.get(location, ()))
        return held

    def drop_expired(self, now_ms: int) -> bool:
        expired = [name for name, inv in self.invitations.items() if inv.expire_at <= now_ms]
        for name in expired:
            del self.invitations[name]
        return bool(expired)

    def forget(self, url: str) -> set[str]:
        """Drop a resource (deleted or moved away): its grants and its place in invitations.
        Returns the recipients that held it."""
        shared = self.resources.pop(url, None)
        self.revoke_in_invitations(url, None)
        return set() if shared is None else set(shared.users)

    def revoke_in_invitations(self, url: str, permissions: set[str] | None) -> None:
        """DIAL's `cleanUpPermissions`: the permissions (None: all) leave every invitation; an
        invitation left with no resource is deleted."""
        for name in list(self.invitations):
            invitation = self.invitations[name]
            kept = []
            for entry in invitation.resources:
                if entry["url"] == url:
                    left = (
                        []
                        if permissions is None
                        else [p for p in entry["permissions"] if p not in permissions]
                    )
                    if not left:
                        continue
                    entry = {**entry, "permissions": left}
                kept.append(entry)
            if kept:
                invitation.resources = kept
            else:
                del self.invitations[name]


def merge(held: Iterable[str], added: Iterable[str]) -> list[str]:
    merged = set(held) | set(added)
    return [p for p in PERMISSIONS if p in merged]


def covering_urls(resource: ResourcePath) -> list[str]:
    """The resource's URL and those of every folder above it, up to its bucket's root: a
    grant on any of them covers it."""
    prefix = f"{resource.group}/{resource.bucket}/"
    urls = [resource.url]
    encoded = [encode_segment(segment) for segment in resource.segments]
    upto = len(encoded) - (0 if resource.is_folder else 1)
    if resource.is_folder:
        upto -= 1  # the folder's own URL is already first
    for count in range(upto, -1, -1):
        urls.append(prefix + "".join(f"{segment}/" for segment in encoded[:count]))
    return urls


class Sharing:
    """The records in the store, and the conditional writes that change them."""

    def __init__(self, store: ResourceStore, now_ms: Callable[[], int]) -> None:
        self.store = store
        self.now_ms = now_ms
        # One writer per record per instance at a time: instances race only with each other.
        self._locks: dict[str, asyncio.Lock] = {}

    # --- invitation ids

    @staticmethod
    def new_invitation(owner: str, cipher: BucketCipher) -> tuple[str, str]:
        """A new invitation's random part and its id: the owner's location and the random
        part, encrypted as DIAL does (so the id names its owner without a lookup)."""
        name = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        return name, cipher.encrypt(f"{owner}{INVITATIONS}/{name}")

    @staticmethod
    def parse_invitation(invitation_id: str, cipher: BucketCipher) -> tuple[str, str] | None:
        """The owner's location and the random part of an id, or None if it is not one."""
        if not invitation_id.isalnum():
            return None
        text = cipher.decrypt(invitation_id)
        if text is None:
            return None
        owner, slash, name = text.rpartition(f"{INVITATIONS}/")
        if not slash or len(name) != ID_LENGTH or any(ch not in ID_ALPHABET for ch in name):
            return None
        if not is_private_location(owner):
            return None
        return owner, name

    # --- reading

    async def owner_record(self, owner: str) -> OwnerRecord:
        blob = await self.store.get(owner + OWNER_KEY)
        return OwnerRecord.from_bytes(None if blob is None else blob.data)

    async def granted(self, resource: ResourcePath, recipient: str) -> set[str]:
        """DIAL's rule 5: what `recipient` was granted on `resource` or a folder above it."""
        record = await self.owner_record(resource.location)
        return record.granted(covering_urls(resource), recipient)

    async def index(self, recipient: str) -> dict[str, list[str]]:
        blob = await self.store.get(recipient + INDEX_KEY)
        if blob is None:
            return {}
        return dict(orjson.loads(blob.data).get("resources", {}))

    # --- writing

    async def update_owner(self, owner: str, change: Callable[[OwnerRecord], _T]) -> _T:
        """`change` applied to the owner's latest record and written over exactly that
        version; a lost race reads again and applies `change` again. `change` may refuse with
        a GatewayError, which writes nothing. Expired invitations are dropped on the way."""
        return await self._update(
            owner + OWNER_KEY, OwnerRecord.from_bytes, OwnerRecord.to_bytes, change, prune=True
        )

    async def update_index(
        self, recipient: str, change: Callable[[dict[str, list[str]]], None]
    ) -> None:
        def load(data: bytes | None) -> dict[str, list[str]]:
            return dict(orjson.loads(data).get("resources", {})) if data else {}

        def dump(index: dict[str, list[str]]) -> bytes:
            return orjson.dumps({"resources": index})

        await self._update(recipient + INDEX_KEY, load, dump, change, prune=False)

    async def _update(
        self,
        key: str,
        load: Callable[[bytes | None], Any],
        dump: Callable[[Any], bytes],
        change: Callable[[Any], _T],
        *,
        prune: bool,
    ) -> _T:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        try:
            async with lock:
                for attempt in range(WRITE_RETRIES):
                    blob = await self.store.get(key)
                    data = None if blob is None else blob.data
                    record = load(data)
                    before = dump(record)
                    if prune:
                        record.drop_expired(self.now_ms())
                    result = change(record)
                    after = dump(record)
                    if after == before:
                        return result  # nothing changed: nothing to write
                    try:
                        if blob is None:
                            await self.store.put(key, after, if_none_match=True)
                        else:
                            await self.store.put(key, after, if_match=blob.etag)
                        return result
                    except PreconditionFailed:
                        # Another instance wrote it meanwhile: back off a little, read again.
                        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
        finally:
            if not lock.locked():
                self._locks.pop(key, None)  # a new lock for a later writer costs nothing
        raise GatewayError(409, "The sharing record changed too often meanwhile; try again")
