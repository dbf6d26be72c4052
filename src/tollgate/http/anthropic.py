"""The Anthropic face of the gateway: `/anthropic/v1/models[/{id}]` and Anthropic's error shape
on every `/anthropic/...` path (compatibility C77).

The calls themselves (`/anthropic/v1/messages`, `.../count_tokens`) are deployment calls of the
pipeline (`pipeline.deployments`); this module lists the models that serve them and renders
errors as the `anthropic` SDK reads them.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
from aiohttp import web

from tollgate.config.schema import ANTHROPIC_MESSAGES, Model
from tollgate.errors import GatewayError, forbidden_deployment
from tollgate.http.responses import JSON, json_response
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, Kind, Snapshot, may_use

DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 1000
# DIAL's default `created_at` of a model that names none.
DEFAULT_CREATED_AT: Final = "2023-01-01T01:00:00Z"
# Anthropic's error types by status; any other 4xx is a bad request, any other 5xx an API error.
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def is_anthropic_path(raw_path: str) -> bool:
    return raw_path.lstrip("/").startswith("anthropic/")


def error_response(error: GatewayError) -> web.Response:
    """`{"type": "error", "error": {"type", "message"}}`, with DIAL's status and message."""
    status = error.status
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})
    response = web.Response(body=body, status=status, content_type=JSON)
    if error.headers:
        response.headers.update(error.headers)
    return response


def _served(deployment: Deployment) -> bool:
    return deployment.kind is Kind.MODEL and ANTHROPIC_MESSAGES in deployment.targets


def _item(deployment: Deployment) -> dict[str, Any]:
    spec = deployment.spec
    item: dict[str, Any] = {
        "id": deployment.name,
        "type": "model",
        "display_name": spec.display_name
        if isinstance(spec.display_name, str) and spec.display_name
        else deployment.name,
        "created_at": DEFAULT_CREATED_AT,
    }
    limits = spec.limits if isinstance(spec, Model) else None
    if limits is not None:
        if limits.max_prompt_tokens is not None:
            item["max_input_tokens"] = limits.max_prompt_tokens
        if limits.max_completion_tokens is not None:
            item["max_tokens"] = limits.max_completion_tokens
    return item


def models(snapshot: Snapshot, principal: Principal, query: Any) -> web.Response:
    """`GET /anthropic/v1/models`: the models the caller may use that serve the Messages API,
    in config order, paged by `limit` (1-1000, 20 by default) and `after_id` / `before_id`."""
    after = query.get("after_id")
    before = query.get("before_id")
    if after is not None and before is not None:
        raise GatewayError(400, "Only one of after_id or before_id may be provided")
    text = query.get("limit")
    limit = DEFAULT_LIMIT
    if text is not None:
        try:
            limit = int(text)
        except ValueError:
            raise GatewayError(400, "Limit must be an integer") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise GatewayError(400, f"Limit is out of allowed range: [1, {MAX_LIMIT}]")
    names = [
        name
        for name, deployment in snapshot.deployments.items()
        if _served(deployment) and may_use(deployment.user_roles, principal.role_set)
    ]
    if after is not None:
        if after not in names:
            raise GatewayError(400, "Invalid after_id: model not found")
        start = names.index(after) + 1
        page = names[start : start + limit]
        more = start + limit < len(names)
    elif before is not None:
        if before not in names:
            raise GatewayError(400, "Invalid before_id: model not found")
        end = names.index(before)
        page = names[max(0, end - limit) : end]
        more = end - limit > 0
    else:
        page = names[:limit]
        more = limit < len(names)
    deployments = snapshot.deployments
    return json_response(
        {
            "data": [_item(deployments[name]) for name in page],
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
    )


def model(snapshot: Snapshot, principal: Principal, name: str) -> web.Response:
    """`GET /anthropic/v1/models/{id}`: 404 for a model that does not serve the Messages API
    (or none of that name), 403 when the caller's roles do not allow it."""
    deployment = snapshot.deployments.get(name)
    if deployment is None or not _served(deployment):
        raise GatewayError(404, f"Model is not found: {name}")
    if not may_use(deployment.user_roles, principal.role_set):
        raise forbidden_deployment(name)
    return json_response(_item(deployment))
