"""The HTTP edge: front-door checks, dispatch, and the deployment call pipeline.

This module only wires the steps together (STYLE): authenticate → resolve → authorize →
forward → relay → settle; each step lives in `tollgate.pipeline`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from tollgate import __version__
from tollgate.config_store import ConfigStore
from tollgate.errors import GatewayError, no_route, unknown_api_key
from tollgate.http import catalog, protocol_errors
from tollgate.http.limits_api import LimitsApi
from tollgate.http.openapi import openapi_response
from tollgate.http.ops import Ops, metrics_app
from tollgate.http.responses import error_response
from tollgate.limits.cost import Prices
from tollgate.limits.ledger import Ask, Charge, Refusal
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.store import build_ledger, describe, redis_client
from tollgate.observability.calls import CallNote, Observer
from tollgate.observability.logs import AccessLog
from tollgate.observability.metrics import Metrics, StoreView
from tollgate.pipeline import features
from tollgate.pipeline.admit import Admission, Ticket
from tollgate.pipeline.assistants import addon_headers, assistant_request
from tollgate.pipeline.attempts import Timeouts, send
from tollgate.pipeline.authenticate import Authenticator
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.forward import enhance, parse_body, upstream_headers, upstream_url
from tollgate.pipeline.interceptors import INTERCEPTOR_ID, Interceptors
from tollgate.pipeline.relay import Relayed
from tollgate.pipeline.resolve import decode_id, resolve
from tollgate.pipeline.route_call import RouteCalls
from tollgate.pipeline.settle import charge_for
from tollgate.security.admin import AdminRules
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import RemoteKeyLookup, SharedKeys
from tollgate.settings import Settings
from tollgate.snapshot import Kind, Snapshot

if TYPE_CHECKING:  # the optional `otel` extra: imported only when tracing is configured
    from tollgate.observability.tracing import Tracing

log = logging.getLogger("tollgate.http")

# Settles running in the background at most; past it, a finished call waits for its own.
MAX_SETTLING: Final = 4096
ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"})
DEPLOYMENT_CALL = re.compile(
    r"/+openai/deployments/(.+?)/(chat/completions|completions|embeddings)"
)
OPS_RELOAD = re.compile(r"/+v1/ops/config/reload")


class DeploymentCall(NamedTuple):
    principal: Principal
    snapshot: Snapshot
    raw_id: str
    api: str  # chat/completions, completions or embeddings


class Gateway:
    """One gateway process: the live config, per-request keys and the upstream client."""

    def __init__(self, settings: Settings, store: ConfigStore) -> None:
        self.settings = settings
        self.store = store
        self.per_request_keys = PerRequestKeys(settings.per_request_key_ttl_s)
        self.redis = redis_client(settings)
        self.ledger = build_ledger(settings, self.redis)
        self.shared_keys = (
            None
            if self.redis is None
            else SharedKeys(
                self.redis,
                settings.per_request_key_ttl_s,
                # Read on every hop: the ledger's flag, not the dict /health builds from it.
                store_healthy=lambda: getattr(self.ledger, "healthy", True),
            )
        )
        self.authenticator = Authenticator(
            self.per_request_keys, settings.proxy_count, shared=self.shared_keys is not None
        )
        # The embedded ledger is called directly (no coroutine per call); see Admission.
        self.settle_now = self.ledger.settle_now if isinstance(self.ledger, MemoryLedger) else None
        self.admission = Admission(
            self.ledger,
            reserve=settings.admission == "reserve",
            default_completion_tokens=settings.default_completion_tokens,
        )
        self.limits_api = LimitsApi(self.ledger)
        # Telemetry (DECISIONS 12): None when off, so a call pays one attribute check.
        self.metrics = (
            Metrics(
                StoreView(
                    lambda: (store.reloads, store.failed_reloads),
                    lambda: store.current.balancers,
                    lambda: describe(self.ledger),
                )
            )
            if settings.metrics_enabled
            else None
        )
        access = (
            AccessLog(settings.log_format) if settings.access_log and AccessLog.enabled() else None
        )
        self.access_log = access  # flushed at stop: its lines are buffered
        self.tracing: Tracing | None = None
        if settings.tracing is not None:
            from tollgate.observability.tracing import Tracing

            self.tracing = Tracing(settings.tracing)
        self.observer = (
            Observer(self.metrics, access, self.tracing)
            if self.metrics is not None or access is not None or self.tracing is not None
            else None
        )
        if self.metrics is not None:
            self.admission.on_refusal = self._count_refusal
        self.ops = Ops(store, AdminRules.from_settings(settings.raw), self.metrics)
        # `/metrics` on this port (for admins), unless it has a port of its own.
        self._metrics_here = self.metrics is not None and settings.metrics_port is None
        self._metrics_runner: web.AppRunner | None = None
        # Balancer state lives in `store.balancers`, one registry beside the swapped snapshot.
        self.timeouts = Timeouts(
            settings.connect_timeout_s, settings.read_timeout_s, settings.write_stall_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._settling: set[asyncio.Task[None]] = set()  # see _settle_later
        self.features = features.FeatureCalls(
            lambda: self.session,
            self.per_request_keys,
            self.shared_keys,
            self.timeouts,
            end_hop=self._end_hop,
            authorization_is_api_key=_authorization_is_api_key,
            read_body=self.read_body,
        )
        self.interceptors = Interceptors(
            self.per_request_keys,
            self.shared_keys,
            self.timeouts,
            session=lambda: self.session,
            read_body=self.read_body,
            end_hop=self._end_hop,
            authorization_is_api_key=_authorization_is_api_key,
            finish=self.deployment_call,
        )
        self.routes = RouteCalls(
            lambda: self.session,
            self.ledger,
            self.timeouts,
            read_body=self.read_body,
            authorization_is_api_key=_authorization_is_api_key,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the gateway has not started"
        return self._session

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, ttl_dns_cache=300),
            timeout=self.timeouts.default,  # each call passes its deployment's (attempts.py)
            # Upstream bodies are relayed and parsed as they are (spec proxy 5.3): requests ask
            # for `Accept-Encoding: identity` (see forward.py), and nothing is decompressed.
            auto_decompress=False,
            # One session serves every caller: cookies an upstream sets must never be sent on
            # another caller's request (and keeping none saves a jar lookup per call).
            cookie_jar=aiohttp.DummyCookieJar(),
            # Traced: the call's span context goes on every upstream request (tracing.py).
            trace_configs=None if self.tracing is None else [self.tracing.client_trace()],
        )
        await self.ledger.start()
        self.store.start(asyncio.get_running_loop())
        port = self.settings.metrics_port
        if self.metrics is not None and port is not None:
            self._metrics_runner = web.AppRunner(metrics_app(self.ops), access_log=None)
            await self._metrics_runner.setup()
            host = self.settings.metrics_host or self.settings.host
            await web.TCPSite(self._metrics_runner, host, port).start()

    async def stop(self) -> None:
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.store.stop()
        if self._session is not None:
            await self._session.close()
        while self._settling:  # calls that finished before the stop are charged
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.ledger.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.shared_keys is not None:
            await self.shared_keys.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.tracing is not None:  # the spans still queued are exported
            await asyncio.to_thread(self.tracing.shutdown)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request enters here. Every answer allows any origin (spec proxy 2)."""
        routed: web.StreamResponse | DeploymentCall | AsyncAnswer | None = None
        try:
            if "Expect" in request.headers:
                await _expect(request)
            try:
                routed = self._route(request)
            except RemoteKeyLookup as lookup:
                routed = self._route(request, await self._remote_principal(lookup))
            if isinstance(routed, DeploymentCall):
                response = await (
                    self.deployment_call(request, *routed)
                    if self.observer is None
                    else self._observed_call(request, routed, self.observer)
                )
            elif isinstance(routed, AsyncAnswer):
                response = await (
                    routed.answer
                    if self.tracing is None
                    else self.tracing.around(request, routed.span, routed.answer)
                )
                if routed.counted is not None and self.metrics is not None:
                    self.metrics.endpoint(*routed.counted, response.status)
            else:
                response = routed
        except GatewayError as error:
            response = error_response(error)
            if isinstance(routed, AsyncAnswer) and routed.counted and self.metrics is not None:
                self.metrics.endpoint(*routed.counted, error.status)
            if routed is None and self.observer is not None:
                self._observe_refusal(request, error.status, self.observer)
        except Exception:
            # A bug must still answer in DIAL's error shape, and must not log request data.
            log.exception("unexpected error on %s %s", request.method, request.path)
            response = error_response(GatewayError(500, "Internal server error"))
        if not response.prepared:  # a streamed answer carries the header already
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def _remote_principal(self, lookup: RemoteKeyLookup) -> Principal:
        """A per-request key minted by another instance, from the shared store."""
        assert self.shared_keys is not None
        principal = await self.shared_keys.lookup(lookup.digest)
        if principal is None:
            raise unknown_api_key()
        return principal

    async def _observed_call(
        self, request: web.Request, call: DeploymentCall, observer: Observer
    ) -> web.StreamResponse:
        """`deployment_call`, recorded in the metrics, the access log and its span (each when
        on) once it settled."""
        note = observer.begin(request.headers, call.principal, call.api)
        status = 500
        try:
            response = await self.deployment_call(request, *call, note=note)
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

    def _observe_refusal(self, request: web.Request, status: int, observer: Observer) -> None:
        """A deployment call refused before its caller was known (401, 400, 413...)."""
        if request.method != "POST":
            return
        call = DEPLOYMENT_CALL.fullmatch(request.raw_path.partition("?")[0])
        if call is not None:
            note = observer.begin(request.headers, None, call[2])
            observer.end(note, request.headers, None, call[1], status, timed=False)

    def _count_refusal(self, ask: Ask, refusal: Refusal) -> None:
        assert self.metrics is not None
        project = ask.bucket.removeprefix("Keys/")
        window = refusal.exceeded[0] if refusal.exceeded else ""
        self.metrics.rejected(project, ask.entity, refusal.kind, window)

    def _route(
        self, request: web.Request, principal: Principal | None = None
    ) -> web.StreamResponse | DeploymentCall | AsyncAnswer:
        """DIAL's front door (spec proxy 2) and authentication; then either the answer of a
        quick handler, or the deployment call to make."""
        method = request.method
        if request.version != aiohttp.HttpVersion11:
            raise GatewayError(505, "HTTP version is not supported")
        if method == "OPTIONS":
            return _preflight(request)
        if method not in ALLOWED_METHODS:
            raise GatewayError(405, "Method is not allowed")
        length = request.content_length
        if length is not None and length > self.settings.max_body_size:
            raise GatewayError(413, "Request body is too large")
        path = request.raw_path.partition("?")[0]
        if method == "GET":
            if path == "/health":
                store = describe(self.ledger)
                status = "ok" if store["healthy"] else "degraded"
                return web.json_response({"status": status, "limits": store})
            if path == "/version":
                return web.Response(text=__version__)
            if path == "/openapi.json":  # public, like /health: it names no secret
                return openapi_response()
        snapshot = self.store.current
        if principal is None:
            principal = self.authenticator.authenticate(request.headers, request, snapshot)
        if method == "POST":
            call = DEPLOYMENT_CALL.fullmatch(path)
            if call is not None:
                return DeploymentCall(principal, snapshot, call[1], call[2])
            if OPS_RELOAD.fullmatch(path):  # administrators only (spec auth-limits 6.4)
                return self.ops.reload(principal)
        elif method == "GET" and path == "/metrics" and self._metrics_here:
            return self.ops.metrics_for(principal)  # administrators only: see http/ops.py
        for route_method, pattern, feature in FEATURE_ROUTES:
            if route_method == method:
                match = pattern.fullmatch(path)
                if match is not None:
                    # Labelled by a deployment the config names, never an id a client made up.
                    known = snapshot.resolve(decode_id(match[1]))
                    return AsyncAnswer(
                        self.features.call(request, principal, snapshot, match[1], feature),
                        f"{method} {feature.name}",
                        (feature.name, "" if known is None else known.name, principal.project),
                    )
        if method == "GET":
            for pattern, async_handler in ASYNC_ROUTES:
                match = pattern.fullmatch(path)
                if match is not None:
                    return AsyncAnswer(
                        async_handler(self, request, principal, snapshot, match), "GET limits"
                    )
        for route_method, pattern, handler in ROUTES:
            if route_method == method:
                match = pattern.fullmatch(path)
                if match is not None:
                    return handler(request, principal, snapshot, match)
        # Anything else goes to the configured routes (spec proxy 3, 10), first match wins.
        route = snapshot.routes.match(method, request.raw_path) if snapshot.routes else None
        if route is not None:
            return AsyncAnswer(
                self.routes.call(request, principal, snapshot, route),
                f"{method} {route.name}",
                ("route", route.name, principal.project),
            )
        raise no_route()

    async def deployment_call(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        raw_id: str,
        api: str,
        *,
        chained: bool = False,
        note: CallNote | None = None,
    ) -> web.StreamResponse:
        """POST /openai/deployments/{id}/(chat/completions|completions|embeddings).

        `chained`: called by the end of an interceptor chain, which this call has run through.
        `note`: what the call reports to the metrics and the access log, when they are on.
        """
        if "application/json" not in request.headers.get("Content-Type", "").lower():
            raise GatewayError(415, "Only application/json is supported")
        if raw_id == INTERCEPTOR_ID:  # an interceptor's callback (spec proxy 8)
            return await self.interceptors.next(request, principal, snapshot, note)
        deployment = resolve(snapshot, raw_id)
        if note is not None:
            note.deployment = deployment.name
        authorize(principal, deployment)
        if deployment.endpoint_url is None:
            raise GatewayError(503, f"Deployment has no endpoint: {deployment.name}")
        if deployment.interceptors and not chained:
            return await self.interceptors.enter(
                request, principal, snapshot, deployment, raw_id, api
            )
        body = await self.read_body(request)
        parsed = parse_body(body)
        key, handle = self.per_request_keys.mint(principal, deployment.name)
        shared = self.shared_keys
        # With Redis, the hop's key is published while the call is admitted: both commands
        # leave in one write, one round trip instead of two.
        publishing = (
            None
            if shared is None
            else asyncio.ensure_future(shared.publish(handle, principal.via(deployment.name)))
        )
        ticket: Ticket | None = None
        relayed: Relayed | None = None
        try:
            admission = self.admission
            ticket = (
                admission.admit_now(snapshot, principal, deployment, api, body, parsed)
                if admission.synchronous
                else await admission.admit(snapshot, principal, deployment, api, body, parsed)
            )
            body = enhance(body, parsed, deployment)
            assistant = None
            if deployment.kind is Kind.ASSISTANT:  # prompt, addons, model (spec proxy 9)
                assistant = assistant_request(parsed, snapshot, principal, deployment)
                body = assistant.body
            if publishing is not None:
                await publishing  # the key must be readable everywhere before it is sent
            url = upstream_url(deployment, request.raw_path.partition("?")[2])
            headers = upstream_headers(
                request.headers.items(),
                key,
                forward_authorization=(
                    deployment.forward_auth_token and not _authorization_is_api_key(request)
                ),
            )
            if assistant is not None:
                headers = addon_headers(headers, assistant.headers)
            # Balancer, retries and timeouts (spec proxy 6, DECISIONS 5), then the relay.
            relayed = await send(
                self.session,
                request,
                snapshot,
                deployment,
                url,
                headers,
                body,
                self.timeouts,
                keep=ticket is not None and _prices_by_characters(ticket.prices),
                # DIAL deletes the hop's key when its caller disconnects (spec auth-limits
                # 3.5); the drain for usage must not keep it alive.
                on_client_gone=lambda: self._end_hop(handle),
                note=note,
            )
            if note is not None:
                note.usage = relayed.usage
            return relayed.response
        finally:
            if publishing is not None and not publishing.done():
                await publishing  # a refused call: its key's SET must not land after the DEL
            self._end_hop(handle)
            if ticket is not None:
                # Settled whatever happened: a failed call releases its reservation.
                charge = charge_for(
                    ticket,
                    relayed.response.status if relayed else 0,
                    relayed.usage if relayed else None,
                    parsed,
                    relayed.body if relayed else b"",
                    relayed is not None and relayed.streamed,
                    api,
                    # Charged in today's periods: a reload may have changed the schedule
                    # since this call was admitted.
                    self.store.current.clock,
                )
                if note is not None:
                    note.cost_nano = charge.cost_nano
                if self.settle_now is not None:
                    self.settle_now(charge)
                elif len(self._settling) < MAX_SETTLING:
                    self._settle_later(charge)
                else:  # the store is that far behind: this caller waits for it
                    await self.ledger.settle(charge)

    def _settle_later(self, charge: Charge) -> None:
        """Settle with the shared store in the background: the caller has its whole answer and
        need not wait one more round trip. Pending settles are awaited when the gateway stops
        (`stop`), so none is lost on shutdown."""
        task = asyncio.get_running_loop().create_task(self.ledger.settle(charge))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The resilient ledger handles store failures itself; anything else is a bug.
            log.error("settling a call failed", exc_info=task.exception())

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, or DIAL's 413 / 422, or 408 when it does not come in time."""
        try:
            if request.content.is_eof():  # the body came with the headers: no timer needed
                return await request.read()
            # A body that trickles or never ends must not hold the call (and its slot) forever.
            async with asyncio.timeout(self.settings.body_read_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(413, "Request body is too large") from None
        except TimeoutError:
            raise GatewayError(408, "Failed to receive body") from None
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            aiohttp.ClientPayloadError,
            web.RequestPayloadError,  # the client closed or broke its side mid-body
        ):
            raise GatewayError(422, "Failed to receive body") from None

    def _end_hop(self, handle: bytes) -> None:
        """The hop's per-request key dies here (it may be called twice: harmless)."""
        if self.per_request_keys.invalidate(handle) and self.shared_keys is not None:
            self.shared_keys.revoke(handle)


