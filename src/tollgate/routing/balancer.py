"""Upstream choice for the forward step: tiers, weighted round robin, parking.

The rules are DIAL's, with the differences of compatibility C31-C36.

Pure and I/O-free: time comes from an injectable monotonic clock, nothing here sends a request.
Not thread-safe; the gateway drives it from one event loop.

The API, as the forward step uses it::

    balancers = Balancers()                          # once per process; clock=time.monotonic
    retriable = retriable_statuses(config.retriable_error_codes)  # once per snapshot
    by_name = balancers.sync(                        # at every (re)load, beside the snapshot
        {name: UpstreamSet.of(d.spec, d.endpoint) for name, d in snapshot.deployments.items()}
    )
    plan = by_name[deployment.name].plan(max_attempts=MAX_ATTEMPTS, retriable=retriable)
    for upstream in plan:                            # UpstreamState, best first
        headers.extend(upstream.headers)             # its X-UPSTREAM-* headers
        try:
            response = await send(...)
        except ConnectionFailure:
            plan.record_transport_failure()          # booked as a 502, always retried
            continue
        if not plan.record(response.status, response.headers.get("Retry-After")):
            break                                    # relay it; X-UPSTREAM-ATTEMPTS: plan.attempts
    else:
        exhausted = plan.exhaustion()                # 503 + Retry-After if rate_limited, else 502

- `UpstreamSet` is one deployment's upstream list as configured (`UpstreamSet.of`); an
  upstream-less deployment gets one synthetic upstream used for bookkeeping only: it sends no
  `X-UPSTREAM-*` headers.
- `Balancers` is the registry that outlives config snapshots. `sync` returns a fresh
  name → `DeploymentBalancer` mapping for the new snapshot; state is kept per (deployment name,
  upstream identity), where the identity is the endpoint, digests of the key and `extraData`, the
  weight, the tier and whether the upstream is synthetic. An upstream that stays finds its parking,
  back-off and round-robin counters again; one that disappears or changes (a new weight, say)
  starts afresh; a deployment whose set is unchanged, in any order, keeps its balancer as a whole
  (compatibility C32). Core goes further and resets every upstream of a deployment whose set
  changed; Tollgate keeps the parking of the upstreams that did not change.
- `DeploymentBalancer.plan()` makes the `AttemptPlan` of one client call: the upstreams in the order
  to try, at most `max_attempts` of them (Core: 5), skipping parked ones and moving on to
  the next tier when a tier has none left. `record(status, retry_after)` books an answer
  and says whether to try the next upstream; `exhaustion()` says why the plan ran dry: whether every
  upstream is parked, whether all of them for a 429 (503 `Service is not available`)
  and in how many seconds the first one comes back (its `Retry-After`).
- `UpstreamState` is what a plan hands out: the configured `Upstream`, its precomputed headers, a
  key fingerprint for logs, and its health (`error_count`, `parked_until`, `rate_limited`). Its repr
  never shows the key or `extraData`.
- `is_retriable`, `retriable_statuses`, `retry_after_seconds` and `backoff_seconds` are the rules
  themselves, for direct use and for tests.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from tollgate.config.key_names import digest_of, fingerprint_of_digest
from tollgate.config.schema import (
    CHAT_COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Deployable,
    Model,
    Upstream,
)
from tollgate.routing.interfaces import VENDOR_PATHS

Monotonic = Callable[[], float]
"""A clock returning monotonic seconds (`time.monotonic`, or a test's fake)."""

MAX_ATTEMPTS: Final = 5  # upstream picks per client call, the first included (compatibility C35)
RETRIABLE_STATUSES: Final = frozenset({429, 502, 503, 504})  # before retriableErrorCodes
DEFAULT_RETRY_AFTER: Final = 30  # seconds, when a 429 has no usable Retry-After
ERROR_THRESHOLD: Final = 3  # consecutive 5xx before an upstream is parked
BACKOFF_BASE: Final = 1.0  # seconds: parked for BACKOFF_BASE * 2**errors ...
BACKOFF_CAP: Final = 300.0  # ... but never longer than 5 minutes

_NOT_PARKED: Final = -math.inf
_LONG_MAX: Final = 2**63 - 1  # Java's Long.parseLong range
_INTEGER = re.compile(r"[+-]?[0-9]+")
# 2**9 s already passes the cap: a larger exponent changes nothing (and Java's `1L << errors`
# would wrap after 63 errors and unpark the upstream; we keep the cap instead).
_MAX_EXPONENT: Final = math.ceil(math.log2(BACKOFF_CAP / BACKOFF_BASE))


def retriable_statuses(extra: Iterable[int] = ()) -> frozenset[int]:
    """429, 502, 503, 504 and the config's `retriableErrorCodes`: once a snapshot."""
    return RETRIABLE_STATUSES | frozenset(extra)


def is_retriable(status: int, retriable: frozenset[int] = RETRIABLE_STATUSES) -> bool:
    """Whether an upstream answer with `status` is discarded and the next upstream tried.

    Connection failures are always retried (compatibility C35), see
    `AttemptPlan.record_transport_failure`.
    """
    return status in retriable


def retry_after_seconds(value: str | None) -> int:
    """A 429's parking time from its `Retry-After` header (compatibility C34).

    An integer number of seconds, negative taken as 0; absent or unparsable (an HTTP-date
    included) gives 30 s, as Core's `Long.parseLong` fallback does.
    """
    if value is None:
        return DEFAULT_RETRY_AFTER
    text = value.strip(" \t")  # optional whitespace around a field value (RFC 9110 5.5)
    if not _INTEGER.fullmatch(text):
        return DEFAULT_RETRY_AFTER
    seconds = int(text)
    if not -_LONG_MAX - 1 <= seconds <= _LONG_MAX:
        return DEFAULT_RETRY_AFTER  # Java: NumberFormatException
    return max(seconds, 0)


def backoff_seconds(error_count: int) -> float | None:
    """How long `error_count` consecutive 5xx park an upstream: None under the threshold.

    From the third error on: 1 s x 2**errors, i.e. 8 s, 16 s, 32 s ... capped at 5 minutes.
    """
    if error_count < ERROR_THRESHOLD:
        return None
    return min(BACKOFF_BASE * (1 << min(error_count, _MAX_EXPONENT)), BACKOFF_CAP)


def upstream_headers(upstream: Upstream) -> tuple[tuple[str, str], ...]:
    """`X-UPSTREAM-*` sent with a call through `upstream`; a null value sends nothing."""
    headers: list[tuple[str, str]] = []
    if upstream.endpoint is not None:
        headers.append(("X-UPSTREAM-ENDPOINT", upstream.endpoint))
    if upstream.key is not None:
        headers.append(("X-UPSTREAM-KEY", upstream.key))
    if upstream.extra_data is not None:
        headers.append(("X-UPSTREAM-EXTRA-DATA", _extra_text(upstream.extra_data)))
    return tuple(headers)


def interface_headers(upstream: Upstream, interface: str) -> tuple[tuple[str, str], ...]:
    """`X-UPSTREAM-*` of a call through `upstream` to another API family than the deployments
    one (compatibility C75): the upstream's override for the interface, else its
    `responsesEndpoint` (Responses), else its `baseUrl` with the vendor's API path, else its
    `endpoint`; `secretExtraData` merged over `extraData`."""
    override = upstream.interfaces.get(interface)
    endpoint = override.endpoint if override is not None else None
    if endpoint is None and interface == RESPONSES:
        endpoint = upstream.responses_endpoint
    if endpoint is None and upstream.base_url is not None and interface in VENDOR_PATHS:
        endpoint = upstream.base_url.rstrip("/") + VENDOR_PATHS[interface]
    if endpoint is None:
        endpoint = upstream.endpoint
    key = upstream.key
    extra = upstream.extra_data
    if override is not None:
        if override.key is not None:
            key = override.key
        if override.extra_data is not None:
            extra = override.extra_data
        secret = override.secret_extra_data
        if isinstance(secret, dict):
            extra = {**extra, **secret} if isinstance(extra, dict) else secret
        elif secret is not None:
            extra = secret
    return upstream_headers(Upstream(endpoint=endpoint, key=key, extra_data=extra))


def _extra_text(extra: object) -> str:
    # DIAL keeps `extraData` as its compact JSON text, or the raw string (compatibility C25).
    return extra if isinstance(extra, str) else orjson.dumps(extra).decode()


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True, repr=False)
class UpstreamSet:
    """One deployment's upstreams as configured, in config order.

    `forwarded` is False for the synthetic upstream of an upstream-less deployment (applications,
    assistants, models without `upstreams`): it exists for bookkeeping only and sends no
    `X-UPSTREAM-*` headers (compatibility C31).
    """

    upstreams: tuple[Upstream, ...]
    forwarded: bool = True

    @classmethod
    def of(cls, spec: Deployable, endpoint: str | None) -> UpstreamSet:
        """A model's `upstreams`, or the synthetic upstream of anything else (at `endpoint`)."""
        if isinstance(spec, Model) and spec.upstreams:
            return cls(tuple(spec.upstreams))
        return cls.synthetic(endpoint)

    @classmethod
    def synthetic(cls, endpoint: str | None) -> UpstreamSet:
        """Core's `{endpoint: deployment.endpoint, key: "whatever"}`; no key is kept."""
        return cls((Upstream(endpoint=endpoint),), forwarded=False)

    def __repr__(self) -> str:
        endpoints = ", ".join(repr(u.endpoint) for u in self.upstreams)
        return f"UpstreamSet([{endpoints}], forwarded={self.forwarded})"


