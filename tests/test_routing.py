"""Balancing, retries and failures end to end: Tollgate against a fake model failing on command.

Every call goes to the deployment's `endpoint` (the fake model); the upstream an attempt went
through shows in its `X-UPSTREAM-ENDPOINT` header (spec proxy 5.3). The fake fails per upstream
through `POST /_fake/faults`, as a DIAL adapter does when the provider behind it fails.
Each test has a deployment of its own: balancer state lives as long as the gateway.

Tollgate and the fake model run in process (`inprocess.py`); the reload test runs `tollgate
serve` on a config file it rewrites.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import chat, error_of
from harness import FakeModel, eventually, free_port, start_gateway, stop, write_json
from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway
from tollgate.config.schema import Config
from tollgate.pipeline.hop import Timeouts
from tollgate.snapshot import build_snapshot

KEY = "routing-key-0123456789"
ATTEMPTS = "X-UPSTREAM-ATTEMPTS"


def up(name: str, **extra: Any) -> dict[str, Any]:
    """An upstream whose endpoint is a label the fake's faults and the counts go by."""
    return {"endpoint": f"http://{name}", "key": f"key-of-{name}", **extra}


def models(fake: InProcessFake, dead: str, stuck: str) -> dict[str, Any]:
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
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake, stuck_listener: socket.socket
) -> AsyncIterator[InProcessGateway]:
    """This module's gateway, in process, on the session's in-process fake model (`afake`
    clears its records and faults around each test)."""
    path = "/openai/deployments/{}/chat/completions"
    dead = f"http://127.0.0.1:{free_port()}{path.format('refused')}"
    stuck = f"http://127.0.0.1:{stuck_listener.getsockname()[1]}{path.format('stuck')}"
    config = {
        "models": models(inprocess_fake, dead, stuck),
        "applications": {"app": {"endpoint": inprocess_fake.endpoint("app")}},
        "keys": {KEY: {"project": "routing", "role": "user"}},
        "retriableErrorCodes": [418],
    }
    gw = await start_inprocess_gateway(work_dir, [config])
    yield gw
    await gw.stop()


@pytest.fixture
async def aclient(
    agateway: InProcessGateway, afake: InProcessFake
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agateway.url, timeout=30) as http:
        yield http


async def call(client: httpx.AsyncClient, deployment: str, **headers: str) -> httpx.Response:
    return await client.post(
        f"/openai/deployments/{deployment}/chat/completions",
        headers={"Api-Key": KEY, **headers},
        json=chat(),
    )


def fault(fake: FakeModel | InProcessFake, **spec: Any) -> None:
    if isinstance(fake, InProcessFake):
        fake.add_fault(spec)
        return
    response = httpx.post(f"{fake.url}/_fake/faults", json=spec)
    assert response.status_code == 204, response.text


def seen(fake: FakeModel | InProcessFake, deployment: str) -> list[str | None]:
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


