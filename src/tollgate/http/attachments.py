"""Whether a caller may attach what its request attaches (compatibility C93): each resource
URL `tollgate.pipeline.attachments` finds in a request must be one (`parse_url`: else 400 with
its message) that the caller may read (`ResourcesApi.permissions`: else 403 `Access denied to
the file <url>`), DIAL's `CollectRequestAttachmentsFn`. The canonical URLs go into the hop's
per-request key, which may then read them (and, for a folder, what lies below it).
"""

from __future__ import annotations

import logging
from typing import Final

from tollgate.errors import GatewayError
from tollgate.http.resources_api import ResourcesApi
from tollgate.http.resources_common import READ, store_unavailable
from tollgate.resources.paths import parse_url
from tollgate.security.principal import Principal
from tollgate.storage.store import StorageError

log = logging.getLogger("tollgate.resources")

# Distinct resources one request may attach: each is an access check, which may read the
# owner's sharing record from the store.
MAX_ATTACHMENTS: Final = 1000


class AttachmentAccess:
    """The `AttachmentCheck` of the call path, on one gateway's resources."""

    def __init__(self, resources: ResourcesApi) -> None:
        self.resources = resources

    async def __call__(self, principal: Principal, urls: list[str]) -> frozenset[str]:
        cipher = await self.resources.cipher()
        granted: set[str] = set()
        for url in dict.fromkeys(urls):  # each once, in order
            resource = parse_url(url, cipher)  # DIAL: 400 (its parser's message here)
            if resource.url in granted:
                continue
            if len(granted) >= MAX_ATTACHMENTS:
                raise GatewayError(400, f"Too many attachments: at most {MAX_ATTACHMENTS}")
            try:
                held = await self.resources.permissions(principal, resource)
            except StorageError as exc:
                log.warning("attachment %s: %s", resource.url, exc)
                raise store_unavailable() from None
            if READ not in held:
                raise GatewayError(403, f"Access denied to the file {url}")
            granted.add(resource.url)
        return frozenset(granted)
