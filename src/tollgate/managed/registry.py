"""The live API-managed keys and roles of one instance (compatibility C81).

The resource store is the truth: every write reads the entity's current version from the store
and replaces exactly that version (a conditional write on its ETag), so two instances never
lose each other's change. The instance that writes applies the change at once (its next call
sees it); it then publishes a change notice (Redis pub/sub with Redis configured), and every
other instance reads the entity from the store and applies it, within a second. A full rescan
every `config.reload` period is the safety net for a lost notice, as DIAL's polling is.

Keys are looked up by the SHA-256 of the secret a caller sends, in one dict that is changed in
place, on the event loop, one key at a time: a change costs the same with ten keys or a
million, and a call's lookup is one dict access (no rebuild of the config snapshot). Roles
change the limits of the snapshot: a role's change rebuilds it with the API roles laid over the
file's (`ConfigStore.set_api_roles`).

Reads never need the store: when it is unreachable, calls keep being served from the last keys
and roles read (`describe()` says so in `/health`), writes answer 503, and the rescan retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from tollgate.config.key_names import digest_of, fingerprint_of_digest
from tollgate.config.schema import Role
from tollgate.errors import GatewayError
from tollgate.managed.audit import AuditTrail
from tollgate.managed.entities import (
    KEYS_FOLDER,
    MAX_PREVIOUS,
    ROLES_FOLDER,
    KeyRecord,
    RoleRecord,
    iso,
    key_spec,
    name_of,
    new_secret,
    role_spec,
    secret_digest,
    store_key,
)
from tollgate.security.ip_ranges import IpRanges
from tollgate.security.keys import ProjectKey
from tollgate.security.principal import Principal
from tollgate.storage.notices import ChangeNotices, Subscription
from tollgate.storage.store import NotFound, PreconditionFailed, ResourceStore, StorageError

log = logging.getLogger("tollgate.keys")
Record = TypeVar("Record", KeyRecord, RoleRecord)

DEFAULT_GRACE_S = 86_400  # a rotated key's old secret keeps working for a day by default
MAX_GRACE_S = 30 * 86_400
READ_BATCH = 256  # objects read at once when loading or rescanning
# Objects listed per page when scanning: large, since a filesystem page walks the folder.
LIST_PAGE = 50_000
WRITE_RETRIES = 5  # a write that lost a race with another instance is tried again
RETRY_LOAD_S = 2.0  # how soon a failed load or rescan is tried again
SWEEP_S = 0.5  # how often expiries and grace ends are looked for


def store_unavailable() -> GatewayError:
    return GatewayError(503, "Resource store is not available, the change was not made")


def not_found(kind: str, name: str) -> GatewayError:
    return GatewayError(404, f"Resource not found: {kind}/platform/{name}")


class Conditions:
    """A write's `If-Match` / `If-None-Match` (compatibility C81): DIAL's messages."""

    __slots__ = ("if_match", "if_none_match", "raw_match")

    def __init__(self, if_match: str | None = None, if_none_match: str | None = None) -> None:
        if if_none_match is not None and if_none_match.strip() != "*":
            raise GatewayError(400, "only header if-none-match=* is supported")
        self.if_none_match = if_none_match is not None
        self.raw_match = if_match
        self.if_match = (
            None
            if if_match is None
            else frozenset(tag.strip().strip('"') for tag in if_match.split(",") if tag.strip())
        )

    def failed(self, etag: str | None = None) -> GatewayError:
        """The 412 of a condition that did not hold."""
        if self.if_none_match:
            return GatewayError(412, "Resource already exists")
        return GatewayError(412, f"ETag {self.raw_match or etag} is rejected")

    def check(self, etag: str | None) -> None:
        """`etag`: the entity's current version, None when there is none."""
        if self.if_none_match and etag is not None:
            raise self.failed()
        if self.if_match is not None and (
            etag is None or ("*" not in self.if_match and etag not in self.if_match)
        ):
            raise self.failed()


def actor_of(principal: Principal) -> dict[str, str]:
    """Who made a change, as the audit trail and the `author` field name them."""
    return {"project": principal.project, "key": principal.key_fingerprint}


def author_of(actor: Mapping[str, str]) -> str:
    return f"{actor.get('project', '')} (key {actor.get('key', '')})"


