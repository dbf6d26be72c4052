"""The bodies of DIAL's JSON resources (compatibility C86): conversations, prompts and custom
applications, checked before they are stored.

A body must be a JSON object (UTF-8); conversations and prompts are stored byte for byte as
sent (DIAL's newest validation is loose; Tollgate checks only that the body is an object). An
application's body must be a valid DIAL application definition (spec 6.2), checked by
`tollgate.config.schema.Application` as a config file's application is (an absolute http(s)
`endpoint`); it is stored with DIAL's overrides (`prepareApplication`): `name` = the
resource's URL, `user_roles` null, `forward_auth_token` false, a `reference` when absent.
What is stored is callable as a deployment (`tollgate.resources.applications`, compatibility
C92), which applies the overrides again whoever wrote the object.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pydantic import ValidationError

from tollgate.config.schema import Application
from tollgate.errors import GatewayError
from tollgate.resources.paths import ResourcePath

SCHEMA_MISMATCH = "Provided payload do not match required schema"
NO_ENDPOINT = "Application endpoint or function must be provided"
# Fields DIAL sets itself on a custom application, in either spelling.
_OVERRIDDEN = ("name", "user_roles", "userRoles", "forward_auth_token", "forwardAuthToken")


def resource_body(resource: ResourcePath, data: bytes) -> bytes:
    """The bytes to store for `data` sent to `resource`, or a 400 with a clear message."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"{SCHEMA_MISMATCH}: the body is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise GatewayError(400, f"{SCHEMA_MISMATCH}: the body must be a JSON object")
    if resource.group != "applications":
        return data
    return orjson.dumps(application(resource, document))


def application(resource: ResourcePath, document: dict[str, Any]) -> dict[str, Any]:
    """DIAL's checks and overrides of a custom application's definition."""
    if document.get("endpoint") is None and document.get("function") is None:
        raise GatewayError(400, NO_ENDPOINT)
    if document.get("endpoint") is None:
        # Functions (DIAL's app controller) are not served: a function-only app cannot run.
        raise GatewayError(
            400, "Application endpoint must be provided: functions are not supported"
        )
    try:
        Application.model_validate(document)
    except ValidationError as exc:
        raise GatewayError(400, _message(exc)) from None
    prepared = {key: value for key, value in document.items() if key not in _OVERRIDDEN}
    prepared = {"name": resource.url, **prepared, "user_roles": None, "forward_auth_token": False}
    if prepared.get("reference") is None:
        prepared["reference"] = str(uuid.uuid4())
    return prepared


def _message(exc: ValidationError) -> str:
    """The schema's first message, with the field it is about (`features.rate: ...`)."""
    error = exc.errors(include_url=False)[0]
    text = str(error.get("msg", "invalid"))
    text = text.removeprefix("Value error, ")
    where = ".".join(str(part) for part in error.get("loc", ()))
    if where and where not in text:
        return f"Invalid application: {where}: {text}"
    return f"Invalid application: {text}"
