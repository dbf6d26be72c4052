"""Interceptor chains: a deployment's call through its interceptors first (compatibility C40).

A deployment listing interceptors `[i1, i2]` (after `globalInterceptors`, newer DIAL) is not
called directly. The client's request goes to `i1`'s endpoint (plus the client's query string)
with a fresh per-request key whose principal records the chain step: the chain, the index of
the interceptor holding the key, and the deployment and API the client called. The interceptor
calls back `POST /openai/deployments/interceptor/<api>` with that key:

- more interceptors left → the next one, with a new key one step further;
- none left → the deployment's normal path (limits, defaults, `overrideName`, balancer,
  retries: `DeploymentCalls.run`), acting as the root caller, who is charged once.

An interceptor hop differs from a deployment hop (compatibility C40, C41): no `defaults`, no
limits, no retries or balancer, no `X-UPSTREAM-*`; `Authorization` goes along only with the
interceptor's `forwardAuthToken` (newer DIAL; the 2024 code sent it always). Its answer,
whatever it is, is relayed as it comes. Unlike DIAL 2024, an interceptor that breaks off after
connecting ends the call with 502 instead of leaving the client waiting.

A call to any other deployment made with an interceptor's key is a fresh call (newer DIAL),
which runs that deployment's own chain, if it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.pipeline.attachments import SCANNED_APIS, AttachmentCheck, attached_urls
from tollgate.pipeline.call import Call
from tollgate.pipeline.forward import (
    client_headers,
    parse_body,
    read_body,
    upstream_url,
    with_hop_key,
)
from tollgate.pipeline.hop import INTERCEPTOR, HopEngine, Outbound
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.security.principal import ChainStep, Principal

log = logging.getLogger("tollgate.interceptors")

# The reserved deployment id: "the next step of my chain" (compatibility C40). DIAL tests it
# before resolving the id, so it shadows any deployment of that name.
INTERCEPTOR_ID: Final = "interceptor"


def interceptor_not_found() -> GatewayError:
    return GatewayError(404, "Interceptor is not found")


def not_mid_chain(principal: Principal) -> GatewayError:
    """`interceptor` called with a key that holds no step of a chain (compatibility C40)."""
    if principal.source_deployment is None:
        # A project key: DIAL's message where a per-request key is required.
        return GatewayError(400, "Provided API key is not per request key")
    return GatewayError(400, "Provided API key is not a per request key of an interceptor")


class Interceptors:
    """The interceptor steps of the request path."""

    __slots__ = ("_attachments", "_body_timeout_s", "_engine", "_finish", "_keys")

    def __init__(
        self,
        engine: HopEngine,
        keys: HopKeys,
        body_timeout_s: float,
        *,
        finish: Callable[[Call], Awaitable[web.StreamResponse]],
        attachments: AttachmentCheck | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._body_timeout_s = body_timeout_s
        self._finish = finish  # the deployment call at the chain's end
        self._attachments = attachments  # what a request attaches, checked (C93)

    async def enter(self, call: Call) -> web.StreamResponse:
        """The client's call of a deployment with a chain: to the chain's first interceptor.

        No limit is checked here: the call is admitted when the chain reaches the deployment.
        """
        assert call.deployment is not None
        step = ChainStep(call.deployment.interceptors, 0, call.raw_id, call.api)
        return await self._hop(call, call.principal.via_interceptor(step))

    async def next(self, call: Call) -> web.StreamResponse:
        """`POST /openai/deployments/interceptor/<api>`, made by an interceptor with its key.

        The call's note goes to the deployment's call at the chain's end (its metrics and
        access log).
        """
        principal = call.principal
        step = principal.chain
        if step is None or not step.mid_chain:
            raise not_mid_chain(principal)
        following = step.position + 1
        if following < len(step.interceptors):
            return await self._hop(
                call, principal.via_interceptor(step._replace(position=following))
            )
        # The chain is done: the deployment the client called, as the root caller rather than
        # as the last interceptor (the caller's access was checked when the chain was entered;
        # `accessibleByPerRequestKey` is about callers, and this is the caller's call going on).
        root = Principal(
            principal.project,
            principal.roles,
            principal.role_set,
            principal.key_fingerprint,
            principal.secured,
        )
        return await self._finish(call.continued(root, step.deployment, step.api))

    async def _hop(self, call: Call, principal: Principal) -> web.StreamResponse:
        """One interceptor hop: a key of its own (dead when the hop ends), one attempt."""
        step = principal.chain
        assert step is not None
        name = step.interceptors[step.position]
        interceptor = call.snapshot.interceptors.get(name)
        if interceptor is None:
            log.warning("interceptor %r of %s is not configured", name, step.deployment)
            raise interceptor_not_found()
        if interceptor.endpoint_url is None:
            raise GatewayError(503, f"Interceptor has no endpoint: {name}")
        request = call.request
        body = await read_body(request, self._body_timeout_s)
        parsed = parse_body(body)  # DIAL parses the request before any hop: invalid JSON is 400
        check = self._attachments
        if check is not None and step.api in SCANNED_APIS:
            urls = attached_urls(parsed)
            if urls:  # the interceptor's key may read what the caller attached (C93)
                principal = principal._replace(attachments=await check(call.principal, urls))
        keys = self._keys
        # The callback may reach another instance: the key carries the chain step there.
        hop_key = keys.open(principal)
        try:
            if hop_key.publishing is not None:
                await hop_key.publishing
            headers = client_headers(request, forward_authorization=interceptor.forward_auth_token)
            relayed = await self._engine.send(
                request,
                Outbound(
                    "POST",
                    upstream_url(interceptor, request.raw_path.partition("?")[2]),
                    with_hop_key(headers, hop_key.key),
                    body,
                    self._engine.timeouts.of(interceptor),
                    INTERCEPTOR,
                    target=f"interceptor {name}",
                    # The client gone, the hop's key dies at once (compatibility C29).
                    on_client_gone=lambda: keys.end(hop_key.handle),
                ),
            )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "interceptor project=%s key=%s deployment=%s interceptor=%s step=%d status=%d",
                    principal.project,
                    principal.key_fingerprint,
                    step.deployment,
                    name,
                    step.position,
                    relayed.response.status,
                )
            return relayed.response
        finally:
            await keys.close(hop_key)
