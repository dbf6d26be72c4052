"""Sharing: who may use whose resources, and the invitations that grant it (compatibility C88).

What is kept, per bucket location, in the resource store (two JSON objects, each written only by
a conditional write over the version read, so every change is atomic on every provider and
across any number of instances on one store):

- the owner's record, `<owner>shared_by_me/share`: for each shared resource URL the recipients
  (`Keys/<project>/` locations) with their permissions, the share limit snapshotted when the
  resource was last shared, and the invitations of its resources (re-shares by recipients
  holding SHARE included, so that their accepts count against the same limits); and, for a
  re-sharer, the ids of the invitations it made in other owners' records;
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from tollgate.errors import GatewayError
from tollgate.resources.buckets import encode_segment, is_private_location
from tollgate.resources.encryption import BucketCipher
from tollgate.resources.paths import ResourcePath
from tollgate.storage.store import PreconditionFailed, ResourceStore

READ, WRITE, SHARE = "READ", "WRITE", "SHARE"
PERMISSIONS = (READ, WRITE, SHARE)
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


class Shared:
    """One shared resource in its owner's record: a view of its JSON (`users`: location →
    permissions; `maxAcceptedUsers`: the limit snapshotted at the last share)."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    @property
    def users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = self.raw.setdefault("users", {})
        return users

    @property
    def limit(self) -> int | None:
        return self.raw.get("maxAcceptedUsers")

    @limit.setter
    def limit(self, value: int | None) -> None:
        self.raw["maxAcceptedUsers"] = value


class Invitation:
    """An invitation: a view of DIAL's Invitation JSON, as it is stored."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    @classmethod
    def new(
        cls,
        invitation_id: str,
        resources: list[dict[str, Any]],
        created_at: int,
        expire_at: int,
        author: str,
        max_accepted_users: int | None,
        created_by: str | None = None,
    ) -> Invitation:
        raw: dict[str, Any] = {
            "id": invitation_id,
            "resources": resources,
            "createdAt": created_at,
            "expireAt": expire_at,
            "author": author,
        }
        if max_accepted_users is not None:
            raw["maxAcceptedUsers"] = max_accepted_users
        raw["acceptedUserLocations"] = []
        if created_by is not None:
            raw["createdBy"] = created_by  # a re-share: who made it (kept, never shown)
        return cls(raw)

    @property
    def id(self) -> str:
        return str(self.raw["id"])

    @property
    def resources(self) -> list[dict[str, Any]]:  # {"url": ..., "permissions": [...]}
        resources: list[dict[str, Any]] = self.raw["resources"]
        return resources

    @resources.setter
    def resources(self, value: list[dict[str, Any]]) -> None:
        self.raw["resources"] = value

    @property
    def created_at(self) -> int:
        return int(self.raw["createdAt"])

    @property
    def expire_at(self) -> int:
        return int(self.raw["expireAt"])

    @property
    def max_accepted_users(self) -> int | None:
        return self.raw.get("maxAcceptedUsers")

    @property
    def created_by(self) -> str | None:
        """For a re-share, the location of the recipient that made it; None: the owner's."""
        return self.raw.get("createdBy")

    def made_by(self, location: str, owner: str) -> bool:
        return (self.created_by or owner) == location

    @property
    def accepted(self) -> list[str]:  # the recipients' locations
        accepted: list[str] = self.raw.setdefault("acceptedUserLocations", [])
        return accepted

    def answer(self, for_owner: bool) -> dict[str, Any]:
        """DIAL's Invitation; who accepted it is the owner's to see (the locations name the
        recipients' projects)."""
        hidden = ("createdBy",) if for_owner else ("createdBy", "acceptedUserLocations")
        return {k: v for k, v in self.raw.items() if k not in hidden}


