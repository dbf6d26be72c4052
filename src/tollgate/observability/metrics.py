"""Prometheus metrics (compatibility C54): plain counters on the request path, rendered at scrape.

prometheus-client's own metric objects take a lock and look up a labelled child on every
update (microseconds each); the request path instead adds to plain dicts keyed by label
tuples, on the event loop thread, and `_Collector` turns them into metric families when
Prometheus scrapes. What the gateway already keeps (config reloads, balancer health, store
health) is read at scrape time and costs the request path nothing.

Labels name deployments, projects and upstreams by their key's fingerprint (or position), never
a key, a key's digest or a header value (compatibility C55). A deployment that does not exist is
labelled `""`, so unknown ids sent by clients cannot grow the label set.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from tollgate.routing.balancer import DeploymentBalancer

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
# Seconds. A call's total time runs from milliseconds (refused) to minutes (long streams).
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
TOKEN_TYPES: Final = ("prompt", "completion")


class Histogram:
    """Bucket counts and a sum; `observe` is one bisect and two additions."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf only
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*DURATION_BUCKETS, None), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound is None else repr(bound), running))
        return buckets


class StoreView:
    """What the metrics read of the gateway at scrape time (kept apart for tests and typing)."""

    def __init__(
        self,
        reloads: Callable[[], tuple[int, int]],
        balancers: Callable[[], Mapping[str, DeploymentBalancer]],
        store: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.reloads = reloads  # (successful, failed)
        self.balancers = balancers
        self.store = store  # `limits.store.describe` of the ledger


class Metrics:
    """Counters of one gateway process. Only the event loop thread writes them."""

    def __init__(self, view: StoreView | None = None) -> None:
        self.view = view
        self.requests: dict[tuple[str, str, int], int] = {}  # deployment, project, status
        self.durations: dict[str, Histogram] = {}  # by deployment
        self.ttfb: dict[str, Histogram] = {}  # upstream time to first byte, by deployment
        self.attempts: dict[tuple[str, str, str], int] = {}  # deployment, upstream, outcome
        self.tokens: dict[tuple[str, str], list[int]] = {}  # project, deployment → prompt, compl.
        self.cost_nano: dict[tuple[str, str], int] = {}  # project, deployment
        self.estimated: dict[str, int] = {}  # calls charged an estimate, by deployment
        self.rejections: dict[tuple[str, str, str, str], int] = {}  # project, depl., kind, window
        # Feature endpoints and routes: endpoint, target, project, status.
        self.endpoints: dict[tuple[str, str, str, int], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # --- the request path ------------------------------------------------------------------

    def call(
        self,
        deployment: str,
        project: str,
        status: int,
        seconds: float | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost_nano: int,
        usage_estimated: bool = False,
    ) -> None:
        """One deployment call, answered or refused (`seconds` None: refused before it was
        timed, at the front door); `usage_estimated`: its tokens are Tollgate's estimate."""
        key = (deployment, project, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if seconds is not None:
            histogram = self.durations.get(deployment)
            if histogram is None:
                histogram = self.durations[deployment] = Histogram()
            histogram.observe(seconds)
        if prompt_tokens or completion_tokens:
            pair = (project, deployment)
            tokens = self.tokens.get(pair)
            if tokens is None:
                tokens = self.tokens[pair] = [0, 0]
            tokens[0] += prompt_tokens
            tokens[1] += completion_tokens
        if cost_nano:
            pair = (project, deployment)
            self.cost_nano[pair] = self.cost_nano.get(pair, 0) + cost_nano
        if usage_estimated:
            self.estimated[deployment] = self.estimated.get(deployment, 0) + 1

    def attempt(self, deployment: str, upstream: str, outcome: str, ttfb_s: float | None) -> None:
        """One upstream attempt: `outcome` is the answer's status, or why there was none."""
        key = (deployment, upstream, outcome)
        attempts = self.attempts
        attempts[key] = attempts.get(key, 0) + 1
        if ttfb_s is not None:
            histogram = self.ttfb.get(deployment)
            if histogram is None:
                histogram = self.ttfb[deployment] = Histogram()
            histogram.observe(ttfb_s)

    def endpoint(self, endpoint: str, target: str, project: str, status: int) -> None:
        """A feature-endpoint call (`rate`, `tokenize`, ...) or a route call, answered."""
        key = (endpoint, target, project, status)
        self.endpoints[key] = self.endpoints.get(key, 0) + 1

    def rejected(self, project: str, deployment: str, kind: str, window: str) -> None:
        """A call refused by a limit (429): its kind (token, request, cost) and window."""
        key = (project, deployment, kind, window)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    # --- scrape ------------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """Turns the plain counters into Prometheus metric families when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield _printable(family)

    def _families(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "tollgate_requests",
            "Deployment calls, by deployment, caller project and answer status.",
            labels=("deployment", "project", "status"),
        )
        for (deployment, project, status), count in list(m.requests.items()):
            requests.add_metric((deployment, project, str(status)), count)
        yield requests
        yield _histograms(
            "tollgate_request_duration_seconds",
            "Time from a deployment call's arrival until its answer was relayed.",
            m.durations,
        )
        yield _histograms(
            "tollgate_upstream_ttfb_seconds",
            "Time from sending an upstream attempt until its status line arrived.",
            m.ttfb,
        )
        attempts = CounterMetricFamily(
            "tollgate_upstream_attempts",
            "Upstream attempts, by deployment, upstream (sha256:<key fingerprint> or "
            "#<position>) and outcome (the status, or connect_failed, timeout, broken).",
            labels=("deployment", "upstream", "outcome"),
        )
        for (deployment, upstream, outcome), count in list(m.attempts.items()):
            attempts.add_metric((deployment, upstream, outcome), count)
        yield attempts
        tokens = CounterMetricFamily(
            "tollgate_tokens",
            "Tokens used, by caller project, deployment and type (prompt, completion).",
            labels=("project", "deployment", "type"),
        )
        for (project, deployment), counts in list(m.tokens.items()):
            for kind, count in zip(TOKEN_TYPES, counts, strict=True):
                tokens.add_metric((project, deployment, kind), count)
        yield tokens
        cost = CounterMetricFamily(
            "tollgate_cost_usd",
            "Cost charged in US dollars, by caller project and deployment.",
            labels=("project", "deployment"),
        )
        for (project, deployment), nano in list(m.cost_nano.items()):
            cost.add_metric((project, deployment), nano / 1e9)
        yield cost
        estimated = CounterMetricFamily(
            "tollgate_usage_estimated",
            "Successful model calls whose answer reported no usage, charged Tollgate's own "
            "count of their tokens instead, by deployment.",
            labels=("deployment",),
        )
        for deployment, count in list(m.estimated.items()):
            estimated.add_metric((deployment,), count)
        yield estimated
        rejections = CounterMetricFamily(
            "tollgate_limit_rejections",
            "Calls refused by a limit (429), by project, deployment, kind (token, request, "
            "cost) and the first window exceeded.",
            labels=("project", "deployment", "kind", "window"),
        )
        for labels, count in list(m.rejections.items()):
            rejections.add_metric(labels, count)
        yield rejections
        endpoints = CounterMetricFamily(
            "tollgate_endpoint_requests",
            "Feature-endpoint calls (rate, tokenize, truncate_prompt, configuration) by their "
            "deployment, and route calls (endpoint `route`) by route name; by caller project "
            "and answer status.",
            labels=("endpoint", "target", "project", "status"),
        )
        for (endpoint, target, project, status), count in list(m.endpoints.items()):
            endpoints.add_metric((endpoint, target, project, str(status)), count)
        yield endpoints
        if m.view is not None:
            yield from _gateway_state(m.view)


# C0 and C1 control characters and DEL: a label value holding one (a route or deployment named
# with a NUL) is escaped as `\xNN`, so every label is printable and names stay distinct.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape_control(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _printable(family: Metric) -> Metric:
    """`family` with every label value printable (checked per scrape, rewritten only when a
    value holds a control character)."""
    samples = family.samples
    for index, sample in enumerate(samples):
        labels = sample.labels
        if any(_CONTROL.search(value) for value in labels.values()):
            samples[index] = sample._replace(
                labels={k: _CONTROL.sub(_escape_control, v) for k, v in labels.items()}
            )
    return family


def _histograms(name: str, documentation: str, by_deployment: dict[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=("deployment",))
    for deployment, histogram in list(by_deployment.items()):
        family.add_metric((deployment,), histogram.cumulative(), histogram.sum)
    return family


def _gateway_state(view: StoreView) -> Iterator[Metric]:
    reloaded, failed = view.reloads()
    yield CounterMetricFamily(
        "tollgate_config_reloads",
        "Dynamic config reloads that applied a changed config.",
        value=reloaded,
    )
    yield CounterMetricFamily(
        "tollgate_config_reload_failures",
        "Dynamic config reloads refused (the previous config kept serving).",
        value=failed,
    )
    parked = GaugeMetricFamily(
        "tollgate_upstream_parked",
        "1 while an upstream is parked after a 429 or repeated 5xx, else 0.",
        labels=("deployment", "upstream"),
    )
    for name, balancer in sorted(view.balancers().items()):
        now = balancer.clock()
        for state in balancer.states:
            parked.add_metric((name, state.label), 0.0 if state.available(now) else 1.0)
    yield parked
    store = view.store()
    healthy = GaugeMetricFamily(
        "tollgate_limits_store_healthy",
        "1 while the limits store answers (always 1 for the embedded store).",
        labels=("store",),
    )
    healthy.add_metric((str(store.get("store", "embedded")),), 1.0 if store["healthy"] else 0.0)
    yield healthy
    yield GaugeMetricFamily(
        "tollgate_limits_replay_pending",
        "Usage counted on this instance while Redis was unreachable, not yet added to it.",
        value=float(store.get("pendingReplay", 0)),
    )
