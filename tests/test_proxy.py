"""The deployment call end to end: forwarding, headers, body, streaming, errors (spec proxy 3-7)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway_config import (
    DEFAULT_KEY,
    POWER_KEY,
    PROVIDER_SECRET,
    chat,
    error_of,
    key_headers,
    main_config,
)
from harness import FakeModel, eventually, start_gateway, stop
from inprocess import Gateways, InProcessFake, InProcessGateway

# In process, but for the tests marked e2e (tests/conftest.py marks by fixtures).


@pytest.fixture
def client(aclient: httpx.AsyncClient) -> httpx.AsyncClient:
    """The in-process gateway on the shared test config (tests/inprocess.py)."""
    return aclient


@pytest.fixture
def fake(afake: InProcessFake) -> InProcessFake:
    """The in-process fake model, its records and faults cleared."""
    return afake


@pytest.fixture
def gateway(inprocess_gateway: InProcessGateway) -> InProcessGateway:
    return inprocess_gateway


CHAT = "/openai/deployments/chat-model/chat/completions"


def upstream_headers(fake: InProcessFake) -> dict[str, str]:
    return {name.lower(): value for name, value in fake.last()["headers"]}


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` as raw bytes on a new connection; the first bytes of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.read(4096)
    finally:
        writer.close()


class TestForwarding:
    async def test_plain_chat_is_relayed(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        response = await client.post(CHAT, headers=key_headers(), json=chat("one two three"))
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["usage"]["prompt_tokens"] == 3
        assert response.headers["X-UPSTREAM-ATTEMPTS"] == "1"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert fake.last()["path"] == "/openai/deployments/chat-model/chat/completions"

    async def test_query_string_passes_byte_for_byte(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        raw_query = "api-version=2024-02-01&x=%2F%20a+b&y=%c3%a9&empty="
        response = await client.post(f"{CHAT}?{raw_query}", headers=key_headers(), json=chat())
        assert response.status_code == 200
        assert (
            fake.last()["raw_path"]
            == f"/openai/deployments/chat-model/chat/completions?{raw_query}"
        )

    async def test_headers_rewritten_for_the_hop(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        headers = key_headers() | {
            "Authorization": f"Bearer {DEFAULT_KEY}",
            "X-Conversation-Id": "conv-1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Accept-Encoding": "gzip",
            "User-Agent": "test-agent/1.0",
        }
        await client.post(CHAT, headers=headers, json=chat())
        seen = upstream_headers(fake)
        # The client's key never leaves; a fresh per-request key replaces it.
        assert seen["api-key"] != DEFAULT_KEY and len(seen["api-key"]) == 32
        assert "authorization" not in seen
        assert seen["accept-encoding"] == "identity"  # not the client's gzip
        # X-UPSTREAM-* of the upstream the balancer chose: the tier-0 one.
        assert seen["x-upstream-endpoint"] == "https://provider.example/v1/chat/completions"
        assert seen["x-upstream-key"] == PROVIDER_SECRET
        assert json.loads(seen["x-upstream-extra-data"]) == {"region": "eu"}
        # Everything else passes through.
        assert seen["x-conversation-id"] == "conv-1"
        assert seen["traceparent"].startswith("00-0af7651916cd43dd")
        assert seen["user-agent"] == "test-agent/1.0"
        assert DEFAULT_KEY not in json.dumps(fake.last())

    async def test_client_cannot_inject_upstream_headers(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        headers = key_headers() | {"X-UPSTREAM-KEY": "stolen", "X-UPSTREAM-ENDPOINT": "evil"}
        await client.post(
            "/openai/deployments/renamed-model/chat/completions", headers=headers, json=chat()
        )
        seen = upstream_headers(fake)
        assert "x-upstream-key" not in seen and "x-upstream-endpoint" not in seen

    async def test_forward_auth_token(self, client: httpx.AsyncClient, fake: InProcessFake) -> None:
        url = "/openai/deployments/auth-model/chat/completions"
        # An Authorization that is not the API key (a user token) is forwarded as it came...
        hop_headers = key_headers() | {"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "100"}
        async with client.stream(
            "POST", CHAT, headers=hop_headers, json=chat(stream=True)
        ) as stream:
            chunks = stream.aiter_raw()
            await anext(chunks)
            hop_key = upstream_headers(fake)["api-key"]
            both = key_headers(hop_key) | {"Authorization": "Bearer user-jwt"}
            assert (await client.post(url, headers=both, json=chat())).status_code == 200
            assert upstream_headers(fake)["authorization"] == "Bearer user-jwt"
            async for _ in chunks:
                pass
        # ...but the caller's own key, sent as a bearer token, never is.
        await client.post(
            url, headers=key_headers() | {"Authorization": f"Bearer {DEFAULT_KEY}"}, json=chat()
        )
        assert "authorization" not in upstream_headers(fake)

    async def test_body_forwarded_unchanged(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        raw = b'{ "messages" : [ {"role":"user", "content":"hi"} ],  "zeta": 1, "alpha": null }'
        await client.post(CHAT, headers=key_headers(), content=raw)
        assert fake.last()["body"] == raw.decode()

    async def test_defaults_and_override_name(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        url = "/openai/deployments/renamed-model/chat/completions"
        await client.post(url, headers=key_headers(), json=chat(model="client-name", max_tokens=10))
        sent = json.loads(fake.last()["body"])
        assert sent["model"] == "provider-model-name"
        assert sent["max_tokens"] == 10  # present in the request: kept
        assert sent["temperature"] == 0.5  # absent: filled from defaults
        await client.post(url, headers=key_headers(), json=chat(temperature=None))
        sent = json.loads(fake.last()["body"])
        assert sent["temperature"] is None  # an explicit null is left alone
        assert sent["max_tokens"] == 64

    async def test_application_defaults(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        await client.post(
            "/openai/deployments/echo-app/chat/completions", headers=key_headers(), json=chat()
        )
        assert fake.last()["path"] == "/openai/deployments/echo-app/chat/completions"
        assert json.loads(fake.last()["body"])["custom_fields"] == {"configuration": {"x": 1}}

    async def test_assistant_uses_the_shared_endpoint(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        url = "/openai/deployments/helper-assistant/chat/completions"
        # An assistant's request names the model it is to use (spec proxy 9).
        body = chat(model="chat-model")
        assert (await client.post(url, headers=key_headers(), json=body)).status_code == 200
        assert fake.last()["path"] == "/openai/deployments/assistant/chat/completions"

    @pytest.mark.parametrize("api", ["completions", "embeddings"])
    async def test_other_apis(
        self, client: httpx.AsyncClient, fake: InProcessFake, api: str
    ) -> None:
        body = {"prompt": "a b", "input": ["a", "b c"]}
        url = f"/openai/deployments/embedding-model/{api}"
        response = await client.post(url, headers=key_headers(), json=body)
        assert response.status_code == 200
        # DIAL forwards every API to the deployment's one endpoint (spec proxy 3).
        assert fake.last()["path"] == "/openai/deployments/embedding-model/embeddings"

    async def test_percent_encoded_deployment_id(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        url = "/openai/deployments/special%5B1m%5D/chat/completions"
        assert (await client.post(url, headers=key_headers(), json=chat())).status_code == 200
        assert fake.last()["path"] == "/openai/deployments/special/chat/completions"

    async def test_leading_slashes(
        self, client: httpx.AsyncClient, gateway: InProcessGateway
    ) -> None:
        url = f"{gateway.url}//openai/deployments/chat-model/chat/completions"
        assert (await client.post(url, headers=key_headers(), json=chat())).status_code == 200


class TestStreaming:
    async def test_chunks_arrive_as_they_are_produced(self, client: httpx.AsyncClient) -> None:
        headers = key_headers() | {"X-Fake-Chunks": "5", "X-Fake-Chunk-Delay-Ms": "400"}
        started = time.monotonic()
        arrivals: list[float] = []
        events: list[bytes] = []
        async with client.stream("POST", CHAT, headers=headers, json=chat(stream=True)) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - started)
                    events.append(line.encode())
        assert events[-1] == b"data: [DONE]"
        assert b'"usage"' in events[-2]
        # The upstream takes 5 x 400 ms; the first event must not wait for the last.
        assert arrivals[0] < arrivals[-1] - 1.0

    async def test_upstream_error_status_is_relayed(self, client: httpx.AsyncClient) -> None:
        headers = key_headers() | {"X-Fake-Status": "400"}
        response = await client.post(CHAT, headers=headers, json=chat(stream=True))
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "fake failure"

    async def test_upstream_breaking_off_mid_stream(self, client: httpx.AsyncClient) -> None:
        headers = key_headers() | {"X-Fake-Chunks": "10", "X-Fake-Drop-After": "3"}
        with pytest.raises(httpx.HTTPError):
            async with client.stream(
                "POST", CHAT, headers=headers, json=chat(stream=True)
            ) as stream:
                async for _ in stream.aiter_raw():
                    pass
        assert (await client.post(CHAT, headers=key_headers(), json=chat())).status_code == 200


class TestBadInput:
    async def test_wrong_content_type_is_415(self, client: httpx.AsyncClient) -> None:
        headers = {"Api-Key": DEFAULT_KEY, "Content-Type": "text/plain"}
        assert error_of(await client.post(CHAT, headers=headers, content=b"{}")) == (
            415,
            "Only application/json is supported",
        )

    @pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
    async def test_malformed_json_is_400(self, client: httpx.AsyncClient, body: bytes) -> None:
        status, message = error_of(await client.post(CHAT, headers=key_headers(), content=body))
        assert status == 400 and message

    async def test_unknown_deployment_is_404(self, client: httpx.AsyncClient) -> None:
        url = "/openai/deployments/missing/chat/completions"
        assert error_of(await client.post(url, headers=key_headers(), json=chat())) == (
            404,
            "Unknown application: missing",
        )

    @pytest.mark.parametrize("deployment", ["power-model", "nobody-model", "power-app"])
    async def test_forbidden_deployment_is_403(
        self, client: httpx.AsyncClient, deployment: str
    ) -> None:
        url = f"/openai/deployments/{deployment}/chat/completions"
        assert error_of(await client.post(url, headers=key_headers(), json=chat())) == (
            403,
            f"Forbidden deployment: {deployment}",
        )

    async def test_roles_grant_access(self, client: httpx.AsyncClient) -> None:
        url = "/openai/deployments/power-model/chat/completions"
        assert (
            await client.post(url, headers=key_headers(POWER_KEY), json=chat())
        ).status_code == 200
        nobody = "/openai/deployments/nobody-model/chat/completions"
        assert (
            await client.post(nobody, headers=key_headers(POWER_KEY), json=chat())
        ).status_code == 403

    async def test_no_endpoint_is_503(self, client: httpx.AsyncClient) -> None:
        url = "/openai/deployments/no-endpoint-model/chat/completions"
        assert (await client.post(url, headers=key_headers(), json=chat())).status_code == 503

    async def test_unreachable_upstream_is_502(self, client: httpx.AsyncClient) -> None:
        url = "/openai/deployments/dead-model/chat/completions"
        assert error_of(await client.post(url, headers=key_headers(), json=chat())) == (
            502,
            "Failed to connect to origin",
        )

    async def test_unknown_url_is_404_no_route(self, client: httpx.AsyncClient) -> None:
        assert error_of(await client.get("/v1/nothing/here", headers=key_headers())) == (
            404,
            "No route",
        )
        # Authentication comes first, as in DIAL.
        assert (await client.get("/v1/nothing/here")).status_code == 401

    async def test_unsupported_method_is_405(self, client: httpx.AsyncClient) -> None:
        assert (await client.request("PROPFIND", CHAT, headers=key_headers())).status_code == 405

    async def test_http_1_0_is_505(self, gateway: InProcessGateway) -> None:
        reply = await raw_exchange(
            gateway.port,
            b"GET /v1/user/info HTTP/1.0\r\nApi-Key: " + DEFAULT_KEY.encode() + b"\r\n\r\n",
        )
        assert reply.split(b" ", 2)[1] == b"505"

    async def test_declared_oversized_body_is_413(self, gateway: InProcessGateway) -> None:
        headers = key_headers() | {"Content-Length": str(64 * 1024 * 1024 + 1)}
        request = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        reply = await raw_exchange(gateway.port, request.encode() + b"\r\n{}")
        assert reply.split(b" ", 2)[1] == b"413"
        assert b"Request body is too large" in reply

    async def test_gateway_keeps_serving(self, client: httpx.AsyncClient) -> None:
        assert (await client.post(CHAT, headers=key_headers(), json=chat())).status_code == 200


async def test_small_body_limit_for_chunked_uploads(
    gateways: Gateways, fake: InProcessFake
) -> None:
    """`resources.maxSize` bounds bodies without a Content-Length too."""
    gw = await gateways.start([main_config(fake)], env={"aidial.resources.maxSize": "2000"})
    big = json.dumps(chat("x" * 5000)).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield big[:1000]
        yield big[1000:]

    async with httpx.AsyncClient(base_url=gw.url) as http:
        response = await http.post(CHAT, headers=key_headers(), content=chunks())
        assert error_of(response) == (413, "Request body is too large")
        small = await http.post(CHAT, headers=key_headers(), json=chat())
        assert small.status_code == 200


async def test_front_door_without_credentials(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/version")).text.strip()
    preflight = await client.request(
        "OPTIONS",
        CHAT,
        headers={
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Api-Key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Max-Age"] == "86400"
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "Api-Key"
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.e2e  # reads the DEBUG log of a real process
def test_usage_is_counted_after_the_client_disconnects(
    work_dir: Path, fake_model: FakeModel
) -> None:
    """DECISIONS 9: the upstream is drained for its final usage when the client goes away."""

    gw = start_gateway(work_dir, [main_config(fake_model)], log_level="DEBUG")
    try:
        headers = key_headers() | {
            "X-Fake-Reply": "w1 w2 w3 w4 w5 w6",
            "X-Fake-Chunk-Delay-Ms": "150",
        }
        body = chat("hi", stream=True)
        with httpx.stream("POST", gw.url + CHAT, headers=headers, json=body) as stream:
            next(stream.iter_raw())  # read one chunk, then hang up
        eventually(lambda: "total_tokens=7" in gw.output(), timeout=10)
        line = next(x for x in gw.output().splitlines() if "total_tokens=7" in x)
        assert "deployment=chat-model" in line and "completion_tokens=6" in line
        assert "project=proj-a" in line
        assert DEFAULT_KEY not in gw.output()
        assert httpx.post(gw.url + CHAT, headers=key_headers(), json=chat()).status_code == 200
    finally:
        stop(gw.process)


@pytest.mark.e2e  # an upstream app process
def test_an_upstreams_cookies_never_reach_another_callers_request(work_dir: Path) -> None:
    """One upstream client serves every caller: a cookie an upstream sets is relayed to the
    caller that got it, and never sent upstream again on anyone's request."""
    from harness_apps import start_app

    upstream = start_app(work_dir, "cookie_upstream", dial_url="http://127.0.0.1:1")
    keys = {"cookie-key-a-0123456789abcdef": "a", "cookie-key-b-0123456789abcdef": "b"}
    config = {
        # By name: aiohttp's default cookie jar ignores cookies of hosts given as IP addresses.
        "models": {"jar": {"endpoint": upstream.endpoint("jar").replace("127.0.0.1", "localhost")}},
        "keys": {key: {"project": project, "role": "user"} for key, project in keys.items()},
    }
    gw = start_gateway(work_dir, [config])
    try:
        for key in (*keys, *keys):
            response = httpx.post(
                f"{gw.url}/openai/deployments/jar/chat/completions",
                headers={"Api-Key": key, "Content-Type": "application/json"},
                json={"messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert response.status_code == 200
            assert response.headers["Set-Cookie"].startswith("session=caller-")
        assert upstream.get("/seen") == [None, None, None, None]
    finally:
        stop(gw.process)
        stop(upstream.process)
