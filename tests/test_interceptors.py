"""Interceptor chains end to end (spec proxy 8, 15.5; auth-limits 3.3, 3.5, 5.1).

On loopback: Tollgate, the fake model, `apps/relay_interceptor.py` (an aiohttp interceptor
service that records what it gets, appends ` [<name>]` to the last message and calls Tollgate
back with its per-request key) and, in its own virtualenv, an interceptor built with
`aidial-interceptors-sdk` from PyPI (`apps/sdk_interceptor.py`, upper-cases answers). The first
three run in process (`inprocess.py`); the SDK interceptor is a process, and so are the
instances sharing Redis.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    FakeModel,
    Gateway,
    free_port,
    start_fake_model,
    start_gateway,
    start_relay,
    stop,
)
from inprocess import (
    Gateways,
    InProcessFake,
    InProcessGateway,
    InProcessRelay,
    listening_socket,
    start_inprocess_gateway,
    start_inprocess_relay,
)
from interceptors_sdk import start_sdk_interceptor
from redis_server import RedisServer, start_redis_server, stop_redis_server
from tollgate.config.schema import Config
from tollgate.config_check import reference_problems
from tollgate.errors import GatewayError
from tollgate.fake_model import DEFAULT_REPLY
from tollgate.pipeline.call import Call
from tollgate.pipeline.interceptors import Interceptors
from tollgate.security.principal import ChainStep, Principal

TESTS_DIR = Path(__file__).resolve().parent
ROOT_KEY = "icpt-key-root-0123456789"
OTHER_KEY = "icpt-key-other-0123456789"  # same role, another project
API_VERSION = "2024-02-01"
PROVIDER_KEY = "icpt-provider-secret"
CLOSED_PORT = "http://127.0.0.1:9/x/chat/completions"
PER_REQUEST_KEY = re.compile(r"[0-9a-zA-Z_-]{32}")
REPLY = "alpha beta gamma"  # 3 tokens for the fake model


def interceptors_config(fake: InProcessFake, relay_port: int, sdk_port: int) -> dict[str, Any]:
    def relay(name: str) -> str:
        return f"http://127.0.0.1:{relay_port}/{name}/chat/completions"

    def model(name: str, chain: list[str], **extra: Any) -> dict[str, Any]:
        return {"endpoint": fake.endpoint(name), "interceptors": chain, **extra}

    return {
        "models": {
            "plain-model": {"endpoint": fake.endpoint("plain-model")},
            "one-model": model(
                "one-model",
                ["first"],
                upstreams=[{"endpoint": "https://provider.example/v1", "key": PROVIDER_KEY}],
                defaults={"temperature": 0.5},
                overrideName="provider-one",
            ),
            "two-model": model("two-model", ["first", "second"]),
            "other-model": model("other-model", ["second"]),
            "auth-model": model("auth-model", ["first", "authfwd"]),
            "limited-model": model("limited-model", ["first"]),
            "ghost-model": model("ghost-model", ["ghost"]),
            "ghost-second-model": model("ghost-second-model", ["first", "ghost"]),
            "dead-model": model("dead-model", ["dead"]),
            "slow-model": model("slow-model", ["slow"]),
            "embedding-model": {
                "type": "embedding",
                "endpoint": fake.endpoint("embedding-model", "embeddings"),
                "interceptors": ["first"],
            },
            "sdk-model": model("sdk-model", ["first", "shout"]),
            "closed-model": model(
                "closed-model", ["first"], features={"accessibleByPerRequestKey": False}
            ),
        },
        "applications": {
            # Not chained: the relay service at `/probe/...` calls `interceptor` with the
            # application's key, which holds no chain step.
            "probe-app": {"endpoint": relay("probe")},
        },
        "interceptors": {
            "first": {"endpoint": relay("first")},
            "second": {"endpoint": relay("second")},
            "authfwd": {"endpoint": relay("authfwd"), "forwardAuthToken": True},
            "dead": {"endpoint": CLOSED_PORT},
            "slow": {"endpoint": relay("slow"), "readTimeout": 300},
            "shout": {
                "endpoint": f"http://127.0.0.1:{sdk_port}/openai/deployments/shout/chat/completions"
            },
        },
        "keys": {
            ROOT_KEY: {"project": "icpt-root", "role": "default"},
            OTHER_KEY: {"project": "icpt-other", "role": "default"},
        },
        "roles": {
            "default": {"limits": {"limited-model": {"minute": "5", "requestDay": "100"}}},
        },
    }


@pytest.fixture(scope="module")
def relay_socket() -> Iterator[socket.socket]:
    """The relay's listening socket: Tollgate's config names its port before it serves."""
    sock = listening_socket()
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def sdk_port() -> int:
    """The SDK interceptor's port: Tollgate's config names it before it starts."""
    return free_port()


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake, relay_socket: socket.socket, sdk_port: int
) -> AsyncIterator[InProcessGateway]:
    """This module's gateway, in process, on the session's in-process fake model."""
    relay_port = relay_socket.getsockname()[1]
    config = interceptors_config(inprocess_fake, relay_port, sdk_port)
    gw = await start_inprocess_gateway(work_dir, [config])
    yield gw
    await gw.stop()


@pytest.fixture(scope="module")
async def relay_service(
    agateway: InProcessGateway, relay_socket: socket.socket
) -> AsyncIterator[InProcessRelay]:
    relay = await start_inprocess_relay(agateway.url, sock=relay_socket)
    yield relay
    await relay.stop()


@pytest.fixture
def relay(relay_service: InProcessRelay) -> InProcessRelay:
    relay_service.clear()
    return relay_service


async def post(url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.post`, without blocking the loop the in-process servers answer on."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, **kwargs)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(url, **kwargs)


def chat_request(
    url: str, model: str, content: str, key: str, headers: dict[str, str] | None, **body: Any
) -> dict[str, Any]:
    """The arguments of `httpx.post` for a chat call of `model` at the gateway at `url`."""
    return {
        "url": f"{url}/openai/deployments/{model}/chat/completions",
        "params": {"api-version": API_VERSION},
        "headers": {
            "Api-Key": key,
            "Content-Type": "application/json",
            "X-Fake-Reply": REPLY,
            **(headers or {}),
        },
        "json": {"messages": [{"role": "user", "content": content}], **body},
        "timeout": 30,
    }


async def call(
    gateway: InProcessGateway,
    model: str,
    content: str = "hi",
    *,
    key: str = ROOT_KEY,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    return await post(**chat_request(gateway.url, model, content, key, headers, **body))


def call_process(
    gateway: Gateway,
    model: str,
    content: str = "hi",
    *,
    key: str = ROOT_KEY,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    """`call`, made of a gateway process."""
    return httpx.post(**chat_request(gateway.url, model, content, key, headers, **body))


def headers_of(record: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in record["headers"]}


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def error_of(response: httpx.Response) -> tuple[int, str]:
    message: str = response.json()["error"]["message"]
    return response.status_code, message


def streamed_content(body: str) -> str:
    text = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def model_request(fake: FakeModel | InProcessFake) -> tuple[dict[str, str], dict[str, Any]]:
    last = fake.last()
    return headers_of(last), json.loads(last["body"])


class TestOneInterceptor:
    async def test_the_interceptor_gets_the_request_and_a_key_of_its_own(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        assert content_of(await call(agateway, "one-model", "hi")) == REPLY
        [got] = relay.got("first")
        assert got["path"] == "/first/chat/completions"
        assert got["query"] == f"api-version={API_VERSION}"  # the client's query, passed on
        headers = headers_of(got)
        key = headers["api-key"]
        assert PER_REQUEST_KEY.fullmatch(key) and key != ROOT_KEY
        # An interceptor hop: no defaults, no overrideName, no X-UPSTREAM-* (spec proxy 8).
        assert json.loads(got["body"]) == {"messages": [{"role": "user", "content": "hi"}]}
        assert not any(name.startswith("x-upstream-") for name in headers)
        assert "authorization" not in headers

    async def test_the_model_sees_the_modified_request_on_its_normal_path(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(agateway, "one-model", "hi")
        assert content_of(response) == REPLY
        headers, body = model_request(afake)
        assert afake.last()["path"] == "/openai/deployments/one-model/chat/completions"
        assert body["messages"] == [{"role": "user", "content": "hi [first]"}]
        # The deployment's own path: defaults, overrideName, upstream headers.
        assert body["temperature"] == 0.5 and body["model"] == "provider-one"
        assert headers["x-upstream-key"] == PROVIDER_KEY
        assert headers["x-upstream-endpoint"] == "https://provider.example/v1"
        # The model's hop has a key of its own: neither the root's nor the interceptor's.
        interceptor_key = headers_of(relay.got("first")[0])["api-key"]
        assert PER_REQUEST_KEY.fullmatch(headers["api-key"])
        assert headers["api-key"] not in (ROOT_KEY, interceptor_key)
        # An interceptor hop makes one attempt and says nothing of attempts (the relay service
        # does not pass the model call's header on either).
        assert "X-UPSTREAM-ATTEMPTS" not in response.headers

    async def test_streaming_through_the_chain(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(
            agateway, "one-model", "hi", stream=True, headers={"X-Fake-Chunks": "3"}
        )
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert streamed_content(response.text) == REPLY
        assert response.text.rstrip().endswith("data: [DONE]")
        _, body = model_request(afake)
        assert body["stream"] is True
        assert body["messages"][-1]["content"] == "hi [first]"

    async def test_embeddings_through_the_chain(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await post(
            f"{agateway.url}/openai/deployments/embedding-model/embeddings",
            headers={"Api-Key": ROOT_KEY, "Content-Type": "application/json"},
            json={"input": ["one", "two"]},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 2
        # The interceptor is reached at its one endpoint (DIAL ignores the API suffix, spec
        # proxy 3) and calls back `.../chat/completions`: the chain still ends at the model.
        assert relay.got("first")[0]["path"] == "/first/chat/completions"
        assert json.loads(relay.got("first")[0]["body"]) == {"input": ["one", "two"]}
        assert afake.last()["path"] == "/openai/deployments/embedding-model/embeddings"

    async def test_a_plain_model_is_not_intercepted(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        assert content_of(await call(agateway, "plain-model", "hi")) == REPLY
        assert relay.got("first") == []
        _, body = model_request(afake)
        assert body["messages"][-1]["content"] == "hi"


class TestTwoInterceptors:
    async def test_the_request_goes_through_both_in_order(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        assert content_of(await call(agateway, "two-model", "hi")) == REPLY
        [first], [second] = relay.got("first"), relay.got("second")
        assert json.loads(second["body"])["messages"][-1]["content"] == "hi [first]"
        _, body = model_request(afake)
        assert body["messages"][-1]["content"] == "hi [first] [second]"
        keys = {headers_of(first)["api-key"], headers_of(second)["api-key"]}
        keys.add(model_request(afake)[0]["api-key"])
        assert len(keys) == 3 and ROOT_KEY not in keys  # one key per hop

    async def test_streaming_through_both(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(
            agateway, "two-model", "hi", stream=True, headers={"X-Fake-Chunks": "3"}
        )
        assert response.status_code == 200
        assert streamed_content(response.text) == REPLY
        assert model_request(afake)[1]["messages"][-1]["content"] == "hi [first] [second]"

    async def test_an_unknown_second_interceptor_is_404_through_the_first(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(agateway, "ghost-second-model")
        assert error_of(response) == (404, "Interceptor is not found")
        assert len(relay.got("first")) == 1
        assert afake.requests() == []


class TestAuthorization:
    async def test_forwarded_to_an_interceptor_only_with_forward_auth_token(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # `first` calls back with a token of its own: a mid-chain key may come with a different
        # Authorization (spec auth-limits 3.3); `authfwd` has forwardAuthToken (newer DIAL).
        response = await call(
            agateway, "auth-model", headers={"X-Test-Mode-first": "auth:user-token"}
        )
        assert content_of(response) == REPLY
        assert headers_of(relay.got("authfwd")[0])["authorization"] == "Bearer user-token"
        # The model has no forwardAuthToken: its hop drops it.
        assert "authorization" not in model_request(afake)[0]

    async def test_not_forwarded_without_forward_auth_token(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(
            agateway, "two-model", headers={"X-Test-Mode-first": "auth:user-token"}
        )
        assert content_of(response) == REPLY
        assert "authorization" not in headers_of(relay.got("second")[0])

    async def test_an_api_key_in_authorization_is_never_forwarded(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # The openai SDK sends the key in both headers; forwarding it would leak the root key.
        response = await call(
            agateway, "auth-model", headers={"Authorization": f"Bearer {ROOT_KEY}"}
        )
        assert content_of(response) == REPLY
        assert "authorization" not in headers_of(relay.got("first")[0])
        assert "authorization" not in headers_of(relay.got("authfwd")[0])


class TestAccess:
    async def test_a_chain_reaches_a_model_closed_to_per_request_keys(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # The root caller was let in when the chain was entered; the last interceptor's key is
        # the chain going on, not a per-request-key caller of its own.
        assert content_of(await call(agateway, "closed-model")) == REPLY
        assert model_request(afake)[1]["messages"][-1]["content"] == "hi [first]"

    async def test_but_an_interceptor_calling_it_directly_is_refused(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        response = await call(
            agateway, "one-model", headers={"X-Test-Mode-first": "call:closed-model"}
        )
        assert error_of(response) == (403, "Deployment closed-model is not accessible by first")
        assert afake.requests() == []


class TestLimits:
    async def test_charged_once_to_the_root_caller(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        async def used(key: str) -> tuple[int, int]:
            stats = (
                await get(
                    f"{agateway.url}/v1/deployments/limited-model/limits", headers={"Api-Key": key}
                )
            ).json()
            return stats["minuteTokenStats"]["used"], stats["dayRequestStats"]["used"]

        assert await used(ROOT_KEY) == (0, 0)
        response = await call(agateway, "limited-model", "one two")  # prompt 3 words, reply 3
        assert content_of(response) == REPLY
        assert await used(ROOT_KEY) == (6, 1)
        assert await used(OTHER_KEY) == (0, 0)
        # Over the minute limit now: refused where the chain reaches the model (auth-limits
        # 5.1), and the interceptor relays DIAL's answer.
        refused = await call(agateway, "limited-model")
        assert refused.status_code == 429
        assert error_of(refused)[1].startswith("Hit token rate limit. Minute limit: 6 / 5 tokens.")
        assert len(relay.got("first")) == 2
        assert len(afake.requests()) == 1
        assert await used(ROOT_KEY) == (6, 1)  # the refused call counts nowhere
        assert content_of(await call(agateway, "limited-model", key=OTHER_KEY)) == REPLY


class TestErrors:
    async def test_unknown_interceptor(
        self, agateway: InProcessGateway, afake: InProcessFake
    ) -> None:
        assert error_of(await call(agateway, "ghost-model")) == (404, "Interceptor is not found")
        assert afake.requests() == []

    async def test_unreachable_interceptor(
        self, agateway: InProcessGateway, afake: InProcessFake
    ) -> None:
        assert error_of(await call(agateway, "dead-model")) == (502, "Failed to connect to origin")
        assert afake.requests() == []

    async def test_interceptor_breaking_off_after_connecting(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # DIAL 2024 leaves the client waiting here; Tollgate ends the call.
        response = await call(agateway, "one-model", headers={"X-Test-Mode-first": "drop"})
        assert error_of(response) == (502, "Upstream connection failed")
        assert len(relay.got("first")) == 1
        assert afake.requests() == []

    async def test_interceptor_timing_out(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # The interceptor's own readTimeout (300 ms) bounds its silence.
        response = await call(agateway, "slow-model", headers={"X-Test-Mode-slow": "sleep:3000"})
        assert error_of(response) == (504, "Upstream timed out")
        assert afake.requests() == []

    async def test_interceptor_called_with_a_project_key(self, agateway: InProcessGateway) -> None:
        response = await call(agateway, "interceptor")
        assert error_of(response) == (400, "Provided API key is not per request key")

    async def test_interceptor_called_with_a_key_outside_a_chain(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # probe-app's key is a per-request key, but no interceptor's: the app relays the 400.
        response = await call(agateway, "probe-app")
        assert error_of(response) == (
            400,
            "Provided API key is not a per request key of an interceptor",
        )
        assert len(relay.got("probe")) == 1
        assert afake.requests() == []

    async def test_interceptor_called_with_a_key_past_its_chain_end(self) -> None:
        # Tollgate never mints such a key (a chain's last key is at its last position); a key
        # published by something else must still be refused (spec proxy 16 item 4).
        def never(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("must not be reached")

        interceptors = Interceptors(None, None, 1.0, finish=never)  # type: ignore[arg-type]
        step = ChainStep(("a", "b"), 2, "m", "chat/completions")
        past_end = Principal("p", ("default",), frozenset({"default"}), "fp", False, "b", step)
        with pytest.raises(GatewayError) as refused:
            await interceptors.next(Call(None, past_end, None))  # type: ignore[arg-type]
        assert (refused.value.status, refused.value.message) == (
            400,
            "Provided API key is not a per request key of an interceptor",
        )

    async def test_content_type_is_checked_first(self, agateway: InProcessGateway) -> None:
        response = await post(
            f"{agateway.url}/openai/deployments/interceptor/chat/completions",
            headers={"Api-Key": ROOT_KEY, "Content-Type": "text/plain"},
            content=b"{}",
        )
        assert error_of(response) == (415, "Only application/json is supported")

    async def test_invalid_json_is_refused_before_the_first_hop(
        self, agateway: InProcessGateway, relay: InProcessRelay
    ) -> None:
        response = await post(
            f"{agateway.url}/openai/deployments/one-model/chat/completions",
            headers={"Api-Key": ROOT_KEY, "Content-Type": "application/json"},
            content=b"{not json",
        )
        assert response.status_code == 400
        assert relay.got("first") == []


class TestKeys:
    async def test_an_interceptor_key_dies_when_its_hop_ends(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        assert content_of(await call(agateway, "two-model")) == REPLY
        for name in ("first", "second"):
            key = headers_of(relay.got(name)[0])["api-key"]
            for target in ("interceptor", "plain-model"):
                assert error_of(await call(agateway, target, key=key)) == (401, "Unknown api key")

    async def test_another_deployment_called_with_an_interceptor_key_is_a_fresh_call(
        self, agateway: InProcessGateway, relay: InProcessRelay, afake: InProcessFake
    ) -> None:
        # `first` (of one-model's chain) calls other-model itself: other-model's own chain
        # (`second`) runs, then other-model; one-model is never reached (newer DIAL).
        response = await call(
            agateway, "one-model", headers={"X-Test-Mode-first": "call:other-model"}
        )
        assert content_of(response) == REPLY
        assert len(relay.got("second")) == 1
        [request] = afake.requests()
        assert request["path"] == "/openai/deployments/other-model/chat/completions"
        assert json.loads(request["body"])["messages"][-1]["content"] == "hi [first] [second]"


# --- an interceptor built with aidial-interceptors-sdk ------------------------------------------


@pytest.fixture(scope="module")
def sdk_interceptor(
    work_dir: Path, agateway: InProcessGateway, sdk_port: int
) -> Iterator[subprocess.Popen[bytes]]:
    """A process calling back the in-process gateway (a test awaits, so the loop answers)."""
    _, process = start_sdk_interceptor(work_dir, dial_url=agateway.url, port=sdk_port)
    yield process
    stop(process)


class TestSdkInterceptor:
    async def test_in_a_chain(
        self,
        agateway: InProcessGateway,
        relay: InProcessRelay,
        sdk_interceptor: subprocess.Popen[bytes],
        afake: InProcessFake,
    ) -> None:
        response = await call(agateway, "sdk-model", "hi")
        # The SDK interceptor upper-cases the answer (its DIAL client passes no X-Fake-Reply on:
        # the model's default reply); the relay passes it back unchanged.
        assert content_of(response) == DEFAULT_REPLY.upper()
        _, body = model_request(afake)
        assert body["messages"][-1]["content"] == "hi [first] [shout]"

    async def test_streaming(
        self,
        agateway: InProcessGateway,
        relay: InProcessRelay,
        sdk_interceptor: subprocess.Popen[bytes],
        afake: InProcessFake,
    ) -> None:
        response = await call(
            agateway, "sdk-model", "hi", stream=True, headers={"X-Fake-Chunks": "3"}
        )
        assert response.status_code == 200
        assert streamed_content(response.text) == DEFAULT_REPLY.upper()
        assert model_request(afake)[1]["stream"] is True


# --- keys shared through Redis -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis(work_dir: Path) -> Iterator[RedisServer]:
    server = start_redis_server(work_dir / "redis-interceptors")
    yield server
    stop_redis_server(server)


def test_a_chain_across_instances_sharing_redis(work_dir: Path, redis: RedisServer) -> None:
    """The interceptor calls back another instance: the chain step travels in Redis."""
    fake = start_fake_model(work_dir)
    relay_port = free_port()
    config = {
        "models": {
            "shared-model": {
                "endpoint": fake.endpoint("shared-model"),
                "interceptors": ["cross", "cross"],  # twice: the position must travel too
            }
        },
        "interceptors": {
            "cross": {"endpoint": f"http://127.0.0.1:{relay_port}/cross/chat/completions"}
        },
        "keys": {ROOT_KEY: {"project": "icpt-root", "role": "default"}},
    }
    env = {"aidial.redis.singleServerConfig.address": redis.url}
    a = start_gateway(work_dir, [config], env=env)
    b = start_gateway(work_dir, [config], env=env)
    relay = start_relay(work_dir, relay_port, b.url)  # it always calls instance b back
    try:
        response = call_process(a, "shared-model", "hi")
        assert content_of(response) == REPLY
        assert len(relay.got("cross")) == 2
        _, body = model_request(fake)
        assert body["messages"][-1]["content"] == "hi [cross] [cross]"
        # The first key was minted by a and used on b: dead on both once its hop is over (the
        # shared copy is deleted in the background).
        first_key = headers_of(relay.got("cross")[0])["api-key"]
        deadline = time.monotonic() + 10
        for gw in (a, b):
            while (status := call_process(gw, "interceptor", key=first_key).status_code) != 401:
                assert time.monotonic() < deadline, f"the key still works on {gw.url}: {status}"
                time.sleep(0.1)
    finally:
        for process in (relay.process, a.process, b.process, fake.process):
            stop(process)


async def test_global_interceptors_run_before_a_deployment_own(
    gateways: Gateways, afake: InProcessFake
) -> None:
    """Newer DIAL's `globalInterceptors`: every deployment's chain starts with them."""
    fake = afake
    relay_socket = listening_socket()
    relay_port = relay_socket.getsockname()[1]

    def relay(name: str) -> str:
        return f"http://127.0.0.1:{relay_port}/{name}/chat/completions"

    config = {
        "globalInterceptors": ["audit"],
        "models": {
            "own-model": {"endpoint": fake.endpoint("own-model"), "interceptors": ["local"]},
            "bare-model": {"endpoint": fake.endpoint("bare-model")},
        },
        "applications": {"bare-app": {"endpoint": fake.endpoint("bare-app")}},
        "interceptors": {
            "audit": {"endpoint": relay("audit")},
            "local": {"endpoint": relay("local")},
        },
        "keys": {ROOT_KEY: {"project": "icpt-root", "role": "default"}},
    }
    metrics_port = free_port()
    gw = await gateways.start(
        [config], settings={"metrics": {"port": metrics_port, "host": "127.0.0.1"}}
    )
    relay_service = await start_inprocess_relay(gw.url, sock=relay_socket)
    try:
        assert content_of(await call(gw, "own-model", "hi")) == REPLY
        assert json.loads(fake.last()["body"])["messages"][-1]["content"] == "hi [audit] [local]"
        # The call at the chain's end is counted once, for the client's project and the model.
        metrics = (await get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        tokens = {
            (sample.labels["project"], sample.labels["deployment"], sample.labels["type"]): value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "tollgate_tokens_total" and (value := sample.value)
        }
        assert tokens == {
            ("icpt-root", "own-model", "prompt"): 3,
            ("icpt-root", "own-model", "completion"): 3,
        }
        for deployment in ("bare-model", "bare-app"):
            assert content_of(await call(gw, deployment, "hi")) == REPLY
            assert json.loads(fake.last()["body"])["messages"][-1]["content"] == "hi [audit]"
        assert len(relay_service.got("audit")) == 3
    finally:
        await relay_service.stop()
        relay_socket.close()


def test_config_check_names_undefined_global_interceptors() -> None:
    config = Config.model_validate(
        {
            "globalInterceptors": ["audit", "ghost"],
            "interceptors": {"audit": {"endpoint": CLOSED_PORT}},
        }
    )
    assert [(p.severity, p.path, p.message) for p in reference_problems(config)] == [
        ("warning", "$.globalInterceptors[1]", 'no interceptor "ghost" in interceptors')
    ]
