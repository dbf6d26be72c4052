"""Step 2: which deployment the call is for (compatibility C5, C92)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote

from tollgate.errors import unknown_application
from tollgate.snapshot import Deployment, Snapshot

if TYPE_CHECKING:
    from tollgate.pipeline.call import Call

# A deployment id the config does not know, tried as a custom application's resource URL
# (`applications/<bucket>/<path>`, compatibility C92): its deployment, or DIAL's 404 or 403.
CustomApplications = Callable[["Call", str], Awaitable[Deployment]]
CUSTOM_PREFIX = "applications/"


def decode_id(raw_id: str) -> str:
    """A deployment id from the raw path, percent-decoded: `%2F` becomes `/` (compatibility
    C22)."""
    return unquote(raw_id) if "%" in raw_id else raw_id


def resolve(snapshot: Snapshot, raw_id: str) -> Deployment:
    """The deployment named by a raw (percent-encoded) path segment: applications first, then
    models, then assistants. Unknown → 404 `Unknown application: <id>`."""
    deployment_id = decode_id(raw_id)
    deployment = snapshot.resolve(deployment_id)
    if deployment is None:
        raise unknown_application(deployment_id)
    return deployment


async def custom_application(
    call: Call, deployment_id: str, custom: CustomApplications | None
) -> Deployment:
    """An id the config does not know: (newer DIAL) a custom application when it starts with
    `applications/` and custom applications are served, else 404 `Unknown application: <id>`."""
    if custom is None or not deployment_id.startswith(CUSTOM_PREFIX):
        raise unknown_application(deployment_id)
    return await custom(call, deployment_id)
