"""OpenTelemetry traces (DECISIONS 12): spans exported over OTLP/HTTP when configured.

Real processes on loopback: Tollgate exporting to `otlp_collector.py` (which decodes what it gets
with `opentelemetry-proto`), the fake model (it records the headers it got), and
`apps/relay_interceptor.py` as an interceptor and as an application that calls back with its
per-request key and no `traceparent` of its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import chat
from harness import (
    FakeModel,
    Gateway,
    Relay,
    _wait_healthy,
    free_port,
    start_gateway,
    start_relay,
    stop,
    write_json,
)
from tollgate.settings import load_settings

TESTS_DIR = Path(__file__).resolve().parent
KEY = "tracing-key-0123456789abcdef"
WRONG_KEY = "tracing-wrong-key-0123456789"
FIRST_UPSTREAM_KEY = "tracing-upstream-one-secret"
SECOND_UPSTREAM_KEY = "tracing-upstream-two-secret"
FIRST_UPSTREAM = "http://first.tracing.example/v1"
SECRETS = (KEY, WRONG_KEY, FIRST_UPSTREAM_KEY, SECOND_UPSTREAM_KEY)
SERVICE = "tollgate-under-test"
CHAT_SPAN = "POST /openai/deployments/{deployment}/chat/completions"


@dataclass
class Collector:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(f"{self.url}/_spans").json()
        return result

    def raw(self) -> bytes:
        return httpx.get(f"{self.url}/_raw").content

    def trace(self, trace_id: str, count: int) -> list[dict[str, Any]]:
        """The spans of `trace_id`, once `count` of them have arrived (bounded wait)."""
        deadline = time.monotonic() + 15
        while True:
            found = [s for s in self.spans() if s["trace_id"] == trace_id]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def start_collector(log_dir: Path) -> Collector:
    port = free_port()
    log = log_dir / f"otlp-collector-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "otlp_collector.py"), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
    return Collector(port, process)


def traceparent(trace_id: str, parent: str, flags: str = "01") -> str:
    return f"00-{trace_id}-{parent}-{flags}"


def sampled(flags: str) -> bool:
    """The W3C `sampled` flag (the SDK may also set level 2's `random` flag)."""
    return int(flags, 16) & 1 == 1


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def new_trace_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:32]


def config(fake: FakeModel, relay_port: int) -> dict[str, Any]:
    def relay(name: str) -> str:
        return f"http://127.0.0.1:{relay_port}/{name}/chat/completions"

    return {
        "models": {
            "traced-model": {
                "endpoint": fake.endpoint("traced-model"),
                "upstreams": [
                    {"endpoint": FIRST_UPSTREAM, "key": FIRST_UPSTREAM_KEY},
                    {
                        # A fallback: calls go to the first one while it is available.
                        "endpoint": "http://second.tracing.example/v1",
                        "key": SECOND_UPSTREAM_KEY,
                        "tier": 1,
                    },
                ],
                "pricing": {"unit": "token", "prompt": "0.25", "completion": "0.5"},
                "features": {"tokenizeEndpoint": f"{fake.url}/traced-model/tokenize"},
            },
            "chained-model": {
                "endpoint": fake.endpoint("chained-model"),
                "interceptors": ["relay"],
            },
        },
        "applications": {"calling-app": {"endpoint": relay("probe")}},
        "interceptors": {"relay": {"endpoint": relay("relay")}},
        "routes": {
            "echo-route": {
                "paths": ["/traced-route"],
                "methods": ["POST"],
                "upstreams": [{"endpoint": f"{fake.url}/traced-route"}],
            }
        },
        "keys": {KEY: {"project": "tracing team", "role": "user"}},
    }


@pytest.fixture(scope="module")
def collector(work_dir: Path) -> Iterator[Collector]:
    found = start_collector(work_dir)
    yield found
    stop(found.process)


