"""Custom applications as deployments and in listings (compatibility C92, spec 6.4).

- A deployment call whose id the config does not know and starts with `applications/` is a
  custom application's resource URL: `resolve` checks it as DIAL's
  `DeploymentController.selectDeployment` does and gives the call path the stored definition's
  deployment (`tollgate.resources.applications`), which then runs as a config application.
- `GET /openai/applications/applications/<bucket>/<path>`: its ApplicationData.
- `GET /openai/applications`: the config's applications, and with the static setting
  `applications.includeCustomApps` the caller's own, shared with it and public ones.

Access is `ResourcesApi.permissions` (READ), so whoever may read the definition may call it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from tollgate.errors import GatewayError, unknown_application
from tollgate.http import catalog
from tollgate.http.resources_api import ResourcesApi
from tollgate.http.resources_common import READ, store_unavailable
from tollgate.http.responses import json_bytes_response, json_response, list_body
from tollgate.pipeline.call import Call
from tollgate.pipeline.resolve import CUSTOM_PREFIX, decode_id
from tollgate.resources.applications import CustomApp, CustomApps
from tollgate.resources.buckets import (
    PUBLIC_LOCATION,
    encode_path,
    initiator_location,
    user_location,
)
from tollgate.resources.paths import ResourcePath, parse_url
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, Snapshot
from tollgate.storage.store import StorageError

log = logging.getLogger("tollgate.resources")

GROUP = "applications"
# Custom applications one listing shows at most, and how many are read from the store at once.
MAX_LISTED = 1000
READ_AT_ONCE = 16


class CustomApplications:
    """The custom applications of one gateway: the call path's resolver and the listings."""

    def __init__(self, resources: ResourcesApi, *, include_in_listing: bool = False) -> None:
        self.resources = resources
        self.apps = CustomApps(resources.store)
        self.include_in_listing = include_in_listing  # `applications.includeCustomApps`

    # --- the call path

    async def resolve(self, call: Call, deployment_id: str) -> Deployment:
        """`DeploymentCalls`' resolver of ids the config does not know."""
        app = await self.find(call.principal, call.snapshot, deployment_id)
        return app.deployment

    async def find(self, principal: Principal, snapshot: Snapshot, deployment_id: str) -> CustomApp:
        """DIAL's order and messages: an id that is no resource URL → 404 `Unknown application:
        <id>`; a folder or another type → 404 `Invalid application url: <url>`; not readable →
        403; nothing stored → 404 `Application is not found: <url>`."""
        url = encode_path(deployment_id)  # DIAL's UrlUtil.encodePath: the id's segments encoded
        cipher = await self.resources.cipher()
        try:
            resource = parse_url(url, cipher)
        except GatewayError:
            raise unknown_application(deployment_id) from None
        if resource.is_folder or resource.group != GROUP:
            raise GatewayError(404, f"Invalid application url: {url}")
        try:
            if READ not in await self.resources.permissions(principal, resource):
                # DIAL answers an empty 403 (compatibility C51: Tollgate says what it refuses).
                raise GatewayError(403, f"You don't have an access to: {url}")
            app = await self.apps.load(resource, _chain(snapshot))
        except StorageError as exc:
            log.warning("custom application %s: %s", resource.url, exc)
            raise store_unavailable() from None
        if app is None:
            raise GatewayError(404, f"Application is not found: {resource.url}")
        return app

    # --- listings

    async def item(self, principal: Principal, snapshot: Snapshot, raw_id: str) -> web.Response:
        """`GET /openai/applications/{id}`: a config application as before, else a custom one."""
        name = decode_id(raw_id)
        if snapshot.resolve(name) is not None or not name.startswith(CUSTOM_PREFIX):
            return catalog.application(snapshot, principal, raw_id)
        return json_response((await self.find(principal, snapshot, name)).item)

    async def listing(self, principal: Principal, snapshot: Snapshot) -> web.Response:
        """`GET /openai/applications`: the config's, then (with `includeCustomApps`) the custom
        applications the caller may read: its own, those shared with it, the public ones."""
        if not self.include_in_listing:
            return catalog.listing(snapshot.applications, principal)
        items = snapshot.applications.visible(principal.role_set)
        try:
            items += await self._custom_items(principal, snapshot)
        except StorageError as exc:
            log.warning("custom applications listing: %s", exc)
            raise store_unavailable() from None
        return json_bytes_response(list_body(items))

    async def _custom_items(self, principal: Principal, snapshot: Snapshot) -> list[dict[str, Any]]:
        cipher = await self.resources.cipher()
        candidates: dict[str, ResourcePath] = {}

        async def add_folder(location: str, segments: tuple[str, ...] = ()) -> None:
            folder = f"{location}{GROUP}/" + "".join(f"{s}/" for s in segments)
            bucket = cipher.encrypt(location) if location != PUBLIC_LOCATION else "public"
            prefix = len(f"{location}{GROUP}/")
            token: str | None = None
            while len(candidates) < MAX_LISTED:
                page = await self.resources.store.list(folder, recursive=True, token=token)
                for info in page.objects[: MAX_LISTED - len(candidates)]:
                    path = tuple(info.key[prefix:].split("/"))
                    resource = ResourcePath(GROUP, bucket, location, path, False)
                    candidates.setdefault(resource.url, resource)
                token = page.next_token
                if token is None:
                    return

        await add_folder(user_location(principal))
        sharing = self.resources.sharing
        if sharing is not None:
            for url in await sharing.index(initiator_location(principal)):
                if not url.startswith(f"{GROUP}/") or len(candidates) >= MAX_LISTED:
                    continue
                try:
                    shared = parse_url(url, cipher)
                except GatewayError:
                    continue
                if shared.is_folder:
                    await add_folder(shared.location, shared.segments)
                else:
                    candidates.setdefault(shared.url, shared)
        await add_folder(PUBLIC_LOCATION)
        chain = _chain(snapshot)
        found = list(candidates.values())
        items: list[dict[str, Any]] = []
        for at in range(0, len(found), READ_AT_ONCE):  # a few store reads at a time
            batch = found[at : at + READ_AT_ONCE]
            apps = await asyncio.gather(*(self._readable(principal, r, chain) for r in batch))
            items += [app.item for app in apps if app is not None]
        return items

    async def _readable(
        self, principal: Principal, resource: ResourcePath, chain: tuple[str, ...]
    ) -> CustomApp | None:
        if READ not in await self.resources.permissions(principal, resource):
            return None  # an index entry the owner's record no longer backs
        return await self.apps.load(resource, chain)


def _chain(snapshot: Snapshot) -> tuple[str, ...]:
    return tuple(snapshot.config.global_interceptors)