# What tells one upstream from another across reloads: endpoint, key digest, extraData digest,
# weight, tier, forwarded, and the occurrence among identical entries. Digests, so that no secret
# is ever a dict key or shows in a repr.
Identity = tuple[str | None, bytes, bytes, int, int, bool, int]


def _identities(upstreams: Sequence[Upstream], forwarded: bool) -> list[Identity]:
    seen: dict[tuple[str | None, bytes, bytes, int, int, bool], int] = {}
    identities: list[Identity] = []
    for upstream in upstreams:
        key = b"" if upstream.key is None else digest_of(upstream.key)
        extra = upstream.extra_data
        extra_digest = b"" if extra is None else digest_of(_extra_text(extra))
        base = (upstream.endpoint, key, extra_digest, upstream.weight, upstream.tier, forwarded)
        occurrence = seen.get(base, 0)
        seen[base] = occurrence + 1
        identities.append((*base, occurrence))
    return identities


# ---------------------------------------------------------------------------------------------
# Per-upstream state


class UpstreamState:
    """One upstream's health, with what a call through it needs precomputed.

    Health follows Core's `UpstreamState`: `parked_until` is a monotonic time (the
    upstream is available once the clock is past it), `error_count` counts 5xx since the last
    200, `rate_limited` says the current parking came from a 429.
    """

    __slots__ = (
        "_by_interface",
        "endpoint",
        "error_count",
        "fingerprint",
        "headers",
        "identity",
        "label",
        "parked_until",
        "rate_limited",
        "upstream",
    )

    def __init__(self, upstream: Upstream, identity: Identity, *, forwarded: bool = True) -> None:
        self.upstream = upstream
        self.identity = identity
        self.endpoint = upstream.endpoint
        # Logs name a key by the first 8 hex digits of its SHA-256 (compatibility C10).
        self.fingerprint = "" if upstream.key is None else fingerprint_of_digest(identity[1])
        self.headers = upstream_headers(upstream) if forwarded else ()
        # Of the other API families (`headers_of`); None: the synthetic upstream sends none.
        self._by_interface: dict[str, tuple[tuple[str, str], ...]] | None = (
            {} if forwarded else None
        )
        # Its name in metrics, traces and logs: `sha256:<fingerprint>` of its key, or
        # `#<position>` among its deployment's enabled upstreams (set by the balancer).
        self.label = f"sha256:{self.fingerprint}" if self.fingerprint else "#0"
        self.error_count = 0
        self.parked_until = _NOT_PARKED
        self.rate_limited = False

    def headers_of(self, interface: str) -> tuple[tuple[str, str], ...]:
        """`X-UPSTREAM-*` of a call to `interface` (`headers` for the deployments family)."""
        by_interface = self._by_interface
        if by_interface is None or interface in (CHAT_COMPLETIONS, EMBEDDINGS):
            return self.headers
        headers = by_interface.get(interface)
        if headers is None:
            headers = by_interface[interface] = interface_headers(self.upstream, interface)
        return headers

    def available(self, now: float) -> bool:
        return now > self.parked_until

    def record(self, status: int, retry_after: str | None, now: float) -> None:
        """Book one answer: 200 clears, 429 parks, 5xx count and back off."""
        if status == 200:
            self.error_count = 0
            self.parked_until = _NOT_PARKED
            self.rate_limited = False
        elif status == 429:
            self.parked_until = now + retry_after_seconds(retry_after)
            self.rate_limited = True
        elif status >= 500:  # transport failures arrive here as 502
            self.error_count += 1
            backoff = backoff_seconds(self.error_count)
            if backoff is not None:
                # The count is not reset when the parking ends: the next 5xx parks longer.
                self.parked_until = now + backoff
                self.rate_limited = False
        # Anything else (3xx, 4xx other than 429, other 2xx) changes nothing.

    def __repr__(self) -> str:
        key = f"sha256:{self.fingerprint}…" if self.fingerprint else None
        return (
            f"UpstreamState(endpoint={self.endpoint!r}, key={key}, "
            f"weight={self.upstream.weight}, tier={self.upstream.tier}, "
            f"errors={self.error_count}, parked_until={self.parked_until}, "
            f"rate_limited={self.rate_limited})"
        )


