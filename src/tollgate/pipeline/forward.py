"""Step 5: the upstream request: the client's body read, enhanced, and its headers rewritten
(compatibility C23, C25).

Sending it, once per upstream the balancer hands out, is `tollgate.pipeline.hop`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.pipeline.relay import nominated
from tollgate.snapshot import Deployment

# Never copied from the client (compatibility C25, C64): hop-by-hop headers, the client's
# credentials, and X-UPSTREAM-* that only Tollgate may set (DIAL let client copies through).
DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "host",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "accept-encoding",
        "api-key",
        "x-api-key",
        "x-upstream-endpoint",
        "x-upstream-key",
        "x-upstream-extra-data",
    }
)
DROPPED_WITHOUT_AUTH_FORWARDING = DROPPED_HEADERS | {"authorization"}


def parse_body(body: bytes) -> dict[str, Any]:
    """The request as a JSON object, or DIAL's 400."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"Invalid JSON in request body: {exc}") from None
    if not isinstance(value, dict):
        raise GatewayError(400, "Request body must be a JSON object")
    return value


def enhance(
    body: bytes, request: dict[str, Any], defaults: Mapping[str, Any], override: str | None
) -> bytes:
    """Apply `defaults` and `overrideName` (compatibility C23).

    Defaults fill only top-level keys the request lacks (an explicit null stays). When nothing
    changes, the client's bytes are forwarded as they came.
    """
    changed = False
    for key, value in defaults.items():
        if key not in request:
            request[key] = value
            changed = True
    if override is not None and request.get("model") != override:
        request["model"] = override
        changed = True
    return orjson.dumps(request) if changed else body


MAX_CACHED_QUERIES = 64


def upstream_url(deployment: Deployment, raw_query: str) -> URL:
    """The deployment endpoint plus the client's query string, byte for byte."""
    endpoint = deployment.endpoint_url
    assert endpoint is not None and deployment.endpoint is not None
    if not raw_query:
        return endpoint
    url = deployment.urls_by_query.get(raw_query)
    if url is None:
        separator = "&" if endpoint.raw_query_string else "?"
        # encoded=True: yarl takes the text as it is, neither re-quoting nor normalising it.
        url = URL(deployment.endpoint + separator + raw_query, encoded=True)
        if len(deployment.urls_by_query) < MAX_CACHED_QUERIES:
            deployment.urls_by_query[raw_query] = url
    return url


def client_headers(request: web.Request, *, forward_authorization: bool) -> list[tuple[str, str]]:
    """The client's headers that go upstream: minus hop-by-hop ones (and those its `Connection`
    header names, RFC 9110 7.6.1), its credentials, and Tollgate's own `X-UPSTREAM-*`.

    `Authorization` goes along only with `forward_authorization`, and never when it carries the
    caller's own API key (compatibility C10). A plain list: the HTTP client builds its own
    multidict from it, so building one here would be done twice.
    """
    headers = request.headers
    dropped = (
        DROPPED_HEADERS
        if forward_authorization and not authorization_is_api_key(request)
        else DROPPED_WITHOUT_AUTH_FORWARDING
    )
    if "Connection" in headers:
        dropped = dropped | nominated(headers)
    return [(name, value) for name, value in headers.items() if name.lower() not in dropped]


def upstream_headers(
    client: Iterable[tuple[str, str]],
    per_request_key: str,
    *,
    forward_authorization: bool,
) -> list[tuple[str, str]]:
    """Client headers minus the dropped ones, and the hop's `Api-Key`.

    Each attempt appends its upstream's `X-UPSTREAM-*` (see `hop.HopEngine`).
    """
    dropped = DROPPED_HEADERS if forward_authorization else DROPPED_WITHOUT_AUTH_FORWARDING
    headers = [(name, value) for name, value in client if name.lower() not in dropped]
    return with_hop_key(headers, per_request_key)


def with_default_headers(
    headers: list[tuple[str, str]],
    sent: CIMultiDictProxy[str],
    defaults: tuple[tuple[str, str], ...],
) -> None:
    """A deployment's `defaultHeaders` that the client did not send (compatibility C75). Never
    one Tollgate sets itself or drops: the client and Tollgate win over a default."""
    for name, value in defaults:
        lower = name.lower()
        if name not in sent and lower not in DROPPED_HEADERS:
            headers.append((name, value))


def with_hop_key(headers: list[tuple[str, str]], per_request_key: str) -> list[tuple[str, str]]:
    """`headers` plus the hop's `Api-Key` and `Accept-Encoding: identity`."""
    headers.append(("Api-Key", per_request_key))
    # Uncompressed answers, so usage can be read from them; set here rather than with the
    # client's skip_auto_headers, which copies every request's headers to honour it.
    headers.append(("Accept-Encoding", "identity"))
    return headers


def authorization_is_api_key(request: web.Request) -> bool:
    """True when `Authorization` carries the API key itself (the openai SDK sends it there).

    `forwardAuthToken` exists to pass a user's token on; forwarding a project key instead would
    hand the caller's secret to the upstream, so that one is never forwarded (compatibility C10).
    """
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return False
    api_key = request.headers.get("Api-Key")
    parts = authorization.split(" ", 2)
    token = parts[1] if len(parts) > 1 else ""
    return api_key is None or not token or token == api_key


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The request body, or DIAL's 413 / 422, or 408 when it does not come in time.

    Read only once the caller is authenticated and the declared length accepted, so a client
    that sent `Expect: 100-continue` is told to go on only then (compatibility C63).
    """
    try:
        if request.content.is_eof():  # the body came with the headers: no timer needed
            return await request.read()
        if "Expect" in request.headers:  # checked at the front door: 100-continue
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the interim answer is not part of the response
        # A body that trickles or never ends must not hold the call (and its slot) forever.
        async with asyncio.timeout(timeout_s):
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
