"""The deployment call: `POST /openai/deployments/{id}/(chat/completions|completions|embeddings)`.

The steps in order: content type → resolve → authorize → (an interceptor chain first, when the
deployment has one) → read the body → a per-request key for the hop → admit (limits) →
enhance the body (`defaults`, `overrideName`, an assistant's prompt and addons) → the hop
(balancer, retries, relay) → settle. Each step is a module of this package; this one only
orders them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from tollgate.errors import GatewayError
from tollgate.observability.calls import Observer
from tollgate.pipeline.admit import Admission
from tollgate.pipeline.assistants import addon_headers, assistant_request
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.call import Call
from tollgate.pipeline.estimate import counted_usage
from tollgate.pipeline.forward import (
    client_headers,
    enhance,
    parse_body,
    read_body,
    upstream_url,
    with_hop_key,
)
from tollgate.pipeline.hop import DEPLOYMENT, HopEngine, Outbound
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.pipeline.include_usage import ask_for_usage
from tollgate.pipeline.interceptors import INTERCEPTOR_ID, Interceptors
from tollgate.pipeline.resolve import resolve
from tollgate.pipeline.settle import Settler
from tollgate.snapshot import Kind

if TYPE_CHECKING:
    from tollgate.routing.balancer import UpstreamState


def _with_upstream_headers(upstream: UpstreamState, headers: list[tuple[str, str]]) -> None:
    """Each attempt of a deployment call carries its upstream's `X-UPSTREAM-*` headers."""
    headers.extend(upstream.headers)


class DeploymentCalls:
    """The deployment pipeline of one gateway."""

    __slots__ = ("_admission", "_body_timeout_s", "_engine", "_keys", "_settler", "interceptors")

    def __init__(
        self,
        engine: HopEngine,
        keys: HopKeys,
        admission: Admission,
        settler: Settler,
        *,
        body_timeout_s: float,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._admission = admission
        self._settler = settler
        self._body_timeout_s = body_timeout_s
        self.interceptors = Interceptors(engine, keys, body_timeout_s, finish=self.run)

    async def observed(self, call: Call, observer: Observer) -> web.StreamResponse:
        """`run`, recorded in the metrics, the access log and its span (each when on) once it
        settled."""
        request = call.request
        note = call.note = observer.begin(request.headers, call.principal, call.api)
        status = 500
        try:
            response = await self.run(call)
            status = response.status
            return response
        except GatewayError as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away before the answer (nginx's code)
            raise
        finally:
            observer.end(note, request.headers, call.principal, call.raw_id, status)

    async def run(self, call: Call) -> web.StreamResponse:
        request = call.request
        if "application/json" not in request.headers.get("Content-Type", "").lower():
            raise GatewayError(415, "Only application/json is supported")
        if call.raw_id == INTERCEPTOR_ID:  # an interceptor's callback (compatibility C40)
            return await self.interceptors.next(call)
        deployment = call.deployment = resolve(call.snapshot, call.raw_id)
        note = call.note
        if note is not None:
            note.deployment = deployment.name
        authorize(call.principal, deployment)
        if deployment.endpoint_url is None:
            raise GatewayError(503, f"Deployment has no endpoint: {deployment.name}")
        if deployment.interceptors and not call.chained:
            return await self.interceptors.enter(call)
        body = call.body = await read_body(request, self._body_timeout_s)
        parsed = call.parsed = parse_body(body)
        keys = self._keys
        hop_key = keys.open(call.principal.via(deployment.name))
        ticket = None
        try:
            admission = self._admission
            ticket = call.ticket = (
                admission.admit_now(call) if admission.synchronous else await admission.admit(call)
            )
            enhanced = enhance(body, parsed, deployment)
            hide_usage = False
            if deployment.asks_stream_usage and call.api != "embeddings":
                # A stream must not go uncharged because the client did not ask the upstream
                # for usage (compatibility C70).
                asked = ask_for_usage(
                    enhanced, parsed if enhanced is body else parse_body(enhanced)
                )
                if asked is not None:
                    enhanced, hide_usage = asked, True
            body = enhanced
            headers = client_headers(request, forward_authorization=deployment.forward_auth_token)
            if deployment.kind is Kind.ASSISTANT:  # prompt, addons, model (compatibility C42)
                assistant = assistant_request(parsed, call.snapshot, call.principal, deployment)
                body = assistant.body
                headers = addon_headers(headers, assistant.headers)
            with_hop_key(headers, hop_key.key)
            if hop_key.publishing is not None:
                await hop_key.publishing  # the key must be readable everywhere before it is sent
            snapshot = call.snapshot
            relayed = call.relayed = await self._engine.send(
                request,
                Outbound(
                    "POST",
                    upstream_url(deployment, request.raw_path.partition("?")[2]),
                    headers,
                    body,
                    self._engine.timeouts.of(deployment),
                    DEPLOYMENT,
                    snapshot.balancers[deployment.name].plan(
                        deployment.max_attempts, snapshot.retriable
                    ),
                    _with_upstream_headers,
                    deployment.name,
                    hide_usage=hide_usage,
                    keep=ticket is not None
                    and ticket.prices is not None
                    and ticket.prices.unit == "char_without_whitespace",
                    # DIAL deletes the hop's key when its caller disconnects (compatibility
                    # C29); the drain for usage must not keep it alive.
                    on_client_gone=lambda: keys.end(hop_key.handle),
                    note=note,
                ),
            )
            usage = counted_usage(call)  # estimated when the upstream reported none
            if note is not None:
                note.usage = usage
            return relayed.response
        finally:
            publishing = hop_key.publishing
            if publishing is not None and not publishing.done():
                await publishing  # a refused call: its key's SET must not land after the DEL
            keys.end(hop_key.handle)
            if ticket is not None:
                waiting = self._settler.settle(call, ticket)
                if waiting is not None:
                    await waiting
