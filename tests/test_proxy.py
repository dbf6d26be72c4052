"""The deployment call end to end: forwarding, headers, body, streaming, errors (spec proxy 3-7)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from gateway_config import DEFAULT_KEY, POWER_KEY, PROVIDER_SECRET, chat, error_of, key_headers
from harness import FakeModel, Gateway, start_gateway, stop

CHAT = "/openai/deployments/chat-model/chat/completions"


def upstream_headers(fake: FakeModel) -> dict[str, str]:
    return {name.lower(): value for name, value in fake.last()["headers"]}


class TestForwarding:
    def test_plain_chat_is_relayed(self, client: httpx.Client, fake: FakeModel) -> None:
        response = client.post(CHAT, headers=key_headers(), json=chat("one two three"))
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["usage"]["prompt_tokens"] == 3
        assert response.headers["X-UPSTREAM-ATTEMPTS"] == "1"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert fake.last()["path"] == "/openai/deployments/chat-model/chat/completions"

    def test_query_string_passes_byte_for_byte(self, client: httpx.Client, fake: FakeModel) -> None:
        raw_query = "api-version=2024-02-01&x=%2F%20a+b&y=%c3%a9&empty="
        response = client.post(f"{CHAT}?{raw_query}", headers=key_headers(), json=chat())
        assert response.status_code == 200
        assert (
            fake.last()["raw_path"]
            == f"/openai/deployments/chat-model/chat/completions?{raw_query}"
        )

    def test_headers_rewritten_for_the_hop(self, client: httpx.Client, fake: FakeModel) -> None:
        headers = key_headers() | {
            "Authorization": f"Bearer {DEFAULT_KEY}",
            "X-Conversation-Id": "conv-1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "Accept-Encoding": "gzip",
            "User-Agent": "test-agent/1.0",
        }
        client.post(CHAT, headers=headers, json=chat())
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

    def test_client_cannot_inject_upstream_headers(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        headers = key_headers() | {"X-UPSTREAM-KEY": "stolen", "X-UPSTREAM-ENDPOINT": "evil"}
        client.post(
            "/openai/deployments/renamed-model/chat/completions", headers=headers, json=chat()
        )
        seen = upstream_headers(fake)
        assert "x-upstream-key" not in seen and "x-upstream-endpoint" not in seen

    def test_forward_auth_token(self, client: httpx.Client, fake: FakeModel) -> None:
        url = "/openai/deployments/auth-model/chat/completions"
        # An Authorization that is not the API key (a user token) is forwarded as it came...
        hop_headers = key_headers() | {"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "100"}
        with client.stream("POST", CHAT, headers=hop_headers, json=chat(stream=True)) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            hop_key = upstream_headers(fake)["api-key"]
            both = key_headers(hop_key) | {"Authorization": "Bearer user-jwt"}
            assert client.post(url, headers=both, json=chat()).status_code == 200
            assert upstream_headers(fake)["authorization"] == "Bearer user-jwt"
            for _ in chunks:
                pass
        # ...but the caller's own key, sent as a bearer token, never is.
        client.post(
            url, headers=key_headers() | {"Authorization": f"Bearer {DEFAULT_KEY}"}, json=chat()
        )
        assert "authorization" not in upstream_headers(fake)

    def test_body_forwarded_unchanged(self, client: httpx.Client, fake: FakeModel) -> None:
        raw = b'{ "messages" : [ {"role":"user", "content":"hi"} ],  "zeta": 1, "alpha": null }'
        client.post(CHAT, headers=key_headers(), content=raw)
        assert fake.last()["body"] == raw.decode()

    def test_defaults_and_override_name(self, client: httpx.Client, fake: FakeModel) -> None:
        url = "/openai/deployments/renamed-model/chat/completions"
        client.post(url, headers=key_headers(), json=chat(model="client-name", max_tokens=10))
        sent = json.loads(fake.last()["body"])
        assert sent["model"] == "provider-model-name"
        assert sent["max_tokens"] == 10  # present in the request: kept
        assert sent["temperature"] == 0.5  # absent: filled from defaults
        client.post(url, headers=key_headers(), json=chat(temperature=None))
        sent = json.loads(fake.last()["body"])
        assert sent["temperature"] is None  # an explicit null is left alone
        assert sent["max_tokens"] == 64

    def test_application_defaults(self, client: httpx.Client, fake: FakeModel) -> None:
        client.post(
            "/openai/deployments/echo-app/chat/completions", headers=key_headers(), json=chat()
        )
        assert fake.last()["path"] == "/openai/deployments/echo-app/chat/completions"
        assert json.loads(fake.last()["body"])["custom_fields"] == {"configuration": {"x": 1}}

    def test_assistant_uses_the_shared_endpoint(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        url = "/openai/deployments/helper-assistant/chat/completions"
        # An assistant's request names the model it is to use (spec proxy 9).
        body = chat(model="chat-model")
        assert client.post(url, headers=key_headers(), json=body).status_code == 200
        assert fake.last()["path"] == "/openai/deployments/assistant/chat/completions"

    @pytest.mark.parametrize("api", ["completions", "embeddings"])
    def test_other_apis(self, client: httpx.Client, fake: FakeModel, api: str) -> None:
        body = {"prompt": "a b", "input": ["a", "b c"]}
        url = f"/openai/deployments/embedding-model/{api}"
        response = client.post(url, headers=key_headers(), json=body)
        assert response.status_code == 200
        # DIAL forwards every API to the deployment's one endpoint (spec proxy 3).
        assert fake.last()["path"] == "/openai/deployments/embedding-model/embeddings"

    def test_percent_encoded_deployment_id(self, client: httpx.Client, fake: FakeModel) -> None:
        url = "/openai/deployments/special%5B1m%5D/chat/completions"
        assert client.post(url, headers=key_headers(), json=chat()).status_code == 200
        assert fake.last()["path"] == "/openai/deployments/special/chat/completions"

    def test_leading_slashes(self, client: httpx.Client, gateway: Gateway) -> None:
        url = f"{gateway.url}//openai/deployments/chat-model/chat/completions"
        assert client.post(url, headers=key_headers(), json=chat()).status_code == 200


class TestStreaming:
    def test_chunks_arrive_as_they_are_produced(self, client: httpx.Client) -> None:
        headers = key_headers() | {"X-Fake-Chunks": "5", "X-Fake-Chunk-Delay-Ms": "400"}
        started = time.monotonic()
        arrivals: list[float] = []
        events: list[bytes] = []
        with client.stream("POST", CHAT, headers=headers, json=chat(stream=True)) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - started)
                    events.append(line.encode())
        assert events[-1] == b"data: [DONE]"
        assert b'"usage"' in events[-2]
        # The upstream takes 5 x 400 ms; the first event must not wait for the last.
        assert arrivals[0] < arrivals[-1] - 1.0

    def test_upstream_error_status_is_relayed(self, client: httpx.Client) -> None:
        headers = key_headers() | {"X-Fake-Status": "400"}
        response = client.post(CHAT, headers=headers, json=chat(stream=True))
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "fake failure"

    def test_upstream_breaking_off_mid_stream(self, client: httpx.Client) -> None:
        headers = key_headers() | {"X-Fake-Chunks": "10", "X-Fake-Drop-After": "3"}
        with (
            pytest.raises(httpx.HTTPError),
            client.stream("POST", CHAT, headers=headers, json=chat(stream=True)) as stream,
        ):
            for _ in stream.iter_raw():
                pass
        assert client.post(CHAT, headers=key_headers(), json=chat()).status_code == 200


class TestBadInput:
    def test_wrong_content_type_is_415(self, client: httpx.Client) -> None:
        headers = {"Api-Key": DEFAULT_KEY, "Content-Type": "text/plain"}
        assert error_of(client.post(CHAT, headers=headers, content=b"{}")) == (
            415,
            "Only application/json is supported",
        )

    @pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
    def test_malformed_json_is_400(self, client: httpx.Client, body: bytes) -> None:
        status, message = error_of(client.post(CHAT, headers=key_headers(), content=body))
        assert status == 400 and message

    def test_unknown_deployment_is_404(self, client: httpx.Client) -> None:
        url = "/openai/deployments/missing/chat/completions"
        assert error_of(client.post(url, headers=key_headers(), json=chat())) == (
            404,
            "Unknown application: missing",
        )

    @pytest.mark.parametrize("deployment", ["power-model", "nobody-model", "power-app"])
    def test_forbidden_deployment_is_403(self, client: httpx.Client, deployment: str) -> None:
        url = f"/openai/deployments/{deployment}/chat/completions"
        assert error_of(client.post(url, headers=key_headers(), json=chat())) == (
            403,
            f"Forbidden deployment: {deployment}",
        )

    def test_roles_grant_access(self, client: httpx.Client) -> None:
        url = "/openai/deployments/power-model/chat/completions"
        assert client.post(url, headers=key_headers(POWER_KEY), json=chat()).status_code == 200
        nobody = "/openai/deployments/nobody-model/chat/completions"
        assert client.post(nobody, headers=key_headers(POWER_KEY), json=chat()).status_code == 403

    def test_no_endpoint_is_503(self, client: httpx.Client) -> None:
        url = "/openai/deployments/no-endpoint-model/chat/completions"
        assert client.post(url, headers=key_headers(), json=chat()).status_code == 503

    def test_unreachable_upstream_is_502(self, client: httpx.Client) -> None:
        url = "/openai/deployments/dead-model/chat/completions"
        assert error_of(client.post(url, headers=key_headers(), json=chat())) == (
            502,
            "Failed to connect to origin",
        )

    def test_unknown_url_is_404_no_route(self, client: httpx.Client) -> None:
        assert error_of(client.get("/v1/nothing/here", headers=key_headers())) == (404, "No route")
        # Authentication comes first, as in DIAL.
        assert client.get("/v1/nothing/here").status_code == 401

    def test_unsupported_method_is_405(self, client: httpx.Client) -> None:
        assert client.request("PROPFIND", CHAT, headers=key_headers()).status_code == 405

    def test_http_1_0_is_505(self, gateway: Gateway) -> None:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(
                b"GET /v1/user/info HTTP/1.0\r\nApi-Key: " + DEFAULT_KEY.encode() + b"\r\n\r\n"
            )
            reply = sock.recv(4096)
        assert reply.split(b" ", 2)[1] == b"505"

    def test_declared_oversized_body_is_413(self, client: httpx.Client) -> None:
        headers = key_headers() | {"Content-Length": str(64 * 1024 * 1024 + 1)}
        with socket.create_connection(("127.0.0.1", client.base_url.port or 80)) as sock:
            request = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n" + "".join(
                f"{name}: {value}\r\n" for name, value in headers.items()
            )
            sock.sendall(request.encode() + b"\r\n{}")
            reply = sock.recv(4096)
        assert reply.split(b" ", 2)[1] == b"413"
        assert b"Request body is too large" in reply

    def test_gateway_keeps_serving(self, client: httpx.Client) -> None:
        assert client.post(CHAT, headers=key_headers(), json=chat()).status_code == 200


def test_small_body_limit_for_chunked_uploads(work_dir: Path, fake_model: FakeModel) -> None:
    """`resources.maxSize` bounds bodies without a Content-Length too."""
    from conftest import main_config

    gw = start_gateway(
        work_dir, [main_config(fake_model)], env={"aidial.resources.maxSize": "2000"}
    )
    try:
        big = json.dumps(chat("x" * 5000)).encode()

        def chunks():  # no Content-Length: chunked transfer encoding
            yield big[:1000]
            yield big[1000:]

        with httpx.Client(base_url=gw.url) as http:
            response = http.post(CHAT, headers=key_headers(), content=chunks())
            assert error_of(response) == (413, "Request body is too large")
            small = http.post(CHAT, headers=key_headers(), json=chat())
            assert small.status_code == 200
    finally:
        stop(gw.process)


def test_front_door_without_credentials(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/version").text.strip()
    preflight = client.request(
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


def test_usage_is_counted_after_the_client_disconnects(
    work_dir: Path, fake_model: FakeModel
) -> None:
    """DECISIONS 9: the upstream is drained for its final usage when the client goes away."""
    from conftest import main_config
    from harness import eventually

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