@pytest.fixture(scope="module")
def relay_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def traced(
    work_dir: Path, fake_model: FakeModel, collector: Collector, relay_port: int
) -> Iterator[Gateway]:
    gw = start_gateway(
        work_dir,
        [config(fake_model, relay_port)],
        settings={"telemetry": {"otlp": {"endpoint": collector.url}, "serviceName": SERVICE}},
        env={"OTEL_BSP_SCHEDULE_DELAY": "50"},  # the batch processor's delay, in ms
    )
    yield gw
    stop(gw.process)


@pytest.fixture(scope="module")
def relay(work_dir: Path, traced: Gateway, relay_port: int) -> Iterator[Relay]:
    service = start_relay(work_dir, relay_port, traced.url)
    yield service
    stop(service.process)


def post(
    gw: Gateway, deployment: str, headers: dict[str, str] | None = None, key: str = KEY
) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/deployments/{deployment}/chat/completions",
        headers={"Api-Key": key, "Content-Type": "application/json", **(headers or {})},
        json=chat("count these four"),
        timeout=30,
    )


def header(record: dict[str, Any], name: str) -> str | None:
    values = [v for k, v in record["headers"] if k.lower() == name]
    assert len(values) <= 1, values
    return values[0] if values else None


def model_requests(fake: FakeModel, path_part: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests() if path_part in r["path"]]


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, spans)
    return found[0]


def test_a_call_joins_the_clients_trace_and_forwards_its_attempts_context(
    traced: Gateway, collector: Collector, fake: FakeModel
) -> None:
    trace_id = new_trace_id("joins")
    headers = {"traceparent": traceparent(trace_id, "00f067aa0ba902b7"), "tracestate": "vnd=a1"}
    response = post(traced, "traced-model", headers)
    assert response.status_code == 200
    spans = collector.trace(trace_id, 2)
    assert len(spans) == 2
    server = one(spans, kind="SERVER")
    attempt = one(spans, kind="CLIENT")
    assert server["name"] == CHAT_SPAN
    assert server["parent_span_id"] == "00f067aa0ba902b7"
    assert server["status"] == "UNSET"
    assert server["resource"]["service.name"] == SERVICE
    assert server["attributes"] == {
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "tollgate.deployment": "traced-model",
        "tollgate.project": "tracing team",
        # The fake counts words: 3 in the prompt, 5 in its answer.
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 5,
        "tollgate.usage.total_tokens": 8,
        "tollgate.cost_usd": pytest.approx(3 * 0.25 + 5 * 0.5),
        "tollgate.upstream": f"sha256:{fingerprint(FIRST_UPSTREAM_KEY)}",
        "tollgate.attempts": 1,
    }
    assert attempt["parent_span_id"] == server["span_id"]
    assert attempt["attributes"]["tollgate.attempt"] == 1
    assert attempt["attributes"]["tollgate.upstream"] == server["attributes"]["tollgate.upstream"]
    assert attempt["attributes"]["http.response.status_code"] == 200
    assert attempt["attributes"]["server.address"] == "127.0.0.1"
    # The model got the attempt's context, the client's tracestate kept (W3C trace context).
    [got] = model_requests(fake, "traced-model")
    assert header(got, "traceparent") == traceparent(trace_id, attempt["span_id"])
    assert header(got, "tracestate") == "vnd=a1"


def test_a_retried_call_has_a_span_per_attempt(
    traced: Gateway, collector: Collector, fake: FakeModel
) -> None:
    trace_id = new_trace_id("retried")
    fault = {"upstream": FIRST_UPSTREAM, "status": 503, "times": 1}
    assert httpx.post(f"{fake.url}/_fake/faults", json=fault).status_code == 204
    try:
        response = post(traced, "traced-model", {"traceparent": traceparent(trace_id, "1" * 16)})
    finally:
        httpx.delete(f"{fake.url}/_fake/faults")
    assert response.status_code == 200
    assert response.headers["X-UPSTREAM-ATTEMPTS"] == "2"
    spans = collector.trace(trace_id, 3)
    server = one(spans, kind="SERVER")
    attempts = sorted(
        (s for s in spans if s["kind"] == "CLIENT"),
        key=lambda s: s["attributes"]["tollgate.attempt"],
    )
    assert [a["attributes"]["tollgate.attempt"] for a in attempts] == [1, 2]
    assert all(a["parent_span_id"] == server["span_id"] for a in attempts)
    assert attempts[0]["attributes"]["http.response.status_code"] == 503
    assert attempts[0]["status"] == "ERROR"
    assert attempts[1]["attributes"]["http.response.status_code"] == 200
    assert attempts[1]["status"] == "UNSET"
    upstreams = {f"sha256:{fingerprint(k)}" for k in (FIRST_UPSTREAM_KEY, SECOND_UPSTREAM_KEY)}
    assert {a["attributes"]["tollgate.upstream"] for a in attempts} <= upstreams
    assert server["attributes"]["tollgate.attempts"] == 2
    # Each attempt carried its own span's context to the model.
    sent = [header(r, "traceparent") for r in model_requests(fake, "traced-model")]
    assert sent == [traceparent(trace_id, a["span_id"]) for a in attempts]