# ---------------------------------------------------------------------------------------------
# Selection


class _Tier:
    """Core's `WeightedRoundRobinBalancer` over one tier's enabled upstreams (compatibility C33).

    Upstreams sorted by weight, heaviest first (stable). Each pick computes for every upstream
    `delta_i = w_i/W - (u_i == 0 ? 0 : u_i/U)` and tries them in descending delta, ties to the
    earlier one; every candidate tried, available or not, counts in `u_i` and `U`. So a parked
    upstream keeps its share on the books and gets no burst when it comes back.

    Done in O(n) without sorting: the choice is the available upstream with the largest delta;
    the ones tried before it are exactly those ordered above it, all parked.
    """

    __slots__ = ("key", "rates", "states", "total", "usage")

    def __init__(self, states: Sequence[UpstreamState]) -> None:
        ordered = sorted(states, key=lambda s: -s.upstream.weight)
        weight = sum(s.upstream.weight for s in ordered)
        self.states: tuple[UpstreamState, ...] = tuple(ordered)
        self.rates: tuple[float, ...] = tuple(s.upstream.weight / weight for s in ordered)
        self.usage: list[int] = [0] * len(ordered)
        self.total = 0
        self.key = frozenset(s.identity for s in ordered)

    def pick(self, now: float) -> UpstreamState | None:
        states = self.states
        if len(states) == 1:  # nothing to balance: counters would never change the order
            only = states[0]
            return only if now > only.parked_until else None
        usage = self.usage
        rates = self.rates
        total = self.total
        best = -1
        best_delta = 0.0
        parked = False
        for i, state in enumerate(states):
            used = usage[i]
            delta = rates[i] - used / total if used else rates[i]
            if now > state.parked_until:
                if best < 0 or delta > best_delta:
                    best = i
                    best_delta = delta
            else:
                parked = True
        if not parked:  # the usual case: only the chosen one was tried
            usage[best] += 1
            self.total = total + 1
            return states[best]
        tried = 0
        for i in range(len(states)):
            used = usage[i]
            delta = rates[i] - used / total if used else rates[i]
            if best < 0 or i == best or delta > best_delta or (delta == best_delta and i < best):
                usage[i] = used + 1
                tried += 1
        self.total = total + tried
        return states[best] if best >= 0 else None


