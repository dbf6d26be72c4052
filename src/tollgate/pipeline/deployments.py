"""The deployment call: `POST /openai/deployments/{id}/(chat/completions|completions|embeddings)`.

The steps in order: content type → resolve → authorize → (an interceptor chain first, when the
deployment has one) → read the body → a per-request key for the hop → admit (limits) →
enhance the body (`defaults`, `overrideName`, an assistant's prompt and addons) → the hop
(balancer, retries, relay) → settle. Each step is a module of this package; this one only
orders them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Final

from aiohttp import web
from yarl import URL

from tollgate.config.schema import INTERFACE_TYPES
from tollgate.errors import GatewayError, unknown_application
from tollgate.limits.api_usage import ANTHROPIC, OPENAI, RESPONSES
from tollgate.observability.calls import Observer
from tollgate.pipeline.admit import Admission
from tollgate.pipeline.assistants import addon_headers, assistant_request
from tollgate.pipeline.attachments import SCANNED_APIS, AttachmentCheck, attached_urls
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.budget import stream_budget
from tollgate.pipeline.call import Call
from tollgate.pipeline.estimate import counted_usage
from tollgate.pipeline.forward import (
    client_headers,
    enhance,
    parse_body,
    read_body,
    upstream_url,
    with_default_headers,
    with_hop_key,
)
from tollgate.pipeline.hop import DEPLOYMENT, HopEngine, Outbound
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.pipeline.include_usage import ask_for_usage
from tollgate.pipeline.interceptors import INTERCEPTOR_ID, Interceptors
from tollgate.pipeline.resolve import CustomApplications, custom_application, decode_id
from tollgate.pipeline.response_ids import IdRewrite, ResponseRef
from tollgate.pipeline.settle import Settler
from tollgate.routing.interfaces import INTERFACE_OF, Target
from tollgate.snapshot import Deployment, Kind

if TYPE_CHECKING:
    from tollgate.routing.balancer import UpstreamState


def _with_upstream_headers(upstream: UpstreamState, headers: list[tuple[str, str]]) -> None:
    """Each attempt of a deployment call carries its upstream's `X-UPSTREAM-*` headers."""
    headers.extend(upstream.headers)


def _interface_headers(
    interface: str,
) -> Callable[[UpstreamState, list[tuple[str, str]]], None]:
    """The same, for a call to one interface: the upstream's headers for it (compatibility
    C75)."""

    def add(upstream: UpstreamState, headers: list[tuple[str, str]]) -> None:
        headers.extend(upstream.headers_of(interface))

    return add


INTERFACE_HEADERS: Final = {name: _interface_headers(name) for name in INTERFACE_TYPES}


def _noting_upstream(
    add: Callable[[UpstreamState, list[tuple[str, str]]], None], rewrite: IdRewrite
) -> Callable[[UpstreamState, list[tuple[str, str]]], None]:
    """`add`, which also tells `rewrite` which upstream the attempt goes to (a Responses id
    names it, compatibility C78)."""

    def each(upstream: UpstreamState, headers: list[tuple[str, str]]) -> None:
        rewrite.at(upstream.upstream.id or "")
        add(upstream, headers)

    return each


# Called with the model in the body (compatibility C76).
TYPED_APIS: Final = frozenset(
    {"responses", "anthropic/messages", "anthropic/messages/count_tokens"}
)
NOT_SERVED: Final = {
    "responses": "OpenAI responses not supported for this deployment type",
    "anthropic/messages": "Anthropic messages not supported for this deployment type",
    "anthropic/messages/count_tokens": "Anthropic messages not supported for this deployment type",
}
USAGE_FORMATS: Final = {"responses": RESPONSES, "anthropic/messages": ANTHROPIC}
# A hop that is neither limited nor charged (Anthropic's `count_tokens`): no usage is read.
UNCHARGED: Final = replace(DEPLOYMENT, usage=False)