def _prices_by_characters(prices: Prices | None) -> bool:
    return prices is not None and prices.unit == "char_without_whitespace"


def _authorization_is_api_key(request: web.Request) -> bool:
    """True when `Authorization` carries the API key itself (the openai SDK sends it there).

    `forwardAuthToken` exists to pass a user's token on; forwarding a project key instead would
    hand the caller's secret to the upstream, so that one is never forwarded (DECISIONS 11).
    """
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return False
    api_key = request.headers.get("Api-Key")
    parts = authorization.split(" ", 2)
    token = parts[1] if len(parts) > 1 else ""
    return api_key is None or not token or token == api_key


async def _expect(request: web.Request) -> None:
    """`Expect: 100-continue` (curl sends it before bodies over 1 KiB): the client may send
    the body. Any other expectation: 417 (RFC 9110 10.1.1)."""
    if request.headers["Expect"].lower() != "100-continue":
        raise GatewayError(417, "Expectation failed")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim answer is not part of the response


def _preflight(request: web.Request) -> web.Response:
    """CORS pre-flight: 200, no auth, requested methods and headers echoed (spec proxy 2)."""
    headers = {"Access-Control-Max-Age": "86400"}
    requested_method = request.headers.get("Access-Control-Request-Method")
    if requested_method is not None:
        headers["Access-Control-Allow-Methods"] = requested_method
    requested_headers = request.headers.get("Access-Control-Request-Headers")
    if requested_headers is not None:
        headers["Access-Control-Allow-Headers"] = requested_headers
    return web.Response(headers=headers)


