"""DIAL's resource operations: move and copy, the Share API and invitations (compatibility C88).

- `POST /v1/ops/resource/move|copy`: one item to another URL of the same type, streamed from
  store to store; `overwrite` or 400; a move within the bucket takes the shares along, a move
  to another bucket drops them.
- `POST /v1/ops/resource/share/create|list|revoke|discard|copy` and `GET|DELETE
  /v1/invitations[/{id}]` (`?accept=true` accepts), with DIAL's shapes, statuses and messages
  and newest DIAL's `roles.<r>.share` limits. Per-request keys get DIAL's 403 on all of them.

The records and the atomic accept are `tollgate.resources.sharing`'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.http.resources_common import JSON, node, store_unavailable
from tollgate.http.resources_json import resource_body
from tollgate.pipeline.forward import read_body
from tollgate.resources.buckets import KEYS_PREFIX, PUBLIC_LOCATION, initiator_location
from tollgate.resources.encryption import BucketCipher
from tollgate.resources.events import ResourceEvents
from tollgate.resources.paths import RESOURCE_TYPES, ResourcePath, parse_url
from tollgate.resources.sharing import (
    DEFAULT_LIMITS,
    PERMISSIONS,
    READ,
    SHARE,
    WRITE,
    Invitation,
    OwnerRecord,
    Shared,
    Sharing,
    covering_urls,
    effective_limit,
    merge,
)
from tollgate.security.principal import Principal
from tollgate.storage.store import NotFound, PreconditionFailed, StorageError

if TYPE_CHECKING:
    from tollgate.http.resources_api import ResourcesApi

log = logging.getLogger("tollgate.resources")

OPERATION = re.compile(r"/+v1/ops/resource/(move|copy|subscribe)")
SHARE_API = re.compile(r"/+v1/ops/resource/share/(create|list|revoke|discard|copy)")
INVITATIONS = re.compile(r"/+v1/invitations(?:/([^/]*))?")
PER_REQUEST_REFUSED = "The Share API is not allowed for per-request keys"
SHARE_ONLY = (
    "You're not allowed to share a resource with the permission SHARE only. "
    "This permission is allowed along with READ and/or WRITE"
)
LIMIT_EXCEEDED = "Limit is exceeded on the number of accepted users for the resource: "
COPY_CHUNK = 262144
DISCONNECT_CHECK_S = 1.0  # how often an idle subscription looks whether its client left
# Resources named by one share, revoke or discard request (DIAL Chat's folder share names the
# folder and each attachment of its conversations).
MAX_RESOURCES_PER_REQUEST = 5000
# Open invitations per owner: every change of the owner's record reads and writes all of them.
MAX_INVITATIONS = 10000
TYPE_OF_NAME = {name: group for group, name in RESOURCE_TYPES.items()}


def _not_found(invitation_id: str, *, spaced: bool = True) -> GatewayError:
    # DIAL's DELETE says `ID<id>`, its GET `ID <id>`.
    return GatewayError(404, f"No invitation found for ID{' ' if spaced else ''}{invitation_id}")


def display_name(location: str) -> str:
    """How a bucket location is shown to people: a key's project, else the location."""
    if location.startswith(KEYS_PREFIX):
        return location[len(KEYS_PREFIX) : -1]
    return location


