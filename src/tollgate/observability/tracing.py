"""OpenTelemetry traces (compatibility C55), exported over OTLP/HTTP when configured.

This module needs the optional extra `otel` (`pip install 'tollgate[otel]'`). The gateway
imports it only when tracing is configured (`telemetry.otlp.endpoint`, or OpenTelemetry's own
`OTEL_EXPORTER_OTLP_*ENDPOINT` variables: see `settings._tracing`), and `tollgate serve`
refuses to start when it is configured but the extra is missing. With tracing off nothing here
runs: a call pays one `is None` check.

What is traced:

- a SERVER span per deployment call, named for its API (`POST /openai/deployments/{deployment}/
  chat/completions`), and one per feature, limits or configured-route call (`POST tokenize`,
  `GET limits`, `POST route <name>`), refused calls included;
- a CLIENT span per upstream attempt of a deployment call, child of the call's span: the
  upstream (its key's fingerprint or position, as in the metrics), the attempt's number, its
  status or why it got none. The attempt that is relayed ends with the call.

W3C trace context: a valid `traceparent` (and `tracestate`) of the client makes the call's span
a child of the client's. Every request the gateway sends while a call is traced (attempts,
interceptor, feature and route hops) carries the context of the call's current span instead of
the client's: the attempt's during an attempt, else the call's. That is done by a hook of the
upstream client (`Tracing.inject`, called with each request's headers), so that the steps of
the request path need not know about tracing. With tracing off, the client's headers are
forwarded unchanged.

A per-request key hop continues the trace: an application or interceptor that calls Tollgate back
with its per-request key joins the trace of the call that gave it the key, through its own
`traceparent` when it sends one, else through the key (the hop's current span is its parent;
on this instance: a key minted by another instance starts a new trace if no `traceparent` comes).

Attributes name the deployment, the project, the status, tokens, cost and upstream; never a key,
a key's digest, an upstream key, a header or a URL's query (compatibility C55).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Mapping
from typing import Final

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from tollgate import __version__
from tollgate.errors import GatewayError
from tollgate.limits.usage import Usage
from tollgate.routing.balancer import UpstreamState
from tollgate.security.keys import digest_of
from tollgate.security.principal import Principal
from tollgate.settings import TracingSettings

log = logging.getLogger("tollgate.tracing")

SCOPE: Final = "tollgate"
TRACE_HEADERS: Final = ("traceparent", "tracestate")
# The trace of the call the running task serves (each aiohttp request has a task of its own).
_CURRENT: contextvars.ContextVar[CallTrace | None] = contextvars.ContextVar(
    "tollgate_call_trace", default=None
)
_PROPAGATOR: Final = TraceContextTextMapPropagator()
# Span names stay few (OpenTelemetry's advice): the deployment is an attribute, not in the name.
CALL_SPAN_NAMES: Final = {
    api: f"POST /openai/deployments/{{deployment}}/{api}"
    for api in ("chat/completions", "completions", "embeddings")
}


class Tracing:
    """The tracer of one gateway process, and the per-request key hops in flight."""

    __slots__ = ("_provider", "hops", "tracer")

    def __init__(self, settings: TracingSettings) -> None:
        resource = Resource.create(
            {"service.name": settings.service_name, "service.version": __version__}
        )
        self._provider = TracerProvider(
            resource=resource, sampler=ParentBasedTraceIdRatio(settings.sample_ratio)
        )
        # Batched in a thread of its own; its delay and sizes follow OTEL_BSP_* variables.
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint))
        )
        self.tracer = self._provider.get_tracer(SCOPE, __version__)
        # A per-request key's digest → the traced call whose request carried it (see `_inject`).
        self.hops: dict[bytes, CallTrace] = {}
        log.info(
            "tracing: spans exported to %s (from %s), service %s, sample ratio %s",
            _shown(settings.endpoint),
            settings.source,
            settings.service_name,
            settings.sample_ratio,
        )

    # --- calls -------------------------------------------------------------------------------

    def deployment_call(
        self, headers: Mapping[str, str], principal: Principal | None, api: str
    ) -> CallTrace:
        """A deployment call's span (`api`: chat/completions, completions or embeddings)."""
        return self.begin(headers, principal, CALL_SPAN_NAMES[api], "POST")

    def begin(
        self, headers: Mapping[str, str], principal: Principal | None, name: str, method: str
    ) -> CallTrace:
        """Start a call's SERVER span and make it the current one of this task."""
        span = self.tracer.start_span(
            name,
            context=self._parent(headers, principal),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method},
        )
        call = CallTrace(self, span)
        call.token = _CURRENT.set(call)
        return call

    async def around(
        self, request: web.Request, name: str, answer: Awaitable[web.StreamResponse]
    ) -> web.StreamResponse:
        """A feature, limits or route call, traced while `answer` is awaited."""
        call = self.begin(request.headers, None, name, request.method)
        status = 500
        try:
            response = await answer
            status = response.status
            return response
        except GatewayError as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code), as in the access log
            raise
        finally:
            call.end_status(status)

    def _parent(self, headers: Mapping[str, str], principal: Principal | None) -> Context | None:
        """The client's trace context, else the hop's whose per-request key the call uses."""
        if "traceparent" in headers:
            context = _PROPAGATOR.extract(headers)
            if get_current_span(context).get_span_context().is_valid:
                return context
        hops = self.hops
        if hops and (principal is None or principal.source_deployment is not None):
            key = _presented_key(headers)
            call = hops.get(digest_of(key)) if key else None
            if call is not None:
                return set_span_in_context(call.current)
        return None

    # --- the upstream client ----------------------------------------------------------------

    @staticmethod
    def inject(headers: CIMultiDict[str]) -> None:
        """The upstream client's hook: the current span's context on every request the gateway
        sends (see `_inject`)."""
        _inject(headers)

    def shutdown(self) -> None:
        """Export the spans still queued and stop (blocking: run it in a thread)."""
        self._provider.shutdown()


