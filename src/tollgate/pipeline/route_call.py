"""A call that a configured route answers (compatibility C44-C46).

The route was chosen by the front door (`RouteTable.match`: methods, then the paths' full match
of the request URI). Then, in DIAL's order:

1. access: `userRoles` absent admits everyone, `[]` nobody, else one shared role; refused →
   403 `Forbidden route` (compatibility C45);
2. limits (newer DIAL, compatibility C45): `roles.<role>.limits.<route name>` as for a model,
   with the route's `userRoles` choosing the roles that count. Requests are counted and checked
   (`requestHour`, `requestDay`), and the caller's cost budget (`costLimit`) is checked; a route
   produces no tokens and no cost, so token windows never fill. A non-positive limit → 403
   `Access denied`; exceeded → 429 with DIAL's message and `Retry-After` (compatibility C18).
   A route no limit applies to is not counted at all;
3. the request body is read (422 `Failed to receive body` if it cannot be);
4. a static `response` answers with its `status` and `body`;
5. otherwise the balancer's upstreams are tried in turn (compatibility C33), each sent the client's
   method, body and headers (hop-by-hop ones, the caller's credentials and Tollgate's own
   `X-UPSTREAM-*` removed; `Authorization` kept unless it carries the caller's API key,
   compatibility C10) with `Api-Key` set to the upstream's `key` (none without one). The URL is the
   upstream's `endpoint`; with `rewritePath` its path is replaced by the request's. The
   request's query string is not sent in either mode, as in DIAL (compatibility C46).
   Only a 429 and a failed connection move on to the next upstream, up to the route's
   `maxRetryAttempts` (default 5); any other answer is relayed as it is, streamed chunk by
   chunk when it has no length or is an event stream.

When the upstreams run out: all of them parked by 429s → 503 `Service is not available` with
`Retry-After` (compatibility C46); the last attempt timed out → 504 `Upstream timed out`; anything
else → 502 `No route`, as DIAL answers for routes.
"""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.pipeline.admit import Admission
from tollgate.pipeline.call import Call
from tollgate.pipeline.forward import client_headers, read_body
from tollgate.pipeline.hop import ROUTE, HopEngine, Outbound
from tollgate.routing.balancer import UpstreamState
from tollgate.routing.routes import ROUTE_RETRIABLE, CompiledRoute, escapes
from tollgate.snapshot import may_use


def forbidden_route() -> GatewayError:
    return GatewayError(403, "Forbidden route")


class RouteCalls:
    """Calls through configured routes; one per gateway."""

    __slots__ = ("_admission", "_body_timeout_s", "_engine")

    def __init__(self, engine: HopEngine, admission: Admission, body_timeout_s: float) -> None:
        self._engine = engine
        self._admission = admission  # its refusal hook counts route refusals too
        self._body_timeout_s = body_timeout_s

    async def call(self, call: Call, route: CompiledRoute) -> web.StreamResponse:
        request = call.request
        if escapes(request.raw_path.partition("?")[0]):
            raise GatewayError(400, "Invalid path")
        if not may_use(route.user_roles, call.principal.role_set):
            raise forbidden_route()
        await self._admission.admit_route(call, route)
        body = await read_body(request, self._body_timeout_s)
        answer = route.answer
        if answer is not None:
            return web.Response(
                status=answer.status, body=answer.body or None, headers=answer.headers
            )
        # `Authorization` is kept unless it carries the caller's API key (compatibility C10, C46).
        headers = client_headers(request, forward_authorization=True)
        # Routes relay bytes they never parse; identity keeps them as the upstream wrote them
        # (DIAL drops the client's Accept-Encoding, compatibility C25).
        headers.append(("Accept-Encoding", "identity"))
        engine = self._engine
        relayed = await engine.send(
            request,
            Outbound(
                request.method,
                "",
                headers,
                body,
                engine.timeouts.default,
                ROUTE,
                route.balancer.plan(route.max_attempts, ROUTE_RETRIABLE),
                _Attempt(route, request.raw_path.partition("?")[0]),
                f"route {route.name}",
            ),
        )
        return relayed.response


class _Attempt:
    """A route attempt's URL and `Api-Key`: the upstream's `endpoint` (its path replaced by the
    request's with `rewritePath`) and the upstream's `key` (none without one)."""

    __slots__ = ("_path", "_route")

    def __init__(self, route: CompiledRoute, path: str) -> None:
        self._route = route
        self._path = path

    def __call__(self, upstream: UpstreamState, headers: list[tuple[str, str]]) -> URL:
        key = upstream.upstream.key
        if key is not None:
            headers.append(("Api-Key", key))
        route = self._route
        url = route.upstream_urls[id(upstream.upstream)]
        if not route.rewrite_path:
            return url
        # The endpoint's path replaced by the request's, as sent; its query kept.
        rewritten = url.with_path(self._path, encoded=True)
        query = url.raw_query_string
        return URL(f"{rewritten}?{query}", encoded=True) if query else rewritten