def test_a_call_without_traceparent_starts_a_trace_the_access_log_names(
    traced: Gateway, collector: Collector, fake: FakeModel
) -> None:
    response = post(traced, "traced-model")
    assert response.status_code == 200
    [got] = model_requests(fake, "traced-model")
    sent = header(got, "traceparent")
    assert sent is not None
    version, trace_id, span_id, flags = sent.split("-")
    assert version == "00" and sampled(flags)
    spans = collector.trace(trace_id, 2)
    server = one(spans, kind="SERVER")
    assert server["parent_span_id"] == ""
    assert one(spans, kind="CLIENT")["span_id"] == span_id
    deadline = time.monotonic() + 10
    while f"trace_id={trace_id}" not in traced.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"trace_id={trace_id}" in traced.output()


def test_an_invalid_traceparent_is_not_followed(
    traced: Gateway, collector: Collector, fake: FakeModel
) -> None:
    # An all-zero trace id is invalid (W3C trace context): a new trace starts.
    response = post(traced, "traced-model", {"traceparent": traceparent("0" * 32, "2" * 16)})
    assert response.status_code == 200
    sent = header(model_requests(fake, "traced-model")[0], "traceparent")
    assert sent is not None
    trace_id = sent.split("-")[1]
    assert trace_id != "0" * 32
    server = one(collector.trace(trace_id, 2), kind="SERVER")
    assert server["parent_span_id"] == ""


def test_an_application_calling_back_with_its_key_continues_the_trace(
    traced: Gateway, collector: Collector, fake: FakeModel, relay: Relay
) -> None:
    """The relay calls `traced-model` with the app's per-request key and no `traceparent`:
    the callback joins the trace through the key, under the attempt that gave it out."""
    relay.clear()
    trace_id = new_trace_id("application")
    headers = {
        "traceparent": traceparent(trace_id, "3" * 16),
        "X-Test-Mode-probe": "call:traced-model",
    }
    response = post(traced, "calling-app", headers)
    assert response.status_code == 200, response.text
    spans = collector.trace(trace_id, 4)
    servers = [s for s in spans if s["kind"] == "SERVER"]
    app_call = one(servers, parent_span_id="3" * 16)
    app_attempt = one(spans, kind="CLIENT", parent_span_id=app_call["span_id"])
    callback = one(servers, parent_span_id=app_attempt["span_id"])
    assert app_call["attributes"]["tollgate.deployment"] == "calling-app"
    assert callback["attributes"]["tollgate.deployment"] == "traced-model"
    assert callback["attributes"]["tollgate.via"] == "calling-app"
    assert callback["attributes"]["tollgate.project"] == "tracing team"
    callback_attempt = one(spans, kind="CLIENT", parent_span_id=callback["span_id"])
    # The app got the attempt's context; it sent none back (the key linked the callback).
    [got] = relay.got("probe")
    sent = dict((k.lower(), v) for k, v in got["headers"])
    assert sent["traceparent"] == traceparent(trace_id, app_attempt["span_id"])
    [model_call] = model_requests(fake, "traced-model")
    assert header(model_call, "traceparent") == traceparent(trace_id, callback_attempt["span_id"])


