"""DIAL's `routes` compiled for the request path (compatibility C44-C46).

A route answers requests that none of Tollgate's own endpoints takes:
the first route, in config order, whose `methods` admit the request's method and one of whose
`paths` (Java regexes, see `tollgate.config.java_regex`) fully matches the request URI including
its query string. A route with no `paths` matches every URI. Newer DIAL's `order` puts a route
first (lower first, default 2^31-1; ties keep config order).

Built once per config snapshot: patterns compiled, methods upper-cased, the static answer encoded,
and each route's balancer taken from the process's registry, under a name no deployment can
clash with, so upstream health survives reloads as a deployment's does (compatibility C32).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

import orjson
from yarl import URL

from tollgate.config.java_regex import compile_java
from tollgate.config.schema import Route
from tollgate.routing.balancer import MAX_ATTEMPTS, DeploymentBalancer, UpstreamSet

DEFAULT_ORDER: Final = 2**31 - 1  # newer DIAL's `order` default: after every ordered route
# Only a 429 moves a route call to the next upstream; so do failed connections (compatibility C46).
ROUTE_RETRIABLE: Final = frozenset({429})
# Prefix of a route's entry in the balancer registry, beside the deployments' (a NUL cannot
# appear in a name anyone configures on purpose).
BALANCER_PREFIX: Final = "\0route\0"


@dataclass(frozen=True, slots=True)
class StaticAnswer:
    """A route's `response`. DIAL sends its body without a Content-Type; aiohttp would call a
    body `application/octet-stream`, so one that is JSON says so and any other is plain text."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    @classmethod
    def of(cls, status: int, body: str) -> StaticAnswer:
        if not body:
            return cls(status, b"", {})
        try:
            orjson.loads(body)
            content_type = "application/json"
        except orjson.JSONDecodeError:
            content_type = "text/plain; charset=utf-8"
        return cls(status, body.encode(), {"Content-Type": content_type})


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One route, ready for the request path."""

    name: str
    patterns: tuple[re.Pattern[str], ...]  # empty: every URI matches
    methods: frozenset[str] | None  # None: every method
    user_roles: frozenset[str] | None  # DIAL's access rule, as for deployments (compatibility C45)
    rewrite_path: bool
    answer: StaticAnswer | None  # `response`: answered here, nothing proxied
    upstream_urls: Mapping[int, URL]  # by id() of the balancer's Upstream object
    balancer: DeploymentBalancer
    max_attempts: int

    def matches(self, method: str, uri: str) -> bool:
        methods = self.methods
        if methods is not None and method not in methods:
            return False
        patterns = self.patterns
        if not patterns:
            return True
        return any(pattern.fullmatch(uri) is not None for pattern in patterns)


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[CompiledRoute, ...]

    def __bool__(self) -> bool:
        return bool(self.routes)

    def match(self, method: str, uri: str) -> CompiledRoute | None:
        """The first route for `method` and the raw request URI (path and query), or None."""
        for route in self.routes:
            if route.matches(method, uri):
                return route
        return None


EMPTY: Final = RouteTable(())

_ENCODED_SEPARATOR: Final = re.compile(r"%(?:2f|5c)", re.IGNORECASE)
MAX_DECODINGS: Final = 3


def escapes(path: str) -> bool:
    """Whether an upstream that normalises `path` could read it as another path: a dot segment
    (`.`, `..`, also percent-encoded, once or more), an encoded slash or backslash, or a
    backslash. A route forwards with the route's own upstream key, so such a path could reach
    what lies outside the route (compatibility C67): it is refused instead."""
    for _ in range(MAX_DECODINGS):
        if "\\" in path or _ENCODED_SEPARATOR.search(path) is not None:
            return True
        if any(segment in (".", "..") for segment in path.split("/")):
            return True
        if "%" not in path:
            return False
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True  # encoded more deeply than any client needs


def balancer_name(route: str) -> str:
    return BALANCER_PREFIX + route


def upstream_sets(routes: Mapping[str, Route]) -> dict[str, UpstreamSet]:
    """Each route's upstreams, keyed for the balancer registry (see `balancer_name`).

    Only http(s) upstreams: newer DIAL's WebSocket upstreams are not served (config check says
    so), and a route left with none answers 502 `No route`.
    """
    return {
        balancer_name(name): UpstreamSet(tuple(u for u in route.upstreams if _is_http(u.endpoint)))
        for name, route in routes.items()
        if route.response is None
    }


def build_table(
    routes: Mapping[str, Route], balancers: Mapping[str, DeploymentBalancer]
) -> RouteTable:
    """The compiled table; `balancers` must hold every entry of `upstream_sets(routes)`."""
    ordered = sorted(
        enumerate(routes.items()),
        key=lambda item: (
            DEFAULT_ORDER if item[1][1].order is None else item[1][1].order,
            item[0],
        ),
    )
    compiled: list[CompiledRoute] = []
    for _, (name, route) in ordered:
        response = route.response
        if response is not None:
            answer: StaticAnswer | None = StaticAnswer.of(response.status, response.body)
            balancer = DeploymentBalancer(balancer_name(name), UpstreamSet(()))
        else:
            answer = None
            balancer = balancers[balancer_name(name)]
        compiled.append(
            CompiledRoute(
                name=name,
                patterns=tuple(compile_java(path) for path in route.paths),
                methods=frozenset(m.upper() for m in route.methods) if route.methods else None,
                user_roles=None if route.user_roles is None else frozenset(route.user_roles),
                rewrite_path=route.rewrite_path,
                answer=answer,
                upstream_urls={
                    id(state.upstream): URL(state.upstream.endpoint or "", encoded=True)
                    for state in balancer.states
                },
                balancer=balancer,
                max_attempts=(
                    MAX_ATTEMPTS if route.max_retry_attempts is None else route.max_retry_attempts
                ),
            )
        )
    return RouteTable(tuple(compiled)) if compiled else EMPTY


def _is_http(endpoint: str | None) -> bool:
    return endpoint is not None and endpoint[:5].lower() in ("http:", "https")