async def test_weights_spread_calls_in_proportion(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    for _ in range(20):
        response = await call(aclient, "weighted")
        assert response.status_code == 200 and response.headers[ATTEMPTS] == "1"
    assert Counter(seen(afake, "weighted")) == {"heavy": 18, "light": 2}
    for _ in range(60):
        assert (await call(aclient, "thirds")).status_code == 200
    assert Counter(seen(afake, "thirds")) == {"one": 10, "two": 20, "three": 30}


async def test_disabled_upstreams_are_never_called(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    response = await call(aclient, "disabled")
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "0"
    assert seen(afake, "disabled") == []


async def test_tier_fallback_while_parked_by_429(
    agateway: InProcessGateway, aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    clock = agateway.balancer_clock("tiers")
    assert (await call(aclient, "tiers")).headers[ATTEMPTS] == "1"  # tier 0 wins despite its weight
    fault(afake, upstream="http://primary", status=429, retryAfter="1", times=1)
    first = await call(aclient, "tiers")
    assert first.status_code == 200 and first.headers[ATTEMPTS] == "2"
    for _ in range(3):  # parked for the second Retry-After asked for
        assert (await call(aclient, "tiers")).headers[ATTEMPTS] == "1"
    assert seen(afake, "tiers") == ["primary", "primary"] + ["fallback"] * 4
    clock.advance(1.2)
    assert (await call(aclient, "tiers")).headers[ATTEMPTS] == "1"
    assert seen(afake, "tiers")[-1] == "primary"


async def test_5xx_back_off(aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
    fault(afake, upstream="http://flaky", status=503)
    responses = [await call(aclient, "backoff") for _ in range(6)]
    assert [r.status_code for r in responses] == [200] * 6
    # Three 503s in a row park the flaky upstream (8 s, spec 6.3): then no more detours.
    assert [r.headers[ATTEMPTS] for r in responses] == ["2", "2", "2", "1", "1", "1"]
    assert Counter(seen(afake, "backoff")) == {"flaky": 3, "steady": 6}


async def test_all_parked_by_429_is_503_with_retry_after(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://busy-a", status=429, retryAfter="5")
    fault(afake, upstream="http://busy-b", status=429, retryAfter="7")
    response = await call(aclient, "parked")
    assert error_of(response) == (503, "Service is not available")
    assert response.headers["Retry-After"] == "5"  # the first one back
    assert response.headers[ATTEMPTS] == "2"
    again = await call(aclient, "parked")  # nothing is tried while all are parked
    assert error_of(again) == (503, "Service is not available")
    assert again.headers["Retry-After"] in ("4", "5")
    assert again.headers[ATTEMPTS] == "0"
    assert sorted(seen(afake, "parked")) == ["busy-a", "busy-b"]


async def test_parked_for_other_reasons_is_502(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://limited", status=429, retryAfter="100")
    fault(afake, upstream="http://broken", status=503)
    response = await call(aclient, "mixed")
    assert error_of(response) == (502, "No route")
    assert "Retry-After" not in response.headers
    # limited: 429, parked; broken: three 503s, then parked too; the fifth pick finds none.
    assert response.headers[ATTEMPTS] == "4"
    assert seen(afake, "mixed") == ["limited", "broken", "broken", "broken"]


# --- what is retried (spec proxy 6.4, DECISIONS 5)


async def test_retriable_error_codes_from_config(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://teapot", status=418)
    response = await call(aclient, "custom-codes")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(afake, "custom-codes") == ["teapot", "kettle"]


@pytest.mark.parametrize("status", [500, 400, 401])
async def test_other_errors_are_relayed_as_they_are(
    aclient: httpx.AsyncClient, afake: InProcessFake, status: int
) -> None:
    fault(afake, status=status, times=1)
    response = await call(aclient, "relayed")
    assert response.status_code == status
    assert response.json() == {"error": {"message": "fake fault", "code": str(status)}}
    assert response.headers[ATTEMPTS] == "1"
    assert len(seen(afake, "relayed")) == 1


async def test_upstream_less_deployments_retry_without_upstream_headers(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, status=502, times=2)
    response = await aclient.post(
        "/openai/deployments/reuse/chat/completions",
        headers={"Api-Key": KEY, "X-UPSTREAM-ENDPOINT": "forged"},
        json=chat(),
    )
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "3"
    assert seen(afake, "reuse") == [None, None, None]


async def test_an_application_is_called_once_by_default(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    """Newer DIAL's default `maxRetryAttempts` for applications is 1 (spec proxy 6.5): an
    application may act on a call, so a failed one is not repeated."""
    fault(afake, status=502, times=2)
    response = await aclient.post(
        "/openai/deployments/app/chat/completions", headers={"Api-Key": KEY}, json=chat()
    )
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "1"
    assert seen(afake, "app") == [None]


async def test_max_retry_attempts(aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
    fault(afake, status=503)
    response = await call(aclient, "one-try")
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "1"
    assert seen(afake, "one-try") == ["only-once"]


async def test_dropped_connection_moves_to_the_next_upstream(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://hangs-up", disconnect=True)
    response = await call(aclient, "reset")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(afake, "reset") == ["hangs-up", "answers"]


async def test_connection_refused_tries_the_next_upstream(aclient: httpx.AsyncClient) -> None:
    first = await call(aclient, "refused")
    assert error_of(first) == (502, "Failed to connect to origin")
    assert first.headers[ATTEMPTS] == "5"  # ra, rb, ra, rb, ra: the attempt limit
    second = await call(
        aclient, "refused"
    )  # ra is parked after three failures; rb's third parks it
    assert error_of(second) == (502, "Failed to connect to origin")
    assert second.headers[ATTEMPTS] == "1"
    third = await call(aclient, "refused")
    assert error_of(third) == (502, "No route")
    assert third.headers[ATTEMPTS] == "0"
    bare = await call(aclient, "refused-bare")
    assert error_of(bare) == (502, "Failed to connect to origin")
    assert bare.headers[ATTEMPTS] == "3"  # then its synthetic upstream is parked


async def test_no_retry_once_the_stream_started(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://first", status=503, times=1)
    headers = {"Api-Key": KEY, "X-Fake-Chunks": "5", "X-Fake-Drop-After": "2"}
    url = "/openai/deployments/streamed/chat/completions"
    received: list[bytes] = []
    async with aclient.stream("POST", url, headers=headers, json=chat(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers[ATTEMPTS] == "2"  # the 503 was retried: nothing was sent yet
        with pytest.raises(httpx.RemoteProtocolError):  # the cut is passed on, not retried
            async for chunk in response.aiter_raw():
                received.append(chunk)
    body = b"".join(received)
    assert body.count(b"data: ") == 3 and b"[DONE]" not in body
    await asyncio.sleep(0.3)
    assert seen(afake, "streamed") == ["first", "second"]


async def test_a_retried_answer_gives_its_connection_back(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    # The error's body comes 200 ms after its headers: unless Tollgate reads it, the
    # connection cannot serve the retry.
    fault(afake, status=503, bodyDelayMs=200, times=1)
    response = await call(aclient, "reuse")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    ports = [r["client_port"] for r in afake.requests() if "/reuse/" in r["path"]]
    assert len(ports) == 2 and ports[0] == ports[1]


# --- timeouts


async def test_read_timeout_per_deployment(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    started = time.monotonic()
    response = await call(aclient, "slow", **{"X-Fake-Delay-Ms": "800"})
    elapsed = time.monotonic() - started
    assert error_of(response) == (504, "Upstream timed out")
    assert response.headers[ATTEMPTS] == "3"  # then the endpoint is parked
    assert elapsed < 2.0  # three 300 ms timeouts, not three 800 ms waits
    assert len(seen(afake, "slow")) == 3
    # Without its own readTimeout a deployment waits (upstream.readTimeout: 5 minutes).
    assert (await call(aclient, "patient", **{"X-Fake-Delay-Ms": "800"})).status_code == 200


async def test_timeout_moves_to_the_next_upstream(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, upstream="http://sleepy", delayMs=1000)
    response = await call(aclient, "slow-pair")
    assert response.status_code == 200 and response.headers[ATTEMPTS] == "2"
    assert seen(afake, "slow-pair") == ["sleepy", "awake"]


async def test_connect_timeout_per_deployment(aclient: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await call(aclient, "stuck")
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
    work_dir: Path, fake_model: FakeModel
) -> None:
    httpx.delete(f"{fake_model.url}/_fake/faults")
    fake_model.clear()

    def config(key: str, primary_weight: int = 1) -> dict[str, Any]:
        upstreams = [up("kept", weight=primary_weight), up("spare", tier=1)]
        if primary_weight == 1:
            upstreams.reverse()  # the same set in another order is the same set
        return {
            "models": {
                "reloaded": {"endpoint": fake_model.endpoint("reloaded"), "upstreams": upstreams}
            },
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
        fault(fake_model, upstream="http://kept", status=429, retryAfter="100", times=1)
        assert answer("reload-key-1").headers[ATTEMPTS] == "2"
        assert seen(fake_model, "reloaded") == ["kept", "spare"]

        write_json(path, config("reload-key-2"))
        eventually(lambda: answer("reload-key-2").status_code == 200)
        # Still parked: the new config kept the upstream, and its state with it.
        assert seen(fake_model, "reloaded")[2:] == ["spare"]
        assert answer("reload-key-2").headers[ATTEMPTS] == "1"
        assert seen(fake_model, "reloaded")[2:] == ["spare", "spare"]

        write_json(path, config("reload-key-3", primary_weight=2))
        eventually(lambda: answer("reload-key-3").status_code == 200)
        # A new weight makes a new upstream: its parking is gone.
        assert seen(fake_model, "reloaded")[4:] == ["kept"]
    finally:
        stop(gw.process)
        httpx.delete(f"{fake_model.url}/_fake/faults")  # the session's fake model: left clean