def test_an_interceptor_hop_and_its_callback_stay_in_the_trace(
    traced: Gateway, collector: Collector, fake: FakeModel, relay: Relay
) -> None:
    relay.clear()
    trace_id = new_trace_id("interceptor")
    response = post(traced, "chained-model", {"traceparent": traceparent(trace_id, "4" * 16)})
    assert response.status_code == 200, response.text
    spans = collector.trace(trace_id, 3)
    entry = one(spans, kind="SERVER", parent_span_id="4" * 16)
    [got] = relay.got("relay")
    sent = dict((k.lower(), v) for k, v in got["headers"])
    assert sent["traceparent"] == traceparent(trace_id, entry["span_id"])
    # The interceptor called back with its key only: the chain's end joins through the key.
    chain_end = one(spans, kind="SERVER", parent_span_id=entry["span_id"])
    assert chain_end["attributes"]["tollgate.deployment"] == "chained-model"
    attempt = one(spans, kind="CLIENT", parent_span_id=chain_end["span_id"])
    [model_call] = model_requests(fake, "chained-model")
    assert header(model_call, "traceparent") == traceparent(trace_id, attempt["span_id"])


def test_feature_and_route_calls_have_spans_whose_context_is_forwarded(
    traced: Gateway, collector: Collector, fake: FakeModel
) -> None:
    trace_id = new_trace_id("features")
    headers = {
        "Api-Key": KEY,
        "Content-Type": "application/json",
        "traceparent": traceparent(trace_id, "5" * 16),
    }
    tokenize = httpx.post(
        f"{traced.url}/v1/deployments/traced-model/tokenize",
        headers=headers,
        json={"inputs": [{"type": "string", "value": "three words here"}]},
        timeout=30,
    )
    assert tokenize.status_code == 200, tokenize.text
    routed = httpx.post(f"{traced.url}/traced-route", headers=headers, content=b"{}", timeout=30)
    assert routed.status_code == 404  # the fake serves nothing there: relayed as it is
    spans = collector.trace(trace_id, 2)
    feature = one(spans, name="POST tokenize")
    route = one(spans, name="POST echo-route")
    for span, status in ((feature, 200), (route, 404)):
        assert span["kind"] == "SERVER"
        assert span["parent_span_id"] == "5" * 16
        assert span["attributes"]["http.response.status_code"] == status
        assert span["status"] == "UNSET"  # a 4xx is the client's error, not the server's
    [feature_call] = model_requests(fake, "/traced-model/tokenize")
    assert header(feature_call, "traceparent") == traceparent(trace_id, feature["span_id"])
    [route_call] = model_requests(fake, "/traced-route")
    assert header(route_call, "traceparent") == traceparent(trace_id, route["span_id"])


def test_refused_calls_are_traced_without_a_project(traced: Gateway, collector: Collector) -> None:
    trace_id = new_trace_id("refused")
    parent = traceparent(trace_id, "6" * 16)
    assert post(traced, "traced-model", {"traceparent": parent}, key=WRONG_KEY).status_code == 401
    assert post(traced, "no-such-model", {"traceparent": parent}).status_code == 404
    spans = collector.trace(trace_id, 2)
    assert all(s["kind"] == "SERVER" and s["name"] == CHAT_SPAN for s in spans)
    assert all(s["parent_span_id"] == "6" * 16 and s["status"] == "UNSET" for s in spans)
    by_status = {s["attributes"]["http.response.status_code"]: s["attributes"] for s in spans}
    assert sorted(by_status) == [401, 404]
    assert "tollgate.project" not in by_status[401]  # the caller is unknown
    assert by_status[401]["tollgate.deployment"] == "traced-model"
    assert by_status[404]["tollgate.project"] == "tracing team"
    assert by_status[404]["tollgate.deployment"] == "no-such-model"


