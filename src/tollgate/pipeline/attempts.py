"""Step 5, continued: the attempts of one call: balancer, retries, timeouts (spec proxy 6).

The call's `AttemptPlan` hands out upstreams, best first. Each attempt sends the same request
(same body, same per-request key) to the deployment's endpoint with that upstream's
`X-UPSTREAM-*` headers (spec 5.3; none for an upstream-less deployment). An answer with a
retriable status (429, 502, 503, 504 and `retriableErrorCodes`) is discarded and so is a call
that got no answer (connection refused or broken, timeout: DECISIONS 5 retries these too); the
next upstream is tried, up to the deployment's attempt limit. Any other answer is relayed as it
is. The choice is made on the status line, before a byte reaches the client: a stream that has
started is never retried.

When the plan runs dry, the answer is (DECISIONS 5):

- every upstream parked by a 429 → 503 `Service is not available`, with `Retry-After`;
- else, the last attempt timed out → 504 `Upstream timed out`;
- it could not connect → 502 `Failed to connect to origin`;
- it lost the connection before an answer → 502 `Upstream connection failed`;
- else (retriable answers only, or no upstream available) → 502 `No route`.

Relayed answers and these errors alike carry `X-UPSTREAM-ATTEMPTS`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from yarl import URL

from tollgate.errors import GatewayError
from tollgate.pipeline.relay import Relayed, is_stream, relay_stream, relay_whole
from tollgate.routing.balancer import AttemptPlan
from tollgate.snapshot import Deployment, Snapshot

if TYPE_CHECKING:
    from tollgate.observability.calls import CallNote

log = logging.getLogger("tollgate.attempts")

# A retried answer's body is read to its end, so that its connection goes back to the pool;
# one larger or slower than this is not worth it: its connection is closed instead.
MAX_DISCARDED_BODY: Final = 64 * 1024
DISCARD_TIMEOUT_S: Final = 1.0
MAX_TIMEOUT_VARIANTS: Final = 256

# Why an attempt got no answer, as the call answers when it was the last one (DECISIONS 5).
CONNECT_FAILED: Final = (502, "Failed to connect to origin")
TIMED_OUT: Final = (504, "Upstream timed out")
BROKE_OFF: Final = (502, "Upstream connection failed")
Failure = tuple[int, str]
# The `outcome` label of an attempt that got no answer (metrics).
_OUTCOMES: Final = {CONNECT_FAILED: "connect_failed", TIMED_OUT: "timeout", BROKE_OFF: "broken"}


class Timeouts:
    """The aiohttp timeouts of each deployment, built once per distinct value.

    `connectTimeout` / `readTimeout` of the deployment (Tollgate extensions, ms), else the
    settings' `upstream.connectTimeout` / `upstream.readTimeout`: `connect` bounds getting a
    connection, `sock_read` the silence while an answer comes; no bound on the whole call, which
    may stream for long.
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


async def send(
    session: aiohttp.ClientSession,
    request: web.Request,
    snapshot: Snapshot,
    deployment: Deployment,
    url: URL,
    headers: list[tuple[str, str]],
    body: bytes,
    timeouts: Timeouts,
    *,
    keep: bool = False,
    on_client_gone: Callable[[], None] | None = None,
    note: CallNote | None = None,
) -> Relayed:
    """Try the deployment's upstreams until one answers for good; relay that answer.

    `headers` are the hop's (see `forward.upstream_headers`); each attempt appends its
    upstream's `X-UPSTREAM-*` to them. `keep` and `on_client_gone` go to `relay_stream`.
    `note`, when the call is observed, is told each attempt's upstream, outcome and time to
    the status line (metrics, access log); when it is traced, each attempt has a span.
    Raises the `GatewayError` of an exhausted plan (see the module docstring).
    """
    plan = snapshot.balancers[deployment.name].plan(deployment.max_attempts, snapshot.retriable)
    timeout = timeouts.of(deployment)
    common = len(headers)
    failure: Failure | None = None
    reason: Exception
    while (upstream := plan.next()) is not None:
        del headers[common:]  # the previous attempt's X-UPSTREAM-*
        headers.extend(upstream.headers)
        if note is None:
            sent = 0.0
        else:
            sent = perf_counter()
            if note.trace is not None:  # the attempt's span: its context goes upstream
                note.trace.attempt(upstream, url)
        try:
            answer = await session.post(url, data=body, headers=headers, timeout=timeout)
        except aiohttp.ClientConnectorError as exc:
            failure, reason = CONNECT_FAILED, exc
        except TimeoutError as exc:  # aiohttp's connect and read timeouts included
            failure, reason = TIMED_OUT, exc
        except aiohttp.ClientError as exc:
            failure, reason = BROKE_OFF, exc
        else:
            async with answer:
                status = answer.status
                if note is not None:
                    note.attempt(upstream, str(status), perf_counter() - sent)
                retry_after = answer.headers.get("Retry-After") if status == 429 else None
                if not plan.record(status, retry_after):
                    # Relayed as it is; past its status line nothing is retried. (Inline: one
                    # coroutine less per call.)
                    try:
                        if is_stream(answer):
                            return await relay_stream(
                                request,
                                answer,
                                plan.attempts,
                                keep=keep,
                                on_client_gone=on_client_gone,
                                stall_s=timeouts.write_stall_s,
                            )
                        return await relay_whole(answer, plan.attempts)
                    except TimeoutError:
                        raise GatewayError(504, "Upstream timed out") from None
                    except aiohttp.ClientError as exc:
                        log.warning("upstream answer broke off: %s", type(exc).__name__)
                        raise GatewayError(502, "Upstream connection failed") from None
                await _discard(answer)
            failure = None
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "upstream %s of %s answered %d (attempt %d): trying the next",
                    _name(upstream.fingerprint),
                    deployment.name,
                    status,
                    plan.attempts,
                )
            continue
        plan.record_transport_failure()
        if note is not None:
            note.attempt(upstream, _OUTCOMES[failure], None)
        log.warning(
            "upstream call to %s failed (attempt %d): %s",
            deployment.name,
            plan.attempts,
            type(reason).__name__,
        )
    raise exhausted(plan, failure)


async def _discard(answer: aiohttp.ClientResponse) -> None:
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


def exhausted(plan: AttemptPlan, failure: Failure | None) -> GatewayError:
    """The answer of a call whose plan ran dry (DECISIONS 5; see the module docstring)."""
    why = plan.exhaustion()
    headers = {"X-UPSTREAM-ATTEMPTS": str(why.attempts)}
    if why.all_parked and why.rate_limited and why.retry_after is not None:
        headers["Retry-After"] = str(why.retry_after)
        return GatewayError(503, "Service is not available", headers=headers)
    status, message = failure if failure is not None else (502, "No route")
    return GatewayError(status, message, headers=headers)


def _name(fingerprint: str) -> str:
    # DECISIONS 11: an upstream is named by its key's fingerprint, never by the key.
    return f"sha256:{fingerprint}" if fingerprint else "(endpoint)"