class AsyncAnswer(NamedTuple):
    """A handler that must wait for the ledger or an upstream."""

    answer: Coroutine[Any, Any, web.StreamResponse]
    span: str = ""  # the name of its span, when traced
    # Counted in `tollgate_endpoint_requests` as (endpoint, target, project); None: not counted.
    counted: tuple[str, str, str] | None = None


AsyncHandler = Callable[
    [Gateway, web.Request, Principal, Snapshot, re.Match[str]],
    Coroutine[Any, Any, web.StreamResponse],
]

# Feature endpoints (spec proxy 3, 14), DIAL's patterns: rate has no `deployments/` segment.
# Checked before ROUTES, whose `/v1/deployments/(.+?)` would take `.../configuration` as an id.
FEATURE_ROUTES: tuple[tuple[str, re.Pattern[str], features.Feature], ...] = (
    ("POST", re.compile(r"/+v1/(.+?)/rate"), features.RATE),
    ("POST", re.compile(r"/+v1/deployments/(.+?)/tokenize"), features.TOKENIZE),
    ("POST", re.compile(r"/+v1/deployments/(.+?)/truncate_prompt"), features.TRUNCATE_PROMPT),
    ("GET", re.compile(r"/+v1/deployments/(.+?)/configuration"), features.CONFIGURATION),
)