def test_no_secret_is_exported(traced: Gateway, collector: Collector, fake: FakeModel) -> None:
    """Keys, upstream keys, per-request keys and their SHA-256 never leave in a span
    (DECISIONS 11)."""
    trace_id = new_trace_id("secrets")
    headers = {"traceparent": traceparent(trace_id, "7" * 16), "Authorization": f"Bearer {KEY}"}
    assert post(traced, "traced-model", headers).status_code == 200
    assert (
        post(traced, "traced-model", {"traceparent": headers["traceparent"]}, WRONG_KEY).status_code
        == 401
    )
    collector.trace(trace_id, 3)
    per_request_keys = [header(r, "api-key") for r in fake.requests()]
    assert per_request_keys and all(per_request_keys)
    secrets = [*SECRETS, *(k for k in per_request_keys if k)]
    raw = collector.raw()
    assert len(raw) > 0
    exported = raw + repr(collector.spans()).encode()
    for secret in secrets:
        digest = hashlib.sha256(secret.encode()).digest()
        for form in (secret.encode(), digest, digest.hex().encode()):
            assert form not in exported, secret


def test_with_tracing_off_traceparent_passes_through_unchanged(
    gateway: Gateway, fake: FakeModel
) -> None:
    parent = traceparent(new_trace_id("off"), "8" * 16)
    response = httpx.post(
        f"{gateway.url}/openai/deployments/chat-model/chat/completions",
        headers={
            "Api-Key": "test-key-default-0123456789",
            "Content-Type": "application/json",
            "traceparent": parent,
            "tracestate": "vnd=off",
        },
        json=chat(),
        timeout=30,
    )
    assert response.status_code == 200
    got = fake.last()
    assert header(got, "traceparent") == parent
    assert header(got, "tracestate") == "vnd=off"


