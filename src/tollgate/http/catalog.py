"""Listing and identity endpoints (compatibility C47, C48, C61)."""

from __future__ import annotations

import orjson
from aiohttp import web

from tollgate.errors import GatewayError, forbidden_deployment
from tollgate.http.responses import json_bytes_response, json_response, list_body
from tollgate.pipeline.resolve import decode_id, resolve
from tollgate.security.principal import Principal
from tollgate.snapshot import Kind, Listing, Snapshot, may_use


def listing(listing: Listing, principal: Principal) -> web.Response:
    """Only what the caller may use; the rest is silently left out."""
    return json_bytes_response(listing.body(principal.role_set, list_body))


def single(listing: Listing, principal: Principal, raw_id: str, what: str) -> web.Response:
    """One item: unknown → 404, not allowed → 403 (DIAL answers these with empty bodies)."""
    name = decode_id(raw_id)
    found = listing.find(name)
    if found is None:
        raise GatewayError(404, f"{what} is not found: {name}")
    roles, item = found
    if not may_use(roles, principal.role_set):
        raise GatewayError(403, f"Forbidden {what.lower()}: {name}")
    return json_response(item)


def application(snapshot: Snapshot, principal: Principal, raw_id: str) -> web.Response:
    """`/openai/applications/{id}` resolves like a call (compatibility C47)."""
    deployment = resolve(snapshot, raw_id)
    if not may_use(deployment.user_roles, principal.role_set):
        raise forbidden_deployment(deployment.name)
    found = snapshot.applications.find(deployment.name)
    if deployment.kind is not Kind.APPLICATION or found is None:
        raise GatewayError(404, f"Application is not found: {deployment.name}")
    return json_response(found[1])


def all_deployments(snapshot: Snapshot, principal: Principal) -> web.Response:
    """`/v1/deployments` (compatibility C61): models and applications in one bare JSON array."""
    role_set = principal.role_set
    items = snapshot.models.visible(role_set) + snapshot.applications.visible(role_set)
    return json_bytes_response(orjson.dumps(items))


def one_deployment(snapshot: Snapshot, principal: Principal, raw_id: str) -> web.Response:
    deployment = resolve(snapshot, raw_id)
    if not may_use(deployment.user_roles, principal.role_set):
        raise forbidden_deployment(deployment.name)
    for source in (snapshot.applications, snapshot.models, snapshot.assistants):
        found = source.find(deployment.name)
        if found is not None:
            return json_response(found[1])
    raise GatewayError(404, f"Unknown application: {deployment.name}")


def user_info(principal: Principal) -> web.Response:
    """Exactly `{"roles": [...], "project": ...}` for key callers (compatibility C48)."""
    return json_response({"roles": list(principal.roles), "project": principal.project})
