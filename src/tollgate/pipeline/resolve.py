"""Step 2: which deployment the call is for (compatibility C5)."""

from __future__ import annotations

from urllib.parse import unquote

from tollgate.errors import unknown_application
from tollgate.snapshot import Deployment, Snapshot


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
