"""Prometheus metrics (DECISIONS 12): scraped from a real Tollgate after real calls.

One gateway serves `/metrics` on a port of its own (`metrics.port`, no authentication); another
keeps it on its own port, for administrators only. Upstreams fail on command through the fake
model's `/_fake/faults`. No label or value may carry a key, a key's digest or an upstream key
(DECISIONS 11).

Tollgate and the fake model run in process (`inprocess.py`); the reloads on SIGHUP and the
check of a gateway's output run `tollgate serve`.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_config import chat, error_of
from harness import FakeModel, Gateway, eventually, free_port, start_gateway, stop, write_json
from inprocess import Gateways, InProcessFake, InProcessGateway, start_inprocess_gateway

USER_KEY = "metrics-user-key-0123456789"
ADMIN_KEY = "metrics-admin-key-0123456789"
UPSTREAM_KEYS = ("upstream-secret-one-0123", "upstream-secret-two-0123")
SECRETS = (USER_KEY, ADMIN_KEY, *UPSTREAM_KEYS)
JSON = {"Content-Type": "application/json"}


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def config(fake: FakeModel | InProcessFake) -> dict[str, Any]:
    return {
        "models": {
            "priced": {
                "endpoint": fake.endpoint("priced"),
                "pricing": {"unit": "token", "prompt": "0.5", "completion": "1"},
                "features": {"rateEndpoint": f"{fake.url}/openai/deployments/priced/rate"},
            },
            "pair": {
                "endpoint": fake.endpoint("pair"),
                "upstreams": [
                    {"endpoint": "http://first-upstream", "key": UPSTREAM_KEYS[0]},
                    {"endpoint": "http://second-upstream", "key": UPSTREAM_KEYS[1]},
                ],
            },
            "keyless": {
                "endpoint": fake.endpoint("keyless"),
                "upstreams": [{"endpoint": "http://keyless-a"}, {"endpoint": "http://keyless-b"}],
            },
            "scarce": {"endpoint": fake.endpoint("scarce")},
        },
        "keys": {
            USER_KEY: {"project": "team-metrics", "role": "user"},
            ADMIN_KEY: {"project": "ops", "role": "admin"},
        },
        "roles": {
            "user": {"limits": {"scarce": {"requestDay": "1"}}},
            "admin": {"limits": {}},
        },
        "routes": {"static": {"paths": ["/v1/static"], "response": {"body": "fine"}}},
    }


@pytest.fixture(scope="module")
async def separate(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[tuple[InProcessGateway, int, Path]]:
    """A gateway with `metrics.port`, in process, on the session's in-process fake model (`afake`
    clears its records and faults around each test); its config file."""
    port = free_port()
    path = write_json(work_dir / "metrics-config.json", config(inprocess_fake))
    gw = await start_inprocess_gateway(
        work_dir, [path], settings={"metrics": {"port": port, "host": "127.0.0.1"}}
    )
    yield gw, port, path
    await gw.stop()


async def call(
    gw: InProcessGateway, deployment: str, key: str = USER_KEY, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            f"{gw.url}/openai/deployments/{deployment}/chat/completions",
            headers={"Api-Key": key, **JSON, **headers},
            json=chat("one two three"),
        )


def call_process(gw: Gateway, deployment: str, key: str = USER_KEY) -> httpx.Response:
    """`call`, made of a gateway process."""
    return httpx.post(
        f"{gw.url}/openai/deployments/{deployment}/chat/completions",
        headers={"Api-Key": key, **JSON},
        json=chat("one two three"),
        timeout=30,
    )


async def get(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url, headers=headers)


async def scrape(url: str, **headers: str) -> str:
    return checked(await get(f"{url}/metrics", **headers))


def scrape_process(url: str, **headers: str) -> str:
    """`scrape`, of a gateway process."""
    return checked(httpx.get(f"{url}/metrics", headers=headers, timeout=30))


def checked(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples named `name`, by their label set."""
    found: dict[frozenset[tuple[str, str]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    found = samples(text, name)
    key = frozenset(labels.items())
    assert key in found, f"no {name}{labels} in {sorted(map(sorted, found))}"
    return found[key]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text


async def test_calls_tokens_cost_and_latency(separate: tuple[InProcessGateway, int, Path]) -> None:
    gw, port, _ = separate
    for _ in range(3):
        assert (await call(gw, "priced")).status_code == 200
    assert (await call(gw, "unknown-deployment")).status_code == 404
    assert (await call(gw, "priced", key="not-a-key-0123456789")).status_code == 401

    text = await scrape(f"http://127.0.0.1:{port}")
    ok = {"deployment": "priced", "project": "team-metrics", "status": "200"}
    assert value(text, "tollgate_requests_total", **ok) == 3
    # Unknown deployments and unknown callers are labelled "": clients cannot add labels.
    assert value(text, "tollgate_requests_total", deployment="", project="team-metrics",
                 status="404") == 1  # fmt: skip
    assert value(text, "tollgate_requests_total", deployment="", project="", status="401") == 1
    assert "unknown-deployment" not in text
    # The fake counts words: 3 prompt tokens, 5 completion tokens per call.
    pair = {"project": "team-metrics", "deployment": "priced"}
    assert value(text, "tollgate_tokens_total", **pair, type="prompt") == 9
    assert value(text, "tollgate_tokens_total", **pair, type="completion") == 15
    assert value(text, "tollgate_cost_usd_total", **pair) == pytest.approx(3 * (1.5 + 5))
    assert value(text, "tollgate_request_duration_seconds_count", deployment="priced") == 3
    assert value(text, "tollgate_request_duration_seconds_bucket", deployment="priced",
                 le="+Inf") == 3  # fmt: skip
    assert value(text, "tollgate_upstream_ttfb_seconds_count", deployment="priced") == 3
    assert value(text, "tollgate_limits_store_healthy", store="embedded") == 1
    assert_no_secret(text)


async def test_attempts_and_parked_upstreams(
    separate: tuple[InProcessGateway, int, Path], afake: InProcessFake
) -> None:
    gw, port, _ = separate
    first, second = (f"sha256:{fingerprint(k)}" for k in UPSTREAM_KEYS)
    afake.add_fault({"upstream": "http://first-upstream", "status": 502, "times": 1})
    try:
        response = await call(gw, "pair")
        assert response.status_code == 200
        assert response.headers["X-UPSTREAM-ATTEMPTS"] == "2"
        text = await scrape(f"http://127.0.0.1:{port}")
        attempts = "tollgate_upstream_attempts_total"
        assert value(text, attempts, deployment="pair", upstream=first, outcome="502") == 1
        assert value(text, attempts, deployment="pair", upstream=second, outcome="200") == 1
        assert value(text, "tollgate_upstream_parked", deployment="pair", upstream=second) == 0

        # Both answer 429 with a long Retry-After: both parked, the call gets 503.
        afake.add_fault({"status": 429, "retryAfter": 120})
        assert (await call(gw, "keyless")).status_code == 503
        text = await scrape(f"http://127.0.0.1:{port}")
        # Upstreams without a key are named by their position.
        for label in ("#0", "#1"):
            assert value(text, attempts, deployment="keyless", upstream=label, outcome="429") == 1
            assert value(text, "tollgate_upstream_parked", deployment="keyless",
                         upstream=label) == 1  # fmt: skip
        assert value(text, "tollgate_requests_total", deployment="keyless",
                     project="team-metrics", status="503") == 1  # fmt: skip
        assert_no_secret(text)
    finally:
        afake.clear_faults()


async def test_limit_rejections(separate: tuple[InProcessGateway, int, Path]) -> None:
    gw, port, _ = separate
    assert (await call(gw, "scarce")).status_code == 200
    refused = await call(gw, "scarce")
    assert refused.status_code == 429
    text = await scrape(f"http://127.0.0.1:{port}")
    assert value(text, "tollgate_limit_rejections_total", project="team-metrics",
                 deployment="scarce", kind="request", window="day") == 1  # fmt: skip
    assert value(text, "tollgate_requests_total", deployment="scarce", project="team-metrics",
                 status="429") == 1  # fmt: skip


def test_config_reloads_and_failures(work_dir: Path, fake_model: FakeModel) -> None:
    """A `tollgate serve` process of its own: reloaded by SIGHUP."""
    fake = fake_model
    port = free_port()
    path = write_json(work_dir / "metrics-reload-config.json", config(fake))
    gw = start_gateway(work_dir, [path], settings={"metrics": {"port": port, "host": "127.0.0.1"}})
    try:
        url = f"http://127.0.0.1:{port}"
        before = scrape_process(url)
        reloads = value(before, "tollgate_config_reloads_total")
        failures = value(before, "tollgate_config_reload_failures_total")

        changed = config(fake)
        changed["models"]["added"] = {"endpoint": fake.endpoint("added")}
        write_json(path, changed)
        gw.process.send_signal(signal.SIGHUP)
        eventually(
            lambda: value(scrape_process(url), "tollgate_config_reloads_total") == reloads + 1
        )

        path.write_text('{"models": ')
        gw.process.send_signal(signal.SIGHUP)
        eventually(
            lambda: (
                value(scrape_process(url), "tollgate_config_reload_failures_total") == failures + 1
            )
        )
        assert value(scrape_process(url), "tollgate_config_reloads_total") == reloads + 1
    finally:
        stop(gw.process)


async def test_separate_port_leaves_none_on_the_gateway_port(
    separate: tuple[InProcessGateway, int, Path],
) -> None:
    gw, _, _ = separate
    response = await get(f"{gw.url}/metrics", **{"Api-Key": ADMIN_KEY})
    assert error_of(response) == (404, "No route")


def test_metrics_on_the_gateway_port_are_for_admins(work_dir: Path, fake_model: FakeModel) -> None:
    """A `tollgate serve` process: its output is checked too."""
    fake = fake_model
    gw = start_gateway(work_dir, [config(fake)])
    try:
        assert call_process(gw, "priced").status_code == 200
        assert error_of(httpx.get(f"{gw.url}/metrics"))[0] == 401
        assert error_of(httpx.get(f"{gw.url}/metrics", headers={"Api-Key": USER_KEY})) == (
            403,
            "User must be admin",
        )
        # Prometheus sends its credential as a bearer token.
        text = scrape_process(gw.url, Authorization=f"Bearer {ADMIN_KEY}")
        assert value(text, "tollgate_requests_total", deployment="priced",
                     project="team-metrics", status="200") == 1  # fmt: skip
        assert_no_secret(text)
        assert_no_secret(gw.output())
    finally:
        stop(gw.process)


async def test_metrics_can_be_turned_off(gateways: Gateways, afake: InProcessFake) -> None:
    gw = await gateways.start([config(afake)], env={"aidial.metrics.enabled": "false"})
    assert (await call(gw, "priced")).status_code == 200
    response = await get(f"{gw.url}/metrics", **{"Api-Key": ADMIN_KEY})
    assert error_of(response) == (404, "No route")


def test_settings_of_metrics_and_logs() -> None:
    from tollgate.settings import SettingsError, load_settings

    settings = load_settings(environ={"aidial.metrics.port": "9464", "aidial.log.format": "json"})
    assert (settings.metrics_enabled, settings.metrics_port, settings.log_format) == (
        True,
        9464,
        "json",
    )
    for environ, message in (
        ({"aidial.metrics.port": "8080"}, "metrics.port: must differ from server.port"),
        ({"aidial.metrics.port": "70000"}, "metrics.port: 70000 is not a TCP port"),
        ({"aidial.log.format": "xml"}, 'log.format: expected "text" or "json"'),
        ({"aidial.log.level": "LOUD"}, "log.level: expected DEBUG, INFO, WARNING or ERROR"),
    ):
        with pytest.raises(SettingsError, match=message):
            load_settings(environ=environ)


def test_histogram_buckets_are_cumulative() -> None:
    from tollgate.observability.metrics import Histogram

    histogram = Histogram()
    for seconds in (0.001, 0.005, 0.2, 400.0):
        histogram.observe(seconds)
    buckets = dict(histogram.cumulative())
    assert buckets["0.005"] == 2  # `le`: a value on a bound counts in that bucket
    assert buckets["0.25"] == 3
    assert buckets["300.0"] == 3
    assert buckets["+Inf"] == 4
    assert histogram.sum == pytest.approx(400.206)


async def test_feature_endpoints_and_routes_are_counted(
    separate: tuple[InProcessGateway, int, Path],
) -> None:
    gw, port, _ = separate
    headers = {"Api-Key": USER_KEY, **JSON}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        for _ in range(2):
            assert (
                await client.post("/v1/priced/rate", headers=headers, json={})
            ).status_code == 200
        unknown = await client.post("/v1/deployments/made-up-id/tokenize", headers=headers, json={})
        assert unknown.status_code == 404
        assert (await client.get("/v1/static", headers=headers)).text == "fine"
    text = await scrape(f"http://127.0.0.1:{port}")
    name = "tollgate_endpoint_requests_total"
    common = {"project": "team-metrics"}
    assert value(text, name, endpoint="rate", target="priced", status="200", **common) == 2
    # An id the config does not name is not a label: a client cannot grow the label set.
    assert value(text, name, endpoint="tokenize", target="", status="404", **common) == 1
    assert "made-up-id" not in text
    assert value(text, name, endpoint="route", target="static", status="200", **common) == 1


def test_estimated_calls_are_counted_by_deployment() -> None:
    """`tollgate_usage_estimated_total`: calls charged Tollgate's own count of their tokens,
    because the answer reported none (compatibility C71); other calls leave it alone."""
    from tollgate.observability.metrics import Metrics

    metrics = Metrics()
    for estimated in (True, True, False):
        metrics.call("gpt-4o", "team", 200, 0.1, 10, 5, 0, usage_estimated=estimated)
    metrics.call("other", "team", 200, 0.1, 10, 5, 0)
    text = metrics.render().decode()
    found = samples(text, "tollgate_usage_estimated_total")
    assert found == {frozenset({("deployment", "gpt-4o")}): 2.0}
    assert (
        value(text, "tollgate_tokens_total", project="team", deployment="gpt-4o", type="prompt")
        == 30
    )


async def test_responses_and_anthropic_calls_refused_before_the_caller_is_known_are_counted(
    separate: tuple[InProcessGateway, int, Path],
) -> None:
    gw, port, _ = separate
    before = value(
        await scrape(f"http://127.0.0.1:{port}"),
        "tollgate_requests_total",
        deployment="",
        project="",
        status="401",
    )
    async with httpx.AsyncClient(timeout=30) as client:
        for path in ("/openai/v1/responses", "/anthropic/v1/messages"):
            answer = await client.post(
                f"{gw.url}{path}",
                headers={"Api-Key": "not-a-key-0123456789", **JSON},
                json={"model": "priced"},
            )
            assert answer.status_code == 401
    text = await scrape(f"http://127.0.0.1:{port}")
    after = value(text, "tollgate_requests_total", deployment="", project="", status="401")
    assert after == before + 2
