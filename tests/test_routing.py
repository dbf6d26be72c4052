"""Balancing, retries and failures end to end: Tollgate against a fake model failing on command.

Every call goes to the deployment's `endpoint` (the fake model); the upstream an attempt went
through shows in its `X-UPSTREAM-ENDPOINT` header (spec proxy 5.3). The fake fails per upstream
through `POST /_fake/faults`, as a DIAL adapter does when the provider behind it fails.
Each test has a deployment of its own: balancer state lives as long as the gateway.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import chat, error_of
from harness import (
    FakeModel,
    Gateway,
    eventually,
    free_port,
    start_fake_model,
    start_gateway,
    stop,
    write_json,
)
from tollgate.config.schema import Config
from tollgate.pipeline.hop import Timeouts
from tollgate.snapshot import build_snapshot

KEY = "routing-key-0123456789"
ATTEMPTS = "X-UPSTREAM-ATTEMPTS"


def up(name: str, **extra: Any) -> dict[str, Any]:
    """An upstream whose endpoint is a label the fake's faults and the counts go by."""
    return {"endpoint": f"http://{name}", "key": f"key-of-{name}", **extra}


def models(fake: FakeModel, dead: str, stuck: str) -> dict[str, Any]:
    def model(name: str, *upstreams: dict[str, Any], **extra: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"endpoint": fake.endpoint(name), **extra}
        if upstreams:
            spec["upstreams"] = list(upstreams)
        return spec

    return {
        "weighted": model("weighted", up("light", weight=1), up("heavy", weight=9)),
        "thirds": model("thirds", up("one", weight=1), up("two", weight=2), up("three", weight=3)),
        "tiers": model("tiers", up("primary"), up("fallback", tier=1, weight=9)),
        "backoff": model("backoff", up("flaky"), up("steady")),
        "parked": model("parked", up("busy-a"), up("busy-b")),
        "mixed": model("mixed", up("limited"), up("broken")),
        "custom-codes": model("custom-codes", up("teapot"), up("kettle")),
        "relayed": model("relayed"),
        "one-try": model("one-try", up("only-once"), up("never"), maxRetryAttempts=1),
        "disabled": model("disabled", up("off-a", weight=0), up("off-b", weight=-1)),
        "reset": model("reset", up("hangs-up"), up("answers")),
        "streamed": model("streamed", up("first"), up("second"), up("third")),
        "reuse": model("reuse"),
        "slow": model("slow", readTimeout=300),
        "patient": model("patient"),
        "slow-pair": model("slow-pair", up("sleepy"), up("awake"), readTimeout=300),
        "refused": {"endpoint": dead, "upstreams": [up("ra"), up("rb")]},
        "refused-bare": {"endpoint": dead},
        "stuck": {"endpoint": stuck, "connectTimeout": 200},
    }


@pytest.fixture(scope="module")
def fake(work_dir: Path) -> Iterator[FakeModel]:
    """A fake model of this module's own: its faults must not leak into other tests."""
    model = start_fake_model(work_dir)
    yield model
    stop(model.process)


