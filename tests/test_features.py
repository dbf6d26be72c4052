"""Feature endpoints end to end: rate, tokenize, truncate_prompt, configuration (spec proxy 3,
14, 16.8 and 16.15), against the fake model and against a real `aidial-sdk` application.

Against the fake model the gateway runs in process (`inprocess.py`); the `aidial-sdk`
application is a process of its own, and so is the gateway it calls back (its sync
`aidial-client` call and the instances sharing Redis need one).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aidial_client import Dial

from harness import FakeModel, Gateway, free_port, start_gateway, stop
from harness_apps import App, start_app
from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway
from redis_server import RedisServer, start_redis_server, stop_redis_server

KEY = "features-key-default-0123456789"
POWER_KEY = "features-key-power-0123456789"
PROVIDER_A = "https://provider-a.example/openai/deployments/gpt/chat/completions"
PROVIDER_B = "https://provider-b.example/openai/deployments/gpt/chat/completions"
CLOSED = "http://127.0.0.1:9"
SDK_APP = "feature-app"


def feature_urls(base: str, name: str, *which: str) -> dict[str, str]:
    fields = {
        "rate": "rateEndpoint",
        "tokenize": "tokenizeEndpoint",
        "truncate_prompt": "truncatePromptEndpoint",
        "configuration": "configurationEndpoint",
    }
    return {fields[w]: f"{base}/openai/deployments/{name}/{w}" for w in which or fields}


def features_config(fake: FakeModel | InProcessFake, app_url: str) -> dict[str, Any]:
    chat = fake.endpoint
    return {
        "models": {
            "feat-model": {
                "endpoint": chat("feat-model"),
                "upstreams": [
                    {"endpoint": PROVIDER_A, "key": "provider-key-a", "extraData": {"r": 1}},
                    {"endpoint": PROVIDER_B, "key": "provider-key-b", "tier": 1},
                ],
                "features": feature_urls(fake.url, "feat-model"),
            },
            # The same upstreams: its balancer is parked by one test, without touching others.
            "parked-model": {
                "endpoint": chat("parked-model"),
                "upstreams": [
                    {"endpoint": PROVIDER_A, "key": "provider-key-a"},
                    {"endpoint": PROVIDER_B, "key": "provider-key-b", "tier": 1},
                ],
                "features": feature_urls(fake.url, "parked-model", "rate"),
            },
            "plain-model": {"endpoint": chat("plain-model")},
            "auth-model": {
                "endpoint": chat("auth-model"),
                "forwardAuthToken": True,
                "features": feature_urls(fake.url, "auth-model", "tokenize"),
            },
            "power-model": {
                "endpoint": chat("power-model"),
                "userRoles": ["power"],
                "features": feature_urls(fake.url, "power-model", "rate"),
            },
            "dead-model": {
                "endpoint": chat("dead-model"),
                "features": feature_urls(CLOSED, "dead-model", "tokenize", "configuration"),
            },
            "slow-model": {
                "endpoint": chat("slow-model"),
                "readTimeout": 300,
                "features": feature_urls(fake.url, "slow-model", "tokenize"),
            },
            "sdk-model": {
                "endpoint": chat("sdk-model"),
                "upstreams": [{"endpoint": PROVIDER_A, "key": "provider-key-a"}],
                "features": feature_urls(app_url, SDK_APP, "configuration"),
            },
        },
        "applications": {
            "feat-app": {
                "endpoint": chat("feat-app"),
                "features": {
                    "rateEndpoint": f"{fake.url}/app/rate",
                    # Sent exactly as configured: the client's query is not appended.
                    "tokenizeEndpoint": f"{fake.url}/app/tokenize?api-version=fixed",
                    "configurationEndpoint": f"{fake.url}/app/configuration",
                },
            },
            SDK_APP: {
                "endpoint": f"{app_url}/openai/deployments/{SDK_APP}/chat/completions",
                "features": feature_urls(app_url, SDK_APP),
            },
        },
        "assistant": {
            "endpoint": chat("assistant"),
            "features": {"rateEndpoint": f"{fake.url}/assistants/rate"},
            "assistants": {
                "helper": {"prompt": "You help."},
                "own-rate": {"features": {"rateEndpoint": f"{fake.url}/own/rate"}},
            },
        },
        "keys": {
            KEY: {"project": "feat-proj", "role": "default"},
            POWER_KEY: {"project": "feat-power", "roles": ["power"]},
        },
    }


@pytest.fixture(scope="module")
def app_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake, app_port: int
) -> AsyncIterator[InProcessGateway]:
    """This module's gateway, in process, on the session's in-process fake model."""
    config = features_config(inprocess_fake, f"http://127.0.0.1:{app_port}")
    gw = await start_inprocess_gateway(work_dir, [config])
    yield gw
    await gw.stop()


@pytest.fixture
async def aclient(agateway: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agateway.url, timeout=30) as http:
        yield http


# `afake` is conftest's: the session's in-process fake, its records and faults cleared.
# The aidial-sdk application calls back a gateway process: the one its tests talk to.


@pytest.fixture(scope="module")
def process_gateway(work_dir: Path, fake_model: FakeModel, app_port: int) -> Iterator[Gateway]:
    config = features_config(fake_model, f"http://127.0.0.1:{app_port}")
    gw = start_gateway(work_dir, [config])
    yield gw
    stop(gw.process)


@pytest.fixture(scope="module")
def sdk_app(work_dir: Path, process_gateway: Gateway, app_port: int) -> Iterator[App]:
    app = start_app(work_dir, "feature_app", port=app_port, dial_url=process_gateway.url)
    yield app
    stop(app.process)


@pytest.fixture
def process_client(process_gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=process_gateway.url, timeout=30) as http:
        yield http


def headers(key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Api-Key": key, "Content-Type": "application/json", **extra}


def seen_headers(record: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in record["headers"]}


def error_of(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.status_code, response.json()["error"]["message"]


async def is_dead(client: httpx.AsyncClient, key: str) -> bool:
    """Whether Tollgate refuses `key` now (a per-request key after its hop)."""
    response = await client.get("/v1/user/info", headers={"Api-Key": key})
    return error_of(response) == (401, "Unknown api key")


def is_dead_in(client: httpx.Client, key: str) -> bool:
    """`is_dead`, asked of a gateway process."""
    response = client.get("/v1/user/info", headers={"Api-Key": key})
    return error_of(response) == (401, "Unknown api key")


@contextlib.asynccontextmanager
async def live_hop_key(client: httpx.AsyncClient, fake: InProcessFake) -> AsyncIterator[str]:
    """The per-request key of a chat call held open (a slow stream), for calls made with it."""
    slow = headers(**{"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "150"})
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    url = "/openai/deployments/plain-model/chat/completions"
    async with client.stream("POST", url, headers=slow, json=body) as stream:
        chunks = stream.aiter_raw()
        await anext(chunks)
        yield seen_headers(fake.last())["api-key"]
        async for _ in chunks:
            pass


class TestForwarding:
    async def test_rate_reaches_the_model_rate_endpoint(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        raw = b'{ "responseId" : "chatcmpl-1",  "rate": true }'
        sent = headers(
            **{"X-Conversation-Id": "conv-9", "Authorization": f"Bearer {KEY}"},
            **{"X-UPSTREAM-KEY": "injected"},
        )
        response = await aclient.post(
            "/v1/feat-model/rate?api-version=2024-02-01", headers=sent, content=raw
        )
        assert response.status_code == 200
        assert response.text == "PONG"
        record = afake.last()
        assert record["method"] == "POST"
        # The configured URL exactly: the client's query is not appended (spec proxy 14).
        assert record["raw_path"] == "/openai/deployments/feat-model/rate"
        assert record["body"] == raw.decode()  # the body unchanged
        seen = seen_headers(record)
        # A fresh per-request key, not the caller's; no Authorization without forwardAuthToken.
        assert len(seen["api-key"]) == 32 and seen["api-key"] != KEY
        assert "authorization" not in seen
        # The first upstream's endpoint and key, not a client's copy; no extra data (DIAL).
        assert seen["x-upstream-endpoint"] == PROVIDER_A
        assert seen["x-upstream-key"] == "provider-key-a"
        assert "x-upstream-extra-data" not in seen
        assert seen["x-conversation-id"] == "conv-9"
        assert KEY not in json.dumps(record)
        assert await is_dead(aclient, seen["api-key"])

    async def test_tokenize_and_truncate_prompt_are_relayed(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        chat = {"messages": [{"role": "user", "content": "one two three"}]}
        body = {"inputs": [{"type": "request", "value": chat}, {"type": "string", "value": "a b"}]}
        response = await aclient.post(
            "/v1/deployments/feat-model/tokenize", headers=headers(), json=body
        )
        assert response.status_code == 200
        assert response.json() == {
            "outputs": [
                {"status": "success", "token_count": 3},
                {"status": "success", "token_count": 2},
            ]
        }
        assert afake.last()["path"] == "/openai/deployments/feat-model/tokenize"
        assert json.loads(afake.last()["body"]) == body

        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "w w w w"},
            {"role": "assistant", "content": "w w w"},
            {"role": "user", "content": "last one"},
        ]
        truncate = {"inputs": [{"messages": messages, "max_prompt_tokens": 7}]}  # 11 words
        url = "/v1/deployments/feat-model/truncate_prompt"
        response = await aclient.post(url, headers=headers(), json=truncate)
        assert response.status_code == 200
        assert response.json() == {"outputs": [{"status": "success", "discarded_messages": [1]}]}
        assert afake.last()["path"] == "/openai/deployments/feat-model/truncate_prompt"

    async def test_configuration_is_a_get_and_wins_over_the_deployment_route(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        response = await aclient.get("/v1/deployments/feat-model/configuration", headers=headers())
        assert response.status_code == 200
        # The upstream's JSON schema, not `GET /v1/deployments/{id}` of `.../configuration`.
        assert response.json()["properties"]["temperature"]["type"] == "number"
        assert response.headers["content-type"].startswith("application/json")
        record = afake.last()
        assert record["method"] == "GET" and record["body"] == ""
        assert record["path"] == "/openai/deployments/feat-model/configuration"
        assert seen_headers(record)["x-upstream-key"] == "provider-key-a"

    async def test_applications_send_no_upstream_headers(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        sent = headers(**{"X-UPSTREAM-ENDPOINT": "https://evil.example"})
        response = await aclient.post("/v1/feat-app/rate", headers=sent, json={"rate": False})
        assert response.status_code == 200 and response.text == "PONG"
        seen = seen_headers(afake.last())
        assert afake.last()["path"] == "/app/rate"
        assert "x-upstream-endpoint" not in seen and "x-upstream-key" not in seen
        assert len(seen["api-key"]) == 32

    async def test_configured_query_is_kept_and_the_clients_is_not_appended(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        url = "/v1/deployments/feat-app/tokenize?api-version=client&x=1"
        body = {"inputs": [{"type": "string", "value": "a b c"}]}
        response = await aclient.post(url, headers=headers(), json=body)
        assert response.status_code == 200
        assert response.json()["outputs"][0]["token_count"] == 3
        assert afake.last()["raw_path"] == "/app/tokenize?api-version=fixed"

    async def test_upstream_status_headers_and_body_are_relayed(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        body = {"inputs": [{"type": "string", "value": "a"}]}
        response = await aclient.post(
            "/v1/deployments/feat-model/tokenize",
            headers=headers(**{"X-Fake-Status": "418"}),
            json=body,
        )
        assert response.status_code == 418
        assert response.json() == {"error": {"message": "fake failure", "code": "418"}}
        assert "X-UPSTREAM-ATTEMPTS" not in response.headers  # no attempts: no retries here
        # A body the upstream refuses comes back as it answered (no retry, no rewrite).
        response = await aclient.post(
            "/v1/deployments/feat-model/tokenize", headers=headers(), content=b"not json"
        )
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "fake model: body is not valid JSON"
        assert len(afake.requests()) == 2

    async def test_first_available_upstream_is_named(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        # A 429 from the tier-0 provider parks it (spec proxy 6.3) ...
        fault = {"upstream": PROVIDER_A, "status": 429, "retryAfter": 60, "times": 1}
        afake.add_fault(fault)
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        url = "/openai/deployments/parked-model/chat/completions"
        assert (await aclient.post(url, headers=headers(), json=chat)).status_code == 200
        assert [seen_headers(r)["x-upstream-endpoint"] for r in afake.requests()] == [
            PROVIDER_A,
            PROVIDER_B,
        ]
        # ... so the feature call names the next one instead.
        assert (
            await aclient.post("/v1/parked-model/rate", headers=headers(), json={})
        ).text == "PONG"
        assert seen_headers(afake.last())["x-upstream-endpoint"] == PROVIDER_B
        assert seen_headers(afake.last())["x-upstream-key"] == "provider-key-b"


class TestAuthorization:
    async def test_forward_auth_token_passes_a_user_token(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        body = {"inputs": [{"type": "string", "value": "a"}]}
        url = "/v1/deployments/auth-model/tokenize"
        async with live_hop_key(aclient, afake) as hop_key:
            with_token = headers(hop_key, Authorization="Bearer user-jwt")
            assert (await aclient.post(url, headers=with_token, json=body)).status_code == 200
            seen = seen_headers(afake.last())
            assert seen["authorization"] == "Bearer user-jwt"
            assert seen["api-key"] not in (hop_key, KEY)  # a key of its own
            # Without forwardAuthToken, the same token stays behind.
            other = "/v1/deployments/feat-model/tokenize"
            assert (await aclient.post(other, headers=with_token, json=body)).status_code == 200
            assert "authorization" not in seen_headers(afake.last())

    async def test_the_callers_own_key_is_never_forwarded(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        body = {"inputs": [{"type": "string", "value": "a"}]}
        sent = headers(Authorization=f"Bearer {KEY}")
        response = await aclient.post(
            "/v1/deployments/auth-model/tokenize", headers=sent, json=body
        )
        assert response.status_code == 200
        assert "authorization" not in seen_headers(afake.last())
        assert KEY not in json.dumps(afake.last())


class TestRefusals:
    @pytest.mark.parametrize(
        ("method", "path"),
        [("POST", "/v1/plain-model/rate"), ("GET", "/v1/deployments/plain-model/configuration")],
    )
    async def test_unset_rate_and_configuration_answer_an_empty_200(
        self, aclient: httpx.AsyncClient, afake: InProcessFake, method: str, path: str
    ) -> None:
        response = await aclient.request(method, path, headers=headers(), json={"x": 1})
        assert response.status_code == 200
        assert response.content == b""
        assert afake.requests() == []

    @pytest.mark.parametrize("feature", ["tokenize", "truncate_prompt"])
    async def test_unset_tokenize_and_truncate_prompt_are_forbidden(
        self, aclient: httpx.AsyncClient, afake: InProcessFake, feature: str
    ) -> None:
        url = f"/v1/deployments/plain-model/{feature}"
        response = await aclient.post(url, headers=headers(), json={"inputs": []})
        assert error_of(response) == (403, "Forbidden deployment")
        assert afake.requests() == []

    async def test_access_follows_user_roles(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        response = await aclient.post("/v1/power-model/rate", headers=headers(), json={})
        assert error_of(response) == (403, "Forbidden deployment: power-model")
        assert afake.requests() == []
        response = await aclient.post("/v1/power-model/rate", headers=headers(POWER_KEY), json={})
        assert response.status_code == 200 and response.text == "PONG"

    async def test_unknown_deployment(self, aclient: httpx.AsyncClient) -> None:
        response = await aclient.post("/v1/deployments/nope/tokenize", headers=headers(), json={})
        assert error_of(response) == (404, "Unknown application: nope")
        response = await aclient.get("/v1/deployments/nope/configuration", headers=headers())
        assert error_of(response) == (404, "Unknown application: nope")
        # DIAL's rate pattern has no `deployments/` segment: this names `deployments/feat-model`.
        response = await aclient.post("/v1/deployments/feat-model/rate", headers=headers(), json={})
        assert error_of(response) == (404, "Unknown application: deployments/feat-model")

    async def test_authentication_comes_first(self, aclient: httpx.AsyncClient) -> None:
        response = await aclient.post("/v1/feat-model/rate", json={})
        assert response.status_code == 401
        response = await aclient.post("/v1/feat-model/rate", headers=headers("wrong"), json={})
        assert error_of(response) == (401, "Unknown api key")

    async def test_upstream_down(self, aclient: httpx.AsyncClient) -> None:
        body = {"inputs": [{"type": "string", "value": "a"}]}
        response = await aclient.post(
            "/v1/deployments/dead-model/tokenize", headers=headers(), json=body
        )
        assert error_of(response) == (502, "connection error to origin")
        response = await aclient.get("/v1/deployments/dead-model/configuration", headers=headers())
        assert error_of(response) == (502, "connection error to origin")

    async def test_upstream_drops_the_connection(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        afake.add_fault({"disconnect": True, "times": 1})
        response = await aclient.post("/v1/feat-model/rate", headers=headers(), json={})
        assert error_of(response) == (502, "deployment responded with error")
        # Not retried: one request reached the upstream.
        assert len(afake.requests()) == 1
        hop_key = seen_headers(afake.last())["api-key"]
        assert await is_dead(aclient, hop_key)  # the failed hop's key died too

    async def test_upstream_timeout(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        afake.add_fault({"delayMs": 3000, "times": 1})
        body = {"inputs": [{"type": "string", "value": "a"}]}
        response = await aclient.post(
            "/v1/deployments/slow-model/tokenize", headers=headers(), json=body
        )
        assert error_of(response) == (504, "Upstream timed out")


class TestAssistants:
    async def test_assistant_rate_inherits_the_shared_endpoint(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        assert (await aclient.post("/v1/helper/rate", headers=headers(), json={})).text == "PONG"
        assert afake.last()["path"] == "/assistants/rate"
        assert (await aclient.post("/v1/own-rate/rate", headers=headers(), json={})).text == "PONG"
        assert afake.last()["path"] == "/own/rate"
        # The base assistant has the shared features too.
        assert (await aclient.post("/v1/assistant/rate", headers=headers(), json={})).text == "PONG"
        assert afake.last()["path"] == "/assistants/rate"

    async def test_listing_flags_agree(self, aclient: httpx.AsyncClient) -> None:
        item = (await aclient.get("/openai/assistants/helper", headers=headers())).json()
        assert item["features"]["rate"] is True and item["features"]["tokenize"] is False
        model = (await aclient.get("/openai/models/feat-model", headers=headers())).json()
        assert all(model["features"][f] for f in ("rate", "tokenize", "truncate_prompt"))
        assert model["features"]["configuration"] is True
        plain = (await aclient.get("/openai/models/plain-model", headers=headers())).json()
        assert not any(plain["features"][f] for f in ("rate", "tokenize", "configuration"))
        response = await aclient.post("/v1/deployments/helper/tokenize", headers=headers(), json={})
        assert error_of(response) == (403, "Forbidden deployment")


class TestAidialSdkApplication:
    """A real aidial-sdk application: it refuses feature calls without `Api-Key` (spec 15.3)."""

    def test_tokenize_with_a_live_per_request_key(
        self, process_client: httpx.Client, sdk_app: App
    ) -> None:
        body = {"inputs": [{"type": "string", "value": "a b c d"}]}
        response = process_client.post(
            f"/v1/deployments/{SDK_APP}/tokenize", headers=headers(), json=body
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["outputs"] == [{"status": "success", "token_count": 4}]
        # During the hop the app's key works, acting as the caller (spec proxy 11) ...
        assert answer["callback"] == {
            "status": 200,
            "body": {"roles": ["default"], "project": "feat-proj"},
        }
        # ... and it dies with the hop.
        assert is_dead_in(process_client, sdk_app.get("/_test/last")["key"])

    def test_truncate_prompt(self, process_client: httpx.Client, sdk_app: App) -> None:
        messages = [
            {"role": "user", "content": "w w w w w"},
            {"role": "assistant", "content": "w w"},
            {"role": "user", "content": "now"},
        ]
        body = {"inputs": [{"messages": messages, "max_prompt_tokens": 3}]}
        url = f"/v1/deployments/{SDK_APP}/truncate_prompt"
        response = process_client.post(url, headers=headers(), json=body)
        assert response.status_code == 200, response.text
        assert response.json() == {"outputs": [{"status": "success", "discarded_messages": [0]}]}

    def test_rate(self, process_client: httpx.Client, sdk_app: App) -> None:
        body = {"responseId": "chatcmpl-7", "rate": True}
        response = process_client.post(f"/v1/{SDK_APP}/rate", headers=headers(), json=body)
        assert response.status_code == 200 and response.content == b""
        assert sdk_app.get("/_test/last")["rate"] == {"response_id": "chatcmpl-7", "rate": True}

    def test_configuration_through_aidial_client(
        self, process_gateway: Gateway, sdk_app: App
    ) -> None:
        with Dial(api_key=KEY, base_url=process_gateway.url) as dial:
            schema = dial.deployments.get_configuration_schema(SDK_APP)
            assert schema["properties"]["mode"]["enum"] == ["fast", "careful"]
            assert schema["seen"]["api_key_length"] == 32
            assert schema["seen"]["authorization"] is False
            assert schema["seen"]["upstream_endpoint"] is None
            # A model's feature hop names its first upstream, which an adapter needs.
            model_schema = dial.deployments.get_configuration_schema("sdk-model")
            assert model_schema["seen"]["upstream_endpoint"] == PROVIDER_A
            assert model_schema["seen"]["upstream_key"] == "provider-key-a"


@pytest.fixture(scope="module")
def shared_pair(work_dir: Path, fake_model: FakeModel) -> Iterator[tuple[Gateway, Gateway, App]]:
    """Two instances on one Redis, and the aidial-sdk app calling back the second one."""
    redis: RedisServer = start_redis_server(work_dir / "redis-features")
    port = free_port()
    config = features_config(fake_model, f"http://127.0.0.1:{port}")
    env = {"aidial.redis.singleServerConfig.address": redis.url}
    first = start_gateway(work_dir, [config], env=env)
    second = start_gateway(work_dir, [config], env=env)
    app = start_app(work_dir, "feature_app", port=port, dial_url=second.url)
    yield first, second, app
    for process in (app.process, first.process, second.process):
        stop(process)
    stop_redis_server(redis)


def test_feature_keys_are_shared_through_redis(shared_pair: tuple[Gateway, Gateway, App]) -> None:
    """The hop's key, minted by one instance, works on another during the hop (the app calls
    the second instance back) and dies everywhere once the hop ends."""
    first, second, app = shared_pair
    body = {"inputs": [{"type": "string", "value": "a b"}]}
    url = f"{first.url}/v1/deployments/{SDK_APP}/tokenize"
    response = httpx.post(url, headers=headers(), json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["callback"] == {
        "status": 200,
        "body": {"roles": ["default"], "project": "feat-proj"},
    }
    hop_key = app.get("/_test/last")["key"]
    with (
        httpx.Client(base_url=first.url) as on_first,
        httpx.Client(base_url=second.url) as on_second,
    ):
        assert is_dead_in(on_first, hop_key)
        deadline = time.monotonic() + 10
        while not is_dead_in(on_second, hop_key):  # revoked in Redis in the background
            assert time.monotonic() < deadline, "the key still works on the other instance"
            time.sleep(0.1)
