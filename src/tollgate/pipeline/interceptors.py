"""Interceptor chains: a deployment's call through its interceptors first (spec proxy 8).

A deployment listing interceptors `[i1, i2]` (after `globalInterceptors`, newer DIAL) is not
called directly. The client's request goes to `i1`'s endpoint (plus the client's query string)
with a fresh per-request key whose principal records the chain step: the chain, the index of
the interceptor holding the key, and the deployment and API the client called. The interceptor
calls back `POST /openai/deployments/interceptor/<api>` with that key:

- more interceptors left → the next one, with a new key one step further;
- none left → the deployment's normal path (limits, defaults, `overrideName`, balancer,
  retries: `Gateway.deployment_call`), acting as the root caller, who is charged once.

An interceptor hop differs from a deployment hop (spec proxy 8): no `defaults`, no limits, no
retries or balancer, no `X-UPSTREAM-*`; `Authorization` goes along only with the interceptor's
`forwardAuthToken` (newer DIAL; the 2024 code sent it always). Its answer, whatever it is, is
relayed as it comes. Unlike DIAL 2024, an interceptor that breaks off after connecting ends the
call with 502 instead of leaving the client waiting.

A call to any other deployment made with an interceptor's key is a fresh call (newer DIAL),
which runs that deployment's own chain, if it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import aiohttp
from aiohttp import web
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.observability.calls import CallNote
from tollgate.pipeline.attempts import BROKE_OFF, CONNECT_FAILED, TIMED_OUT, Timeouts
from tollgate.pipeline.forward import parse_body, upstream_headers, upstream_url
from tollgate.pipeline.relay import Relayed, is_stream, relay_stream, relay_whole
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import ChainStep, Principal
from tollgate.security.shared_keys import SharedKeys
from tollgate.snapshot import Deployment, Snapshot

log = logging.getLogger("tollgate.interceptors")

# The reserved deployment id: "the next step of my chain" (spec proxy 8). DIAL tests it before
# resolving the id, so it shadows any deployment of that name.
INTERCEPTOR_ID: Final = "interceptor"


class Finish(Protocol):
    """`Gateway.deployment_call`, entered for the deployment at the end of a chain."""

    def __call__(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        raw_id: str,
        api: str,
        *,
        chained: bool = False,
        note: CallNote | None = None,
    ) -> Awaitable[web.StreamResponse]: ...


def interceptor_not_found() -> GatewayError:
    return GatewayError(404, "Interceptor is not found")


def not_mid_chain(principal: Principal) -> GatewayError:
    """`interceptor` called with a key that holds no step of a chain (spec proxy 16 item 4)."""
    if principal.source_deployment is None:
        # A project key: DIAL's message where a per-request key is required (auth-limits 8.2).
        return GatewayError(400, "Provided API key is not per request key")
    return GatewayError(400, "Provided API key is not a per request key of an interceptor")


class Interceptors:
    """The interceptor steps of the request path; `Gateway` wires in what they share with it."""

    __slots__ = (
        "_authorization_is_api_key",
        "_end_hop",
        "_finish",
        "_keys",
        "_read_body",
        "_session",
        "_shared",
        "_timeouts",
    )

    def __init__(
        self,
        keys: PerRequestKeys,
        shared: SharedKeys | None,
        timeouts: Timeouts,
        *,
        session: Callable[[], aiohttp.ClientSession],
        read_body: Callable[[web.Request], Awaitable[bytes]],
        end_hop: Callable[[bytes], None],
        authorization_is_api_key: Callable[[web.Request], bool],
        finish: Finish,
    ) -> None:
        self._keys = keys
        self._shared = shared
        self._timeouts = timeouts
        self._session = session
        self._read_body = read_body
        self._end_hop = end_hop
        self._authorization_is_api_key = authorization_is_api_key
        self._finish = finish

    async def enter(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        deployment: Deployment,
        raw_id: str,
        api: str,
    ) -> web.StreamResponse:
        """The client's call of a deployment with a chain: to the chain's first interceptor.

        No limit is checked here: the call is admitted when the chain reaches the deployment
        (spec auth-limits 5.1).
        """
        step = ChainStep(deployment.interceptors, 0, raw_id, api)
        return await self._hop(request, principal.via_interceptor(step), snapshot)

    async def next(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        note: CallNote | None = None,
    ) -> web.StreamResponse:
        """`POST /openai/deployments/interceptor/<api>`, made by an interceptor with its key.

        `note` goes to the deployment's call at the chain's end (its metrics and access log).
        """
        step = principal.chain
        if step is None or not step.mid_chain:
            raise not_mid_chain(principal)
        following = step.position + 1
        if following < len(step.interceptors):
            return await self._hop(
                request, principal.via_interceptor(step._replace(position=following)), snapshot
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
        return await self._finish(
            request, root, snapshot, step.deployment, step.api, chained=True, note=note
        )

    async def _hop(
        self, request: web.Request, principal: Principal, snapshot: Snapshot
    ) -> web.StreamResponse:
        """One interceptor hop: a key of its own (dead when the hop ends), one attempt."""
        step = principal.chain
        assert step is not None
        name = step.interceptors[step.position]
        interceptor = snapshot.interceptors.get(name)
        if interceptor is None:
            log.warning("interceptor %r of %s is not configured", name, step.deployment)
            raise interceptor_not_found()
        if interceptor.endpoint_url is None:
            raise GatewayError(503, f"Interceptor has no endpoint: {name}")
        body = await self._read_body(request)
        parse_body(body)  # DIAL parses the request before any hop: invalid JSON is 400
        key, handle = self._keys.issue(principal)
        try:
            if self._shared is not None:
                # The callback may reach another instance; it finds the chain step in Redis.
                await self._shared.publish(handle, principal)
            url = upstream_url(interceptor, request.raw_path.partition("?")[2])
            headers = upstream_headers(
                request.headers.items(),
                key,
                forward_authorization=(
                    interceptor.forward_auth_token and not self._authorization_is_api_key(request)
                ),
            )
            relayed = await self._send(request, interceptor, url, headers, body, handle)
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
            self._end_hop(handle)

    async def _send(
        self,
        request: web.Request,
        interceptor: Deployment,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes,
        handle: bytes,
    ) -> Relayed:
        """One attempt, relayed as it comes: an interceptor has no upstreams to retry on."""
        try:
            answer = await self._session().post(
                url,
                data=body,
                headers=headers,
                timeout=self._timeouts.of(interceptor),
            )
        except aiohttp.ClientConnectorError as exc:
            log.warning("interceptor %s unreachable: %s", interceptor.name, type(exc).__name__)
            raise GatewayError(*CONNECT_FAILED) from None
        except TimeoutError:
            raise GatewayError(*TIMED_OUT) from None
        except aiohttp.ClientError as exc:
            # DIAL 2024 only logged this and left the client waiting (spec proxy 8).
            log.warning("interceptor %s broke off: %s", interceptor.name, type(exc).__name__)
            raise GatewayError(*BROKE_OFF) from None
        async with answer:
            try:
                if is_stream(answer):
                    # The client gone, the hop's key dies at once (spec auth-limits 3.5).
                    return await relay_stream(
                        request, answer, 0, on_client_gone=lambda: self._end_hop(handle)
                    )
                return await relay_whole(answer, 0)
            except TimeoutError:
                raise GatewayError(*TIMED_OUT) from None
            except aiohttp.ClientError as exc:
                log.warning("interceptor %s broke off: %s", interceptor.name, type(exc).__name__)
                raise GatewayError(*BROKE_OFF) from None
