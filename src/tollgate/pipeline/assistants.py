"""Step 5 for assistants: the request an assistant receives (compatibility C42).

DIAL rewrites a call to an assistant before sending it to the assistant's endpoint (the shared
`assistant.endpoint` unless the assistant names its own), after `defaults` are applied:

1. `prompt`: every `system` message is removed and `{"role": "system", "content": <prompt>}`
   goes first.
2. Addons: the assistant's `addons`, then the `name` of each of the request's `addons[]`,
   without repeats, in that order. Each must be configured (404 `No addon: <name>`) and usable
   by the caller (`userRoles`; 403 `Forbidden addon: <name>`). The request's `addons` becomes
   `[{"url": <addon endpoint>, "name": <name>}, ...]`, and each addon with a non-blank `token`
   gives a header `x-addon-token-<position>` (its position in that list, from 0).
3. `model` must name a configured model the caller may use (404 `No model: <name>`, 403
   `Forbidden model: <name>`); DIAL fails with an empty 400 when it is missing, Tollgate says
   what is missing.

Pure: a request dict, a snapshot and a principal in, the body and extra headers out. Addon
tokens are secrets (compatibility C10): they travel only in those headers, never in a log line.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from tollgate.config.schema import Assistant, Deployable
from tollgate.errors import GatewayError
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, Snapshot, may_use

ADDON_TOKEN_HEADER = "x-addon-token-"


class AssistantRequest(NamedTuple):
    body: bytes
    headers: tuple[tuple[str, str], ...]  # x-addon-token-<position>: <token>


def assistant_request(
    request: dict[str, Any], snapshot: Snapshot, principal: Principal, deployment: Deployment
) -> AssistantRequest:
    """The body and extra headers of a call to the assistant `deployment` (see the module)."""
    assistant = deployment.spec
    assert isinstance(assistant, Assistant), "only assistants are rewritten"
    if assistant.prompt is not None:
        _inject_prompt(request, assistant.prompt)
    request["addons"], headers = _addons(request, snapshot, principal, assistant.addons)
    _check_model(request, snapshot, principal)
    return AssistantRequest(orjson.dumps(request), headers)


def addon_headers(
    headers: list[tuple[str, str]], tokens: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """The hop's headers with the addon tokens; a client's own `x-addon-token-*` are dropped,
    so that only configured tokens reach the assistant (as Tollgate does for `X-UPSTREAM-*`)."""
    kept = [(name, value) for name, value in headers if not _is_addon_token(name)]
    kept.extend(tokens)
    return kept


def _is_addon_token(name: str) -> bool:
    return name.lower().startswith(ADDON_TOKEN_HEADER)


def _inject_prompt(request: dict[str, Any], prompt: str) -> None:
    messages = request.get("messages")
    if not isinstance(messages, list):
        raise GatewayError(400, 'Invalid request: "messages" must be a JSON array')
    kept = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    request["messages"] = [{"role": "system", "content": prompt}, *kept]


def _requested_addons(request: dict[str, Any]) -> list[str]:
    addons = request.get("addons")
    if addons is None:
        return []
    if not isinstance(addons, list):
        raise GatewayError(400, 'Invalid request: "addons" must be a JSON array')
    names: list[str] = []
    for addon in addons:
        name = addon.get("name") if isinstance(addon, dict) else None
        if not isinstance(name, str):
            raise GatewayError(400, 'Invalid request: each item of "addons" needs a "name"')
        names.append(name)
    return names


def _addons(
    request: dict[str, Any], snapshot: Snapshot, principal: Principal, configured: list[str]
) -> tuple[list[dict[str, Any]], tuple[tuple[str, str], ...]]:
    names = dict.fromkeys(configured)  # ordered and without repeats, as DIAL's LinkedHashSet
    names.update(dict.fromkeys(_requested_addons(request)))
    addons: list[dict[str, Any]] = []
    headers: list[tuple[str, str]] = []
    known = snapshot.config.addons
    for position, name in enumerate(names):
        addon = known.get(name)
        if addon is None:
            raise GatewayError(404, f"No addon: {name}")
        if not _may_use(addon, principal):
            raise GatewayError(403, f"Forbidden addon: {name}")
        addons.append({"url": addon.endpoint, "name": name})
        token = addon.token
        if token is not None and token.strip():
            headers.append((f"{ADDON_TOKEN_HEADER}{position}", token))
    return addons, tuple(headers)


def _check_model(request: dict[str, Any], snapshot: Snapshot, principal: Principal) -> None:
    name = request.get("model")
    if not isinstance(name, str):
        raise GatewayError(
            400, 'Invalid request: "model" must name the model the assistant is to use'
        )
    model = snapshot.config.models.get(name)
    if model is None:
        raise GatewayError(404, f"No model: {name}")
    if not _may_use(model, principal):
        raise GatewayError(403, f"Forbidden model: {name}")


def _may_use(spec: Deployable, principal: Principal) -> bool:
    roles = spec.user_roles
    return may_use(None if roles is None else frozenset(roles), principal.role_set)