# Checked before ROUTES: these paths would otherwise match `/v1/deployments/(.+?)`.
ASYNC_ROUTES: tuple[tuple[re.Pattern[str], AsyncHandler], ...] = (
    (
        re.compile(r"/+v1/deployments/(.+?)/limits"),
        lambda g, r, p, s, m: g.limits_api.deployment(s, p, m[1]),
    ),
    (
        re.compile(r"/+v1/user/limits"),
        lambda g, r, p, s, m: g.limits_api.user(r, s, p, used_only=False),
    ),
    (
        re.compile(r"/+v1/user/usage"),
        lambda g, r, p, s, m: g.limits_api.user(r, s, p, used_only=True),
    ),
)

# --- route table: (method, raw-path regex, handler); leading `/+` as in DIAL (spec proxy 3) -----

Handler = Callable[[web.Request, Principal, Snapshot, re.Match[str]], web.StreamResponse]


def _get(pattern: str, handler: Handler) -> tuple[str, re.Pattern[str], Handler]:
    return ("GET", re.compile(pattern), handler)


ROUTES: tuple[tuple[str, re.Pattern[str], Handler], ...] = (
    _get(r"/+openai/deployments", lambda r, p, s, m: catalog.listing(s.deployments_listing, p)),
    _get(
        r"/+openai/deployments/(.+?)",
        lambda r, p, s, m: catalog.single(s.deployments_listing, p, m[1], "Deployment"),
    ),
    _get(r"/+openai/models", lambda r, p, s, m: catalog.listing(s.models, p)),
    _get(r"/+openai/models/(.+?)", lambda r, p, s, m: catalog.single(s.models, p, m[1], "Model")),
    _get(r"/+openai/applications", lambda r, p, s, m: catalog.listing(s.applications, p)),
    _get(r"/+openai/applications/(.+?)", lambda r, p, s, m: catalog.application(s, p, m[1])),
    _get(r"/+openai/assistants", lambda r, p, s, m: catalog.listing(s.assistants, p)),
    _get(
        r"/+openai/assistants/(.+?)",
        lambda r, p, s, m: catalog.single(s.assistants, p, m[1], "Assistant"),
    ),
    _get(r"/+openai/addons", lambda r, p, s, m: catalog.listing(s.addons, p)),
    _get(r"/+openai/addons/(.+?)", lambda r, p, s, m: catalog.single(s.addons, p, m[1], "Addon")),
    _get(r"/+v1/deployments", lambda r, p, s, m: catalog.all_deployments(s, p)),
    _get(r"/+v1/deployments/(.+?)", lambda r, p, s, m: catalog.one_deployment(s, p, m[1])),
    _get(r"/+v1/user/info", lambda r, p, s, m: catalog.user_info(p)),
)


def build_server(gateway: Gateway) -> web.Server:
    """aiohttp's low-level server: every request goes to `Gateway.handle` as it is, with no
    router, sub-application or middleware in between (`_route` is Tollgate's router); that
    layer cost about 15% of the throughput of a plain model call in `bench/`.

    Runs inside the event loop; the caller starts and stops `gateway` around it (see
    `tollgate.cli`).
    """
    settings = gateway.settings
    loop = asyncio.get_running_loop()
    max_body = settings.max_body_size

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.Request(message, payload, protocol, writer, task, loop, client_max_size=max_body)

    protocol_errors.install()  # no request bytes from aiohttp's own 400s in the log
    handler = cast(Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], gateway.handle)
    return web.Server(
        handler,
        request_factory=make_request,
        access_log=None,  # Tollgate's own (observability/logs.py)
        keepalive_timeout=settings.keep_alive_timeout_s,
        max_line_size=settings.max_header_size,
        max_field_size=settings.max_header_size,
        max_headers=settings.max_headers,
    )