class ResourceOps:
    def __init__(
        self,
        resources: ResourcesApi,
        sharing: Sharing,
        roles_of: Callable[[], Mapping[str, Any]],
        *,
        default_ttl_ms: int | None,
        body_timeout_s: float,
        events: ResourceEvents | None = None,
        heartbeat_s: float = 60.0,
    ) -> None:
        self.resources = resources
        self.sharing = sharing
        self.store = resources.store
        self._roles_of = roles_of
        self._default_ttl_ms = default_ttl_ms
        self._body_timeout_s = body_timeout_s
        self.events = events
        self._heartbeat_s = heartbeat_s

    @staticmethod
    def handles(path: str) -> bool:
        return any(
            pattern.fullmatch(path) is not None for pattern in (OPERATION, SHARE_API, INVITATIONS)
        )

    async def handle(
        self, request: web.Request, principal: Principal, path: str
    ) -> web.StreamResponse:
        method = request.method
        try:
            match = OPERATION.fullmatch(path)
            if match is not None:
                _only(method, "POST")
                if match[1] == "subscribe":
                    return await self._subscribe(request, principal)
                return await self._move_or_copy(request, principal, match[1] == "move")
            if principal.source_deployment is not None:
                raise GatewayError(403, PER_REQUEST_REFUSED)
            match = SHARE_API.fullmatch(path)
            if match is not None:
                _only(method, "POST")
                action = getattr(self, f"_share_{match[1]}")
                return await action(request, principal)  # type: ignore[no-any-return]
            match = INVITATIONS.fullmatch(path)
            assert match is not None
            if match[1] is None or match[1] == "":
                _only(method, "GET")
                return await self._invitations(principal)
            if method == "GET":
                accept = request.query.get("accept", "false").lower() == "true"
                if accept:
                    return await self._accept(principal, match[1])
                return await self._invitation(principal, match[1])
            if method == "DELETE":
                return await self._delete_invitation(principal, match[1])
            raise GatewayError(405, "Method is not allowed", headers={"Allow": "GET, DELETE"})
        except StorageError as exc:
            log.warning("%s %s: %s", method, path, exc)
            raise store_unavailable() from None

    # --- bodies and URLs

    async def _body(self, request: web.Request, message: str) -> dict[str, Any]:
        data = await read_body(request, self._body_timeout_s)
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise GatewayError(400, message) from None
        if not isinstance(body, dict):
            raise GatewayError(400, message)
        return body

    @staticmethod
    def _entries(body: Mapping[str, Any], message: str) -> list[Mapping[str, Any]]:
        """`resources`: a list of objects with a string `url` (else `message`); not empty."""
        entries = body.get("resources")
        if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("url"), str) for entry in entries
        ):
            raise GatewayError(400, message)
        if not entries:
            raise GatewayError(400, "No resources provided")
        if len(entries) > MAX_RESOURCES_PER_REQUEST:
            raise GatewayError(
                400, f"Too many resources: at most {MAX_RESOURCES_PER_REQUEST} in one request"
            )
        return entries

    async def _cipher(self) -> BucketCipher:
        return await self.resources.cipher()

    async def _shared_url(self, url: str) -> ResourcePath:
        """A URL a share names: a private resource, a leading `metadata/` allowed."""
        raw = url.removeprefix("metadata/")
        try:
            resource = parse_url(raw, await self._cipher())
        except GatewayError:
            raise GatewayError(400, f"Incorrect resource link provided {url}") from None
        if resource.location == PUBLIC_LOCATION:
            raise GatewayError(400, f"Incorrect resource link provided {url}")
        return resource

    @staticmethod
    def _permissions(value: Any, message: str, *, default: list[str] | None) -> list[str] | None:
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise GatewayError(400, message)
        wanted = {p.upper() for p in value}
        if not wanted:
            return default
        if not wanted <= set(PERMISSIONS):
            raise GatewayError(400, message)
        return [p for p in PERMISSIONS if p in wanted]

    # --- share/create

    async def _share_create(self, request: web.Request, principal: Principal) -> web.Response:
        message = "Can't initiate share request. Incorrect body"
        body = await self._body(request, message)
        entries = self._entries(body, message)
        kind = body.get("invitationType", "link")
        if not isinstance(kind, str) or kind.lower() not in ("link", "email"):
            raise GatewayError(400, message)
        cap = body.get("maxAcceptedUsers")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise GatewayError(400, "maxAcceptedUsers must be a positive integer")
        me = initiator_location(principal)
        shared: list[tuple[ResourcePath, list[str]]] = []
        seen: set[str] = set()
        for entry in entries:
            resource = await self._shared_url(entry["url"])
            if resource.url in seen:
                raise GatewayError(400, f"Duplicated resource: {resource.url}")
            seen.add(resource.url)
            permissions = self._permissions(entry.get("permissions"), message, default=[READ])
            assert permissions is not None
            if permissions == [SHARE]:
                raise GatewayError(400, SHARE_ONLY)
            shared.append((resource, permissions))
        owner = shared[0][0].location
        if any(resource.location != owner for resource, _ in shared):
            raise GatewayError(
                400,
                "You're not allowed to share resources of different owners in a single request",
            )
        reshare = owner != me
        if reshare:  # checked here for the message, and again in the write (a revoke may race)
            self._check_reshare(await self.sharing.owner_record(owner), shared, me)
        roles = self._roles_of()
        limits = {
            resource.resource_type: effective_limit(
                roles, principal.roles, resource.resource_type, self._default_ttl_ms
            )
            for resource, _ in shared
        }
        ttl_ms = min(limit.ttl_ms for limit in limits.values())
        now = self.sharing.now_ms()
        name, invitation_id = self.sharing.new_invitation(owner, await self._cipher())
        listed: list[dict[str, Any]] = []
        for resource, permissions in shared:
            item: dict[str, Any] = {"url": resource.url, "permissions": permissions}
            if reshare:  # the original author is kept (newest DIAL)
                item["author"], item["sharedBy"] = display_name(owner), principal.project
            listed.append(item)
        invitation = Invitation.new(
            invitation_id,
            listed,
            now,
            now + ttl_ms,
            principal.project,
            cap,
            created_by=me if reshare else None,
        )

        def create(record: OwnerRecord) -> None:
            if not reshare:
                _check_room(record)
            else:
                self._check_reshare(record, shared, me)
            record.add_invitation(name, invitation)
            if reshare:
                return  # the owner's limits stay as the owner last shared
            for resource, _ in shared:
                entry = record.share(resource.url)
                # The limit as the owner's roles have it now; the latest share wins.
                entry.limit = limits[resource.resource_type].max_accepted_users

        if reshare:
            # The re-sharer's own record lists it (GET /v1/invitations), within its bound.
            def note(record: OwnerRecord) -> None:
                _check_room(record)
                record.reshared()[invitation_id] = invitation.expire_at

            await self.sharing.update_owner(me, note)
        await self.sharing.update_owner(owner, create)
        return _json({"invitationLink": f"/v1/invitations/{invitation_id}"})

    @staticmethod
    def _check_reshare(
        record: OwnerRecord, shared: list[tuple[ResourcePath, list[str]]], me: str
    ) -> None:
        """Newest DIAL's re-sharing: what a recipient holds SHARE on (itself or a folder above
        it) it may share on, READ (and SHARE) only."""
        for resource, permissions in shared:
            if SHARE not in record.granted(covering_urls(resource), me):
                raise GatewayError(
                    400, f"Resource {resource.url} is not allowed to be shared by the user"
                )
            if WRITE in permissions:
                raise GatewayError(
                    400,
                    f"Re-shared resource {resource.url} is not allowed to be shared "
                    "with the permission WRITE",
                )

    # --- invitations

    async def _invitations(self, principal: Principal) -> web.Response:
        """The caller's invitations: those of its own resources it made, and its re-shares
        (kept in their owners' records)."""
        me = initiator_location(principal)
        record = await self.sharing.owner_record(me)
        now = self.sharing.now_ms()
        found = [inv for inv in record.invitations() if inv.made_by(me, me)]
        cipher = await self._cipher()
        owners: dict[str, OwnerRecord] = {}
        for invitation_id in record.reshared():
            parsed = self.sharing.parse_invitation(invitation_id, cipher)
            if parsed is None:
                continue
            owner, name = parsed
            if owner not in owners:
                owners[owner] = await self.sharing.owner_record(owner)
            invitation = owners[owner].invitation(name)
            if invitation is not None and invitation.made_by(me, owner):
                found.append(invitation)
        listed = sorted(
            (inv for inv in found if inv.expire_at > now), key=lambda inv: (inv.created_at, inv.id)
        )
        return _json({"invitations": [inv.answer(for_owner=True) for inv in listed]})

    async def _find(self, invitation_id: str, *, spaced: bool = True) -> tuple[str, str]:
        parsed = self.sharing.parse_invitation(invitation_id, await self._cipher())
        if parsed is None:
            raise _not_found(invitation_id, spaced=spaced)
        return parsed

    async def _invitation(self, principal: Principal, invitation_id: str) -> web.Response:
        """Any caller may read an invitation whose id it has (DIAL does so)."""
        owner, name = await self._find(invitation_id)
        record = await self.sharing.owner_record(owner)
        invitation = record.invitation(name)
        if invitation is None or invitation.expire_at <= self.sharing.now_ms():
            raise _not_found(invitation_id)
        mine = invitation.made_by(initiator_location(principal), owner)
        return _json(invitation.answer(for_owner=mine))

    async def _delete_invitation(self, principal: Principal, invitation_id: str) -> web.Response:
        owner, name = await self._find(invitation_id, spaced=False)
        me = initiator_location(principal)
        if owner != me:  # a re-share's maker may delete it too
            made = (await self.sharing.owner_record(owner)).invitation(name)
            if made is None or not made.made_by(me, owner):
                raise GatewayError(403, "You are not invitation owner")
        now = self.sharing.now_ms()

        def delete(record: OwnerRecord) -> Invitation:
            invitation = record.invitation(name)
            if invitation is None or invitation.expire_at <= now:
                raise _not_found(invitation_id, spaced=False)
            if not (invitation.made_by(me, owner) or owner == me):
                raise GatewayError(403, "You are not invitation owner")
            record.pop_invitation(name)
            return invitation

        # Access already granted stays (DIAL): only the invitation goes.
        deleted = await self.sharing.update_owner(owner, delete)
        maker = deleted.created_by
        if maker is not None:
            await self.sharing.update_owner(
                maker, lambda record: record.reshared().pop(invitation_id, None)
            )
        return web.Response(status=200)

    async def _accept(self, principal: Principal, invitation_id: str) -> web.Response:
        """The owner's record checked and changed in one conditional write: the invitation's
        own cap and every resource's limit hold whoever accepts at the same time."""
        owner, name = await self._find(invitation_id)
        me = initiator_location(principal)
        now = self.sharing.now_ms()
        cipher = await self._cipher()

        def accept(record: OwnerRecord) -> list[dict[str, Any]]:
            invitation = record.invitation(name)
            if invitation is None or invitation.expire_at <= now:
                raise _not_found(invitation_id)
            maker = invitation.created_by
            if maker is not None and not all(
                SHARE in record.granted(covering_urls(parse_url(e["url"], cipher)), maker)
                for e in invitation.resources
            ):
                raise _not_found(invitation_id)  # its maker may no longer share it
            if owner == me:
                url = invitation.resources[0]["url"]
                raise GatewayError(400, f"Resource {url} already belong to you")
            cap = invitation.max_accepted_users
            if (
                cap is not None
                and me not in invitation.accepted
                and len(invitation.accepted) >= cap
            ):
                raise GatewayError(400, "The limit of maximum accepted invites is reached")
            for entry in invitation.resources:
                url = entry["url"]
                shared = record.shared(url)
                if shared is None:
                    shared = Shared({})
                if me in shared.users:
                    continue  # accepted before: already counted
                limit = shared.limit if shared.limit is not None else _default_users(url)
                if len(shared.users) >= limit:
                    raise GatewayError(400, f"{LIMIT_EXCEEDED}{url}")
            for entry in invitation.resources:
                shared = record.share(entry["url"])
                shared.users[me] = merge(shared.users.get(me, ()), entry["permissions"])
            if me not in invitation.accepted:
                invitation.accepted.append(me)
            return invitation.resources

        accepted = await self.sharing.update_owner(owner, accept)

        def index(entries: dict[str, list[str]]) -> None:
            for entry in accepted:
                entries[entry["url"]] = merge(entries.get(entry["url"], ()), entry["permissions"])

        await self.sharing.update_index(me, index)
        return web.Response(status=200)

    # --- share/list

    async def _share_list(self, request: web.Request, principal: Principal) -> web.Response:
        message = "Can't list shared resources. Incorrect body"
        body = await self._body(request, message)
        types = body.get("resourceTypes")
        if (
            not isinstance(types, list)
            or not types
            or not all(isinstance(t, str) and t in TYPE_OF_NAME for t in types)
        ):
            raise GatewayError(400, message)
        wanted = set(types)
        user_info = body.get("includeUserInfo") is True
        me = initiator_location(principal)
        cipher = await self._cipher()
        listed: list[dict[str, Any]] = []
        if body.get("with") == "others":
            record = await self.sharing.owner_record(me)
            for url, shared in record.shared_items():
                node = _node(url, cipher, wanted)
                if node is None or not shared.users:
                    continue
                held: set[str] = set().union(*shared.users.values())
                node["permissions"] = [p for p in PERMISSIONS if p in held]
                if user_info:
                    node["sharedWith"] = [
                        {"user": display_name(user), "permissions": permissions}
                        for user, permissions in sorted(shared.users.items())
                    ]
                listed.append(node)
        else:
            index = await self.sharing.index(me)
            records: dict[str, OwnerRecord] = {}
            for url in index:
                node = _node(url, cipher, wanted)
                if node is None:
                    continue
                owner = parse_url(url, cipher).location
                if owner not in records:
                    records[owner] = await self.sharing.owner_record(owner)
                held = records[owner].granted([url], me)  # the owner's record is the truth
                if not held:
                    continue
                node["permissions"] = [p for p in PERMISSIONS if p in held]
                if user_info:
                    node["author"] = node["sharedBy"] = display_name(owner)
                listed.append(node)
        listed.sort(key=lambda node: str(node["url"]))
        return _json({"resources": listed})

    # --- share/revoke, share/discard, share/copy

    async def _share_revoke(self, request: web.Request, principal: Principal) -> web.Response:
        message = "Can't REVOKE shared resources. Incorrect body"
        body = await self._body(request, message)
        entries = self._entries(body, message)
        me = initiator_location(principal)
        revoked: dict[str, set[str] | None] = {}
        for entry in entries:
            resource = await self._shared_url(entry["url"])
            if resource.location != me:
                raise GatewayError(400, "You are only allowed to revoke access from own resources")
            permissions = self._permissions(entry.get("permissions"), message, default=None)
            taken = None if permissions is None else set(permissions)
            before = revoked.get(resource.url, set())
            revoked[resource.url] = None if taken is None or before is None else before | taken

        def revoke(record: OwnerRecord) -> dict[str, dict[str, list[str]]]:
            left_to: dict[str, dict[str, list[str]]] = {}  # recipient → url → what is left
            for url, taken in revoked.items():
                shared = record.shared(url)
                if shared is not None:
                    for user in list(shared.users):
                        left = [
                            p for p in shared.users[user] if taken is not None and p not in taken
                        ]
                        if left:
                            shared.users[user] = left
                        else:
                            del shared.users[user]
                        left_to.setdefault(user, {})[url] = left
                record.revoke_in_invitations(url, taken)
            return left_to

        changes = await self.sharing.update_owner(me, revoke)
        for user, urls in changes.items():
            await self._reindex(user, urls)
        return web.Response(status=200)

    async def _reindex(self, user: str, urls: Mapping[str, list[str]]) -> None:
        """A recipient's index brought in line with what the owner's record now grants (an
        empty list: the entry goes)."""

        def apply(entries: dict[str, list[str]]) -> None:
            for url, left in urls.items():
                if left:
                    entries[url] = left
                else:
                    entries.pop(url, None)

        try:
            await self.sharing.update_index(user, apply)
        except (GatewayError, StorageError) as exc:  # the owner's record already rules
            log.warning("shared_with_me of %s not updated: %s", display_name(user), exc)

    async def _share_discard(self, request: web.Request, principal: Principal) -> web.Response:
        message = "Can't DISCARD shared resources. Incorrect body"
        body = await self._body(request, message)
        entries = self._entries(body, message)
        me = initiator_location(principal)
        by_owner: dict[str, set[str]] = {}
        for entry in entries:
            resource = await self._shared_url(entry["url"])
            if resource.location != me:
                by_owner.setdefault(resource.location, set()).add(resource.url)
        for owner, urls in by_owner.items():

            def discard(record: OwnerRecord, urls: set[str] = urls) -> None:
                for url in urls:
                    shared = record.shared(url)
                    if shared is not None:
                        shared.users.pop(me, None)

            await self.sharing.update_owner(owner, discard)
        await self._reindex(me, {url: [] for urls in by_owner.values() for url in urls})
        return web.Response(status=200)

    async def _share_copy(self, request: web.Request, principal: Principal) -> web.Response:
        body = await self._body(
            request, "Can't initiate copy shared access request. Incorrect body provided"
        )
        source_url, destination_url = body.get("sourceUrl"), body.get("destinationUrl")
        if not isinstance(source_url, str) or not source_url:
            raise GatewayError(400, "sourceUrl must be provided")
        if not isinstance(destination_url, str) or not destination_url:
            raise GatewayError(400, "destinationUrl must be provided")
        me = initiator_location(principal)
        source = await self._shared_url(source_url)
        destination = await self._shared_url(destination_url)
        if source.location != me:
            raise GatewayError(400, "sourceUrl does not belong to the user")
        if destination.location != me:
            raise GatewayError(400, "destinationUrl does not belong to the user")
        if source.url == destination.url:
            raise GatewayError(400, "source and destination cannot be the same")
        if not await self._exists(source):
            raise GatewayError(400, f"source resource {source.url} does not exists")
        if not await self._exists(destination):
            raise GatewayError(400, f"destination resource {destination.url} dos not exists")

        def copy(record: OwnerRecord) -> dict[str, list[str]]:
            shared = record.shared(source.url)
            if shared is None or not shared.users:
                return {}
            target = record.share(destination.url)
            for user, permissions in shared.users.items():
                target.users[user] = merge(target.users.get(user, ()), permissions)
            return dict(target.users)

        granted = await self.sharing.update_owner(me, copy)
        for user, permissions in granted.items():
            await self._reindex(user, {destination.url: permissions})
        return web.Response(status=200)

    async def _exists(self, resource: ResourcePath) -> bool:
        if resource.is_folder:
            page = await self.store.list(resource.storage_key, recursive=True, limit=1)
            return bool(page.objects)
        return await self.store.head(resource.storage_key) is not None

    # --- subscriptions (C94)

    async def _subscribe(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """DIAL's `POST /v1/ops/resource/subscribe`: an event stream of the changes of the
        listed items, each sent only while the caller may still read it; a heartbeat comment
        every `resources.heartbeatPeriod`."""
        message = "resources list must be provided"
        body = await self._body(request, message)
        entries = body.get("resources")
        if not isinstance(entries, list) or not entries:
            raise GatewayError(400, message)
        if not all(isinstance(e, dict) and isinstance(e.get("url"), str) for e in entries):
            raise GatewayError(400, message)
        if len(entries) > MAX_RESOURCES_PER_REQUEST:
            raise GatewayError(
                400, f"Too many resources: at most {MAX_RESOURCES_PER_REQUEST} in one request"
            )
        cipher = await self._cipher()
        watched: dict[str, ResourcePath] = {}
        for entry in entries:
            resource = parse_url(entry["url"], cipher)
            if resource.is_folder:
                raise GatewayError(400, f"resource folder is not supported: {entry['url']}")
            if READ not in await self.resources.permissions(principal, resource):
                raise GatewayError(403, f"Resource is not allowed: {entry['url']}")
            watched[resource.storage_key] = resource
        if self.events is None:
            raise GatewayError(503, "Resource events are not available")
        listener = await self.events.listen(watched)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        try:
            await response.prepare(request)
            idle_s = 0.0
            while True:
                # Woken at least every second to see whether the client is gone (aiohttp does
                # not cancel a handler whose client left): a subscriber that left holds
                # nothing for long.
                wait_s = min(self._heartbeat_s - idle_s, DISCONNECT_CHECK_S)
                try:
                    change = await asyncio.wait_for(listener.queue.get(), wait_s)
                except TimeoutError:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    idle_s += wait_s
                    if idle_s >= self._heartbeat_s:
                        await response.write(b": heartbeat\n\n")
                        idle_s = 0.0
                    continue
                idle_s = 0.0
                if change is None:  # stopping, or the client fell too far behind
                    break
                resource = watched[change.key]
                if READ not in await self.resources.permissions(principal, resource):
                    continue  # no longer shared with the caller: its changes are not its own
                event: dict[str, Any] = {
                    "url": resource.url,
                    "action": change.action,
                    "timestamp": change.timestamp_ms,
                }
                if change.action != "DELETE" and change.etag is not None:
                    event["etag"] = change.etag
                await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
            if request.transport is not None and not request.transport.is_closing():
                await response.write_eof()
        except (ConnectionError, StorageError) as exc:
            log.info("subscription ended: %s", exc)
        finally:
            self.events.forget(listener)
        return response

    # --- deletes and moves: shares follow the resource

    async def forget(self, resource: ResourcePath) -> None:
        """A deleted resource's shares and invitations go (DIAL: recipients lose access, the
        owner's invitations drop it)."""
        if resource.location == PUBLIC_LOCATION:
            return
        holders = await self.sharing.update_owner(
            resource.location, lambda record: record.forget(resource.url)
        )
        for user in holders:
            await self._reindex(user, {resource.url: []})

    async def _follow(self, source: ResourcePath, destination: ResourcePath) -> None:
        """A resource moved within its bucket: its grants, limit and invitations move along."""

        def move(record: OwnerRecord) -> dict[str, list[str]]:
            shared = record.pop_shared(source.url)
            for invitation in record.invitations():
                for entry in invitation.resources:
                    if entry["url"] == source.url:
                        entry["url"] = destination.url
            if shared is None:
                return {}
            target = record.share(destination.url)
            if target.limit is None:
                target.limit = shared.limit
            for user, permissions in shared.users.items():
                target.users[user] = merge(target.users.get(user, ()), permissions)
            return dict(shared.users)

        moved = await self.sharing.update_owner(source.location, move)
        for user, permissions in moved.items():
            await self._reindex(user, {source.url: [], destination.url: permissions})

    async def _move_or_copy(
        self, request: web.Request, principal: Principal, is_move: bool
    ) -> web.Response:
        verb = "move" if is_move else "copy"
        body = await self._body(request, f"Can't {verb} resource. Incorrect body")
        source_url, destination_url = body.get("sourceUrl"), body.get("destinationUrl")
        if not isinstance(source_url, str) or not source_url:
            raise GatewayError(400, "sourceUrl must be provided")
        if not isinstance(destination_url, str) or not destination_url:
            raise GatewayError(400, "destinationUrl must be provided")
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise GatewayError(400, f"Can't {verb} resource. Incorrect body")
        cipher = await self._cipher()
        source = parse_url(source_url, cipher)
        destination = parse_url(destination_url, cipher, write=True)
        if source.group != destination.group:
            raise GatewayError(400, "source and destination resources must be the same type")
        if source.url == destination.url:
            raise GatewayError(400, "source and destination resources cannot be the same")
        if source.is_folder or destination.is_folder:
            raise GatewayError(
                400, f"{'Moving' if is_move else 'Copying'} folders is not supported"
            )
        held = await self.resources.permissions(principal, source)
        if is_move and not {READ, WRITE} <= held:
            raise GatewayError(403, "no read and write access to source resource")
        if not is_move and READ not in held:
            raise GatewayError(403, "no read access to source resource")
        if WRITE not in await self.resources.permissions(principal, destination):
            raise GatewayError(403, "no write access to destination resource")
        obj = await self.store.get_stream(source.storage_key, chunk_size=COPY_CHUNK)
        if obj is None:
            raise GatewayError(400, f"Source resource {source.url} does not exist")
        async with obj:
            chunks: AsyncIterator[bytes] = aiter(obj)
            if source.group == "applications":
                # A custom application's `name` is its URL (DIAL's override): set it anew.
                stored = b"".join([chunk async for chunk in obj])
                chunks = _one(resource_body(destination, stored))
            started = datetime.now(UTC)
            try:
                written = await self.store.put_stream(
                    destination.storage_key,
                    chunks,
                    content_type=obj.info.content_type,
                    if_none_match=not overwrite,
                )
            except PreconditionFailed:
                raise GatewayError(
                    400,
                    f"Can't {verb} resource {source.url} to {destination.url}, "
                    "because destination resource already exists",
                ) from None
            source_etag = obj.etag
        if self.events is not None:
            action = self.events.written(written.created_at, started)
            await self.events.publish(destination.storage_key, action, written.etag)
        if not is_move:
            return web.Response(status=200)
        try:
            await self.store.delete(source.storage_key, if_match=source_etag)
        except NotFound:
            pass  # deleted meanwhile: the move is done all the same
        except PreconditionFailed:
            raise GatewayError(
                409, f"Source resource {source.url} changed during the move; it was copied"
            ) from None
        if self.events is not None:
            await self.events.publish(source.storage_key, "DELETE")
        if source.location == destination.location:
            await self._follow(source, destination)
        else:
            await self.forget(source)
        return web.Response(status=200)


# --- helpers


def _check_room(record: OwnerRecord) -> None:
    if record.invitation_count() >= MAX_INVITATIONS:
        raise GatewayError(
            400,
            f"Too many invitations: at most {MAX_INVITATIONS} may be open at once; "
            "delete some or let them expire",
        )


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise GatewayError(405, "Method is not allowed", headers={"Allow": allowed})


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type=JSON)


def _default_users(url: str) -> int:
    group = url.partition("/")[0]
    return DEFAULT_LIMITS[RESOURCE_TYPES.get(group, "FILE")][0]


def _node(url: str, cipher: BucketCipher, types: set[str]) -> dict[str, Any] | None:
    """DIAL's metadata of a shared URL (no timestamps; a folder's `items` null), or None if
    its type is not wanted or it no longer parses."""
    try:
        resource = parse_url(url, cipher)
    except GatewayError:
        return None
    if resource.resource_type not in types:
        return None
    return node(resource)
