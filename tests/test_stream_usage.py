"""No stream goes uncounted (compatibility C70): a streamed chat or completion call to a model
asks the upstream for usage, and a client that did not ask sees the stream it would have seen
without Tollgate.

The fake model runs as OpenAI does (`X-Fake-Usage: on-request`): usage in a stream only when
the request has `stream_options.include_usage: true`, then `"usage": null` on every chunk and a
last chunk with `"choices": []` that carries it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway

KEY = "stream-usage-key-0123456789abcdef"
LIMITED_KEY = "stream-usage-limited-0123456789abcdef"
OPENAI = {"X-Fake-Usage": "on-request"}
UNLIMITED = 9223372036854775807


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    config = {
        "models": {
            "openai-like": {"endpoint": inprocess_fake.endpoint("openai-like")},
            "limited": {"endpoint": inprocess_fake.endpoint("limited")},
            "completion": {
                "type": "completion",
                "endpoint": inprocess_fake.endpoint("completion", "completions"),
            },
            "with-defaults": {
                "endpoint": inprocess_fake.endpoint("with-defaults"),
                "defaults": {"temperature": 0.5},
            },
            "opted-out": {
                "endpoint": inprocess_fake.endpoint("opted-out"),
                "includeStreamUsage": False,
            },
        },
        "roles": {"tight": {"limits": {"limited": {"day": "1"}}}},
        "keys": {
            KEY: {"project": "stream-usage", "role": "user"},
            LIMITED_KEY: {"project": "stream-usage-limited", "role": "tight"},
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


async def stream(
    client: httpx.AsyncClient,
    deployment: str,
    key: str = KEY,
    api: str = "chat/completions",
    **extra: Any,
) -> httpx.Response:
    body: dict[str, Any] = (
        {"prompt": "Say hello"}
        if api == "completions"
        else {"messages": [{"role": "user", "content": "Say hello"}]}
    )
    return await client.post(
        f"/openai/deployments/{deployment}/{api}",
        headers={"Api-Key": key, **OPENAI},
        json={**body, "stream": True, **extra},
    )


def events(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith("data: ")]


async def used_tokens(client: httpx.AsyncClient, key: str, deployment: str) -> int:
    answer = await client.get(f"/v1/deployments/{deployment}/limits", headers={"Api-Key": key})
    assert answer.status_code == 200, answer.text
    used: int = answer.json()["dayTokenStats"]["used"]
    return used


async def direct(fake: InProcessFake, deployment: str, **extra: Any) -> str:
    """What the fake answers a client that talks to it without Tollgate."""
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(
            fake.endpoint(deployment),
            headers=OPENAI,
            json={"messages": [{"role": "user", "content": "Say hello"}], "stream": True, **extra},
        )
    assert answer.status_code == 200
    return answer.text


async def test_a_stream_is_charged_though_the_client_did_not_ask_for_usage(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, KEY, "openai-like")
    answer = await stream(aclient, "openai-like")
    assert answer.status_code == 200
    sent = orjson.loads(afake.last()["body"])
    assert sent["stream_options"] == {"include_usage": True}
    assert await used_tokens(aclient, KEY, "openai-like") > before


async def test_the_client_sees_the_stream_it_would_see_without_tollgate(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await stream(aclient, "openai-like")
    assert answer.status_code == 200
    assert "usage" not in answer.text  # neither the usage event nor `"usage": null`
    seen = events(answer.text)
    assert seen[-1] == "data: [DONE]"
    assert all(orjson.loads(line[6:])["choices"] for line in seen[:-1])
    # As many events as the upstream sends a client that does not ask for usage.
    assert len(seen) == len(events(await direct(afake, "openai-like")))


async def test_a_client_that_asks_for_usage_gets_the_upstream_stream_as_it_is(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await stream(aclient, "openai-like", stream_options={"include_usage": True})
    assert answer.status_code == 200
    seen = events(answer.text)
    final = orjson.loads(seen[-2][6:])
    assert final["choices"] == [] and final["usage"]["total_tokens"] > 0
    assert all(orjson.loads(line[6:])["usage"] is None for line in seen[:-2])
    sent = afake.last()["body"]
    assert orjson.loads(sent)["stream_options"] == {"include_usage": True}


async def test_include_usage_false_is_asked_all_the_same_and_hidden(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, KEY, "openai-like")
    answer = await stream(aclient, "openai-like", stream_options={"include_usage": False})
    assert answer.status_code == 200
    assert "usage" not in answer.text
    assert orjson.loads(afake.last()["body"])["stream_options"] == {"include_usage": True}
    assert await used_tokens(aclient, KEY, "openai-like") > before


async def test_a_streamed_completion_is_charged_too(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    before = await used_tokens(aclient, KEY, "completion")
    answer = await stream(aclient, "completion", api="completions")
    assert answer.status_code == 200
    assert "usage" not in answer.text
    assert orjson.loads(afake.last()["body"])["stream_options"] == {"include_usage": True}
    assert await used_tokens(aclient, KEY, "completion") > before


async def test_a_token_limit_stops_streamed_calls_as_it_stops_plain_ones(
    aclient: httpx.AsyncClient,
) -> None:
    assert (await stream(aclient, "limited", LIMITED_KEY)).status_code == 200
    assert await used_tokens(aclient, LIMITED_KEY, "limited") > 1
    refused = await stream(aclient, "limited", LIMITED_KEY)
    assert refused.status_code == 429
    assert refused.json()["error"]["display_message"] == "You've exceeded your daily token limit"


async def test_a_plain_call_is_forwarded_as_it_came(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    body = b'{"messages": [{"role": "user", "content": "Say hello"}]}'
    answer = await aclient.post(
        "/openai/deployments/openai-like/chat/completions",
        headers={"Api-Key": KEY, "Content-Type": "application/json", **OPENAI},
        content=body,
    )
    assert answer.status_code == 200
    assert afake.last()["body"] == body.decode()


async def test_a_model_that_opts_out_gets_the_request_as_it_came(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await stream(aclient, "opted-out")
    assert answer.status_code == 200
    assert "stream_options" not in orjson.loads(afake.last()["body"])
    assert "usage" not in answer.text


async def test_defaults_and_the_usage_option_both_reach_the_upstream(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answer = await stream(aclient, "with-defaults")
    assert answer.status_code == 200
    sent = orjson.loads(afake.last()["body"])
    assert sent["temperature"] == 0.5
    assert sent["stream_options"] == {"include_usage": True}
    assert "usage" not in answer.text