class CallTrace:
    """One traced call: its span, and the span of its current upstream attempt."""

    __slots__ = ("attempt_span", "attempts", "current", "hop_keys", "span", "token", "tracing")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span
        self.current: Span = span  # whose context the next request carries
        self.attempt_span: Span | None = None
        self.attempts = 0
        self.token: contextvars.Token[CallTrace | None] | None = None
        self.hop_keys: list[bytes] | None = None  # digests of the keys its requests carried

    @property
    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def attempt(self, state: UpstreamState, url: URL) -> None:
        """An upstream attempt starts: its span becomes the current one (the previous attempt's
        ends)."""
        self._end_attempt()
        self.attempts += 1
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "tollgate.upstream": state.label,
            "tollgate.attempt": self.attempts,
        }
        if url.host is not None:  # never the URL itself: its query may hold a secret
            attributes["server.address"] = url.host
            if url.port is not None:
                attributes["server.port"] = url.port
        span = self.tracing.tracer.start_span(
            "POST upstream",
            context=set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        self.attempt_span = self.current = span

    def answered(self, outcome: str) -> None:
        """The current attempt's status, or why it got none (connect_failed, timeout, broken)."""
        span = self.attempt_span
        if span is None:
            return
        if outcome.isdigit():
            status = int(outcome)
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_status(Status(StatusCode.ERROR))
        else:
            span.set_attribute("error.type", outcome)
            span.set_status(Status(StatusCode.ERROR))

    def _end_attempt(self) -> None:
        if self.attempt_span is not None:
            self.attempt_span.end()
            self.attempt_span = None
            self.current = self.span

    def end(
        self,
        deployment: str,
        principal: Principal | None,
        status: int,
        usage: Usage | None,
        cost_nano: int | None,
        upstream: str | None,
    ) -> None:
        """A deployment call ended: its facts on its span (no key, no digest: compatibility C55)."""
        span = self.span
        if deployment:
            span.set_attribute("tollgate.deployment", deployment)
        if principal is not None:
            span.set_attribute("tollgate.project", principal.project)
            if principal.source_deployment is not None:
                span.set_attribute("tollgate.via", principal.source_deployment)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            span.set_attribute("tollgate.usage.total_tokens", usage.total_tokens)
        if cost_nano is not None:
            span.set_attribute("tollgate.cost_usd", cost_nano / 1e9)
        if upstream is not None:
            span.set_attribute("tollgate.upstream", upstream)
        span.set_attribute("tollgate.attempts", self.attempts)
        self.end_status(status)

    def end_status(self, status: int) -> None:
        self._end_attempt()
        span = self.span
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span's 4xx is the client's error, not the call's
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        if self.token is not None:
            _CURRENT.reset(self.token)
            self.token = None
        if self.hop_keys is not None:  # the hops' keys are dead by now
            hops = self.tracing.hops
            for digest in self.hop_keys:
                if hops.get(digest) is self:
                    del hops[digest]
            self.hop_keys = None


def _inject(headers: CIMultiDict[str]) -> None:
    """The current span's `traceparent` and `tracestate` replace the client's (the upstream
    client sends the headers as this leaves them). The request's `Api-Key`, a per-request key
    of the hop, is remembered until the call ends: a call made back with it joins this trace
    (`Tracing._parent`)."""
    call = _CURRENT.get()
    if call is None or call.token is None:  # untraced, or a task that outlived its call
        return
    for name in TRACE_HEADERS:
        headers.popall(name, None)
    _PROPAGATOR.inject(headers, set_span_in_context(call.current))
    key = headers.get("Api-Key")
    if key:
        digest = digest_of(key)
        call.tracing.hops[digest] = call
        if call.hop_keys is None:
            call.hop_keys = [digest]
        else:
            call.hop_keys.append(digest)


def _presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key a request authenticated with, as `Authenticator` reads it."""
    key = headers.get("Api-Key")
    if key:
        return key
    authorization = headers.get("Authorization")
    if authorization is not None:
        parts = authorization.split(" ", 2)
        return parts[1] if len(parts) > 1 and parts[1] else None
    return headers.get("x-api-key")


def _shown(url: str) -> str:
    """The collector's URL as logged: no user, password or query (they may hold a secret)."""
    try:
        return str(URL(url).with_user(None).with_query(None))
    except ValueError:
        return "(an invalid URL)"
