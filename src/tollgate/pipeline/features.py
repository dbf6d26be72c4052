"""Feature endpoints: rate, tokenize, truncate_prompt, configuration (compatibility C43).

`POST /v1/{id}/rate`, `POST /v1/deployments/{id}/tokenize`,
`POST /v1/deployments/{id}/truncate_prompt` and `GET /v1/deployments/{id}/configuration` go, for
a model, an application or an assistant, to the URL its `features` name (`rateEndpoint`, ...;
an assistant's unset ones come from `assistant.features`, see `config.snapshot`). The deployment
is resolved and authorized as for a call (404 `Unknown application: <id>`, 403 `Forbidden
deployment: <id>`); when the URL is unset, rate and configuration answer an empty 200, tokenize
and truncate_prompt 403 `Forbidden deployment`.

The hop follows newer DIAL (compatibility C43), since aidial-sdk adapters refuse tokenize and
truncate_prompt without `Api-Key`: a fresh per-request key goes as `Api-Key` and dies
when the hop ends; `Authorization` only with `forwardAuthToken` (and never when it carries the
caller's API key); a model with `upstreams` also sends its first available upstream's
`X-UPSTREAM-ENDPOINT` and `X-UPSTREAM-KEY`. The request goes with the client's method to the URL
exactly (no query string appended), its body unchanged; the answer comes back with its status,
headers and body. No limits, no retries, no balancer bookkeeping.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from aiohttp import web

from tollgate.config.schema import Model, Upstream
from tollgate.errors import GatewayError
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.call import Call
from tollgate.pipeline.forward import client_headers, read_body, with_hop_key
from tollgate.pipeline.hop import FEATURE, HopEngine, Outbound
from tollgate.pipeline.hop_keys import HopKeys
from tollgate.pipeline.resolve import resolve
from tollgate.snapshot import Deployment, Snapshot

log = logging.getLogger("tollgate.features")


class Feature(NamedTuple):
    """One feature endpoint: its name, the `Features` field holding its URL, and whether an
    unset URL refuses the call (403) rather than answering an empty 200 (compatibility C43)."""

    name: str
    field: str
    required: bool


RATE = Feature("rate", "rate_endpoint", required=False)
TOKENIZE = Feature("tokenize", "tokenize_endpoint", required=True)
TRUNCATE_PROMPT = Feature("truncate_prompt", "truncate_prompt_endpoint", required=True)
CONFIGURATION = Feature("configuration", "configuration_endpoint", required=False)


def feature_url(deployment: Deployment, feature: Feature) -> str | None:
    """The URL the deployment's `features` give `feature`; None when unset.

    The same values the listings' `features` flags are computed from (`listings.py`).
    """
    features = deployment.spec.features
    if features is None:
        return None
    url: str | None = getattr(features, feature.field)
    return url


def first_upstream(snapshot: Snapshot, deployment: Deployment) -> Upstream | None:
    """The upstream whose `X-UPSTREAM-*` a model's feature call carries; None for anything else.

    DIAL takes the model's first upstream (compatibility C43). Tollgate takes the first one the
    balancer has not parked (lowest tier first, then config order), so a feature call does not
    go to a provider that just answered 429; when all are parked or disabled, the first one.
    """
    spec = deployment.spec
    if not isinstance(spec, Model) or not spec.upstreams:
        return None
    balancer = snapshot.balancers.get(deployment.name)
    if balancer is not None:
        now = balancer.clock()
        best = None
        for state in balancer.states:  # enabled upstreams, in config order
            if state.available(now) and (best is None or state.upstream.tier < best.upstream.tier):
                best = state
        if best is not None:
            return best.upstream
    return spec.upstreams[0]


def upstream_identity(upstream: Upstream | None) -> list[tuple[str, str]]:
    """`X-UPSTREAM-ENDPOINT` and `X-UPSTREAM-KEY` of `upstream` (a null value sends nothing).

    Not `X-UPSTREAM-EXTRA-DATA`: DIAL's feature hop sends only these two (compatibility C43).
    """
    if upstream is None:
        return []
    headers: list[tuple[str, str]] = []
    if upstream.endpoint is not None:
        headers.append(("X-UPSTREAM-ENDPOINT", upstream.endpoint))
    if upstream.key is not None:
        headers.append(("X-UPSTREAM-KEY", upstream.key))
    return headers


class FeatureCalls:
    """The feature endpoints of one gateway."""

    __slots__ = ("_body_timeout_s", "_engine", "_keys")

    def __init__(self, engine: HopEngine, keys: HopKeys, body_timeout_s: float) -> None:
        self._engine = engine
        self._keys = keys
        self._body_timeout_s = body_timeout_s  # the deployment call's: its 408, 413 and 422

    async def call(self, call: Call, feature: Feature) -> web.StreamResponse:
        snapshot, principal, request = call.snapshot, call.principal, call.request
        deployment = call.deployment = resolve(snapshot, call.raw_id)
        authorize(principal, deployment)
        url = feature_url(deployment, feature)
        body = await read_body(request, self._body_timeout_s)  # read in every case, as DIAL does
        if url is None:
            if feature.required:
                raise GatewayError(403, "Forbidden deployment")
            return web.Response()  # DIAL: 200, empty body
        keys = self._keys
        hop_key = keys.open(principal.via(deployment.name))
        try:
            if hop_key.publishing is not None:
                await hop_key.publishing
            headers = with_hop_key(
                client_headers(request, forward_authorization=deployment.forward_auth_token),
                hop_key.key,
            )
            headers += upstream_identity(first_upstream(snapshot, deployment))
            relayed = await self._engine.send(
                request,
                Outbound(
                    request.method,
                    url,
                    headers,
                    body or None,
                    self._engine.timeouts.of(deployment),
                    FEATURE,
                    target=f"{feature.name} of {deployment.name}",
                ),
            )
        finally:
            await keys.close(hop_key)
        response = relayed.response
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "feature %s project=%s key=%s deployment=%s status=%d",
                feature.name,
                principal.project,
                principal.key_fingerprint,
                deployment.name,
                response.status,
            )
        return response
