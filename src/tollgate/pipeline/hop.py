"""Step 5: the outbound hop engine. Every request Tollgate sends upstream goes out here.

One loop for every kind of hop: a deployment call (model, application, assistant), a feature
endpoint, each interceptor of a chain, a route. It asks the hop's attempt plan for an upstream
(the balancer's, or a single attempt), sends, maps transport failures to DIAL's statuses through
one exception map, retries what the plan says is retriable, and relays the chosen answer (see
`relay`): streamed with the write-stall watch, or read whole up to a bound, with usage read
when the hop counts it. What differs per kind of hop is a `HopPolicy` value: error texts, usage,
the attempts header, how large an answer is read whole (compatibility C66).

The choice between attempts is made on the status line, before a byte reaches the client: a
stream that has started is never retried. When the plan runs dry (compatibility C36):

- every upstream parked by a 429 → 503 `Service is not available`, with `Retry-After`;
- else the last attempt's failure, as the policy words it (a timeout is always a 504);
- else (retriable answers only, or no upstream available) → 502 `No route`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Final, Protocol, cast

import aiohttp
from aiohttp import web
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.limits.api_usage import OPENAI, UsageFormat
from tollgate.pipeline.relay import (
    Relayed,
    StallWatch,
    relay_stream,
    relay_whole,
    response_headers,
    streams,
)
from tollgate.pipeline.upstream_client import ConnectFailed, UpstreamClient, UpstreamResponse
from tollgate.routing.balancer import AttemptPlan, UpstreamState

if TYPE_CHECKING:
    from tollgate.observability.calls import CallNote
    from tollgate.pipeline.budget import StreamBudget
    from tollgate.snapshot import Deployment

log = logging.getLogger("tollgate.hop")

# A retried answer's body is read to its end, so that its connection goes back to the pool;
# one larger or slower than this is not worth it: its connection is closed instead.
MAX_DISCARDED_BODY: Final = 64 * 1024
DISCARD_TIMEOUT_S: Final = 1.0
MAX_TIMEOUT_VARIANTS: Final = 256
# A non-streamed answer up to this size is read whole (and parsed for usage); a larger one is
# relayed in chunks, its usage read from its tail, so one call never holds more than this.
MAX_BUFFERED: Final = 8 * 1024 * 1024


class Failure(enum.Enum):
    """Why an attempt got no usable answer."""

    CONNECT = "connect_failed"  # the value: the `outcome` label of the attempt metric
    TIMEOUT = "timeout"
    BROKEN = "broken"


def classify(exc: BaseException) -> Failure:
    """The one exception map of outbound calls."""
    if isinstance(exc, ConnectFailed | aiohttp.ClientConnectorError | aiohttp.InvalidURL):
        return Failure.CONNECT
    if isinstance(exc, TimeoutError):  # the client's connect and read timeouts included
        return Failure.TIMEOUT
    return Failure.BROKEN


TIMED_OUT: Final = (504, "Upstream timed out")


@dataclass(frozen=True, slots=True)
class HopPolicy:
    """What differs between kinds of hop."""

    kind: str  # for logs: deployment, interceptor, feature, route
    # The status and DIAL's message of a call whose last attempt failed so.
    errors: Mapping[Failure, tuple[int, str]]
    # The answer broke off after its status line, before it was relayed whole.
    broken_answer: tuple[int, str] = (502, "Upstream connection failed")
    usage: bool = False  # read usage from 200 answers
    attempts_header: bool = True  # `X-UPSTREAM-ATTEMPTS` on answers and errors
    buffer_limit: int = MAX_BUFFERED  # a larger answer (or one of unknown size) is streamed
    observed: bool = False  # attempts reported to the call's note (metrics, traces)


DEPLOYMENT: Final = HopPolicy(
    "deployment",
    {
        Failure.CONNECT: (502, "Failed to connect to origin"),
        Failure.TIMEOUT: TIMED_OUT,
        Failure.BROKEN: (502, "Upstream connection failed"),
    },
    usage=True,
    observed=True,
)
# An interceptor's answer, whatever it is, is relayed as it comes (compatibility C40).
INTERCEPTOR: Final = HopPolicy("interceptor", DEPLOYMENT.errors, attempts_header=False)
# DIAL's feature-endpoint messages (compatibility C43).
FEATURE: Final = HopPolicy(
    "feature",
    {
        Failure.CONNECT: (502, "connection error to origin"),
        Failure.TIMEOUT: TIMED_OUT,
        Failure.BROKEN: (502, "deployment responded with error"),
    },
    broken_answer=(502, "deployment responded with error"),
    attempts_header=False,
)
# DIAL answers `No route` when a route's upstreams fail; a route's bytes are never parsed, so
# anything above 256 KiB is streamed (compatibility C46, C66).
ROUTE: Final = HopPolicy(
    "route",
    {
        Failure.CONNECT: (502, "No route"),
        Failure.TIMEOUT: TIMED_OUT,
        Failure.BROKEN: (502, "No route"),
    },
    buffer_limit=256 * 1024,
)


class OneAttempt:
    """The plan of a hop without a balancer (feature, interceptor), or of one that must reach a
    given upstream (a Responses follow-up): one attempt, not retried."""

    __slots__ = ("attempts", "upstream")

    def __init__(self, upstream: UpstreamState | None = None) -> None:
        self.attempts = 0
        self.upstream = NO_UPSTREAM if upstream is None else upstream

    def next(self) -> UpstreamState | None:
        if self.attempts:
            return None
        self.attempts = 1
        return self.upstream

    def record(self, status: int, retry_after: str | None = None) -> bool:
        return False

    def record_transport_failure(self) -> bool:
        return False

    def exhausted(self, failure: Failure | None, policy: HopPolicy) -> GatewayError:
        status, message = policy.errors[failure] if failure is not None else (502, "No route")
        return GatewayError(status, message)


class _NoUpstream:
    """Stands for the one target of a hop without upstreams."""

    label = fingerprint = ""


NO_UPSTREAM: Final = cast("UpstreamState", _NoUpstream())


@dataclass(slots=True)
class Outbound:
    """One hop's request: sent as it is to each upstream the plan hands out."""

    method: str
    url: URL | str
    headers: list[tuple[str, str]]
    body: bytes | None
    timeout: aiohttp.ClientTimeout
    policy: HopPolicy
    plan: AttemptPlan | OneAttempt = field(default_factory=OneAttempt)
    # Each attempt's own headers and URL: adds its upstream's headers to `headers` (after the
    # common ones) and returns the attempt's URL, or None for `url`.
    per_upstream: Callable[[UpstreamState, list[tuple[str, str]]], URL | str | None] | None = None
    target: str = ""  # what the hop goes to, for logs
    keep: bool = False  # keep a streamed body (pricing by characters)
    # How the answer reports usage (its API family), when the policy reads usage.
    usage_format: UsageFormat = OPENAI
    # Tollgate asked the upstream for stream usage the client did not ask for: hide it
    # (compatibility C70).
    hide_usage: bool = False
    on_client_gone: Callable[[], None] | None = None
    note: CallNote | None = None
    # Rewrites a 2xx answer on its way to the client (Responses ids, compatibility C78).
    rewrite: Rewrite | None = None
    # Counts a 200 event stream against the caller's limits (compatibility C79).
    budget: StreamBudget | None = None


