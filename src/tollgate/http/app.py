"""The HTTP edge: the front door, authentication, dispatch, and rendering of errors.

The gateway only composes the parts and routes requests to them; every step of a call lives in
`tollgate.pipeline` (`deployments` orders them). See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from tollgate import __version__
from tollgate.config_store import ConfigStore
from tollgate.errors import GatewayError, no_route
from tollgate.http import anthropic, catalog, protocol_errors
from tollgate.http.attachments import AttachmentAccess
from tollgate.http.config_api import ConfigApi
from tollgate.http.custom_apps import CustomApplications
from tollgate.http.limits_api import LimitsApi
from tollgate.http.openapi import openapi_response
from tollgate.http.ops import Ops, metrics_app
from tollgate.http.resource_ops import ResourceOps
from tollgate.http.resources_api import ResourcesApi
from tollgate.http.responses import error_response
from tollgate.limits.ledger import Ask, Refusal
from tollgate.limits.store import build_ledger, describe, redis_client
from tollgate.managed.registry import ManagedConfig
from tollgate.observability.calls import Observer
from tollgate.observability.logs import AccessLog
from tollgate.observability.metrics import Metrics, StoreView
from tollgate.pipeline import features, response_items
from tollgate.pipeline.admit import Admission, wall_clock_ms
from tollgate.pipeline.authenticate import Authenticator, KeyRefused
from tollgate.pipeline.call import Call
from tollgate.pipeline.deployments import DeploymentCalls
from tollgate.pipeline.hop import HopEngine, Timeouts
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.pipeline.resolve import decode_id
from tollgate.pipeline.response_items import ResponseItems
from tollgate.pipeline.route_call import RouteCalls
from tollgate.pipeline.settle import Settler
from tollgate.pipeline.upstream_client import UpstreamClient
from tollgate.resources.events import ResourceEvents
from tollgate.resources.sharing import Sharing
from tollgate.security.admin import AdminRules
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import SharedKeys
from tollgate.settings import Settings
from tollgate.snapshot import Snapshot, known_roles
from tollgate.storage.build import build_notices, build_store
from tollgate.storage.settings import StorageSettings

if TYPE_CHECKING:  # the optional `otel` extra: imported only when tracing is configured
    from tollgate.observability.tracing import Tracing

log = logging.getLogger("tollgate.http")

ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"})
DEPLOYMENT_CALL = re.compile(
    r"/+openai/deployments/(.+?)/(chat/completions|completions|embeddings)"
)
OPS_RELOAD = re.compile(r"/+v1/ops/config/reload")
FILE_UPLOAD = re.compile(r"/+v1/files/")
# Calls that name their deployment in the body's `model` (compatibility C76), by API.
TYPED_CALL = re.compile(r"/+(openai/v1/responses|anthropic/v1/messages(?:/count_tokens)?)")
RESPONSE_ITEM = re.compile(r"/+openai/v1/responses/([^/]+)(/cancel)?")
TYPED_APIS = {
    "openai/v1/responses": "responses",
    "anthropic/v1/messages": "anthropic/messages",
    "anthropic/v1/messages/count_tokens": "anthropic/messages/count_tokens",
}


class Gateway:
    """One gateway process: the live config, per-request keys and the upstream client."""

    def __init__(
        self,
        settings: Settings,
        store: ConfigStore,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        """`now_ms`: the wall clock limits are counted by, in epoch milliseconds (tests set
        their own)."""
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
        # Keys and roles of the Configuration API, in the resource store (compatibility C81).
        storage = StorageSettings.from_raw(settings.raw)  # `tollgate serve` checked it
        # One resource store for everything Tollgate keeps: keys, roles, buckets (C80).
        self.resource_store = build_store(storage)
        self.managed = ManagedConfig(
            self.resource_store,
            build_notices(settings.redis, storage),
            now_ms=now_ms,
            rescan_every_s=settings.reload_ms / 1000,
            file_key=lambda digest: store.current.keys.lookup_digest(digest) is not None,
            known_roles=lambda: known_roles(store.current),
            roles_changed=store.set_api_roles,
        )
        self.authenticator = Authenticator(
            self.per_request_keys,
            settings.proxy_count,
            self.shared_keys,
            self.managed,
            now_ms,
        )
        self.admission = Admission(
            self.ledger,
            reserve=settings.admission == "reserve",
            default_completion_tokens=settings.default_completion_tokens,
            now_ms=now_ms,
        )
        self.limits_api = LimitsApi(self.ledger, now_ms)
        # Telemetry (compatibility C54, C55): None when off, so a call pays one attribute check.
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
        admins = AdminRules.from_settings(settings)
        self.ops = Ops(store, admins, self.metrics, self.managed.rescan)
        self.config_api = ConfigApi(
            self.managed, admins, settings.body_read_timeout_s, settings.max_body_size
        )
        sharing = Sharing(self.resource_store, now_ms)
        self.resources_api = ResourcesApi(
            self.resource_store,
            settings.raw,
            admins,
            max_upload_bytes=storage.max_uploaded_file_size,
            max_body_bytes=settings.max_body_size,
            body_timeout_s=settings.body_read_timeout_s,
            sharing=sharing,
        )
        # Moves, copies, the Share API and invitations (compatibility C88).
        self.resource_ops = ResourceOps(
            self.resources_api,
            sharing,
            lambda: store.current.config.roles,
            default_ttl_ms=(
                None if settings.invitation_ttl_s is None else settings.invitation_ttl_s * 1000
            ),
            body_timeout_s=settings.body_read_timeout_s,
            heartbeat_s=settings.heartbeat_ms / 1000,
        )
        self.resources_api.on_delete = self.resource_ops.forget
        # Resource change events for subscribers, over the same notices as keys (C94).
        self.resource_events = ResourceEvents(self.managed.notices)
        self.resources_api.events = self.resource_ops.events = self.resource_events
        # Custom applications callable as deployments, and listed (compatibility C92).
        self.custom_apps = CustomApplications(
            self.resources_api, include_in_listing=settings.include_custom_apps
        )
        # `/metrics` on this port (for admins), unless it has a port of its own.
        self._metrics_here = self.metrics is not None and settings.metrics_port is None
        self._metrics_runner: web.AppRunner | None = None
        self._client: UpstreamClient | None = None
        # The call path: one hop engine for every kind of hop, the steps around it.
        self.engine = HopEngine(
            Timeouts(
                settings.connect_timeout_s,
                settings.read_timeout_s,
                settings.write_stall_timeout_s,
            )
        )
        keys = HopKeys(self.per_request_keys, self.shared_keys)
        # Settled in the current snapshot's periods (see `settle.charge_for`).
        self.settler = Settler(self.ledger, lambda: store.current.clock, now_ms)
        body_timeout_s = settings.body_read_timeout_s
        self.deployments = DeploymentCalls(
            self.engine,
            keys,
            self.admission,
            self.settler,
            body_timeout_s=body_timeout_s,
            enforce_during_stream=settings.enforce_during_stream,
            custom=self.custom_apps.resolve,
            # What a request attaches, checked and given to the hop's key (compatibility C93).
            attachments=AttachmentAccess(self.resources_api),
        )
        self.features = features.FeatureCalls(self.engine, keys, body_timeout_s)
        self.routes = RouteCalls(self.engine, self.admission, body_timeout_s)
        self.response_items = ResponseItems(self.engine, keys, body_timeout_s)

    async def start(self) -> None:
        # The upstream client (pipeline/upstream_client.py): no cookies are kept (one client
        # serves every caller), nothing is decompressed (compatibility C25, C26).
        self._client = UpstreamClient(
            # Bounded per upstream (host and port) too: a caller that floods one slow upstream
            # must not take the whole pool from every other caller (compatibility C68).
            limit=self.settings.max_connections,
            limit_per_upstream=self.settings.max_connections_per_upstream,
            # Traced: the call's span context goes on every upstream request (tracing.py).
            on_request=None if self.tracing is None else self.tracing.inject,
        )
        self.engine.start(self._client)
        await self.ledger.start()
        await self.managed.start()  # the store unreachable: logged, file keys serve meanwhile
        await self.resources_api.start()
        self.store.start(asyncio.get_running_loop())
        port = self.settings.metrics_port
        if self.metrics is not None and port is not None:
            self._metrics_runner = web.AppRunner(metrics_app(self.ops), access_log=None)
            await self._metrics_runner.setup()
            host = self.settings.metrics_host or self.settings.host
            await web.TCPSite(self._metrics_runner, host, port).start()

    async def closing(self) -> None:
        """The server is about to stop: end the streams that would otherwise run until the
        grace period cuts them (resource subscriptions)."""
        await self.resource_events.close()

    async def stop(self) -> None:
        await self.resource_events.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        await self.store.stop()
        if self._client is not None:
            await self._client.close()
        self.engine.stalls.stop()
        await self.settler.drain()  # calls that finished before the stop are charged
        await self.ledger.close()
        await self.managed.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.shared_keys is not None:
            await self.shared_keys.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.tracing is not None:  # the spans still queued are exported
            await asyncio.to_thread(self.tracing.shutdown)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request enters here. Every answer allows any origin (compatibility C21)."""
        routed: web.StreamResponse | Call | AsyncAnswer | None = None
        try:
            routed = self._front_door(request)
            if routed is None:
                snapshot = self.store.current
                principal = self.authenticator.authenticate(request.headers, request, snapshot)
                if not isinstance(principal, Principal):  # a key from the shared store
                    principal = await principal
                routed = self._route(request, principal, snapshot)
            if type(routed) is Call:
                observer = self.observer
                response = await (
                    self.deployments.run(routed)
                    if observer is None
                    else self.deployments.observed(routed, observer)
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
                assert isinstance(routed, web.StreamResponse)
                response = routed
        except GatewayError as error:
            response = (
                anthropic.error_response(error)
                if anthropic.is_anthropic_path(request.raw_path)
                else error_response(error)
            )
            if isinstance(routed, AsyncAnswer) and routed.counted and self.metrics is not None:
                self.metrics.endpoint(*routed.counted, error.status)
            if routed is None and self.observer is not None:
                self._observe_refusal(request, error, self.observer)
        except Exception:
            # A bug must still answer in DIAL's error shape, and must not log request data.
            log.exception("unexpected error on %s %s", request.method, request.path)
            response = error_response(GatewayError(500, "Internal server error"))
        if not response.prepared:  # a streamed answer carries the header already
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    def _observe_refusal(
        self, request: web.Request, error: GatewayError, observer: Observer
    ) -> None:
        """A deployment call refused before its caller was known (401, 400, 413...); a known
        key refused (expired) is named, with the reason."""
        if request.method != "POST":
            return
        path = request.raw_path.partition("?")[0]
        principal, reason = (
            (error.principal, error.reason) if isinstance(error, KeyRefused) else (None, None)
        )
        call = DEPLOYMENT_CALL.fullmatch(path)
        if call is not None:
            api, raw_id = call[2], call[1]
        else:
            typed = TYPED_CALL.fullmatch(path)
            if typed is None:
                return
            api, raw_id = TYPED_APIS[typed[1]], ""  # its deployment is in a body not read
        note = observer.begin(request.headers, principal, api)
        note.reason = reason
        observer.end(note, request.headers, principal, raw_id, error.status, timed=False)

    def _count_refusal(self, ask: Ask, refusal: Refusal) -> None:
        assert self.metrics is not None
        project = ask.bucket.removeprefix("Keys/")
        window = refusal.exceeded[0] if refusal.exceeded else ""
        self.metrics.rejected(project, ask.entity, refusal.kind, window)

    def _front_door(self, request: web.Request) -> web.StreamResponse | None:
        """DIAL's front door (compatibility C21): what is refused or answered before the caller
        is known. None: the request goes on to authentication."""
        method = request.method
        if request.version != aiohttp.HttpVersion11:
            raise GatewayError(505, "HTTP version is not supported")
        if method == "OPTIONS":
            return _preflight(request)
        if method not in ALLOWED_METHODS:
            raise GatewayError(405, "Method is not allowed")
        headers = request.headers
        length = request.content_length
        if (
            length is not None
            and length > self.settings.max_body_size
            # A file upload has a limit of its own (`storage.maxUploadedFileSize`, checked by
            # the Files API as it streams the body to the store): not `resources.maxSize`.
            and not (method == "PUT" and FILE_UPLOAD.match(request.raw_path))
        ):
            raise GatewayError(413, "Request body is too large")
        if "Transfer-Encoding" in headers:
            _check_transfer_coding(headers.getall("Transfer-Encoding"))
        if "Content-Encoding" in headers:  # compressed bodies are refused (compatibility C62)
            _check_content_encoding(headers.getall("Content-Encoding"))
        if "Expect" in headers and headers["Expect"].lower() != "100-continue":
            # RFC 9110 10.1.1; `100-continue` is answered when the body is read (forward.py,
            # compatibility C63).
            raise GatewayError(417, "Expectation failed")
        if method == "GET":
            path = request.raw_path.partition("?")[0]
            if path == "/health":
                store = describe(self.ledger)
                resources = self.managed.describe()
                healthy = store["healthy"] and resources["healthy"]
                return web.json_response(
                    {
                        "status": "ok" if healthy else "degraded",
                        "limits": store,
                        "resources": resources,
                    }
                )
            if path == "/version":
                return web.Response(text=__version__)
            if path == "/openapi.json":  # public, like /health: it names no secret
                return openapi_response()
        return None

    def _feature(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        method: str,
        path: str,
    ) -> AsyncAnswer | None:
        """A feature endpoint's call (compatibility C43), or None if `path` is none."""
        for route_method, pattern, feature in FEATURE_ROUTES:
            if route_method == method:
                match = pattern.fullmatch(path)
                if match is not None:
                    # Labelled by a deployment the config names, never an id a client made up.
                    known = snapshot.resolve(decode_id(match[1]))
                    return AsyncAnswer(
                        self.features.call(Call(request, principal, snapshot, match[1]), feature),
                        f"{method} {feature.name}",
                        (feature.name, "" if known is None else known.name, principal.project),
                    )
        return None

    def _route(
        self, request: web.Request, principal: Principal, snapshot: Snapshot
    ) -> web.StreamResponse | Call | AsyncAnswer:
        """The authenticated request's handler: the answer of a quick one, the deployment call
        to make, or an answer to await."""
        method = request.method
        path = request.raw_path.partition("?")[0]
        if method == "POST":
            call = DEPLOYMENT_CALL.fullmatch(path)
            if call is not None:
                return Call(request, principal, snapshot, call[1], call[2])
            typed = TYPED_CALL.fullmatch(path)
            if typed is not None:
                return Call(request, principal, snapshot, "", TYPED_APIS[typed[1]])
            if OPS_RELOAD.fullmatch(path):  # administrators only (compatibility C53)
                return AsyncAnswer(self.ops.reload(principal), "POST config reload")
            if path.endswith("/rate"):
                # Before the resource routes: `/v1/<id>/rate` is a deployment's feature even
                # when its id starts with `files`, `conversations` or `applications`.
                feature = self._feature(request, principal, snapshot, method, path)
                if feature is not None:
                    return feature
        elif method == "GET" and path == "/metrics" and self._metrics_here:
            return self.ops.metrics_for(principal)  # administrators only: see http/ops.py
        if self.config_api.handles(path):  # keys and roles at run time (compatibility C81)
            return AsyncAnswer(self.config_api.handle(request, principal, path), f"{method} config")
        if self.resources_api.handles(path):  # buckets (compatibility C83)
            return AsyncAnswer(
                self.resources_api.handle(request, principal, path), f"{method} resources"
            )
        if self.resource_ops.handles(path):  # moves, sharing (compatibility C88)
            return AsyncAnswer(
                self.resource_ops.handle(request, principal, path), f"{method} resource ops"
            )
        if method in ("GET", "DELETE", "POST"):
            item = RESPONSE_ITEM.fullmatch(path)
            if item is not None:  # a follow-up on a stored response (compatibility C78)
                operation = response_items.operation(method, item[2] is not None)
                if operation is not None:
                    return AsyncAnswer(
                        self.response_items.call(
                            Call(request, principal, snapshot), operation, item[1]
                        ),
                        f"{method} response",
                    )
        routed = self._feature(request, principal, snapshot, method, path)
        if routed is not None:
            return routed
        if method == "GET":
            for pattern, async_handler, span in ASYNC_ROUTES:
                match = pattern.fullmatch(path)
                if match is not None:
                    return AsyncAnswer(
                        async_handler(self, request, principal, snapshot, match), span
                    )
        for route_method, pattern, handler in ROUTES:
            if route_method == method:
                match = pattern.fullmatch(path)
                if match is not None:
                    return handler(request, principal, snapshot, match)
        # Anything else goes to the configured routes (compatibility C44), first match wins.
        route = snapshot.routes.match(method, request.raw_path) if snapshot.routes else None
        if route is not None:
            return AsyncAnswer(
                self.routes.call(Call(request, principal, snapshot), route),
                f"{method} {route.name}",
                ("route", route.name, principal.project),
            )
        raise no_route()


def _check_content_encoding(values: list[str]) -> None:
    """A request body must come as it is: a compressed one would be inflated past every size
    check, and forwarded under a label that no longer fits it (compatibility C62)."""
    for value in values:
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                raise GatewayError(415, f"Unsupported Content-Encoding: {coding.strip()[:32]}")


def _check_transfer_coding(values: list[str]) -> None:
    """`chunked` is the only transfer coding Tollgate reads. Any other (`gzip, chunked`) would
    leave the body framed one way and labelled another, and RFC 9112 6.1 answers it with 501
    (compatibility C69)."""
    for value in values:
        for coding in value.split(","):
            if coding.strip().lower() != "chunked":
                raise GatewayError(501, f"Unsupported Transfer-Encoding: {coding.strip()[:32]}")


def _preflight(request: web.Request) -> web.Response:
    """CORS pre-flight: 200, no auth, requested methods and headers echoed (compatibility C21)."""
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

# Feature endpoints (compatibility C43), DIAL's patterns: rate has no `deployments/` segment.
# Checked before ROUTES, whose `/v1/deployments/(.+?)` would take `.../configuration` as an id.
FEATURE_ROUTES: tuple[tuple[str, re.Pattern[str], features.Feature], ...] = (
    ("POST", re.compile(r"/+v1/(.+?)/rate"), features.RATE),
    ("POST", re.compile(r"/+v1/deployments/(.+?)/tokenize"), features.TOKENIZE),
    ("POST", re.compile(r"/+v1/deployments/(.+?)/truncate_prompt"), features.TRUNCATE_PROMPT),
    ("GET", re.compile(r"/+v1/deployments/(.+?)/configuration"), features.CONFIGURATION),
)

# Checked before ROUTES: these paths would otherwise match `/v1/deployments/(.+?)`; the
# applications' listings may read custom applications from the store (compatibility C92).
ASYNC_ROUTES: tuple[tuple[re.Pattern[str], AsyncHandler, str], ...] = (
    (
        re.compile(r"/+v1/deployments/(.+?)/limits"),
        lambda g, r, p, s, m: g.limits_api.deployment(s, p, m[1]),
        "GET limits",
    ),
    (
        re.compile(r"/+v1/user/limits"),
        lambda g, r, p, s, m: g.limits_api.user(r, s, p, used_only=False),
        "GET limits",
    ),
    (
        re.compile(r"/+v1/user/usage"),
        lambda g, r, p, s, m: g.limits_api.user(r, s, p, used_only=True),
        "GET limits",
    ),
    (
        re.compile(r"/+openai/applications"),
        lambda g, r, p, s, m: g.custom_apps.listing(p, s),
        "GET applications",
    ),
    (
        re.compile(r"/+openai/applications/(.+?)"),
        lambda g, r, p, s, m: g.custom_apps.item(p, s, m[1]),
        "GET applications",
    ),
)

# --- route table: (method, raw-path regex, handler); leading `/+` as in DIAL (compatibility C22) -

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
    _get(r"/+anthropic/v1/models", lambda r, p, s, m: anthropic.models(s, p, r.query)),
    _get(r"/+anthropic/v1/models/(.+?)", lambda r, p, s, m: anthropic.model(s, p, decode_id(m[1]))),
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
        auto_decompress=False,  # request bodies are never inflated (see _check_content_encoding)
    )