class DeploymentCalls:
    """The deployment pipeline of one gateway."""

    __slots__ = (
        "_admission",
        "_attachments",
        "_body_timeout_s",
        "_custom",
        "_enforce_during_stream",
        "_engine",
        "_keys",
        "_settler",
        "interceptors",
    )

    def __init__(
        self,
        engine: HopEngine,
        keys: HopKeys,
        admission: Admission,
        settler: Settler,
        *,
        body_timeout_s: float,
        enforce_during_stream: bool = False,
        custom: CustomApplications | None = None,
        attachments: AttachmentCheck | None = None,
    ) -> None:
        """`custom`: the custom applications' resolver (compatibility C92); None: an id the
        config does not know is 404. `attachments`: the check of what a request attaches
        (compatibility C93); None: nothing is checked, and keys may read no attachment."""
        self._engine = engine
        self._keys = keys
        self._admission = admission
        self._settler = settler
        self._body_timeout_s = body_timeout_s
        self._enforce_during_stream = enforce_during_stream  # compatibility C79
        self._custom = custom
        self._attachments = attachments
        self.interceptors = Interceptors(
            engine, keys, body_timeout_s, finish=self.run, attachments=attachments
        )

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
        if call.api in TYPED_APIS:  # the model is named in the body (compatibility C76)
            return await self._typed(call)
        if call.raw_id == INTERCEPTOR_ID:  # an interceptor's callback (compatibility C40)
            return await self.interceptors.next(call)
        deployment_id = decode_id(call.raw_id)
        deployment = call.snapshot.resolve(deployment_id)
        note = call.note
        if deployment is None:  # a custom application, or 404 (compatibility C92)
            deployment = await custom_application(call, deployment_id, self._custom)
            # Its name is made by a caller: metrics count it under "" (a label per name would
            # grow without bound); the access log and the trace name it by the id.
        elif note is not None:
            note.deployment = deployment.name
        call.deployment = deployment
        authorize(call.principal, deployment)
        target = deployment.targets.get(INTERFACE_OF[call.api]) if deployment.targets else None
        if target is None and deployment.endpoint_url is None:
            raise GatewayError(503, f"Deployment has no endpoint: {deployment.name}")
        if deployment.interceptors and not call.chained:
            return await self.interceptors.enter(call)
        body = call.body = await read_body(request, self._body_timeout_s)
        call.parsed = parse_body(body)
        return await self._forward(call, deployment, target)

    async def _typed(self, call: Call) -> web.StreamResponse:
        """A Responses or Anthropic Messages call: the deployment is the body's `model`, and it
        must serve the call's API family (compatibility C76)."""
        api = call.api
        body = call.body = await read_body(call.request, self._body_timeout_s)
        parsed = call.parsed = parse_body(body)
        model = parsed.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "Field model is required")
        call.raw_id = model
        deployment = call.deployment = call.snapshot.resolve(model)
        if deployment is None:
            raise unknown_application(model)
        if call.note is not None:
            call.note.deployment = deployment.name
        authorize(call.principal, deployment)
        target = deployment.targets.get(INTERFACE_OF[api]) if deployment.targets else None
        if target is None:
            raise GatewayError(503, NOT_SERVED[api])
        if deployment.interceptors:
            # A chain speaks the chat completions protocol: the call must not bypass it.
            raise GatewayError(503, f"{NOT_SERVED[api]} with interceptors")
        if api == "responses":
            for field in ("previous_response_id", "conversation"):
                if parsed.get(field) is not None:
                    raise GatewayError(400, f"{field} is not supported")
            if deployment.anonymous_upstreams:
                # Follow-up calls go to the upstream that made the response: it needs an id.
                raise GatewayError(503, "Upstream is missing required id")
        return await self._forward(call, deployment, target)

    async def _forward(
        self, call: Call, deployment: Deployment, target: Target | None
    ) -> web.StreamResponse:
        """The steps from the hop's key to the settle, once the deployment is known and allowed.

        `target`: the interface the call is served by, or None for the legacy `endpoint`.
        """
        request = call.request
        body = call.body
        parsed = call.parsed
        note = call.note
        api = call.api
        # `count_tokens` is neither limited nor charged (compatibility C76).
        charged = api != "anthropic/messages/count_tokens"
        attached = None
        check = self._attachments
        if check is not None and api in SCANNED_APIS:
            urls = attached_urls(parsed)
            if urls:  # refused before anything is forwarded or charged (compatibility C93)
                attached = await check(call.principal, urls)
        keys = self._keys
        hop_key = keys.open(call.principal.via(deployment.name, attached))
        ticket = None
        try:
            if charged:
                admission = self._admission
                ticket = call.ticket = (
                    admission.admit_now(call)
                    if admission.synchronous
                    else await admission.admit(call)
                )
            defaults = deployment.defaults
            if target is not None and target.defaults is not None:
                defaults = target.defaults  # an interface's defaults replace the model's
            enhanced = enhance(body, parsed, defaults, deployment.override_name)
            hide_usage = False
            if deployment.asks_stream_usage and api in ("chat/completions", "completions"):
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
            default_headers = (
                deployment.default_headers if target is None else target.default_headers
            )
            if default_headers:
                with_default_headers(headers, request.headers, default_headers)
            if api.startswith("anthropic/"):
                # The body's `model` is now the upstream's name; the adapter learns the
                # deployment the client asked for from this header, which only Tollgate sets
                # (compatibility C76).
                headers[:] = [h for h in headers if h[0].lower() != "x-dial-deployment-id"]
                headers.append(("X-DIAL-DEPLOYMENT-ID", call.raw_id))
            with_hop_key(headers, hop_key.key)
            if hop_key.publishing is not None:
                await hop_key.publishing  # the key must be readable everywhere before it is sent
            snapshot = call.snapshot
            raw_query = request.raw_path.partition("?")[2]
            url: URL | str
            per_upstream: Callable[[UpstreamState, list[tuple[str, str]]], None]
            if target is None:
                url = upstream_url(deployment, raw_query)
                per_upstream = _with_upstream_headers
            else:
                url = target.upstream_url(
                    api,
                    request.raw_path.partition("?")[0],
                    raw_query,
                    deployment.override_name or deployment.name,
                )
                per_upstream = INTERFACE_HEADERS[target.interface]
            rewrite = None
            if api == "responses":
                # The client gets ids that lead a follow-up back here (compatibility C78).
                rewrite = IdRewrite(ResponseRef(deployment.name, "", "", call.principal.project))
                per_upstream = _noting_upstream(per_upstream, rewrite)
            usage_format = USAGE_FORMATS.get(api, OPENAI)
            budget = None
            if self._enforce_during_stream and ticket is not None and parsed.get("stream"):
                # Token and cost limits hold while the answer streams (compatibility C79).
                budget = stream_budget(call, ticket, self._admission, usage_format)
            relayed = call.relayed = await self._engine.send(
                request,
                Outbound(
                    "POST",
                    url,
                    headers,
                    body,
                    self._engine.timeouts.of(deployment),
                    DEPLOYMENT if charged else UNCHARGED,
                    (
                        snapshot.balancers[deployment.name]
                        if deployment.balancer is None
                        else deployment.balancer  # a custom application's (C92)
                    ).plan(deployment.max_attempts, snapshot.retriable),
                    per_upstream,
                    deployment.name,
                    hide_usage=hide_usage,
                    keep=ticket is not None
                    and ticket.prices is not None
                    and ticket.prices.unit == "char_without_whitespace",
                    usage_format=usage_format,
                    # DIAL deletes the hop's key when its caller disconnects (compatibility
                    # C29); the drain for usage must not keep it alive.
                    on_client_gone=lambda: keys.end(hop_key.handle),
                    note=note,
                    rewrite=rewrite,
                    budget=budget,
                ),
            )
            if charged:
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