class ManagedConfig:
    """API-managed keys and roles: the live lookup, the writes, the following of changes."""

    def __init__(
        self,
        store: ResourceStore,
        notices: ChangeNotices,
        *,
        now_ms: Callable[[], int],
        rescan_every_s: float,
        file_key: Callable[[bytes], bool],
        known_roles: Callable[[], frozenset[str]],
        roles_changed: Callable[[Mapping[str, Role]], Awaitable[None]],
    ) -> None:
        """`file_key(digest)`: whether a config file has a key with that secret;
        `known_roles()`: roles a key may hold (defined, or in a `userRoles`) other than the API's;
        `roles_changed(roles)`: rebuild the snapshot with these API roles."""
        self.store = store
        self.notices = notices
        self.audit = AuditTrail(store, now_ms)
        self._now_ms = now_ms
        self._rescan_every_s = rescan_every_s
        self._file_key = file_key
        self._known_roles = known_roles
        self._roles_changed = roles_changed
        self.keys: dict[str, KeyRecord] = {}
        self.roles: dict[str, RoleRecord] = {}
        self._by_digest: dict[bytes, ProjectKey] = {}
        self._digests: dict[str, tuple[bytes, ...]] = {}
        self._seen: dict[str, tuple[int, float] | None] = {}  # store key -> (size, modified)
        self._role_sets: dict[tuple[str, ...], tuple[tuple[str, ...], frozenset[str]]] = {}
        self._events: list[tuple[int, int, str, str, int]] = []  # (at, seq, action, name, ver)
        self._seq = itertools.count()
        self._sorted: dict[str, list[str]] = {}  # sorted names per folder, until a change
        self._writing = asyncio.Lock()
        # Applies counted, and each name's last: a rescan leaves alone what changed meanwhile.
        self._applied = 0
        self._applied_seq: dict[str, int] = {}
        self.healthy = True
        self.loaded = False
        self.last_error: str | None = None
        self.synced_at: float | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._subscription: Subscription | None = None
        self._rescan_soon = asyncio.Event()
        self._closing = False

    # --- the call path

    def lookup(self, digest: bytes) -> ProjectKey | None:
        return self._by_digest.get(digest)

    def now_ms(self) -> int:
        return self._now_ms()

    def owner_of(self, digest: bytes) -> str | None:
        """The name of the API key with this secret (current or in its grace period), `""`
        for a key of the config files, None if no key has it."""
        if self._file_key(digest):
            return ""
        owner = self._by_digest.get(digest)
        return None if owner is None else owner.name

    def __len__(self) -> int:
        return len(self.keys)

    # --- start, follow, stop

    async def start(self) -> None:
        """Read every entity (a failure is logged: the file keys serve meanwhile), then follow
        the other instances' changes."""
        try:
            self._subscription = await self.notices.subscribe()
        except StorageError as exc:
            self._failed("subscribe to change notices", exc)
        await self._load()
        loop = asyncio.get_running_loop()
        if self._subscription is not None:
            self._tasks.append(loop.create_task(self._follow(self._subscription)))
        self._tasks.append(loop.create_task(self._rescan_loop()))
        self._tasks.append(loop.create_task(self._sweep_loop()))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.aclose()
        await self.audit.close()
        with contextlib.suppress(Exception):
            await self.notices.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    def describe(self) -> dict[str, Any]:
        """For `/health`: whether the store answers, and what this instance serves."""
        return {
            "healthy": self.healthy,
            "keys": len(self.keys),
            "roles": len(self.roles),
            "lastSync": None if self.synced_at is None else iso(int(self.synced_at * 1000)),
            **({} if self.last_error is None else {"error": self.last_error}),
            **({"auditWaiting": self.audit.waiting} if self.audit.waiting else {}),
        }

    def _failed(self, what: str, exc: BaseException) -> None:
        message = f"cannot {what}: {exc}"
        if self.healthy:
            log.error(
                "resource store unreachable (%s); calls are served with the keys and roles read "
                "last, changes answer 503 until it is back",
                message,
            )
        self.healthy = False
        self.last_error = message

    def _answered(self) -> None:
        if not self.healthy:
            log.warning("resource store reachable again")
        self.healthy = True
        self.last_error = None

    async def rescan(self) -> bool:
        """Read every key and role from the store again now (`POST /v1/ops/config/reload`);
        False if the store did not answer."""
        return await self._load()

    async def _load(self) -> bool:
        """A full scan: every key and role read, every change since applied, every entity gone
        from the store dropped. False if the store failed (nothing is dropped then)."""
        started = self._applied
        try:
            roles_changed = False
            for folder in (ROLES_FOLDER, KEYS_FOLDER):
                listed = await self.store.list_all(folder, limit=LIST_PAGE)
                present = {info.key for info in listed}
                stale = [
                    info.key
                    for info in listed
                    if self._seen.get(info.key) != (info.size, info.last_modified.timestamp())
                ]
                records = await self._read_many(stale)
                for key, info in ((info.key, info) for info in listed if info.key in records):
                    self._seen[key] = (info.size, info.last_modified.timestamp())
                for key, blob in records.items():
                    roles_changed |= self._apply_blob(key, blob)
                known = self.keys if folder == KEYS_FOLDER else self.roles
                gone = [
                    name
                    for name in known
                    if store_key(folder, name) not in present
                    # made here after the listing began: not gone, just not listed yet
                    and self._applied_seq.get(folder + name, 0) <= started
                ]
                for name in gone:
                    roles_changed |= self._apply(folder, name, None)
                    self._seen.pop(store_key(folder, name), None)
        except StorageError as exc:
            self._failed("read the keys and roles", exc)
            return False
        self._answered()
        self.loaded = True
        self.synced_at = time.time()
        if roles_changed:
            await self._roles_changed(self.api_roles())
        return True

    async def _read_many(self, keys: list[str]) -> dict[str, Any]:
        """The objects at `keys`, READ_BATCH at a time (`ResourceStore.get_many`: one worker
        call per batch on the filesystem; batches keep 100,000 reads from being 100,000 tasks
        at once)."""
        found: dict[str, Any] = {}
        for start in range(0, len(keys), READ_BATCH):
            batch = keys[start : start + READ_BATCH]
            for key, blob in zip(batch, await self.store.get_many(batch), strict=True):
                found[key] = blob
        return found

    async def _rescan_loop(self) -> None:
        while True:
            wait = self._rescan_every_s if self.healthy else RETRY_LOAD_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan_soon.wait(), wait)
            self._rescan_soon.clear()
            try:
                await self._load()
            except Exception:  # a bug must not end the safety net
                log.exception("rescan of the keys and roles failed")

    async def _follow(self, subscription: Subscription) -> None:
        """Apply the changes other instances announce; a failure asks for a full rescan."""
        own = self.notices.instance_id
        async for change in subscription:
            if change.sender == own:
                continue
            folder = _folder_of(change.key)
            if folder is None:
                continue
            # Under the write lock: a write of this instance's own cannot land between the read
            # and the apply (a late read of an older version would undo it).
            async with self._writing:
                try:
                    blob = await self.store.get(change.key)
                except StorageError as exc:
                    self._failed("read a changed entity", exc)
                    self._rescan_soon.set()
                    continue
                self._answered()
                if blob is None:
                    changed = self._apply(folder, name_of(change.key), None)
                else:
                    changed = self._apply_blob(change.key, blob)
                self._seen[change.key] = None
            if changed:
                await self._roles_changed(self.api_roles())

    def _apply_blob(self, key: str, blob: Any) -> bool:
        """Apply a stored object; True if it changed a role. A corrupt object is logged and
        left out (what this instance had under that name stays)."""
        folder = _folder_of(key)
        if folder is None:
            return False
        name = name_of(key)
        current = (self.keys if folder == KEYS_FOLDER else self.roles).get(name)
        if blob is None:
            return self._apply(folder, name, None)
        if current is not None and current.etag == blob.etag:
            return False
        try:
            record: KeyRecord | RoleRecord = (
                KeyRecord.from_json(name, blob.data, blob.etag)
                if folder == KEYS_FOLDER
                else RoleRecord.from_json(name, blob.data, blob.etag)
            )
        except ValueError as exc:
            log.error("skipped %s: %s", key, exc)
            return False
        if current is not None and record.updated_at < current.updated_at:
            return False  # read before a newer write of ours: every write moves it forward
        return self._apply(folder, name, record)

    def _apply(self, folder: str, name: str, record: KeyRecord | RoleRecord | None) -> bool:
        self._sorted.pop(folder, None)
        self._applied += 1
        self._applied_seq[folder + name] = self._applied
        if folder == ROLES_FOLDER:
            assert record is None or isinstance(record, RoleRecord)
            if record is None:
                return self.roles.pop(name, None) is not None
            self.roles[name] = record
            return True
        assert record is None or isinstance(record, KeyRecord)
        self._apply_key(name, record)
        return False

    def _apply_key(self, name: str, record: KeyRecord | None) -> None:
        by_digest = self._by_digest
        for digest in self._digests.pop(name, ()):
            by_digest.pop(digest, None)
        if record is None:
            self.keys.pop(name, None)
            return
        self.keys[name] = record
        roles = record.roles
        shared = self._role_sets.get(roles)
        if shared is None:
            shared = self._role_sets[roles] = (roles, frozenset(roles))
        ranges = record.spec.get("allowedIpAddressRanges")
        allowed = IpRanges(ranges) if ranges is not None else None
        expires = record.expires_at
        principal = Principal(
            project=record.project,
            roles=shared[0],
            role_set=shared[1],
            key_fingerprint=record.fingerprint,
            secured=bool(record.spec.get("secured", False)),
        )
        digests = [record.digest]
        by_digest[record.digest] = ProjectKey(principal, allowed, expires, name)
        version = record.updated_at
        if expires is not None:
            self._event(expires, "expire", name, version)
        for digest, until in record.live_previous(self._now_ms()):
            # The old secret acts as the same key (same project: the same limits), named in
            # logs by its own fingerprint, until its grace period ends.
            old = principal._replace(key_fingerprint=fingerprint_of_digest(digest))
            by_digest[digest] = ProjectKey(
                old, allowed, until if expires is None else min(until, expires), name
            )
            digests.append(digest)
            self._event(until, "grace-end", name, version)
        self._digests[name] = tuple(digests)

    def _drop_ended(self, name: str, record: KeyRecord, now_ms: int) -> None:
        """Leave the old secrets whose grace period has ended out of the lookup (they were
        refused already: their `expires_at_ms` has passed)."""
        live = {digest for digest, _ in record.live_previous(now_ms)} | {record.digest}
        kept = []
        for digest in self._digests.get(name, ()):
            if digest in live:
                kept.append(digest)
            else:
                self._by_digest.pop(digest, None)
        self._digests[name] = tuple(kept)

    def _event(self, at_ms: int, action: str, name: str, version: int) -> None:
        heapq.heappush(self._events, (at_ms, next(self._seq), action, name, version))

    async def _sweep_loop(self) -> None:
        """Record expiries and grace ends as they happen (once across instances), and drop
        old secrets whose grace has ended from the lookup."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self._now_ms()
            events = self._events
            while events and events[0][0] <= now:
                at, _, action, name, version = heapq.heappop(events)
                record = self.keys.get(name)
                if record is None or record.updated_at != version:
                    continue  # changed since: its own events were queued
                if action == "grace-end":
                    self._drop_ended(name, record, now)
                    changes = {"previousKeyExpiresAt": iso(at)}
                else:
                    changes = {"expiresAt": iso(at)}
                entry = self.audit.entry(action, "key", name, None, changes, at_ms=at)
                try:
                    await self.audit.record(entry, once=f"{action}:{name}:{version}:{at}")
                except Exception:
                    log.exception("audit of a key's %s failed", action)

    # --- reads for the API

    def sorted_names(self, folder: str) -> list[str]:
        names = self._sorted.get(folder)
        if names is None:
            names = self._sorted[folder] = sorted(
                self.keys if folder == KEYS_FOLDER else self.roles
            )
        return names

    def api_roles(self) -> dict[str, Role]:
        return {name: record.role for name, record in self.roles.items()}

    def role_names(self) -> frozenset[str]:
        return self._known_roles() | frozenset(self.roles)

    # --- writes

    async def _read(self, folder: str, name: str) -> Any:
        try:
            blob = await self.store.get(store_key(folder, name))
        except StorageError as exc:
            self._failed("read an entity", exc)
            raise store_unavailable() from None
        self._answered()
        return blob

    async def _write(self, key: str, data: bytes, etag: str | None) -> str:
        try:
            new_etag = await self.store.put(key, data, if_match=etag, if_none_match=etag is None)
        except PreconditionFailed:
            raise
        except StorageError as exc:
            self._failed("write an entity", exc)
            raise store_unavailable() from None
        self._answered()
        return new_etag

    async def _publish(self, key: str, action: str, etag: str | None) -> None:
        self._seen[key] = None  # the next rescan reads it once more (its listing facts)
        try:
            await self.notices.publish(self.notices.change(key, action, etag))  # type: ignore[arg-type]
        except StorageError as exc:  # the others find it at their next rescan
            log.warning("change notice for %s not sent: %s", key, exc)

    async def _compare_and_set(
        self,
        folder: str,
        name: str,
        conditions: Conditions,
        build: Callable[[Any], Record],
    ) -> tuple[Record, Any]:
        """Read the entity, check the client's conditions, `build(blob)` the new record (it may
        refuse with a GatewayError), and write it only over the version read; a write that
        lost a race with another instance reads again. Applied here before it returns. Returns
        the record written and the blob it replaced (None: a new entity)."""
        key = store_key(folder, name)
        async with self._writing:
            for _ in range(WRITE_RETRIES):
                blob = await self._read(folder, name)
                etag = None if blob is None else blob.etag
                conditions.check(etag)
                record = build(blob)
                try:
                    new_etag = await self._write(key, record.to_json(), etag)
                except PreconditionFailed:
                    if conditions.if_match is not None or conditions.if_none_match:
                        raise conditions.failed() from None
                    continue  # another instance wrote it meanwhile: read it again
                record = dataclasses.replace(record, etag=new_etag)
                self._apply(folder, name, record)
                break
            else:
                raise GatewayError(409, "The entity changed too often meanwhile; try again")
        await self._publish(key, "CREATE" if blob is None else "UPDATE", new_etag)
        return record, blob

    async def put_key(
        self, name: str, body: Mapping[str, Any], conditions: Conditions, actor: Mapping[str, str]
    ) -> tuple[KeyRecord, str | None]:
        """Create or replace a key (PUT is a full replace; an absent `key` keeps the secret, or
        makes one for a new key). Returns the record and the secret made, if one was."""
        spec, key_value = key_spec(body)
        known = self.role_names()
        for role in (*spec["roles"], *([spec["role"]] if "role" in spec else [])):
            if role not in known:
                raise GatewayError(
                    400, f'Role "{role}" is not defined in roles and no userRoles lists it'
                )
        wanted = None if key_value is None else secret_digest(key_value)
        made: list[str] = []

        def build(blob: Any) -> KeyRecord:
            current = None if blob is None else KeyRecord.from_json(name, blob.data, blob.etag)
            now = self._now_ms()
            expires = spec.get("expiresAt")
            if (
                expires is not None
                and expires <= now
                and (current is None or current.expires_at != expires)
            ):
                raise GatewayError(
                    400, f"expiresAt: {iso(expires)} is not later than the current time"
                )
            made.clear()
            if wanted is not None:
                digest = wanted
            elif current is not None:
                digest = current.digest
            else:
                made.append(new_secret())
                digest = digest_of(made[0])
            self._check_unique(digest, name)
            kept = current is not None and digest == current.digest
            return KeyRecord(
                name=name,
                spec=spec,
                digest=digest,
                # A new secret given in a PUT replaces the old at once (as DIAL); a rotation
                # keeps it for a grace period.
                previous=current.previous if kept and current else (),
                created_at=current.created_at if current else now,
                updated_at=max(now, current.updated_at + 1) if current else now,
                key_generated_at=current.key_generated_at if kept and current else now,
                author=author_of(actor),
            )

        record, blob = await self._compare_and_set(KEYS_FOLDER, name, conditions, build)
        current = None if blob is None else KeyRecord.from_json(name, blob.data, blob.etag)
        await self.audit.record(
            self.audit.entry(
                "create" if current is None else "update",
                "key",
                name,
                actor,
                _key_changes(current, record),
            )
        )
        return record, made[0] if made else None

    def _check_unique(self, digest: bytes, name: str) -> None:
        owner = self.owner_of(digest)
        if owner is not None and owner != name:
            raise GatewayError(400, "Key secret is already used by a different key entity")

    async def rotate_key(
        self,
        name: str,
        grace_s: int,
        key_value: Any,
        conditions: Conditions,
        actor: Mapping[str, str],
    ) -> tuple[KeyRecord, str | None]:
        """A new secret for the key; the old one keeps working for `grace_s` seconds."""
        if not 0 <= grace_s <= MAX_GRACE_S:
            raise GatewayError(
                400, f"gracePeriodSeconds: expected 0 to {MAX_GRACE_S} seconds, got {grace_s}"
            )
        wanted = None if key_value is None else secret_digest(key_value)
        made: list[str] = []

        def build(blob: Any) -> KeyRecord:
            if blob is None:
                raise not_found("keys", name)
            current = KeyRecord.from_json(name, blob.data, blob.etag)
            now = self._now_ms()
            made.clear()
            if wanted is not None:
                digest = wanted
            else:
                made.append(new_secret())
                digest = digest_of(made[0])
            if digest == current.digest:
                raise GatewayError(400, "key: the new secret must differ from the current one")
            self._check_unique(digest, name)
            # No grace (a leaked key): every old secret ends now, an earlier rotation's too.
            previous: tuple[tuple[bytes, int], ...] = ()
            if grace_s > 0:
                previous = ((current.digest, now + grace_s * 1000), *current.live_previous(now))
            return KeyRecord(
                name=name,
                spec=current.spec,
                digest=digest,
                previous=previous[:MAX_PREVIOUS],
                created_at=current.created_at,
                updated_at=max(now, current.updated_at + 1),
                key_generated_at=now,
                author=author_of(actor),
            )

        if conditions.if_none_match:
            raise GatewayError(400, "If-None-Match does not apply to a rotation")
        record, blob = await self._compare_and_set(KEYS_FOLDER, name, conditions, build)
        before = KeyRecord.from_json(name, blob.data, blob.etag)
        changes: dict[str, Any] = {
            "key": {"from": before.fingerprint, "to": record.fingerprint},
            "gracePeriodSeconds": grace_s,
        }
        await self.audit.record(self.audit.entry("rotate", "key", name, actor, changes))
        return record, made[0] if made else None

    async def delete(
        self, folder: str, name: str, conditions: Conditions, actor: Mapping[str, str]
    ) -> None:
        kind = "keys" if folder == KEYS_FOLDER else "roles"
        key = store_key(folder, name)
        async with self._writing:
            blob = await self._read(folder, name)
            if blob is None:
                raise not_found(kind, name)
            conditions.check(blob.etag)
            try:
                await self.store.delete(key, if_match=blob.etag)
            except PreconditionFailed:
                raise conditions.failed(blob.etag) from None
            except NotFound:
                raise not_found(kind, name) from None
            except StorageError as exc:
                self._failed("delete an entity", exc)
                raise store_unavailable() from None
            self._answered()
            roles_changed = self._apply(folder, name, None)
            self._seen.pop(key, None)
        await self._publish(key, "DELETE", None)
        if roles_changed:
            await self._roles_changed(self.api_roles())
        await self.audit.record(self.audit.entry("delete", kind[:-1], name, actor, {}))

    async def put_role(
        self, name: str, body: Mapping[str, Any], conditions: Conditions, actor: Mapping[str, str]
    ) -> RoleRecord:
        spec, role = role_spec(body)

        def build(blob: Any) -> RoleRecord:
            current = None if blob is None else RoleRecord.from_json(name, blob.data, blob.etag)
            now = self._now_ms()
            return RoleRecord(
                name=name,
                spec=spec,
                role=role,
                created_at=current.created_at if current else now,
                updated_at=max(now, current.updated_at + 1) if current else now,
                author=author_of(actor),
            )

        record, blob = await self._compare_and_set(ROLES_FOLDER, name, conditions, build)
        await self._roles_changed(self.api_roles())
        before = {} if blob is None else dict(RoleRecord.from_json(name, blob.data, None).spec)
        changes = {
            field: {"from": before.get(field), "to": spec.get(field)}
            for field in sorted(set(before) | set(spec))
            if before.get(field) != spec.get(field)
        }
        await self.audit.record(
            self.audit.entry("create" if blob is None else "update", "role", name, actor, changes)
        )
        return record


def _folder_of(key: str) -> str | None:
    for folder in (KEYS_FOLDER, ROLES_FOLDER):
        if key.startswith(folder) and "/" not in key[len(folder) :]:
            return folder
    return None


def _key_changes(old: KeyRecord | None, new: KeyRecord) -> dict[str, Any]:
    """What a key's write changed, field by field: old and new values, a secret by its
    fingerprint only."""
    changes: dict[str, Any] = {}
    before = {} if old is None else dict(old.spec)
    after = dict(new.spec)
    for field in sorted(set(before) | set(after)):
        if before.get(field) != after.get(field):
            value_from, value_to = before.get(field), after.get(field)
            if field == "expiresAt":
                value_from = None if value_from is None else iso(value_from)
                value_to = None if value_to is None else iso(value_to)
            changes[field] = {"from": value_from, "to": value_to}
    if old is None or old.digest != new.digest:
        changes["key"] = {"from": None if old is None else old.fingerprint, "to": new.fingerprint}
    return changes


def instance_id() -> str:
    return uuid.uuid4().hex[:12]