class DeploymentBalancer:
    """One deployment's upstreams: tiers visited lowest first, round robin inside.

    Build it through `Balancers.sync`; construct one directly only for a deployment that is not
    in the config (Core builds a fresh balancer per request for custom applications).
    `previous` carries state over from the balancer the last config built for the same name.
    """

    __slots__ = ("_key", "_tiers", "clock", "name", "states")

    def __init__(
        self,
        name: str,
        upstreams: UpstreamSet,
        clock: Monotonic = time.monotonic,
        previous: DeploymentBalancer | None = None,
    ) -> None:
        enabled = [u for u in upstreams.upstreams if u.weight > 0]  # weight <= 0 disables
        identities = _identities(enabled, upstreams.forwarded)
        known = {} if previous is None else {s.identity: s for s in previous.states}
        states: list[UpstreamState] = []
        for position, (upstream, identity) in enumerate(zip(enabled, identities, strict=True)):
            state = known.get(identity)
            if state is None:
                state = UpstreamState(upstream, identity, forwarded=upstreams.forwarded)
            if not state.fingerprint:
                state.label = f"#{position}"
            states.append(state)
        old_tiers = {} if previous is None else {t.key: t for t in previous._tiers}
        by_tier: dict[int, list[UpstreamState]] = {}
        for state in states:
            by_tier.setdefault(state.upstream.tier, []).append(state)
        tiers: list[_Tier] = []
        for tier in sorted(by_tier):
            members = by_tier[tier]
            # A tier with the same members keeps its round-robin counters; a changed one starts
            # at zero (old counts against new weights would send a newcomer a burst).
            kept = old_tiers.get(frozenset(s.identity for s in members))
            tiers.append(kept if kept is not None else _Tier(members))
        self.name = name
        self.states: tuple[UpstreamState, ...] = tuple(states)
        self._tiers: tuple[_Tier, ...] = tuple(tiers)
        self._key = frozenset(identities)
        self.clock = clock

    def same_upstreams(self, upstreams: UpstreamSet) -> bool:
        """Whether `upstreams` is this balancer's set, in any order (compatibility C32)."""
        enabled = [u for u in upstreams.upstreams if u.weight > 0]
        return frozenset(_identities(enabled, upstreams.forwarded)) == self._key

    def pick(self) -> UpstreamState | None:
        """The next upstream by tier and weight, or None when none is available now."""
        now = self.clock()
        for tier in self._tiers:
            state = tier.pick(now)
            if state is not None:
                return state
        return None

    def plan(
        self, max_attempts: int = MAX_ATTEMPTS, retriable: frozenset[int] = RETRIABLE_STATUSES
    ) -> AttemptPlan:
        """The attempt plan of one client call."""
        return AttemptPlan(self, max_attempts, retriable)

    def exhaustion(self, attempts: int = 0, limit_reached: bool = False) -> Exhaustion:
        """Whether every enabled upstream is parked now, why, and until when (compatibility C36)."""
        now = self.clock()
        states = self.states
        if not states or any(now > s.parked_until for s in states):
            return Exhaustion(attempts, limit_reached, all_parked=False, rate_limited=False)
        soonest = min(s.parked_until for s in states)
        return Exhaustion(
            attempts,
            limit_reached,
            all_parked=True,
            rate_limited=all(s.rate_limited for s in states),
            retry_after=max(1, math.ceil(soonest - now)),
        )

    def __repr__(self) -> str:
        return f"DeploymentBalancer({self.name!r}, {len(self.states)} upstreams)"


