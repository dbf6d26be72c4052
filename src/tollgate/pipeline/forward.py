"""Step 5: the upstream request: body enhancement and header rewriting (spec proxy 5).

Sending it, once per upstream the balancer hands out, is `tollgate.pipeline.attempts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.snapshot import Deployment

# Never copied from the client (spec proxy 5.3): hop-by-hop headers, the client's credentials,
# and X-UPSTREAM-* that only Tollgate may set (DIAL let client copies through: a security gap).
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


def enhance(body: bytes, request: dict[str, Any], deployment: Deployment) -> bytes:
    """Apply `defaults` and `overrideName` (spec proxy 5.2).

    Defaults fill only top-level keys the request lacks (an explicit null stays). When nothing
    changes, the client's bytes are forwarded as they came.
    """
    changed = False
    for key, value in deployment.defaults.items():
        if key not in request:
            request[key] = value
            changed = True
    override = deployment.override_name
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


def upstream_headers(
    client_headers: Iterable[tuple[str, str]],
    per_request_key: str,
    *,
    forward_authorization: bool,
) -> list[tuple[str, str]]:
    """Client headers minus the dropped ones, and the hop's `Api-Key`.

    Each attempt appends its upstream's `X-UPSTREAM-*` (see `attempts.send`). A plain list: the
    HTTP client builds its own multidict from it, so building one here would be done twice.
    """
    dropped = DROPPED_HEADERS if forward_authorization else DROPPED_WITHOUT_AUTH_FORWARDING
    headers = [(name, value) for name, value in client_headers if name.lower() not in dropped]
    headers.append(("Api-Key", per_request_key))
    # Uncompressed answers, so usage can be read from them; set here rather than with the
    # client's skip_auto_headers, which copies every request's headers to honour it.
    headers.append(("Accept-Encoding", "identity"))
    return headers
