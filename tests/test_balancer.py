"""Upstream balancer: Core's LoadBalancerTest / UpstreamRouteTest numbers (spec proxy 16.18-23),
the bookkeeping rules of spec 6.3-6.4, DECISIONS 5, and state across reloads."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollgate.config.schema import Config, Upstream
from tollgate.routing import (
    MAX_ATTEMPTS,
    RETRIABLE_STATUSES,
    Balancers,
    DeploymentBalancer,
    Exhaustion,
    UpstreamSet,
    UpstreamState,
    backoff_seconds,
    is_retriable,
    retriable_statuses,
    retry_after_seconds,
    upstream_headers,
)
from tollgate.snapshot import build_snapshot


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def up(endpoint: str, weight: int = 1, tier: int = 0, key: str | None = None) -> Upstream:
    return Upstream(endpoint=endpoint, key=key, weight=weight, tier=tier)


def balancer(
    *upstreams: Upstream, clock: FakeClock | None = None, name: str = "model1"
) -> DeploymentBalancer:
    return DeploymentBalancer(name, UpstreamSet(upstreams), clock or FakeClock())


def pick_endpoint(b: DeploymentBalancer) -> str | None:
    state = b.pick()
    return None if state is None else state.endpoint


def counts(b: DeploymentBalancer, picks: int) -> Counter[str | None]:
    return Counter(pick_endpoint(b) for _ in range(picks))


def park(b: DeploymentBalancer, endpoint: str, status: int, retry_after: str | None = None) -> None:
    state = next(s for s in b.states if s.endpoint == endpoint)
    state.record(status, retry_after, b.clock())


# --- spec 16.18: weighted round robin inside a tier (LoadBalancerTest.testWeightedLoadBalancer)


def test_weights_1_and_9_over_20_picks_give_2_and_18() -> None:
    b = balancer(up("endpoint1", 1), up("endpoint2", 9))
    assert counts(b, 20) == {"endpoint1": 2, "endpoint2": 18}


def test_weights_1_and_9_sequence_heaviest_first() -> None:
    # delta_i = w_i/W - u_i/U, ties to the heavier (spec 6.2): the light one comes second and
    # twelfth, i.e. once in each run of ten.
    b = balancer(up("endpoint1", 1), up("endpoint2", 9))
    sequence = [pick_endpoint(b) for _ in range(20)]
    light = [i for i, e in enumerate(sequence) if e == "endpoint1"]
    assert sequence[0] == "endpoint2"
    assert light == [1, 11]


def test_four_equal_weights_over_100_picks_give_25_each() -> None:
    b = balancer(*(up(f"endpoint{i}") for i in range(1, 5)))
    assert counts(b, 100) == {f"endpoint{i}": 25 for i in range(1, 5)}


def test_four_equal_weights_rotate_in_config_order() -> None:
    b = balancer(*(up(f"endpoint{i}") for i in range(1, 5)))
    assert [pick_endpoint(b) for _ in range(8)] == [f"endpoint{i}" for i in (1, 2, 3, 4) * 2]


def test_weights_49_44_47_59_over_398_picks() -> None:
    b = balancer(up("endpoint1", 49), up("endpoint2", 44), up("endpoint3", 47), up("endpoint4", 59))
    assert counts(b, 398) == {"endpoint1": 98, "endpoint2": 88, "endpoint3": 94, "endpoint4": 118}


# --- spec 16.19-21: tiers, parking (testTieredLoadBalancer, testLoadBalancerFailure, ...)


def test_lower_tier_takes_every_pick() -> None:
    b = balancer(up("endpoint1", 1, tier=0), up("endpoint2", 9, tier=1))
    assert counts(b, 50) == {"endpoint1": 50}


def test_tiers_ascend_whatever_the_config_order() -> None:
    b = balancer(up("b", tier=5), up("a", tier=-2), up("c", tier=0))
    assert counts(b, 10) == {"a": 10}


def test_429_parks_the_tier_until_retry_after_passes() -> None:
    clock = FakeClock()
    b = balancer(up("endpoint1", 1, tier=0), up("endpoint2", 9, tier=1), clock=clock)
    assert pick_endpoint(b) == "endpoint1"
    park(b, "endpoint1", 429, "1")
    assert counts(b, 10) == {"endpoint2": 10}
    clock.advance(2)
    assert pick_endpoint(b) == "endpoint1"


def test_zero_and_negative_weights_never_answer() -> None:
    b = balancer(up("endpoint1", 0, tier=1), up("endpoint2", -9, tier=1))
    assert counts(b, 10) == {None: 10}
    assert b.states == ()


def test_disabled_upstream_leaves_the_others() -> None:
    b = balancer(up("off", 0), up("on", 1), up("off2", -1))
    assert counts(b, 5) == {"on": 5}


def test_three_503s_move_to_the_next_tier() -> None:
    b = balancer(up("endpoint1", 1, tier=0), up("endpoint2", 1, tier=1))
    for _ in range(3):
        state = b.pick()
        assert state is not None and state.endpoint == "endpoint1"
        state.record(503, "1", b.clock())  # Retry-After is ignored for a 5xx
    assert pick_endpoint(b) == "endpoint2"


# --- spec 16.22: reload (testUpstreamRefresh)


def test_reload_with_same_set_in_other_order_keeps_state() -> None:
    clock = FakeClock()
    balancers = Balancers(clock)
    first = balancers.sync({"model1": UpstreamSet((up("endpoint1", 1, 1), up("endpoint2", 1, 1)))})
    plan = first["model1"].plan()
    for _ in range(2):
        assert plan.next() is not None
        assert plan.record(429, "100")
    assert plan.next() is None

    second = balancers.sync({"model1": UpstreamSet((up("endpoint2", 1, 1), up("endpoint1", 1, 1)))})
    assert second["model1"] is first["model1"]
    assert second["model1"].pick() is None

    third = balancers.sync({"model1": UpstreamSet((up("endpoint2", 5, 1), up("endpoint1", 1, 1)))})
    assert pick_endpoint(third["model1"]) == "endpoint2"
    # Tollgate keeps the state of the upstream that did not change: still parked.
    assert third["model1"].states[1].endpoint == "endpoint1"
    assert not third["model1"].states[1].available(clock())


# --- spec 16.23: attempt plans (UpstreamRouteTest)


def test_plan_makes_at_most_five_attempts() -> None:
    b = balancer(*(up(f"endpoint{i}", 1, 1) for i in range(1, 5)))
    plan = b.plan()
    handed = []
    for state in plan:
        handed.append(state.endpoint)
        assert plan.attempts == len(handed)
        assert plan.record(502)
    assert len(handed) == MAX_ATTEMPTS == 5
    assert handed[:4] == ["endpoint1", "endpoint2", "endpoint3", "endpoint4"]
    assert handed[4] == "endpoint1"  # still under the 5xx threshold: Core hands it out again
    assert plan.attempts == 5
    assert plan.next() is None
    exhausted = plan.exhaustion()
    assert exhausted.limit_reached and not exhausted.all_parked and not exhausted.rate_limited


def test_plan_stops_when_both_upstreams_are_rate_limited() -> None:
    b = balancer(up("endpoint1", 1, 1), up("endpoint2", 1, 1))
    plan = b.plan()
    assert plan.next() is not None and plan.attempts == 1
    assert plan.record(429, "30")
    assert plan.next() is not None and plan.attempts == 2
    assert plan.record(429, "30")
    assert plan.next() is None
    assert plan.attempts == 2  # Core's `used` says 3: it also counts the empty pick
    assert plan.exhaustion() == Exhaustion(
        attempts=2, limit_reached=False, all_parked=True, rate_limited=True, retry_after=30
    )


def test_upstream_less_app_failing_503_three_times() -> None:
    # Spec 6.4 worked example: attempts 1-3 hit the synthetic upstream, then it is parked 8 s.
    clock = FakeClock()
    b = DeploymentBalancer("app", UpstreamSet.synthetic("http://app/chat"), clock)
    plan = b.plan()
    for attempt in range(1, 4):
        state = plan.next()
        assert state is not None and state.headers == ()
        assert plan.attempts == attempt
        assert plan.record(503)
    assert plan.next() is None
    exhausted = plan.exhaustion()
    assert exhausted.all_parked and not exhausted.rate_limited
    assert exhausted.retry_after == 8
    clock.advance(8)
    assert b.pick() is None  # parked until strictly after now + 8 s
    clock.advance(0.001)
    assert b.pick() is not None


def test_plan_past_the_limit_leaves_the_counters_alone() -> None:
    b = balancer(up("a", 1), up("b", 1))
    plan = b.plan(max_attempts=1)
    assert plan.next() is not None
    assert plan.next() is None
    assert plan.next() is None
    assert pick_endpoint(b) == "b"  # the plan's second and third calls picked nothing


def test_plan_makes_one_attempt_at_least() -> None:
    plan = balancer(up("a")).plan(max_attempts=0)
    assert plan.next() is not None
    assert plan.next() is None


def test_plan_record_tells_retriable_from_relayed() -> None:
    b = balancer(up("a"))
    retriable = retriable_statuses([401, 403])
    plan = b.plan(retriable=retriable)
    assert plan.next() is not None
    assert plan.record(401)  # retried, but no bookkeeping for a 4xx (spec 6.3)
    assert b.states[0].error_count == 0 and b.states[0].available(b.clock())
    assert not plan.record(500)  # relayed, still counted
    assert b.states[0].error_count == 1
    assert not plan.record(200)
    assert b.states[0].error_count == 0


def test_transport_failure_books_a_502_and_retries() -> None:
    b = balancer(up("a"), up("b"))
    plan = b.plan()
    first = plan.next()
    assert first is not None
    assert plan.record_transport_failure()
    assert first.error_count == 1
    second = plan.next()
    assert second is not None and second is not first


def test_record_without_a_current_upstream_is_harmless() -> None:
    plan = balancer(up("a", 0)).plan()
    assert plan.next() is None
    assert plan.record(429)
    assert plan.record_transport_failure()


# --- spec 6.3: bookkeeping


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, 30),
        ("5", 5),
        ("0", 0),
        ("-3", 0),
        ("+7", 7),
        (" 12\t", 12),
        ("86400", 86400),
        ("1.5", 30),
        ("", 30),
        ("abc", 30),
        ("1_0", 30),
        ("\u0663", 30),  # a non-ASCII digit
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30),
        ("9223372036854775807", 9223372036854775807),
        ("9223372036854775808", 30),  # past Java's Long
    ],
)
def test_retry_after_seconds(value: str | None, seconds: int) -> None:
    assert retry_after_seconds(value) == seconds


@pytest.mark.parametrize(
    ("errors", "seconds"),
    [(0, None), (1, None), (2, None), (3, 8), (4, 16), (5, 32), (8, 256), (9, 300), (64, 300)],
)
def test_backoff_seconds(errors: int, seconds: float | None) -> None:
    assert backoff_seconds(errors) == seconds


def test_retriable_statuses() -> None:
    assert frozenset({429, 502, 503, 504}) == RETRIABLE_STATUSES
    assert all(is_retriable(s) for s in (429, 502, 503, 504))
    assert not any(is_retriable(s) for s in (200, 400, 401, 404, 413, 500, 501))
    extended = retriable_statuses([401, 403])
    assert is_retriable(401, extended) and is_retriable(403, extended)
    assert is_retriable(502, extended) and not is_retriable(500, extended)


def test_429_without_retry_after_parks_30_seconds() -> None:
    clock = FakeClock()
    b = balancer(up("a"), clock=clock)
    park(b, "a", 429)
    clock.advance(30)
    assert b.pick() is None
    clock.advance(0.5)
    assert b.pick() is not None


def test_429_with_zero_retry_after_unparks_at_once() -> None:
    clock = FakeClock()
    b = balancer(up("a"), clock=clock)
    park(b, "a", 429, "-5")
    assert b.pick() is None  # not strictly past yet
    clock.advance(0.001)
    assert b.pick() is not None


def test_5xx_count_survives_the_parking_and_backs_off_longer() -> None:
    clock = FakeClock()
    b = balancer(up("a"), clock=clock)
    state = b.states[0]
    for _ in range(2):
        state.record(500, None, clock())
        assert state.available(clock())
    state.record(502, None, clock())
    assert state.parked_until == clock() + 8
    clock.advance(9)
    assert state.available(clock())
    state.record(504, None, clock())
    assert state.error_count == 4 and state.parked_until == clock() + 16
    state.record(200, None, clock())
    assert state.error_count == 0 and state.available(clock())


def test_429_leaves_the_error_count_and_success_clears_everything() -> None:
    clock = FakeClock()
    state = balancer(up("a"), clock=clock).states[0]
    state.record(503, None, clock())
    state.record(429, "60", clock())
    assert state.error_count == 1 and state.rate_limited
    state.record(200, None, clock())
    assert state.error_count == 0 and not state.rate_limited and state.available(clock())


def test_other_statuses_change_nothing() -> None:
    clock = FakeClock()
    state = balancer(up("a"), clock=clock).states[0]
    state.record(503, None, clock())
    for status in (201, 204, 301, 400, 401, 404, 413, 418):
        state.record(status, None, clock())
    assert state.error_count == 1 and state.available(clock())


def test_parked_upstream_keeps_its_share_and_gets_no_burst() -> None:
    # Candidates tried while parked still count (spec 6.2), so coming back it takes its turn.
    clock = FakeClock()
    b = balancer(up("a"), up("b"), clock=clock)
    park(b, "a", 429, "10")
    assert counts(b, 20) == {"b": 20}
    clock.advance(11)
    assert counts(b, 20) == {"a": 10, "b": 10}


def test_parked_heavier_upstream_goes_to_the_next_one_in_the_tier() -> None:
    b = balancer(up("light", 1), up("heavy", 3))
    park(b, "heavy", 429, "100")
    assert counts(b, 8) == {"light": 8}


# --- DECISIONS 5: why a plan ran dry


def test_exhaustion_mixed_parking_is_not_rate_limited() -> None:
    clock = FakeClock()
    b = balancer(up("a"), up("b"), clock=clock)
    park(b, "a", 429, "100")
    for _ in range(3):
        park(b, "b", 503)
    plan = b.plan()
    assert plan.next() is None
    exhausted = plan.exhaustion()
    assert exhausted.all_parked and not exhausted.rate_limited
    assert exhausted.retry_after == 8  # the soonest: b's 8 s back-off


def test_exhaustion_retry_after_is_the_soonest_whole_second() -> None:
    clock = FakeClock()
    b = balancer(up("a"), up("b"), clock=clock)
    park(b, "a", 429, "40")
    park(b, "b", 429, "25")
    clock.advance(4.5)
    exhausted = b.plan().exhaustion()
    assert exhausted.rate_limited and exhausted.retry_after == 21


def test_exhaustion_when_nothing_is_enabled() -> None:
    plan = balancer(up("a", 0)).plan()
    assert plan.next() is None
    assert plan.exhaustion() == Exhaustion(0, False, all_parked=False, rate_limited=False)


def test_exhaustion_while_one_is_available() -> None:
    b = balancer(up("a"), up("b"))
    park(b, "a", 429)
    assert not b.plan().exhaustion().all_parked


# --- state across reloads


def test_sync_keeps_a_surviving_upstream_and_drops_the_rest() -> None:
    clock = FakeClock()
    balancers = Balancers(clock)
    first = balancers.sync({"m": UpstreamSet((up("a", key="k1"), up("b", key="k2")))})
    a_state = first["m"].states[0]
    park(first["m"], "a", 429, "100")
    second = balancers.sync({"m": UpstreamSet((up("a", key="k1"), up("c", key="k3")))})
    assert second["m"] is not first["m"]
    assert second["m"].states[0] is a_state and not a_state.available(clock())
    assert [s.endpoint for s in second["m"].states] == ["a", "c"]
    assert counts(second["m"], 3) == {"c": 3}


def test_sync_key_change_starts_afresh() -> None:
    balancers = Balancers(FakeClock())
    first = balancers.sync({"m": UpstreamSet((up("a", key="old"),))})
    park(first["m"], "a", 429, "100")
    second = balancers.sync({"m": UpstreamSet((up("a", key="new"),))})
    assert second["m"].pick() is not None


def test_sync_extra_data_change_starts_afresh() -> None:
    balancers = Balancers(FakeClock())
    old = Upstream(endpoint="a", extra_data={"region": "eu"})
    new = Upstream(endpoint="a", extra_data={"region": "us"})
    first = balancers.sync({"m": UpstreamSet((old,))})
    park(first["m"], "a", 429, "100")
    assert balancers.sync({"m": UpstreamSet((new,))})["m"].pick() is not None


def test_sync_keeps_round_robin_position_of_an_unchanged_tier() -> None:
    balancers = Balancers(FakeClock())
    tier0 = (up("a"), up("b"))
    first = balancers.sync({"m": UpstreamSet(tier0)})
    assert pick_endpoint(first["m"]) == "a"
    # A second tier appears: the deployment is rebuilt, tier 0 carries on where it was
    # (a fresh tier would start with "a" again).
    second = balancers.sync({"m": UpstreamSet((*tier0, up("z", 1, tier=1)))})
    assert second["m"] is not first["m"]
    assert [pick_endpoint(second["m"]) for _ in range(3)] == ["b", "a", "b"]


def test_sync_resets_counters_of_a_changed_tier() -> None:
    balancers = Balancers(FakeClock())
    first = balancers.sync({"m": UpstreamSet((up("a"), up("b")))})
    for _ in range(100):
        first["m"].pick()
    second = balancers.sync({"m": UpstreamSet((up("a"), up("b"), up("c")))})
    # No burst towards the newcomer: the three share the next picks evenly.
    assert counts(second["m"], 6) == {"a": 2, "b": 2, "c": 2}


def test_sync_drops_deployments_that_disappear() -> None:
    balancers = Balancers(FakeClock())
    balancers.sync({"m": UpstreamSet((up("a"),)), "n": UpstreamSet((up("b"),))})
    assert len(balancers) == 2
    current = balancers.sync({"n": UpstreamSet((up("b"),))})
    assert balancers.get("m") is None and "m" not in current
    assert balancers.get("n") is current["n"]


def test_duplicate_upstreams_keep_their_own_state() -> None:
    balancers = Balancers(FakeClock())
    first = balancers.sync({"m": UpstreamSet((up("a"), up("a")))})
    one, two = first["m"].states
    assert one is not two
    park(first["m"], "a", 429, "100")
    assert pick_endpoint(first["m"]) == "a"  # the twin is still available
    assert balancers.sync({"m": UpstreamSet((up("a"), up("a")))})["m"] is first["m"]


def test_synthetic_upstream_follows_the_endpoint() -> None:
    balancers = Balancers(FakeClock())
    first = balancers.sync({"app": UpstreamSet.synthetic("http://one")})
    for _ in range(3):
        park(first["app"], "http://one", 503)
    assert balancers.sync({"app": UpstreamSet.synthetic("http://one")})["app"].pick() is None
    assert balancers.sync({"app": UpstreamSet.synthetic("http://two")})["app"].pick() is not None


def test_synthetic_and_forwarded_upstream_are_not_confused() -> None:
    balancers = Balancers(FakeClock())
    forwarded = balancers.sync({"m": UpstreamSet((Upstream(endpoint="http://x"),))})
    assert forwarded["m"].states[0].headers == (("X-UPSTREAM-ENDPOINT", "http://x"),)
    synthetic = balancers.sync({"m": UpstreamSet.synthetic("http://x")})
    assert synthetic["m"].states[0].headers == ()


# --- inputs and headers


def test_upstream_set_of_a_snapshot() -> None:
    config = Config.model_validate(
        {
            "models": {
                "gpt": {
                    "endpoint": "http://adapter/chat",
                    "upstreams": [
                        {"endpoint": "http://u1", "key": "k1", "extraData": {"a": 1}, "weight": 2},
                        {"endpoint": "http://u2", "tier": 1},
                    ],
                },
                "bare": {"endpoint": "http://ollama/v1/chat/completions"},
            },
            "applications": {"app": {"endpoint": "http://app/chat"}},
        }
    )
    snapshot = build_snapshot(config)
    sets = {name: UpstreamSet.of(d.spec, d.endpoint) for name, d in snapshot.deployments.items()}
    assert [u.endpoint for u in sets["gpt"].upstreams] == ["http://u1", "http://u2"]
    assert sets["gpt"].forwarded
    for name, endpoint in (
        ("bare", "http://ollama/v1/chat/completions"),
        ("app", "http://app/chat"),
    ):
        assert not sets[name].forwarded
        assert [u.endpoint for u in sets[name].upstreams] == [endpoint]
    by_name = Balancers(FakeClock()).sync(sets)
    chosen = by_name["gpt"].pick()
    assert chosen is not None
    assert chosen.headers == (
        ("X-UPSTREAM-ENDPOINT", "http://u1"),
        ("X-UPSTREAM-KEY", "k1"),
        ("X-UPSTREAM-EXTRA-DATA", '{"a":1}'),
    )


def test_upstream_headers_skip_null_values() -> None:
    assert upstream_headers(Upstream()) == ()
    assert upstream_headers(Upstream(endpoint="e", extra_data="raw text")) == (
        ("X-UPSTREAM-ENDPOINT", "e"),
        ("X-UPSTREAM-EXTRA-DATA", "raw text"),
    )


def test_no_secret_in_any_repr() -> None:
    key = "sk-very-secret-upstream-key"
    extra = {"token": "extra-secret-token"}
    balancers = Balancers(FakeClock())
    upstreams = UpstreamSet((Upstream(endpoint="http://u", key=key, extra_data=extra),))
    by_name = balancers.sync({"m": upstreams})
    plan = by_name["m"].plan()
    state = plan.next()
    assert state is not None
    assert state.fingerprint and len(state.fingerprint) == 8
    texts = [
        repr(upstreams),
        repr(balancers),
        repr(by_name),
        repr(by_name["m"]),
        repr(plan),
        repr(state),
        repr(state.identity),
        repr(by_name["m"].states),
        repr(plan.exhaustion()),
    ]
    for text in texts:
        assert key not in text and "extra-secret-token" not in text
    assert state.fingerprint in repr(state)
    assert not any(key in str(part) for part in state.identity)


# --- properties


weights_lists = st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=6)


def _weighted(weights: Sequence[int]) -> DeploymentBalancer:
    return balancer(*(up(str(i), w) for i, w in enumerate(weights)))


@settings(max_examples=200, deadline=None)
@given(weights_lists, st.integers(min_value=1, max_value=3))
def test_every_full_cycle_is_exactly_proportional(weights: list[int], cycles: int) -> None:
    b = _weighted(weights)
    total = sum(weights)
    seen = Counter(pick_endpoint(b) for _ in range(total * cycles))
    assert seen == {str(i): w * cycles for i, w in enumerate(weights)}


@settings(max_examples=200, deadline=None)
@given(weights_lists)
def test_every_prefix_stays_close_to_the_weights(weights: list[int]) -> None:
    b = _weighted(weights)
    total = sum(weights)
    seen = [0] * len(weights)
    for n in range(1, total + 1):
        chosen = pick_endpoint(b)
        assert chosen is not None
        seen[int(chosen)] += 1
        for i, w in enumerate(weights):
            assert abs(seen[i] - n * w / total) < len(weights)


upstream_specs = st.lists(
    st.tuples(st.integers(min_value=-1, max_value=5), st.integers(min_value=0, max_value=2)),
    min_size=1,
    max_size=6,
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("pick"), st.just(0)),
        st.tuples(st.just("advance"), st.integers(min_value=0, max_value=400)),
        st.tuples(st.sampled_from([200, 429, 500, 502, 503, 400]), st.integers(0, 5)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(upstream_specs, events)
def test_picks_respect_tiers_and_parking(
    specs: list[tuple[int, int]], steps: list[tuple[str | int, int]]
) -> None:
    clock = FakeClock()
    b = balancer(*(up(str(i), w, t) for i, (w, t) in enumerate(specs)), clock=clock)
    enabled = [s for s in b.states if s.upstream.weight > 0]
    assert len(enabled) == sum(1 for w, _ in specs if w > 0)
    for kind, value in steps:
        if kind == "advance":
            clock.advance(value)
            continue
        if isinstance(kind, int):
            if enabled:
                enabled[value % len(enabled)].record(kind, str(value), clock())
            continue
        now = clock()
        available = [s for s in enabled if s.available(now)]
        chosen = b.pick()
        if not available:
            assert chosen is None
            continue
        assert chosen is not None and chosen.available(now)
        assert chosen.upstream.tier == min(s.upstream.tier for s in available)
    for state in enabled:  # never parked past the 5-minute cap (Retry-After values are <= 5)
        assert state.parked_until <= clock() + 300


@settings(max_examples=200, deadline=None)
@given(upstream_specs, st.lists(st.sampled_from([429, 500, 502, 503, 504, 400]), max_size=8))
def test_plan_never_exceeds_its_attempts(specs: list[tuple[int, int]], answers: list[int]) -> None:
    clock = FakeClock()
    b = balancer(*(up(str(i), w, t) for i, (w, t) in enumerate(specs)), clock=clock)
    plan = b.plan()
    handed = 0
    for state in plan:
        handed += 1
        assert state.available(clock())
        status = answers[handed - 1] if handed <= len(answers) else 502
        if not plan.record(status, "50"):
            break
    assert plan.attempts == handed <= MAX_ATTEMPTS
    if handed < MAX_ATTEMPTS and plan.next() is None:
        now = clock()
        parked = bool(b.states) and not any(s.available(now) for s in b.states)
        assert plan.exhaustion().all_parked == parked


@settings(max_examples=100, deadline=None)
@given(st.permutations([("a", 1, 0), ("b", 2, 0), ("c", 3, 1), ("d", 1, 1)]))
def test_reordered_set_keeps_the_balancer(order: list[tuple[str, int, int]]) -> None:
    balancers = Balancers(FakeClock())
    base = [("a", 1, 0), ("b", 2, 0), ("c", 3, 1), ("d", 1, 1)]
    first = balancers.sync({"m": UpstreamSet(tuple(up(e, w, t) for e, w, t in base))})
    again = balancers.sync({"m": UpstreamSet(tuple(up(e, w, t) for e, w, t in order))})
    assert again["m"] is first["m"]


def test_states_are_upstream_states() -> None:
    b = balancer(up("a"))
    assert all(isinstance(s, UpstreamState) for s in b.states)
