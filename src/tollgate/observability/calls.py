"""What one deployment call reports when it ends: metrics, its access-log line, its span.

The HTTP edge starts a `CallNote` per call only when metrics, the access log or traces are on; the
steps that know something fill it in (the forward step: upstream, attempts, time to first
byte; the settle step: usage and cost), and `Observer.end` records it once the call has
settled, answered or refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from tollgate.limits.usage import Usage
from tollgate.observability.logs import AccessLog
from tollgate.observability.metrics import Metrics
from tollgate.routing.balancer import UpstreamState
from tollgate.security.principal import Principal

if TYPE_CHECKING:  # tracing needs the optional `otel` extra: imported only when configured
    from tollgate.observability.tracing import CallTrace, Tracing

# W3C Trace Context: version-traceid-parentid-flags; an all-zero trace id is invalid.
TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}.*")
MAX_LOGGED_ID: Final = 256  # a deployment id the config does not know, as the client sent it


class CallNote:
    """One call's facts, filled in by the steps that know them."""

    __slots__ = (
        "attempts",
        "cost_nano",
        "deployment",
        "metrics",
        "reason",
        "started",
        "trace",
        "upstream",
        "usage",
        "usage_estimated",
    )

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.started = perf_counter()
        self.deployment = ""  # the resolved deployment's name; "" until then
        self.upstream: str | None = None  # of the last attempt
        self.attempts = 0
        self.usage: Usage | None = None
        # `usage` is Tollgate's estimate: the answer reported none (compatibility C71).
        self.usage_estimated = False
        self.cost_nano: int | None = None  # None: not charged (not a model, or not settled)
        self.trace: CallTrace | None = None  # when tracing is on
        self.reason: str | None = None  # why a known caller was refused (`key_expired`)

    def attempt(self, state: UpstreamState, outcome: str, ttfb_s: float | None) -> None:
        """One upstream attempt ended: `outcome` is its status, or why it got no answer."""
        self.attempts += 1
        label = self.upstream = state.label
        if self.metrics is not None:
            self.metrics.attempt(self.deployment, label, outcome, ttfb_s)
        if self.trace is not None:
            self.trace.answered(outcome)


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The trace id of a W3C `traceparent` header, if there is a valid one."""
    return _trace_id_of(headers.get("traceparent"))


def _trace_id_of(value: str | None) -> str | None:
    if value is None:
        return None
    match = TRACEPARENT.fullmatch(value.strip().lower())
    if match is None or match[1] == "0" * 32:
        return None
    return match[1]


class Observer:
    """Records ended calls into the metrics, the access log and traces (any may be off)."""

    __slots__ = ("access", "metrics", "tracing")

    def __init__(
        self, metrics: Metrics | None, access: AccessLog | None, tracing: Tracing | None = None
    ) -> None:
        self.metrics = metrics
        self.access = access
        self.tracing = tracing

    def begin(self, headers: Mapping[str, str], principal: Principal | None, api: str) -> CallNote:
        note = CallNote(self.metrics)
        if self.tracing is not None:  # the call's span, current until `end`
            note.trace = self.tracing.deployment_call(headers, principal, api)
        return note

    def end(
        self,
        note: CallNote,
        headers: Mapping[str, str],
        principal: Principal | None,
        raw_id: str,
        status: int,
        *,
        timed: bool = True,
    ) -> None:
        """Record the call; `timed` False: refused before it was timed (no duration)."""
        seconds = perf_counter() - note.started
        usage = note.usage
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        project = principal.project if principal is not None else ""
        trace = note.trace
        if trace is not None:
            deployment = note.deployment or raw_id[:MAX_LOGGED_ID]
            trace.end(deployment, principal, status, usage, note.cost_nano, note.upstream)
        if self.metrics is not None:
            self.metrics.call(
                note.deployment,
                project,
                status,
                seconds if timed else None,
                prompt,
                completion,
                note.cost_nano or 0,
                note.usage_estimated,
            )
        if self.access is None:
            return
        # Only the call's objects are handed over; its line is worked out when it is written.
        self.access.later(
            _access_fields,
            (
                principal,
                note,
                raw_id,
                status,
                seconds if timed else None,
                None if trace is not None else headers.get("traceparent"),
            ),
        )


def _access_fields(
    principal: Principal | None,
    note: CallNote,
    raw_id: str,
    status: int,
    seconds: float | None,
    traceparent: str | None,
) -> tuple[Any, ...]:
    """The fields of a call's access-log line, in `AccessLog.call`'s order."""
    usage = note.usage
    trace = note.trace
    return (
        principal.project or None if principal is not None else None,
        principal.key_fingerprint if principal is not None else None,
        principal.source_deployment if principal is not None else None,
        note.deployment or raw_id[:MAX_LOGGED_ID],
        status,
        (
            usage.prompt_tokens if usage is not None else 0,
            usage.completion_tokens if usage is not None else 0,
            usage.total_tokens if usage is not None else 0,
        ),
        note.cost_nano,  # nano-dollars: the log prints them as a plain decimal
        note.upstream,
        note.attempts,
        None if seconds is None else round(seconds * 1000, 3),
        # The call's own trace when traced (it may continue a per-request key's hop).
        trace.trace_id if trace is not None else _trace_id_of(traceparent),
        note.usage_estimated,
        note.reason,
    )