class Rewrite(Protocol):
    """What changes an answer's bytes: `body` a whole one; `filter` and `end` a stream's."""

    def body(self, body: bytes) -> bytes: ...

    def filter(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class Timeouts:
    """The aiohttp timeouts of each deployment, built once per distinct value.

    `connectTimeout` / `readTimeout` of the deployment (Tollgate extensions, ms), else the
    settings' `upstream.connectTimeout` / `upstream.readTimeout`: `connect` bounds getting a
    connection (a free one in the pool included), `sock_read` the silence while an answer
    comes; no bound on the whole call, which may stream for long.
    """

    __slots__ = ("_variants", "default", "write_stall_s")

    def __init__(self, connect_s: float, read_s: float, write_stall_s: float = 60.0) -> None:
        self.default = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=read_s)
        # How long a client may take none of a streamed answer (`server.writeStallTimeout`).
        self.write_stall_s = write_stall_s
        self._variants: dict[tuple[int | None, int | None], aiohttp.ClientTimeout] = {}

    def of(self, deployment: Deployment) -> aiohttp.ClientTimeout:
        values = deployment.timeouts_ms
        if values is None:
            return self.default
        timeout = self._variants.get(values)
        if timeout is None:
            connect_ms, read_ms = values
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self.default.connect if connect_ms is None else connect_ms / 1000,
                sock_read=self.default.sock_read if read_ms is None else read_ms / 1000,
            )
            if len(self._variants) >= MAX_TIMEOUT_VARIANTS:  # reloads could add values forever
                self._variants.clear()
            self._variants[values] = timeout
        return timeout


