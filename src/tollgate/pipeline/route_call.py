"""A call that a configured route answers (spec proxy 10; auth-limits 2.3, 4.1, 5.1).

The route was chosen by the front door (`RouteTable.match`: methods, then the paths' full match
of the request URI). Then, in DIAL's order:

1. access: `userRoles` absent admits everyone, `[]` nobody, else one shared role; refused →
   403 `Forbidden route` (spec auth-limits 4.1; the newer docs' "[] admits all" contradicts
   DIAL's code and tests, which win here);
2. limits (newer DIAL, spec auth-limits 5.1): `roles.<role>.limits.<route name>` as for a model,
   with the route's `userRoles` choosing the roles that count. Requests are counted and checked
   (`requestHour`, `requestDay`), and the caller's cost budget (`costLimit`) is checked; a route
   produces no tokens and no cost, so token windows never fill. A non-positive limit → 403
   `Access denied`; exceeded → 429 with DIAL's message and `Retry-After` (auth-limits 5.8).
   A route no limit applies to is not counted at all;
3. the request body is read (422 `Failed to receive body` if it cannot be);
4. a static `response` answers with its `status` and `body`;
5. otherwise the balancer's upstreams are tried in turn (spec proxy 6.2), each sent the client's
   method, body and headers (hop-by-hop ones, the caller's credentials and Tollgate's own
   `X-UPSTREAM-*` removed; `Authorization` kept unless it carries the caller's API key,
   DECISIONS 11) with `Api-Key` set to the upstream's `key` (none without one). The URL is the
   upstream's `endpoint`; with `rewritePath` its path is replaced by the request's. The
   request's query string is not sent in either mode, as in DIAL (spec proxy 10).
   Only a 429 and a failed connection move on to the next upstream, up to the route's
   `maxRetryAttempts` (default 5); any other answer is relayed as it is, streamed chunk by
   chunk when it has no length or is an event stream.

When the upstreams run out: all of them parked by 429s → 503 `Service is not available` with
`Retry-After` (DECISIONS 5); the last attempt timed out → 504 `Upstream timed out`; anything
else → 502 `No route`, as DIAL answers for routes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.limits.ledger import Ask, Ledger
from tollgate.limits.memory import MemoryLedger
from tollgate.pipeline.admit import bucket_of, rejection
from tollgate.pipeline.attempts import Timeouts
from tollgate.pipeline.forward import DROPPED_HEADERS, DROPPED_WITHOUT_AUTH_FORWARDING
from tollgate.pipeline.relay import response_headers
from tollgate.routing.balancer import AttemptPlan, UpstreamState
from tollgate.routing.routes import ROUTE_RETRIABLE, CompiledRoute
from tollgate.security.principal import Principal
from tollgate.snapshot import Snapshot, may_use

log = logging.getLogger("tollgate.routes")

# A relayed answer this large (or of unknown length) is streamed rather than read whole.
STREAM_ABOVE: Final = 256 * 1024


def forbidden_route() -> GatewayError:
    return GatewayError(403, "Forbidden route")


class RouteCalls:
    """Calls through configured routes; one per gateway."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        ledger: Ledger,
        timeouts: Timeouts,
        *,
        read_body: Callable[[web.Request], Awaitable[bytes]],
        authorization_is_api_key: Callable[[web.Request], bool],
    ) -> None:
        self._session = session
        self._ledger = ledger
        self._admit_now = ledger.admit_now if isinstance(ledger, MemoryLedger) else None
        self._timeouts = timeouts
        self._read_body = read_body
        self._authorization_is_api_key = authorization_is_api_key

    async def call(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        route: CompiledRoute,
    ) -> web.StreamResponse:
        if not may_use(route.user_roles, principal.role_set):
            raise forbidden_route()
        await self._admit(snapshot, principal, route)
        body = await self._read_body(request)
        answer = route.answer
        if answer is not None:
            return web.Response(
                status=answer.status, body=answer.body or None, headers=answer.headers
            )
        dropped = (
            DROPPED_WITHOUT_AUTH_FORWARDING
            if self._authorization_is_api_key(request)
            else DROPPED_HEADERS
        )
        headers = [(n, v) for n, v in request.headers.items() if n.lower() not in dropped]
        # Routes relay bytes they never parse; identity keeps them as the upstream wrote them
        # (DIAL drops the client's Accept-Encoding, spec proxy 5.3).
        headers.append(("Accept-Encoding", "identity"))
        return await self._send(request, route, headers, body)

    async def _admit(self, snapshot: Snapshot, principal: Principal, route: CompiledRoute) -> None:
        """Request and cost limits on the route's name (spec auth-limits 5.1 [newer])."""
        limits = snapshot.limit_policy.limits(principal.role_set, route.name, route.user_roles)
        if limits.unlimited:
            return
        if not limits.positive:
            raise GatewayError(403, "Access denied")
        ask = Ask(
            bucket_of(principal), route.name, limits, snapshot.clock.at(time.time_ns() // 10**6)
        )
        admit_now = self._admit_now
        refusal = admit_now(ask) if admit_now is not None else await self._ledger.admit(ask)
        if refusal is not None:
            raise rejection(refusal)

    async def _send(
        self,
        request: web.Request,
        route: CompiledRoute,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> web.StreamResponse:
        plan = route.balancer.plan(route.max_attempts, ROUTE_RETRIABLE)
        session = self._session()
        timeout = self._timeouts.default
        method = request.method
        common = len(headers)
        timed_out = False
        while (upstream := plan.next()) is not None:
            del headers[common:]  # the previous attempt's Api-Key
            key = upstream.upstream.key
            if key is not None:
                headers.append(("Api-Key", key))
            url = _url(route, upstream, request)
            try:
                answer = await session.request(
                    method, url, data=body, headers=headers, timeout=timeout
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                plan.record_transport_failure()
                log.warning(
                    "route %s: upstream call failed (attempt %d): %s",
                    route.name,
                    plan.attempts,
                    type(exc).__name__,
                )
                continue
            async with answer:
                status = answer.status
                retry_after = answer.headers.get("Retry-After") if status == 429 else None
                if not plan.record(status, retry_after):
                    return await _relay(request, answer, plan.attempts)
            timed_out = False
            log.debug("route %s: upstream answered %d, trying the next", route.name, status)
        raise _exhausted(plan, timed_out)


def _url(route: CompiledRoute, upstream: UpstreamState, request: web.Request) -> URL:
    url = route.upstream_urls[id(upstream.upstream)]
    if not route.rewrite_path:
        return url
    # The endpoint's path replaced by the request's, as sent (spec proxy 10); its query kept.
    rewritten = url.with_path(request.raw_path.partition("?")[0], encoded=True)
    query = url.raw_query_string
    return URL(f"{rewritten}?{query}", encoded=True) if query else rewritten


async def _relay(
    request: web.Request, answer: aiohttp.ClientResponse, attempts: int
) -> web.StreamResponse:
    """The upstream's answer as it is: status, headers minus hop-by-hop ones, body."""
    headers = response_headers(answer.headers, attempts)
    length = answer.content_length
    streamed = request.method != "HEAD" and (
        length is None
        or length > STREAM_ABOVE
        or answer.headers.get("Content-Type", "").startswith("text/event-stream")
    )
    try:
        if not streamed:
            body = await answer.read()
            return web.Response(
                status=answer.status, reason=answer.reason, body=body, headers=headers
            )
        # Sent before the handler returns, so the edge cannot add it later (spec proxy 2).
        headers["Access-Control-Allow-Origin"] = "*"
        response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
        await response.prepare(request)
    except TimeoutError:
        raise GatewayError(504, "Upstream timed out") from None
    except aiohttp.ClientError:
        raise GatewayError(502, "Upstream connection failed") from None
    try:
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        pass  # the client left: the upstream connection is closed with the answer
    except (TimeoutError, aiohttp.ClientError) as exc:
        # The upstream broke off: the client must not take the truncated body for a whole one.
        log.warning("route upstream answer ended abnormally: %s", type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
    return response


def _exhausted(plan: AttemptPlan, timed_out: bool) -> GatewayError:
    """DECISIONS 5 for a route: 503 when every upstream is parked by a 429, 504 after a
    timeout, else DIAL's 502 `No route`."""
    why = plan.exhaustion()
    headers = {"X-UPSTREAM-ATTEMPTS": str(why.attempts)}
    if why.all_parked and why.rate_limited and why.retry_after is not None:
        headers["Retry-After"] = str(why.retry_after)
        return GatewayError(503, "Service is not available", headers=headers)
    if timed_out:
        return GatewayError(504, "Upstream timed out", headers=headers)
    return GatewayError(502, "No route", headers=headers)
