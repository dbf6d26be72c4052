"""Feature endpoints: rate, tokenize, truncate_prompt, configuration (spec proxy 3, 14).

`POST /v1/{id}/rate`, `POST /v1/deployments/{id}/tokenize`,
`POST /v1/deployments/{id}/truncate_prompt` and `GET /v1/deployments/{id}/configuration` go, for
a model, an application or an assistant, to the URL its `features` name (`rateEndpoint`, ...;
an assistant's unset ones come from `assistant.features`, see `config.snapshot`). The deployment
is resolved and authorized as for a call (404 `Unknown application: <id>`, 403 `Forbidden
deployment: <id>`); when the URL is unset, rate and configuration answer an empty 200, tokenize
and truncate_prompt 403 `Forbidden deployment`.

The hop follows newer DIAL (spec 14 [newer]), since aidial-sdk adapters refuse tokenize and
truncate_prompt without `Api-Key` (spec 15.3): a fresh per-request key goes as `Api-Key` and dies
when the hop ends; `Authorization` only with `forwardAuthToken` (and never when it carries the
caller's API key); a model with `upstreams` also sends its first available upstream's
`X-UPSTREAM-ENDPOINT` and `X-UPSTREAM-KEY`. The request goes with the client's method to the URL
exactly (no query string appended), its body unchanged; the answer comes back with its status,
headers and body. No limits, no retries, no balancer bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import aiohttp
from aiohttp import web

from tollgate.config.schema import Model, Upstream
from tollgate.errors import GatewayError
from tollgate.pipeline.attempts import Timeouts
from tollgate.pipeline.authorize import authorize
from tollgate.pipeline.forward import upstream_headers
from tollgate.pipeline.relay import response_headers
from tollgate.pipeline.resolve import resolve
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import SharedKeys
from tollgate.snapshot import Deployment, Snapshot

log = logging.getLogger("tollgate.features")


class Feature(NamedTuple):
    """One feature endpoint: its name, the `Features` field holding its URL, and whether an
    unset URL refuses the call (403) rather than answering an empty 200 (spec proxy 3)."""

    name: str
    field: str
    required: bool


RATE = Feature("rate", "rate_endpoint", required=False)
TOKENIZE = Feature("tokenize", "tokenize_endpoint", required=True)
TRUNCATE_PROMPT = Feature("truncate_prompt", "truncate_prompt_endpoint", required=True)
CONFIGURATION = Feature("configuration", "configuration_endpoint", required=False)

# DIAL's messages for a hop that failed (spec proxy 14); a timeout is a 504 (DECISIONS 5).
CONNECTION_ERROR = "connection error to origin"
SEND_ERROR = "deployment responded with error"


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

    DIAL takes the model's first upstream (spec 14 [newer]). Tollgate takes the first one the
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

    Not `X-UPSTREAM-EXTRA-DATA`: DIAL's feature hop sends only these two (spec 14 [newer]).
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
    """The feature endpoints of one gateway: its HTTP client, per-request keys and timeouts."""

    __slots__ = (
        "_authorization_is_api_key",
        "_end_hop",
        "_keys",
        "_read_body",
        "_session",
        "_shared",
        "_timeouts",
    )

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        keys: PerRequestKeys,
        shared: SharedKeys | None,
        timeouts: Timeouts,
        *,
        end_hop: Callable[[bytes], None],
        authorization_is_api_key: Callable[[web.Request], bool],
        read_body: Callable[[web.Request], Awaitable[bytes]],
    ) -> None:
        self._session = session  # created when the gateway starts
        self._keys = keys
        self._shared = shared
        self._timeouts = timeouts
        self._end_hop = end_hop  # kills the hop's key here and in the shared store
        self._authorization_is_api_key = authorization_is_api_key
        self._read_body = read_body  # the deployment call's: its 408, 413 and 422 (spec 14)

    async def call(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        raw_id: str,
        feature: Feature,
    ) -> web.StreamResponse:
        deployment = resolve(snapshot, raw_id)
        authorize(principal, deployment)
        url = feature_url(deployment, feature)
        body = await self._read_body(request)  # read in every case, as DIAL does
        if url is None:
            if feature.required:
                raise GatewayError(403, "Forbidden deployment")
            return web.Response()  # DIAL: 200, empty body

        key, handle = self._keys.mint(principal, deployment.name)
        try:
            if self._shared is not None:
                await self._shared.publish(handle, principal.via(deployment.name))
            headers = upstream_headers(
                request.headers.items(),
                key,
                forward_authorization=(
                    deployment.forward_auth_token and not self._authorization_is_api_key(request)
                ),
            )
            headers += upstream_identity(first_upstream(snapshot, deployment))
            response = await self._send(request.method, url, headers, body, deployment, feature)
        finally:
            self._end_hop(handle)
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

    async def _send(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        deployment: Deployment,
        feature: Feature,
    ) -> web.Response:
        """One request, its whole answer relayed (feature answers are small JSON documents)."""
        try:
            async with self._session().request(
                method,
                url,
                data=body or None,
                headers=headers,
                timeout=self._timeouts.of(deployment),
            ) as answer:
                content = await answer.read()
                return web.Response(
                    status=answer.status,
                    reason=answer.reason,
                    body=content,
                    headers=response_headers(answer.headers, 0),  # no attempts: no retries
                )
        except aiohttp.ClientConnectorError as exc:
            raise _failure(502, CONNECTION_ERROR, deployment, feature, exc) from None
        except TimeoutError as exc:  # aiohttp's connect and read timeouts included
            raise _failure(504, "Upstream timed out", deployment, feature, exc) from None
        except aiohttp.InvalidURL as exc:  # a `features` URL that is no URL: never reached
            raise _failure(502, CONNECTION_ERROR, deployment, feature, exc) from None
        except aiohttp.ClientError as exc:
            raise _failure(502, SEND_ERROR, deployment, feature, exc) from None


def _failure(
    status: int, message: str, deployment: Deployment, feature: Feature, reason: Exception
) -> GatewayError:
    # The URL is not logged: a feature URL may carry a secret in its query.
    log.warning("%s call to %s failed: %s", feature.name, deployment.name, type(reason).__name__)
    return GatewayError(status, message)
