"""Custom applications as deployments (compatibility C92): a definition stored at
`applications/<bucket>/<path>` (compatibility C86), read from the resource store and made into
the `Deployment` the call path runs, and into the listing item `/openai/applications` shows.

Reading and compiling a definition (a store read, JSON, the config schema's validation, a
balancer) costs far more than asking the store for its ETag, so compiled definitions are kept,
at most `MAX_CACHED` of them (least recently used out first), by storage key, and each use asks
the store for the current ETag first (`head`, one small request): a changed definition is read
again, a deleted one is gone on the next call, on every instance on the store, with no change
notices to carry.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from tollgate import listings
from tollgate.config.schema import Application
from tollgate.resources.paths import ResourcePath
from tollgate.snapshot import Deployment, custom_application
from tollgate.storage.store import ResourceStore

log = logging.getLogger("tollgate.resources")

MAX_CACHED = 1024


@dataclass(frozen=True, slots=True)
class CustomApp:
    """One stored definition, ready: its deployment (named by the resource's URL) and its
    listing item (DIAL's ApplicationData)."""

    deployment: Deployment
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Entry:
    etag: str
    chain: tuple[str, ...]  # the `globalInterceptors` it was compiled with
    app: CustomApp | None  # None: stored, but not a definition Tollgate can run


class CustomApps:
    """The compiled definitions of one instance, checked against the store on every use."""

    def __init__(self, store: ResourceStore, max_cached: int = MAX_CACHED) -> None:
        self.store = store
        self._max = max_cached
        self._cache: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    async def load(
        self, resource: ResourcePath, global_interceptors: tuple[str, ...] = ()
    ) -> CustomApp | None:
        """The application stored at `resource` (an APPLICATION item), or None when there is
        none, or when what is stored is not a definition (logged). `global_interceptors`: the
        chain of the caller's config (`globalInterceptors`), which every deployment runs."""
        key = resource.storage_key
        info = await self.store.head(key)
        if info is None:
            self._cache.pop(key, None)
            return None
        entry = self._cache.get(key)
        if entry is not None and entry.etag == info.etag and entry.chain == global_interceptors:
            self._cache.move_to_end(key)
            return entry.app
        blob = await self.store.get(key)
        if blob is None:  # deleted since the head
            self._cache.pop(key, None)
            return None
        app = _compile(resource, blob.data, global_interceptors)
        self._cache[key] = _Entry(blob.etag, global_interceptors, app)
        self._cache.move_to_end(key)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return app


def _compile(
    resource: ResourcePath, data: bytes, global_interceptors: tuple[str, ...]
) -> CustomApp | None:
    spec = definition(resource, data)
    if spec is None:
        return None
    name = resource.url
    return CustomApp(
        custom_application(name, spec, global_interceptors),
        listings.application_item(name, spec),
    )


def definition(resource: ResourcePath, data: bytes) -> Application | None:
    """DIAL's `ApplicationService.getApplication`: the stored JSON as a config application,
    named by the URL it is stored at (not by its stored `name`, which a move leaves behind),
    with DIAL's overrides applied again (no `userRoles`, no `forwardAuthToken`) whoever wrote
    the object; None (logged) when it is not a definition."""
    try:
        document = orjson.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        for field in ("userRoles", "user_roles", "forwardAuthToken", "forward_auth_token"):
            document.pop(field, None)
        return Application.model_validate(document)
    except (ValueError, ValidationError) as exc:  # orjson's error is a ValueError
        log.warning(
            "custom application %s cannot be used: %s", resource.url, str(exc).splitlines()[0]
        )
        return None


def application_data(resource: ResourcePath, data: bytes) -> dict[str, Any] | None:
    """What a caller that may read but not write a custom application sees of it: DIAL's
    ApplicationData (the listing's item), never the stored definition (its endpoint)."""
    spec = definition(resource, data)
    return None if spec is None else listings.application_item(resource.url, spec)