class OwnerRecord:
    """An owner's record, kept as the JSON it is stored as (read and written by orjson
    alone: an owner with thousands of shares costs one parse and one dump per change)."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, Any] | None = None) -> None:
        self.raw = raw if raw is not None else {"resources": {}, "invitations": {}}
        self.raw.setdefault("resources", {})
        self.raw.setdefault("invitations", {})

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.raw)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> OwnerRecord:
        return cls(orjson.loads(data) if data else None)

    # --- resources

    def shared(self, url: str) -> Shared | None:
        raw = self.raw["resources"].get(url)
        return None if raw is None else Shared(raw)

    def share(self, url: str) -> Shared:
        """The resource's entry, made if there is none."""
        return Shared(self.raw["resources"].setdefault(url, {"users": {}}))

    def pop_shared(self, url: str) -> Shared | None:
        raw = self.raw["resources"].pop(url, None)
        return None if raw is None else Shared(raw)

    def shared_items(self) -> Iterator[tuple[str, Shared]]:
        for url, raw in self.raw["resources"].items():
            yield url, Shared(raw)

    # --- invitations (by the random part of their id)

    def invitation(self, name: str) -> Invitation | None:
        raw = self.raw["invitations"].get(name)
        return None if raw is None else Invitation(raw)

    def add_invitation(self, name: str, invitation: Invitation) -> None:
        self.raw["invitations"][name] = invitation.raw

    def pop_invitation(self, name: str) -> Invitation | None:
        raw = self.raw["invitations"].pop(name, None)
        return None if raw is None else Invitation(raw)

    def invitation_count(self) -> int:
        return len(self.raw["invitations"]) + len(self.raw.get("reshared", ()))

    # --- invitations this location made in other owners' records (re-shares): id → expireAt

    def reshared(self) -> dict[str, int]:
        reshared: dict[str, int] = self.raw.setdefault("reshared", {})
        return reshared

    def invitations(self) -> list[Invitation]:
        return [Invitation(raw) for raw in self.raw["invitations"].values()]

    # --- what changes them

    def granted(self, urls: Iterable[str], location: str) -> set[str]:
        """The permissions `location` holds on any of `urls` (a resource and its folders)."""
        held: set[str] = set()
        resources = self.raw["resources"]
        for url in urls:
            raw = resources.get(url)
            if raw is not None:
                held.update(raw.get("users", {}).get(location, ()))
        return held

    def drop_expired(self, now_ms: int) -> bool:
        invitations = self.raw["invitations"]
        expired = [name for name, raw in invitations.items() if raw["expireAt"] <= now_ms]
        for name in expired:
            del invitations[name]
        reshared: dict[str, int] = self.raw.get("reshared") or {}
        gone = [invitation_id for invitation_id, at in reshared.items() if at <= now_ms]
        for invitation_id in gone:
            del reshared[invitation_id]
        return bool(expired or gone)

    def forget(self, url: str) -> set[str]:
        """Drop a resource (deleted or moved away): its grants and its place in invitations.
        Returns the recipients that held it."""
        shared = self.pop_shared(url)
        self.revoke_in_invitations(url, None)
        return set() if shared is None else set(shared.users)

    def revoke_in_invitations(self, url: str, permissions: set[str] | None) -> None:
        """DIAL's `cleanUpPermissions`: the permissions (None: all) leave every invitation; an
        invitation left with no resource is deleted."""
        invitations = self.raw["invitations"]
        for name in list(invitations):
            invitation = Invitation(invitations[name])
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
                del invitations[name]


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
        self._pending: dict[str, list[tuple[Callable[[Any], Any], asyncio.Future[Any]]]] = {}

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
        """Group commit: the changes that arrive while a write of `key` is under way wait, and
        the next writer applies them all, in order, in one conditional write (a burst of
        accepts on one invitation costs a write per batch, not per accept). A change that
        refuses (a GatewayError) must do so before it changes anything: the others of its
        batch still go in."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
            self._pending[key] = []
        pending = self._pending[key]
        pending.append((change, future))
        try:
            async with lock:
                if not future.done():
                    batch = pending[:]
                    pending.clear()
                    await self._commit(key, load, dump, batch, prune)
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            if not lock.locked() and not pending:
                self._locks.pop(key, None)  # a new lock for a later writer costs nothing
                self._pending.pop(key, None)
        return future.result()  # type: ignore[no-any-return]

    async def _commit(
        self,
        key: str,
        load: Callable[[bytes | None], Any],
        dump: Callable[[Any], bytes],
        batch: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]],
        prune: bool,
    ) -> None:
        try:
            for attempt in range(WRITE_RETRIES):
                blob = await self.store.get(key)
                data = None if blob is None else blob.data
                record = load(data)
                # What the stored bytes would be unchanged (they are `dump`'s own).
                before = data if data is not None else dump(record)
                if prune:
                    record.drop_expired(self.now_ms())
                outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
                for change, future in batch:
                    if future.done():  # its caller went away before it was applied
                        continue
                    try:
                        outcomes.append((future, True, change(record)))
                    except GatewayError as exc:
                        outcomes.append((future, False, exc))
                after = dump(record)
                if after != before:
                    try:
                        if blob is None:
                            await self.store.put(key, after, if_none_match=True)
                        else:
                            await self.store.put(key, after, if_match=blob.etag)
                    except PreconditionFailed:
                        # Another instance wrote it meanwhile: back off a little, read again,
                        # and apply the whole batch again to what it wrote.
                        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
                        continue
                for future, ok, value in outcomes:
                    if future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                return
            failure: Exception = GatewayError(
                409, "The sharing record changed too often meanwhile; try again"
            )
        except asyncio.CancelledError:
            # This writer's caller went away: the rest of its batch waits for the next writer
            # (each change may be applied twice if the write landed: they are idempotent).
            self._pending.setdefault(key, [])[:0] = [e for e in batch if not e[1].done()]
            raise
        except Exception as exc:  # the store failed, or a change did not refuse cleanly
            failure = exc
        for _, future in batch:
            if not future.done():
                future.set_exception(failure)