def test_opentelemetry_variables_configure_tracing_and_spans_are_flushed_on_stop(
    work_dir: Path, fake_model: FakeModel, collector: Collector
) -> None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT` turns tracing on and `OTEL_SERVICE_NAME` names it; a
    sample ratio of 0 keeps only traces the client sampled; a batch delay longer than the
    test: the spans leave when the gateway stops."""
    gw = start_gateway(
        work_dir,
        [
            {
                "models": {"env-model": {"endpoint": fake_model.endpoint("env-model")}},
                "keys": {KEY: {"project": "env", "role": "user"}},
            }
        ],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_SERVICE_NAME": "tollgate-from-env",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "aidial.telemetry.sampleRatio": "0",
        },
    )
    client_trace = new_trace_id("sampled")
    try:
        fake_model.clear()
        assert post(gw, "env-model").status_code == 200
        assert (
            post(gw, "env-model", {"traceparent": traceparent(client_trace, "9" * 16)}).status_code
            == 200
        )
        unsampled_sent, sampled_sent = (
            header(r, "traceparent") for r in model_requests(fake_model, "env-model")
        )
    finally:
        stop(gw.process)
    assert gw.process.returncode == 0
    assert unsampled_sent is not None and not sampled(unsampled_sent.split("-")[3])
    assert sampled_sent is not None and sampled_sent.startswith(f"00-{client_trace}-")
    spans = collector.trace(client_trace, 2)
    assert len(spans) == 2
    assert {s["resource"]["service.name"] for s in spans} == {"tollgate-from-env"}
    unsampled = unsampled_sent.split("-")[1]
    assert not [s for s in collector.spans() if s["trace_id"] == unsampled]


def clean_env() -> dict[str, str]:
    """This process's environment without Tollgate's or OpenTelemetry's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("aidial.", "OTEL_"))}


def serve_expecting_exit(work_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = write_json(work_dir / "tracing-refused.json", {"keys": {}})
    args = [sys.executable, "-m", "tollgate", "serve", "--host", "127.0.0.1"]
    args += ["--port", str(free_port()), "--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)


def _blocked_sdk(work_dir: Path) -> Path:
    """A directory that, first on `PYTHONPATH`, hides the OpenTelemetry SDK (as if the `otel`
    extra were not installed)."""
    blocker = work_dir / "no-otel-sdk"
    package = blocker / "opentelemetry" / "sdk"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        "raise ModuleNotFoundError('hidden by the test', name='opentelemetry.sdk')\n"
    )
    return blocker


@pytest.mark.parametrize(
    ("source", "env"),
    [
        ("telemetry.otlp.endpoint", {"aidial.telemetry.otlp.endpoint": "http://127.0.0.1:9"}),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}),
    ],
)
def test_tracing_configured_without_the_extra_refuses_to_start(
    work_dir: Path, source: str, env: dict[str, str]
) -> None:
    process_env = clean_env()
    process_env["PYTHONPATH"] = str(_blocked_sdk(work_dir))
    process_env.update(env)
    result = serve_expecting_exit(work_dir, process_env)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert f"setting {source}: traces are configured but OpenTelemetry is not installed" in (
        result.stderr
    )
    assert "pip install 'tollgate[otel]'" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"aidial.telemetry.otlp.endpoint": "collector:4318"},
            "setting telemetry.otlp.endpoint: expected an http:// or https:// URL",
        ),
        (
            {
                "aidial.telemetry.otlp.endpoint": "http://127.0.0.1:9",
                "aidial.telemetry.sampleRatio": "1.5",
            },
            "setting telemetry.sampleRatio: must be between 0 and 1",
        ),
    ],
)
def test_bad_tracing_settings_refuse_to_start(
    work_dir: Path, env: dict[str, str], message: str
) -> None:
    process_env = clean_env()
    process_env.update(env)
    result = serve_expecting_exit(work_dir, process_env)
    assert result.returncode == 1
    assert message in result.stderr


def test_sdk_disabled_turns_tracing_off_and_traceparent_passes_through(
    work_dir: Path, fake_model: FakeModel, collector: Collector
) -> None:
    gw = start_gateway(
        work_dir,
        [
            {
                "models": {"off-model": {"endpoint": fake_model.endpoint("off-model")}},
                "keys": {KEY: {"project": "off", "role": "user"}},
            }
        ],
        settings={"telemetry": {"otlp": {"endpoint": collector.url}}},
        env={"OTEL_SDK_DISABLED": "true"},
    )
    client_trace = new_trace_id("sdk disabled")
    parent = traceparent(client_trace, "a" * 16)
    try:
        fake_model.clear()
        assert post(gw, "off-model", {"traceparent": parent}).status_code == 200
        [got] = model_requests(fake_model, "off-model")
    finally:
        stop(gw.process)  # a tracing gateway would export its spans now
    assert header(got, "traceparent") == parent
    assert "tracing: spans exported" not in gw.output()
    assert not [s for s in collector.spans() if s["trace_id"] == client_trace]


@pytest.mark.parametrize(
    ("settings", "environ", "endpoint", "source"),
    [
        ({}, {}, None, None),
        (
            {"otlp": {"endpoint": "http://collector:4318/"}},
            {},
            "http://collector:4318/v1/traces",
            "telemetry.otlp.endpoint",
        ),
        (
            {"otlp": {"endpoint": "https://collector/v1/traces"}},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318"},
            "https://collector/v1/traces",
            "telemetry.otlp.endpoint",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318"},
            "http://base:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom",
            },
            "http://traces:4318/custom",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b", "OTEL_TRACES_EXPORTER": "none"},
            None,
            None,
        ),
        ({"otlp": {"endpoint": "http://c"}}, {"OTEL_SDK_DISABLED": "true"}, None, None),
    ],
)
def test_where_spans_go(
    settings: dict[str, Any], environ: dict[str, str], endpoint: str | None, source: str | None
) -> None:
    tracing = load_settings(environ=environ, overrides={"telemetry": settings}).tracing
    if endpoint is None:
        assert tracing is None
        return
    assert tracing is not None
    assert (tracing.endpoint, tracing.source) == (endpoint, source)
    assert tracing.sample_ratio == 1.0


def test_service_name_from_the_setting_else_the_variable_else_tollgate() -> None:
    on = {"otlp": {"endpoint": "http://c"}}
    env = {"OTEL_SERVICE_NAME": "from-env"}
    named = load_settings(environ=env, overrides={"telemetry": {**on, "serviceName": "set"}})
    from_env = load_settings(environ=env, overrides={"telemetry": on})
    default = load_settings(environ={}, overrides={"telemetry": on})
    assert [s.tracing.service_name if s.tracing else None for s in (named, from_env, default)] == [
        "set",
        "from-env",
        "tollgate",
    ]