@pytest.fixture(scope="module")
def stuck_listener() -> Iterator[socket.socket]:
    """A port that never completes a connection: its one-slot backlog is kept full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    yield listener
    filler.close()
    listener.close()


@pytest.fixture(scope="module")
def gateway(work_dir: Path, fake: FakeModel, stuck_listener: socket.socket) -> Iterator[Gateway]:
    path = "/openai/deployments/{}/chat/completions"
    dead = f"http://127.0.0.1:{free_port()}{path.format('refused')}"
    stuck = f"http://127.0.0.1:{stuck_listener.getsockname()[1]}{path.format('stuck')}"
    config = {
        "models": models(fake, dead, stuck),
        "applications": {"app": {"endpoint": fake.endpoint("app")}},
        "keys": {KEY: {"project": "routing", "role": "user"}},
        "retriableErrorCodes": [418],
    }
    gw = start_gateway(work_dir, [config])
    yield gw
    stop(gw.process)


@pytest.fixture
def client(gateway: Gateway, fake: FakeModel) -> Iterator[httpx.Client]:
    fake.clear()
    httpx.delete(f"{fake.url}/_fake/faults")
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield http


def call(client: httpx.Client, deployment: str, **headers: str) -> httpx.Response:
    return client.post(
        f"/openai/deployments/{deployment}/chat/completions",
        headers={"Api-Key": KEY, **headers},
        json=chat(),
    )


def fault(fake: FakeModel, **spec: Any) -> None:
    response = httpx.post(f"{fake.url}/_fake/faults", json=spec)
    assert response.status_code == 204, response.text


def seen(fake: FakeModel, deployment: str) -> list[str | None]:
    """The upstream of each call the fake received for `deployment`, in order."""
    result: list[str | None] = []
    for record in fake.requests():
        if record["path"] != f"/openai/deployments/{deployment}/chat/completions":
            continue
        headers = [(name.lower(), value) for name, value in record["headers"]]
        endpoints = [value for name, value in headers if name == "x-upstream-endpoint"]
        keys = [value for name, value in headers if name == "x-upstream-key"]
        assert len(endpoints) <= 1 and len(keys) <= 1, "X-UPSTREAM-* of two attempts"
        if endpoints:
            # Each attempt carries its own upstream's key with its endpoint.
            assert keys == [f"key-of-{endpoints[0].removeprefix('http://')}"]
        result.append(endpoints[0].removeprefix("http://") if endpoints else None)
    return result


# --- balancing (spec proxy 6.2, 16.18-16.21)


def test_weights_spread_calls_in_proportion(client: httpx.Client, fake: FakeModel) -> None:
    for _ in range(20):
        response = call(client, "weighted")
        assert response.status_code == 200 and response.headers[ATTEMPTS] == "1"
    assert Counter(seen(fake, "weighted")) == {"heavy": 18, "light": 2}
    for _ in range(60):
        assert call(client, "thirds").status_code == 200
    assert Counter(seen(fake, "thirds")) == {"one": 10, "two": 20, "three": 30}


def test_disabled_upstreams_are_never_called(client: httpx.Client, fake: FakeModel) -> None:
    response = call(client, "disabled")
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "0"
    assert seen(fake, "disabled") == []


def test_tier_fallback_while_parked_by_429(client: httpx.Client, fake: FakeModel) -> None:
    assert call(client, "tiers").headers[ATTEMPTS] == "1"  # tier 0 wins despite its weight
    fault(fake, upstream="http://primary", status=429, retryAfter="1", times=1)
    first = call(client, "tiers")
    assert first.status_code == 200 and first.headers[ATTEMPTS] == "2"
    for _ in range(3):  # parked for the second Retry-After asked for
        assert call(client, "tiers").headers[ATTEMPTS] == "1"
    assert seen(fake, "tiers") == ["primary", "primary"] + ["fallback"] * 4
    time.sleep(1.2)
    assert call(client, "tiers").headers[ATTEMPTS] == "1"
    assert seen(fake, "tiers")[-1] == "primary"


def test_5xx_back_off(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://flaky", status=503)
    responses = [call(client, "backoff") for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 6
    # Three 503s in a row park the flaky upstream (8 s, spec 6.3): then no more detours.
    assert [r.headers[ATTEMPTS] for r in responses] == ["2", "2", "2", "1", "1", "1"]
    assert Counter(seen(fake, "backoff")) == {"flaky": 3, "steady": 6}


def test_all_parked_by_429_is_503_with_retry_after(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://busy-a", status=429, retryAfter="5")
    fault(fake, upstream="http://busy-b", status=429, retryAfter="7")
    response = call(client, "parked")
    assert error_of(response) == (503, "Service is not available")
    assert response.headers["Retry-After"] == "5"  # the first one back
    assert response.headers[ATTEMPTS] == "2"
    again = call(client, "parked")  # nothing is tried while all are parked
    assert error_of(again) == (503, "Service is not available")
    assert again.headers["Retry-After"] in ("4", "5")
    assert again.headers[ATTEMPTS] == "0"
    assert sorted(seen(fake, "parked")) == ["busy-a", "busy-b"]


def test_parked_for_other_reasons_is_502(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://limited", status=429, retryAfter="100")
    fault(fake, upstream="http://broken", status=503)
    response = call(client, "mixed")
    assert error_of(response) == (502, "No route")
    assert "Retry-After" not in response.headers
    # limited: 429, parked; broken: three 503s, then parked too; the fifth pick finds none.
    assert response.headers[ATTEMPTS] == "4"
    assert seen(fake, "mixed") == ["limited", "broken", "broken", "broken"]


# --- what is retried (spec proxy 6.4, DECISIONS 5)


def test_retriable_error_codes_from_config(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://teapot", status=418)
    response = call(client, "custom-codes")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(fake, "custom-codes") == ["teapot", "kettle"]


@pytest.mark.parametrize("status", [500, 400, 401])
def test_other_errors_are_relayed_as_they_are(
    client: httpx.Client, fake: FakeModel, status: int
) -> None:
    fault(fake, status=status, times=1)
    response = call(client, "relayed")
    assert response.status_code == status
    assert response.json() == {"error": {"message": "fake fault", "code": str(status)}}
    assert response.headers[ATTEMPTS] == "1"
    assert len(seen(fake, "relayed")) == 1


def test_upstream_less_deployments_retry_without_upstream_headers(
    client: httpx.Client, fake: FakeModel
) -> None:
    fault(fake, status=502, times=2)
    response = client.post(
        "/openai/deployments/reuse/chat/completions",
        headers={"Api-Key": KEY, "X-UPSTREAM-ENDPOINT": "forged"},
        json=chat(),
    )
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "3"
    assert seen(fake, "reuse") == [None, None, None]


def test_an_application_is_called_once_by_default(client: httpx.Client, fake: FakeModel) -> None:
    """Newer DIAL's default `maxRetryAttempts` for applications is 1 (spec proxy 6.5): an
    application may act on a call, so a failed one is not repeated."""
    fault(fake, status=502, times=2)
    response = client.post(
        "/openai/deployments/app/chat/completions", headers={"Api-Key": KEY}, json=chat()
    )
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "1"
    assert seen(fake, "app") == [None]


def test_max_retry_attempts(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, status=503)
    response = call(client, "one-try")
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "1"
    assert seen(fake, "one-try") == ["only-once"]


def test_dropped_connection_moves_to_the_next_upstream(
    client: httpx.Client, fake: FakeModel
) -> None:
    fault(fake, upstream="http://hangs-up", disconnect=True)
    response = call(client, "reset")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(fake, "reset") == ["hangs-up", "answers"]


def test_connection_refused_tries_the_next_upstream(client: httpx.Client) -> None:
    first = call(client, "refused")
    assert error_of(first) == (502, "Failed to connect to origin")
    assert first.headers[ATTEMPTS] == "5"  # ra, rb, ra, rb, ra: the attempt limit
    second = call(client, "refused")  # ra is parked after three failures; rb's third parks it
    assert error_of(second) == (502, "Failed to connect to origin")
    assert second.headers[ATTEMPTS] == "1"
    third = call(client, "refused")
    assert error_of(third) == (502, "No route")
    assert third.headers[ATTEMPTS] == "0"
    bare = call(client, "refused-bare")
    assert error_of(bare) == (502, "Failed to connect to origin")
    assert bare.headers[ATTEMPTS] == "3"  # then its synthetic upstream is parked


def test_no_retry_once_the_stream_started(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://first", status=503, times=1)
    headers = {"Api-Key": KEY, "X-Fake-Chunks": "5", "X-Fake-Drop-After": "2"}
    url = "/openai/deployments/streamed/chat/completions"
    received: list[bytes] = []
    with client.stream("POST", url, headers=headers, json=chat(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers[ATTEMPTS] == "2"  # the 503 was retried: nothing was sent yet
        with pytest.raises(httpx.RemoteProtocolError):  # the cut is passed on, not retried
            for chunk in response.iter_raw():
                received.append(chunk)
    body = b"".join(received)
    assert body.count(b"data: ") == 3 and b"[DONE]" not in body
    time.sleep(0.3)
    assert seen(fake, "streamed") == ["first", "second"]


def test_a_retried_answer_gives_its_connection_back(client: httpx.Client, fake: FakeModel) -> None:
    # The error's body comes 200 ms after its headers: unless Tollgate reads it, the
    # connection cannot serve the retry.
    fault(fake, status=503, bodyDelayMs=200, times=1)
    response = call(client, "reuse")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    ports = [r["client_port"] for r in fake.requests() if "/reuse/" in r["path"]]
    assert len(ports) == 2 and ports[0] == ports[1]


# --- timeouts


def test_read_timeout_per_deployment(client: httpx.Client, fake: FakeModel) -> None:
    started = time.monotonic()
    response = call(client, "slow", **{"X-Fake-Delay-Ms": "800"})
    elapsed = time.monotonic() - started
    assert error_of(response) == (504, "Upstream timed out")
    assert response.headers[ATTEMPTS] == "3"  # then the endpoint is parked
    assert elapsed < 2.0  # three 300 ms timeouts, not three 800 ms waits
    assert len(seen(fake, "slow")) == 3
    # Without its own readTimeout a deployment waits (upstream.readTimeout: 5 minutes).
    assert call(client, "patient", **{"X-Fake-Delay-Ms": "800"}).status_code == 200


def test_timeout_moves_to_the_next_upstream(client: httpx.Client, fake: FakeModel) -> None:
    fault(fake, upstream="http://sleepy", delayMs=1000)
    response = call(client, "slow-pair")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(fake, "slow-pair") == ["sleepy", "awake"]


def test_connect_timeout_per_deployment(client: httpx.Client) -> None:
    started = time.monotonic()
    response = call(client, "stuck")
    assert error_of(response) == (504, "Upstream timed out")
    assert response.headers[ATTEMPTS] == "3"
    assert time.monotonic() - started < 3.0  # 200 ms each, not upstream.connectTimeout's 10 s


def test_timeouts_are_built_once_per_value() -> None:
    config = Config.model_validate(
        {
            "models": {
                "a": {"endpoint": "http://u/a", "readTimeout": 1500},
                "b": {"endpoint": "http://u/b", "readTimeout": 1500},
                "c": {"endpoint": "http://u/c", "connectTimeout": 20},
                "d": {"endpoint": "http://u/d"},
            }
        }
    )
    a, b, c, d = (build_snapshot(config).deployments[n] for n in "abcd")
    timeouts = Timeouts(connect_s=10.0, read_s=300.0)
    assert timeouts.of(d) is timeouts.default
    assert (timeouts.default.connect, timeouts.default.sock_read) == (10.0, 300.0)
    assert timeouts.of(a) is timeouts.of(b)
    assert (timeouts.of(a).connect, timeouts.of(a).sock_read) == (10.0, 1.5)
    assert (timeouts.of(c).connect, timeouts.of(c).sock_read) == (0.02, 300.0)
    assert timeouts.of(c).total is None  # a long stream is not cut


# --- state across config reloads (spec proxy 6.1, 16.22)


def test_balancer_state_survives_a_reload_that_keeps_the_upstream(
    work_dir: Path, fake: FakeModel
) -> None:
    httpx.delete(f"{fake.url}/_fake/faults")
    fake.clear()

    def config(key: str, primary_weight: int = 1) -> dict[str, Any]:
        upstreams = [up("kept", weight=primary_weight), up("spare", tier=1)]
        if primary_weight == 1:
            upstreams.reverse()  # the same set in another order is the same set
        return {
            "models": {"reloaded": {"endpoint": fake.endpoint("reloaded"), "upstreams": upstreams}},
            "keys": {key: {"project": "p", "role": "r"}},
        }

    def answer(key: str) -> httpx.Response:
        return httpx.post(
            f"{gw.url}/openai/deployments/reloaded/chat/completions",
            headers={"Api-Key": key},
            json=chat(),
        )

    path = write_json(work_dir / "routing-reload.json", config("reload-key-1"))
    gw = start_gateway(work_dir, [path], env={"aidial.config.reload": "100"})
    try:
        fault(fake, upstream="http://kept", status=429, retryAfter="100", times=1)
        assert answer("reload-key-1").headers[ATTEMPTS] == "2"
        assert seen(fake, "reloaded") == ["kept", "spare"]

        write_json(path, config("reload-key-2"))
        eventually(lambda: answer("reload-key-2").status_code == 200)
        # Still parked: the new config kept the upstream, and its state with it.
        assert seen(fake, "reloaded")[2:] == ["spare"]
        assert answer("reload-key-2").headers[ATTEMPTS] == "1"
        assert seen(fake, "reloaded")[2:] == ["spare", "spare"]

        write_json(path, config("reload-key-3", primary_weight=2))
        eventually(lambda: answer("reload-key-3").status_code == 200)
        # A new weight makes a new upstream: its parking is gone.
        assert seen(fake, "reloaded")[4:] == ["kept"]
    finally:
        stop(gw.process)