class HopEngine:
    """Sends hops on the gateway's one HTTP client (`upstream_client`)."""

    __slots__ = ("_client", "stalls", "timeouts")

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self.stalls = StallWatch(timeouts.write_stall_s)  # every stream this engine relays
        self._client: UpstreamClient | None = None

    def start(self, client: UpstreamClient) -> None:
        self._client = client

    async def send(self, request: web.Request, hop: Outbound) -> Relayed:
        """Try the hop's upstreams until one answers for good; relay that answer.

        Raises the `GatewayError` of an exhausted plan (see the module docstring).
        """
        client = self._client
        assert client is not None, "the gateway has not started"
        plan = hop.plan
        policy = hop.policy
        note = hop.note if policy.observed else None
        headers = hop.headers
        common = len(headers)
        url = hop.url
        usage_format = hop.usage_format if policy.usage else None
        failure: Failure | None = None
        while (upstream := plan.next()) is not None:
            if hop.per_upstream is not None:
                del headers[common:]  # the previous attempt's own headers
                url = hop.per_upstream(upstream, headers) or hop.url
            if note is None:
                sent = 0.0
            else:
                sent = perf_counter()
                if note.trace is not None:  # the attempt's span: its context goes upstream
                    note.trace.attempt(upstream, URL(url) if isinstance(url, str) else url)
            try:
                answer = await client.request(
                    hop.method, url, data=hop.body, headers=headers, timeout=hop.timeout
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                failure = classify(exc)
                plan.record_transport_failure()
                if note is not None:
                    note.attempt(upstream, failure.value, None)
                log.warning(
                    "%s hop to %s failed (attempt %d): %s",
                    policy.kind,
                    hop.target,
                    plan.attempts,
                    type(exc).__name__,
                )
                continue
            async with answer:
                status = answer.status
                if not 100 <= status <= 599:  # no HTTP status: not an answer to relay
                    failure = Failure.BROKEN
                    plan.record_transport_failure()
                    if note is not None:
                        note.attempt(upstream, failure.value, None)
                    log.warning("%s hop to %s: invalid status %d", policy.kind, hop.target, status)
                    continue
                if note is not None:
                    note.attempt(upstream, str(status), perf_counter() - sent)
                retry_after = answer.headers.get("Retry-After") if status == 429 else None
                if not plan.record(status, retry_after):
                    # Relayed as it is; past its status line nothing is retried. (Inline: one
                    # coroutine less per call.)
                    attempts = plan.attempts if policy.attempts_header else 0
                    headers_out = response_headers(answer.headers, attempts)
                    try:
                        if streams(answer, policy.buffer_limit, hop.method):
                            return await relay_stream(
                                request,
                                answer,
                                headers_out,
                                usage_format=usage_format,
                                stalls=self.stalls,
                                keep=hop.keep,
                                hide_usage=hop.hide_usage,
                                on_client_gone=hop.on_client_gone,
                                rewrite=hop.rewrite,
                                budget=hop.budget,
                            )
                        relayed = await relay_whole(answer, headers_out, usage_format)
                        response = relayed.response
                        if hop.rewrite is not None and 200 <= status < 300:
                            assert isinstance(response, web.Response)  # not prepared yet
                            body = hop.rewrite.body(relayed.body)
                            response.body = body
                            relayed = relayed._replace(body=body)
                        return relayed
                    except TimeoutError:
                        raise GatewayError(*TIMED_OUT) from None
                    except aiohttp.ClientError as exc:
                        log.warning(
                            "%s answer of %s broke off: %s",
                            policy.kind,
                            hop.target,
                            type(exc).__name__,
                        )
                        raise GatewayError(*policy.broken_answer) from None
                await _discard(answer)
            failure = None
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s hop: upstream %s of %s answered %d (attempt %d): trying the next",
                    policy.kind,
                    _name(upstream.fingerprint),
                    hop.target,
                    status,
                    plan.attempts,
                )
        if isinstance(plan, OneAttempt):
            raise plan.exhausted(failure, policy)
        raise exhausted(plan, failure, policy)


async def _discard(answer: UpstreamResponse) -> None:
    """Read a retried answer to its end (bounded), so that its connection can be reused.

    What is left unread when this gives up makes the release close the connection instead.
    """
    content = answer.content
    received = 0
    try:
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            while received <= MAX_DISCARDED_BODY:
                chunk = await content.readany()
                if not chunk:
                    return
                received += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
        pass


def exhausted(
    plan: AttemptPlan, failure: Failure | None, policy: HopPolicy = DEPLOYMENT
) -> GatewayError:
    """The answer of a call whose plan ran dry (see the module docstring)."""
    why = plan.exhaustion()
    headers = {"X-UPSTREAM-ATTEMPTS": str(why.attempts)} if policy.attempts_header else None
    if why.all_parked and why.rate_limited and why.retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(why.retry_after)}
        return GatewayError(503, "Service is not available", headers=headers)
    status, message = policy.errors[failure] if failure is not None else (502, "No route")
    return GatewayError(status, message, headers=headers)


def _name(fingerprint: str) -> str:
    # An upstream is named by its key's fingerprint, never by the key (compatibility C10).
    return f"sha256:{fingerprint}" if fingerprint else "(endpoint)"
