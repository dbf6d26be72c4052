"""Follow-ups on a stored response: `GET`, `DELETE /openai/v1/responses/{id}` and
`POST /openai/v1/responses/{id}/cancel` (compatibility C78).

The id says which deployment, upstream and project made the response (`response_ids`); the
follow-up goes to that upstream alone (a response lives where it was made), with a per-request
key, the caller's headers and the answer's ids rewritten as in the call that made it. Neither
limited nor charged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiohttp import web
from yarl import URL

from tollgate.config.schema import RESPONSES
from tollgate.errors import GatewayError
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.call import Call
from tollgate.pipeline.forward import client_headers, read_body, with_hop_key
from tollgate.pipeline.hop import DEPLOYMENT, HopEngine, HopPolicy, OneAttempt, Outbound
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.pipeline.response_ids import IdRewrite, decode
from tollgate.routing.balancer import UpstreamState

GET: Final = "getOpenaiResponsesById"
DELETE: Final = "deleteOpenaiResponsesById"
CANCEL: Final = "postOpenaiResponsesCancel"
# Not retried (a response lives on one upstream), not charged.
ITEM: Final = HopPolicy("response item", DEPLOYMENT.errors, attempts_header=False)


def operation(method: str, cancel: bool) -> str | None:
    """DIAL's name of the follow-up a method and path ask for; None: no such follow-up."""
    if cancel:
        return CANCEL if method == "POST" else None
    return {"GET": GET, "DELETE": DELETE}.get(method)


def not_found(response_id: str) -> GatewayError:
    message = f"Response with id '{response_id}' not found."
    return GatewayError(404, message, display_message=message, kind="invalid_request_error")


class ResponseItems:
    """The follow-up calls of one gateway."""

    __slots__ = ("_body_timeout_s", "_engine", "_keys")

    def __init__(self, engine: HopEngine, keys: HopKeys, body_timeout_s: float) -> None:
        self._engine = engine
        self._keys = keys
        self._body_timeout_s = body_timeout_s

    async def call(self, call: Call, operation: str, response_id: str) -> web.StreamResponse:
        ref = decode(response_id)
        if ref is None:
            raise not_found(response_id)
        principal = call.principal
        if ref.project != principal.project:
            raise GatewayError(403, "Access denied")
        snapshot = call.snapshot
        deployment = snapshot.resolve(ref.deployment)
        if deployment is None:
            raise not_found(response_id)
        authorize(principal, deployment)
        target = deployment.targets.get(RESPONSES)
        if target is None:
            raise GatewayError(503, "Deployment for response_id does not support Responses API")
        upstream = _upstream(snapshot.balancers[deployment.name].states, ref.upstream)
        if upstream is None:  # the upstream that holds it is no longer configured
            raise not_found(response_id)
        request = call.request
        body = await read_body(request, self._body_timeout_s) if operation == CANCEL else None
        raw_query = request.raw_path.partition("?")[2]
        url = target.item_url(
            operation, ref.response_id, raw_query, deployment.override_name or deployment.name
        )
        headers = client_headers(request, forward_authorization=deployment.forward_auth_token)
        headers.extend(upstream.headers_of(RESPONSES))
        keys = self._keys
        hop_key = keys.open(principal.via(deployment.name))
        try:
            with_hop_key(headers, hop_key.key)
            if hop_key.publishing is not None:
                await hop_key.publishing
            rewrite = IdRewrite(ref)
            rewrite.learn(ref.response_id)
            relayed = await self._engine.send(
                request,
                Outbound(
                    request.method,
                    URL(url, encoded=True),
                    headers,
                    body,
                    self._engine.timeouts.of(deployment),
                    ITEM,
                    OneAttempt(upstream),
                    target=deployment.name,
                    rewrite=rewrite,
                    on_client_gone=lambda: keys.end(hop_key.handle),
                ),
            )
        finally:
            await keys.close(hop_key)
        return relayed.response


def _upstream(states: Sequence[UpstreamState], upstream_id: str) -> UpstreamState | None:
    """The upstream named `upstream_id`; the one synthetic upstream of a deployment without
    upstreams when it is ""."""
    for state in states:
        if (state.upstream.id or "") == upstream_id:
            return state
    return None
