"""The OpenAI Responses API and the Anthropic Messages API through Tollgate (compatibility
C75-C77), with the real `openai` and `anthropic` SDKs pointed at an in-process gateway.

Models declare typed `interfaces` (or the legacy `responsesEndpoint`); the fake model serves
`/openai/v1/responses` and `/anthropic/v1/messages[/count_tokens]` as the vendors do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway

KEY = "typed-apis-key-0123456789abcdef"
LIMITED_KEY = "typed-apis-limited-0123456789abcdef"
NOBODY_KEY = "typed-apis-nobody-0123456789abcdef"


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    base = inprocess_fake.url
    config = {
        "models": {
            "gpt-typed": {
                "interfaces": {
                    "openaiResponses": {"baseUrl": base, "defaults": {"store": False}},
                    "openaiChatCompletions": {"baseUrl": base},
                },
                "overrideName": "gpt-upstream",
                "defaultHeaders": {"X-Default": "model", "X-Client-Wins": "default"},
            },
            "gpt-legacy": {
                "endpoint": inprocess_fake.endpoint("gpt-legacy"),
                "responsesEndpoint": f"{base}/openai/v1/responses",
            },
            "claude": {
                "displayName": "Claude (test)",
                "overrideName": "claude-upstream",
                "limits": {"maxPromptTokens": 1000, "maxCompletionTokens": 200},
                "interfaces": {
                    "anthropicMessages": {
                        "baseUrl": base,
                        "defaultHeaders": {"x-dial-custom": "v2"},
                    }
                },
            },
            "claude-limited": {
                "interfaces": {"anthropic_messages": {"base_url": base}},
                "upstreams": [{"id": "one", "key": "upstream-secret-key"}],
            },
            "claude-hidden": {
                "userRoles": ["nobody-has-this"],
                "interfaces": {"anthropicMessages": {"baseUrl": base}},
            },
            "chat-only": {"endpoint": inprocess_fake.endpoint("chat-only")},
            "resp-no-upstream-id": {
                "interfaces": {"openaiResponses": {"baseUrl": base}},
                "upstreams": [{"key": "k"}],
            },
        },
        "roles": {
            "tight": {
                "limits": {
                    "claude-limited": {"day": "1"},
                    "gpt-typed": {"day": "1"},
                }
            }
        },
        "keys": {
            KEY: {"project": "typed", "role": "user"},
            LIMITED_KEY: {"project": "typed-limited", "role": "tight"},
        },
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


def openai_client(gateway: InProcessGateway, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"{gateway.url}/openai/v1", max_retries=0)


def anthropic_client(gateway: InProcessGateway, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=f"{gateway.url}/anthropic", max_retries=0)


async def used_tokens(client: httpx.AsyncClient, key: str, deployment: str) -> int:
    answer = await client.get(f"/v1/deployments/{deployment}/limits", headers={"Api-Key": key})
    assert answer.status_code == 200, answer.text
    used: int = answer.json()["dayTokenStats"]["used"]
    return used


def header(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key.lower() == name.lower()]


# --- Responses ---------------------------------------------------------------------------------


async def test_responses_create_with_the_openai_sdk(
    agateway: InProcessGateway, aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, KEY, "gpt-typed")
    response = await openai_client(agateway).responses.create(
        model="gpt-typed", input="Say hello to the gateway"
    )
    assert response.output_text
    assert response.usage is not None and response.usage.total_tokens > 0
    sent = afake.last()
    assert sent["path"] == "/openai/v1/responses"
    body = orjson.loads(sent["body"])
    assert body["model"] == "gpt-upstream"  # overrideName
    assert body["store"] is False  # the interface's defaults
    assert header(sent, "Api-Key") and header(sent, "Api-Key")[0] != KEY  # a per-request key
    assert header(sent, "Authorization") == []  # the caller's key never goes upstream
    assert header(sent, "X-Default") == ["model"]
    charged = await used_tokens(aclient, KEY, "gpt-typed") - before
    assert charged == response.usage.total_tokens


async def test_a_streamed_response_is_relayed_event_by_event_and_charged(
    agateway: InProcessGateway, aclient: httpx.AsyncClient
) -> None:
    before = await used_tokens(aclient, KEY, "gpt-typed")
    stream = await openai_client(agateway).responses.create(
        model="gpt-typed", input="Tell a story", stream=True
    )
    kinds = []
    text = ""
    final = None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text and final is not None and final.usage is not None
    charged = await used_tokens(aclient, KEY, "gpt-typed") - before
    assert charged == final.usage.total_tokens > 0


async def test_the_legacy_responses_endpoint_serves_the_responses_api(
    agateway: InProcessGateway, afake: InProcessFake
) -> None:
    response = await openai_client(agateway).responses.create(model="gpt-legacy", input="Hi")
    assert response.output_text
    assert afake.last()["path"] == "/openai/v1/responses"


async def test_responses_on_a_model_without_the_interface_is_503(
    agateway: InProcessGateway,
) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        await openai_client(agateway).responses.create(model="chat-only", input="Hi")
    assert raised.value.status_code == 503
    assert raised.value.response.json()["error"]["message"] == (
        "OpenAI responses not supported for this deployment type"
    )


async def test_responses_refuses_previous_response_id_and_conversation(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    calls = len(afake.requests())
    for field in ("previous_response_id", "conversation"):
        answer = await aclient.post(
            "/openai/v1/responses",
            headers={"Api-Key": KEY},
            json={"model": "gpt-typed", "input": "Hi", field: "resp_123"},
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["message"] == f"{field} is not supported"
    assert len(afake.requests()) == calls  # nothing went upstream


async def test_responses_needs_upstream_ids(aclient: httpx.AsyncClient) -> None:
    answer = await aclient.post(
        "/openai/v1/responses",
        headers={"Api-Key": KEY},
        json={"model": "resp-no-upstream-id", "input": "Hi"},
    )
    assert answer.status_code == 503
    assert answer.json()["error"]["message"] == "Upstream is missing required id"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"input": "Hi"}, 400, "Field model is required"),
        ({"model": 7, "input": "Hi"}, 400, "Field model is required"),
        ({"model": "no-such-model", "input": "Hi"}, 404, "Unknown application: no-such-model"),
    ],
)
async def test_responses_bad_models(
    aclient: httpx.AsyncClient, body: dict[str, Any], status: int, message: str
) -> None:
    answer = await aclient.post("/openai/v1/responses", headers={"Api-Key": KEY}, json=body)
    assert answer.status_code == status
    assert answer.json()["error"]["message"] == message


async def test_responses_bad_requests(aclient: httpx.AsyncClient) -> None:
    wrong_type = await aclient.post(
        "/openai/v1/responses",
        headers={"Api-Key": KEY, "Content-Type": "text/plain"},
        content=b'{"model": "gpt-typed"}',
    )
    assert wrong_type.status_code == 415
    not_json = await aclient.post(
        "/openai/v1/responses",
        headers={"Api-Key": KEY, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert not_json.status_code == 400
    unauthenticated = await aclient.post(
        "/openai/v1/responses", json={"model": "gpt-typed", "input": "Hi"}
    )
    assert unauthenticated.status_code == 401


async def test_a_token_limit_stops_responses_calls(agateway: InProcessGateway) -> None:
    client = openai_client(agateway, LIMITED_KEY)
    await client.responses.create(model="gpt-typed", input="Hi")  # over the 1-token day now
    with pytest.raises(openai.RateLimitError) as raised:
        await client.responses.create(model="gpt-typed", input="Hi")
    assert raised.value.status_code == 429


async def test_the_chat_interface_entry_replaces_the_deployment_segment(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await aclient.post(
        "/openai/deployments/gpt-typed/chat/completions?api-version=2024-02-01",
        headers={"Api-Key": KEY, "X-Client-Wins": "client"},
        json={"messages": [{"role": "user", "content": "Hi"}]},
    )
    assert answer.status_code == 200, answer.text
    sent = afake.last()
    assert sent["raw_path"] == (
        "/openai/deployments/gpt-upstream/chat/completions?api-version=2024-02-01"
    )
    assert header(sent, "X-Client-Wins") == ["client"]  # a default never overrides the client
    assert header(sent, "X-Default") == ["model"]


async def test_embeddings_on_a_chat_only_interface_map_is_503(
    aclient: httpx.AsyncClient,
) -> None:
    answer = await aclient.post(
        "/openai/deployments/gpt-typed/embeddings",
        headers={"Api-Key": KEY},
        json={"input": "Hi"},
    )
    assert answer.status_code == 503


# --- Anthropic ---------------------------------------------------------------------------------


async def test_messages_create_with_the_anthropic_sdk(
    agateway: InProcessGateway, aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, KEY, "claude")
    message = await anthropic_client(agateway).messages.create(
        model="claude",
        max_tokens=64,
        messages=[{"role": "user", "content": "Say hello to the gateway"}],
    )
    assert message.content and message.content[0].type == "text"
    sent = afake.last()
    assert sent["path"] == "/anthropic/v1/messages"
    assert orjson.loads(sent["body"])["model"] == "claude-upstream"
    assert header(sent, "X-DIAL-DEPLOYMENT-ID") == ["claude"]
    assert header(sent, "anthropic-version")  # passed through as the SDK sent it
    assert header(sent, "x-api-key") == []  # the caller's key never goes upstream
    assert header(sent, "x-dial-custom") == ["v2"]
    usage = message.usage
    expected = (
        usage.input_tokens
        + (usage.cache_read_input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
        + usage.output_tokens
    )
    assert await used_tokens(aclient, KEY, "claude") - before == expected > 0


async def test_a_streamed_message_is_relayed_and_charged(
    agateway: InProcessGateway, aclient: httpx.AsyncClient
) -> None:
    before = await used_tokens(aclient, KEY, "claude")
    async with anthropic_client(agateway).messages.stream(
        model="claude",
        max_tokens=64,
        messages=[{"role": "user", "content": "Tell a story"}],
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text
    usage = final.usage
    assert usage.output_tokens > 0
    charged = await used_tokens(aclient, KEY, "claude") - before
    assert charged == usage.input_tokens + usage.output_tokens + (
        usage.cache_read_input_tokens or 0
    ) + (usage.cache_creation_input_tokens or 0)


async def test_a_client_cannot_name_another_deployment_to_the_adapter(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await aclient.post(
        "/anthropic/v1/messages",
        headers={"x-api-key": KEY, "X-DIAL-DEPLOYMENT-ID": "claude-hidden"},
        json={"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert answer.status_code == 200, answer.text
    assert header(afake.last(), "X-DIAL-DEPLOYMENT-ID") == ["claude"]


async def test_count_tokens_is_relayed_and_not_charged(
    agateway: InProcessGateway, aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, LIMITED_KEY, "claude-limited")
    client = anthropic_client(agateway, LIMITED_KEY)
    for _ in range(3):  # a 1-token day limit: counting is neither limited nor charged
        counted = await client.messages.count_tokens(
            model="claude-limited", messages=[{"role": "user", "content": "one two three"}]
        )
        assert counted.input_tokens > 0
    assert afake.last()["path"] == "/anthropic/v1/messages/count_tokens"
    assert await used_tokens(aclient, LIMITED_KEY, "claude-limited") == before


async def test_a_token_limit_stops_messages_in_anthropics_error_shape(
    agateway: InProcessGateway, afake: InProcessFake
) -> None:
    client = anthropic_client(agateway, LIMITED_KEY)
    await client.messages.create(
        model="claude-limited", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
    )
    sent = afake.last()
    assert header(sent, "X-UPSTREAM-KEY") == ["upstream-secret-key"]
    assert header(sent, "X-UPSTREAM-ENDPOINT") == []  # the upstream names none
    with pytest.raises(anthropic.RateLimitError) as raised:
        await client.messages.create(
            model="claude-limited", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        )
    body = raised.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("Hit token rate limit")


async def test_anthropic_errors_have_anthropics_shape(aclient: httpx.AsyncClient) -> None:
    cases = [
        ({}, {"model": "claude", "max_tokens": 1, "messages": []}, 401, "authentication_error"),
        (
            {"x-api-key": KEY},
            {"model": "claude-hidden", "max_tokens": 1, "messages": []},
            403,
            "permission_error",
        ),
        (
            {"x-api-key": KEY},
            {"model": "nope", "max_tokens": 1, "messages": []},
            404,
            "not_found_error",
        ),
        (
            {"x-api-key": KEY},
            {"model": "chat-only", "max_tokens": 1, "messages": []},
            503,
            "api_error",
        ),
    ]
    for headers, body, status, kind in cases:
        answer = await aclient.post("/anthropic/v1/messages", headers=headers, json=body)
        assert answer.status_code == status, answer.text
        error = answer.json()
        assert error["type"] == "error" and error["error"]["type"] == kind
        assert error["error"]["message"]


async def test_both_anthropic_sdk_credentials_authenticate(
    agateway: InProcessGateway,
) -> None:
    bearer = anthropic.AsyncAnthropic(
        auth_token=KEY, base_url=f"{agateway.url}/anthropic", max_retries=0
    )
    message = await bearer.messages.create(
        model="claude", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content


async def test_beta_messages_with_a_query_string_are_routed_and_forwarded(
    agateway: InProcessGateway, afake: InProcessFake
) -> None:
    message = await anthropic_client(agateway).beta.messages.create(
        model="claude",
        max_tokens=8,
        messages=[{"role": "user", "content": "Hi"}],
        betas=["context-1m-2025-08-07"],
    )
    assert message.content
    assert header(afake.last(), "anthropic-beta") == ["context-1m-2025-08-07"]
    # Older SDKs (0.x) also add `?beta=true`: routed on the path, the query forwarded.
    async with httpx.AsyncClient(base_url=agateway.url, timeout=30) as http:
        answer = await http.post(
            "/anthropic/v1/messages?beta=true",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            json={
                "model": "claude",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
    assert answer.status_code == 200, answer.text
    assert afake.last()["raw_path"] == "/anthropic/v1/messages?beta=true"
    assert header(afake.last(), "anthropic-version") == ["2023-06-01"]


async def test_models_lists_the_models_that_serve_messages(agateway: InProcessGateway) -> None:
    client = anthropic_client(agateway)
    page = await client.models.list()
    names = [model.id for model in page.data]
    assert names == ["claude", "claude-limited"]  # config order; hidden and others left out
    claude = await client.models.retrieve("claude")
    assert claude.display_name == "Claude (test)"
    assert claude.type == "model"


async def test_listings_show_the_interfaces(aclient: httpx.AsyncClient) -> None:
    answer = await aclient.get("/openai/models", headers={"Api-Key": KEY})
    items = {item["id"]: item for item in answer.json()["data"]}
    assert items["gpt-typed"]["interfaces"] == ["openaiResponses", "openaiChatCompletions"]
    assert items["gpt-legacy"]["interfaces"] == ["openaiChatCompletions", "openaiResponses"]
    assert items["claude-limited"]["interfaces"] == ["anthropicMessages"]
    assert "interfaces" not in items["chat-only"]  # DIAL's older shape for older configs
    both = await aclient.get("/v1/deployments", headers={"Api-Key": KEY})
    assert {i["id"]: i.get("interfaces") for i in both.json()}["claude"] == ["anthropicMessages"]


async def test_models_paging_and_errors(aclient: httpx.AsyncClient) -> None:
    headers = {"x-api-key": KEY}
    first = await aclient.get("/anthropic/v1/models?limit=1", headers=headers)
    assert first.status_code == 200
    body = first.json()
    assert [m["id"] for m in body["data"]] == ["claude"]
    assert body["has_more"] is True and body["first_id"] == body["last_id"] == "claude"
    assert body["data"][0]["max_input_tokens"] == 1000 and body["data"][0]["max_tokens"] == 200
    second = await aclient.get("/anthropic/v1/models?limit=1&after_id=claude", headers=headers)
    assert [m["id"] for m in second.json()["data"]] == ["claude-limited"]
    assert second.json()["has_more"] is False
    back = await aclient.get("/anthropic/v1/models?before_id=claude-limited", headers=headers)
    assert [m["id"] for m in back.json()["data"]] == ["claude"]
    for query, message in [
        ("after_id=claude&before_id=claude", "Only one of after_id or before_id may be provided"),
        ("limit=x", "Limit must be an integer"),
        ("limit=0", "Limit is out of allowed range: [1, 1000]"),
        ("limit=1001", "Limit is out of allowed range: [1, 1000]"),
        ("after_id=nope", "Invalid after_id: model not found"),
    ]:
        answer = await aclient.get(f"/anthropic/v1/models?{query}", headers=headers)
        assert answer.status_code == 400, query
        assert answer.json()["error"] == {"type": "invalid_request_error", "message": message}
    hidden = await aclient.get("/anthropic/v1/models/claude-hidden", headers=headers)
    assert hidden.status_code == 403
    for name in ("chat-only", "nope"):
        missing = await aclient.get(f"/anthropic/v1/models/{name}", headers=headers)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"


# --- Responses follow-ups (compatibility C78) ------------------------------------------------


async def test_a_response_is_retrieved_cancelled_and_deleted_by_tollgates_id(
    agateway: InProcessGateway, afake: InProcessFake
) -> None:
    client = openai_client(agateway)
    created = await client.responses.create(
        model="gpt-legacy", input="Keep this one", background=True
    )
    assert created.id.startswith("resp_dial_")
    upstream_id = list(afake._state.responses)[-1]  # what the fake stored it under
    assert upstream_id not in created.id  # the upstream's id never reaches the client as is
    again = await client.responses.retrieve(created.id)
    assert again.id == created.id
    assert afake.last()["path"] == f"/openai/v1/responses/{upstream_id}"
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.id == created.id
    assert afake.last()["path"] == f"/openai/v1/responses/{upstream_id}/cancel"
    await client.responses.delete(created.id)
    assert afake.last()["method"] == "DELETE"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)  # the upstream's 404, relayed


async def test_a_plain_answer_carries_no_upstream_id(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await aclient.post(
        "/openai/v1/responses",
        headers={"Api-Key": KEY},
        json={"model": "gpt-legacy", "input": "Hi"},
    )
    assert answer.status_code == 200
    upstream_id = list(afake._state.responses)[-1]
    assert upstream_id not in answer.text
    assert answer.json()["id"].startswith("resp_dial_")
    assert int(answer.headers["Content-Length"]) == len(answer.content)


async def test_a_streamed_response_carries_tollgates_id_in_every_event(
    agateway: InProcessGateway, aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    async with aclient.stream(
        "POST",
        "/openai/v1/responses",
        headers={"Api-Key": KEY},
        json={"model": "gpt-legacy", "input": "Tell a story", "stream": True},
    ) as answer:
        assert answer.status_code == 200
        text = "".join([piece async for piece in answer.aiter_text(7)])  # any chunking
    upstream_id = list(afake._state.responses)[-1]
    assert upstream_id not in text
    ids = {
        orjson.loads(line[6:])["response"]["id"]
        for line in text.splitlines()
        if line.startswith("data: ") and '"response"' in line
    }
    assert len(ids) == 1 and next(iter(ids)).startswith("resp_dial_")
    # The SDK retrieves it by that id.
    again = await openai_client(agateway).responses.retrieve(next(iter(ids)))
    assert again.id == next(iter(ids))


async def test_follow_ups_with_ids_tollgate_did_not_make_are_404(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    calls = len(afake.requests())
    for made_up in ("resp_123", "resp_dial_bm90LWpzb24", "resp_dial_WyJkMSIsImEiXQ"):
        answer = await aclient.get(f"/openai/v1/responses/{made_up}", headers={"Api-Key": KEY})
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["message"] == f"Response with id '{made_up}' not found."
        assert error["display_message"] == error["message"]
        assert error["type"] == "invalid_request_error"
    assert len(afake.requests()) == calls


async def test_a_response_id_cannot_steer_the_upstream_url(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    from tollgate.pipeline.response_ids import ResponseRef, encode

    calls = len(afake.requests())
    for sneaky in ("../../admin", "a/b", "x?y=1", "%2e%2e"):
        made_up = encode(ResponseRef("gpt-legacy", "", sneaky, "typed"))
        answer = await aclient.get(f"/openai/v1/responses/{made_up}", headers={"Api-Key": KEY})
        assert answer.status_code == 404, sneaky
    assert len(afake.requests()) == calls


async def test_another_project_is_refused_a_response(
    agateway: InProcessGateway, aclient: httpx.AsyncClient
) -> None:
    created = await openai_client(agateway).responses.create(model="gpt-legacy", input="Mine")
    answer = await aclient.get(
        f"/openai/v1/responses/{created.id}", headers={"Api-Key": LIMITED_KEY}
    )
    assert answer.status_code == 403
    assert answer.json()["error"]["message"] == "Access denied"