@dataclass(frozen=True, slots=True)
class Exhaustion:
    """Why a plan handed out no further upstream.

    `all_parked`: every enabled upstream is parked now (False when none is enabled);
    `rate_limited`: ... and every one of them by a 429, which the gateway answers with 503
    `Service is not available`; anything else is 502 `No route` (or 504 after a timeout).
    `retry_after`: whole seconds until the first parked upstream comes back, when all are parked.
    """

    attempts: int
    limit_reached: bool
    all_parked: bool
    rate_limited: bool
    retry_after: int | None = None


class AttemptPlan:
    """The upstreams of one client call, in the order to try (compatibility C35).

    `next()` (or iteration) hands out the current upstream; `record` / `record_transport_failure`
    book its answer on it. After `max_attempts` upstreams, or when none is available, `next()`
    returns None for good, without touching the balancer again. `attempts` is the number handed out
    (the value of `X-UPSTREAM-ATTEMPTS`; Core's `used` also counts a final empty pick, which no
    client ever sees). The same upstream may come back if it is still available, as in Core (a 502
    under the threshold, or a deployment with a single upstream).
    """

    __slots__ = ("_balancer", "_done", "_limit", "_retriable", "attempts", "current")

    def __init__(
        self,
        balancer: DeploymentBalancer,
        max_attempts: int = MAX_ATTEMPTS,
        retriable: frozenset[int] = RETRIABLE_STATUSES,
    ) -> None:
        self._balancer = balancer
        self._limit = max(1, max_attempts)  # a call makes one attempt at least
        self._retriable = retriable
        self._done = False
        self.attempts = 0
        self.current: UpstreamState | None = None

    def next(self) -> UpstreamState | None:
        if self._done:
            return None
        if self.attempts >= self._limit:  # Core does not ask the balancer past the limit
            self._done = True
            self.current = None
            return None
        state = self._balancer.pick()
        self.current = state
        if state is None:
            self._done = True
            return None
        self.attempts += 1
        return state

    def __iter__(self) -> AttemptPlan:
        return self

    def __next__(self) -> UpstreamState:
        state = self.next()
        if state is None:
            raise StopIteration
        return state

    def record(self, status: int, retry_after: str | None = None) -> bool:
        """Book the current upstream's answer; True when the next upstream should be tried.

        `retry_after` is the raw `Retry-After` header of a 429. A retriable answer is discarded;
        any other is relayed, its bookkeeping done all the same (a 500 counts).
        """
        state = self.current
        if state is not None:
            state.record(status, retry_after, self._balancer.clock())
        return status in self._retriable

    def record_transport_failure(self) -> bool:
        """A connection failure or timeout: booked as a 502, and retried (compatibility C35)."""
        state = self.current
        if state is not None:
            state.record(502, None, self._balancer.clock())
        return True

    def exhaustion(self) -> Exhaustion:
        """Why `next()` returned None: attempts used up, or none available (compatibility C36)."""
        return self._balancer.exhaustion(self.attempts, self.attempts >= self._limit)

    def __repr__(self) -> str:
        return f"AttemptPlan({self._balancer.name!r}, attempts={self.attempts}/{self._limit})"


# ---------------------------------------------------------------------------------------------
# Registry


class Balancers:
    """Balancer state across config snapshots, by (deployment name, upstream identity).

    In process memory, not shared between instances, as in Core.
    """

    __slots__ = ("_by_name", "_clock")

    def __init__(self, clock: Monotonic = time.monotonic) -> None:
        self._clock = clock
        self._by_name: dict[str, DeploymentBalancer] = {}

    def sync(self, sets: Mapping[str, UpstreamSet]) -> Mapping[str, DeploymentBalancer]:
        """Balancers for a new config: the unchanged kept, the rest rebuilt with what survives.

        Returns the new mapping (keep it beside the snapshot, so that a call sees the balancers
        of the config it started with); deployments absent from `sets` are dropped.
        """
        previous = self._by_name
        current: dict[str, DeploymentBalancer] = {}
        for name, upstreams in sets.items():
            old = previous.get(name)
            if old is not None and old.same_upstreams(upstreams):
                current[name] = old
            else:
                current[name] = DeploymentBalancer(name, upstreams, self._clock, old)
        self._by_name = current
        return current

    def get(self, name: str) -> DeploymentBalancer | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Balancers({len(self._by_name)} deployments)"
