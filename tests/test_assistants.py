"""Assistants and addons end to end (spec proxy 9): the request an assistant receives, and the
refusals, through Tollgate with the fake model as the assistant service.

Tollgate and the fake model run in process (`inprocess.py`); the openai SDK's client and the
check of the DEBUG log talk to a `tollgate serve` process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness import FakeModel, Gateway, eventually, start_gateway, stop
from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway

KEY = "assistants-key-default-0123456789"
POWER_KEY = "assistants-key-power-0123456789"
SEARCH_TOKEN = "search-addon-token-c0ffee-secret"
POWER_TOKEN = "power-addon-token-deadbeef-secret"
SEARCH_URL = "http://127.0.0.1:1/search"
CALC_URL = "http://127.0.0.1:1/calc"
API_VERSION = "2024-02-01"


def assistants_config(fake: FakeModel | InProcessFake) -> dict[str, Any]:
    return {
        "models": {
            "gpt-4": {"endpoint": fake.endpoint("gpt-4")},
            "secret-model": {"endpoint": fake.endpoint("secret-model"), "userRoles": ["power"]},
        },
        "applications": {"some-app": {"endpoint": fake.endpoint("some-app")}},
        "addons": {
            "search": {"endpoint": SEARCH_URL, "token": SEARCH_TOKEN},
            "calc": {"endpoint": CALC_URL},
            "blank": {"endpoint": "http://127.0.0.1:1/blank", "token": "   "},
            "power-addon": {
                "endpoint": "http://127.0.0.1:1/power",
                "token": POWER_TOKEN,
                "userRoles": ["power"],
            },
        },
        "assistant": {
            "endpoint": fake.endpoint("assistant"),
            # Inherited by every assistant that does not set it (spec proxy 1).
            "features": {"accessibleByPerRequestKey": False},
            "assistants": {
                "helper": {"prompt": "You help.", "addons": ["search", "calc"]},
                "plain": {},
                "blocked": {"addons": ["power-addon"]},
                "own-endpoint": {"endpoint": fake.endpoint("own-assistant"), "prompt": "Own."},
                "private": {"userRoles": ["power"]},
                "with-defaults": {"defaults": {"model": "gpt-4", "addons": [{"name": "calc"}]}},
                "open": {"features": {"accessibleByPerRequestKey": True}},
            },
        },
        "keys": {
            KEY: {"project": "asst-proj", "role": "default"},
            POWER_KEY: {"project": "asst-power", "roles": ["power"]},
        },
    }


@pytest.fixture(scope="module")
def gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    # DEBUG logs: the addon tokens must not show up even there.
    gw = start_gateway(work_dir, [assistants_config(fake_model)], log_level="DEBUG")
    yield gw
    stop(gw.process)


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    """This module's gateway, in process, on the session's in-process fake model."""
    gw = await start_inprocess_gateway(work_dir, [assistants_config(inprocess_fake)])
    yield gw
    await gw.stop()


@pytest.fixture
async def aclient(agateway: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agateway.url, timeout=30) as http:
        yield http


# In process: `afake` is conftest's. For the processes, `client` and `fake` are conftest's:
# `client` talks to this module's `gateway`.


def headers(key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Api-Key": key, "Content-Type": "application/json", **extra}


async def call(
    client: httpx.AsyncClient, assistant: str, body: dict[str, Any], key: str = KEY, **extra: str
) -> httpx.Response:
    url = f"/openai/deployments/{assistant}/chat/completions"
    return await client.post(url, headers=headers(key, **extra), json=body)


def call_process(
    client: httpx.Client, assistant: str, body: dict[str, Any], key: str = KEY, **extra: str
) -> httpx.Response:
    """`call`, made of a gateway process."""
    url = f"/openai/deployments/{assistant}/chat/completions"
    return client.post(url, headers=headers(key, **extra), json=body)


def sent(fake: FakeModel | InProcessFake) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and (lower-cased) headers the assistant service received."""
    record = fake.last()
    return json.loads(record["body"]), {k.lower(): v for k, v in record["headers"]}


def error_of(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.status_code, response.json()["error"]["message"]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


class TestRewrite:
    async def test_prompt_replaces_system_messages(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        messages = [
            {"role": "system", "content": "old rules"},
            user("hi"),
            {"role": "system", "content": "more old rules"},
            user("there"),
        ]
        response = await call(aclient, "helper", {"model": "gpt-4", "messages": messages})
        assert response.status_code == 200
        body, _ = sent(afake)
        assert body["messages"] == [
            {"role": "system", "content": "You help."},
            user("hi"),
            user("there"),
        ]
        assert body["model"] == "gpt-4"
        # Sent to the shared assistant endpoint.
        assert afake.last()["path"] == "/openai/deployments/assistant/chat/completions"

    async def test_no_prompt_leaves_messages_alone(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        messages = [{"role": "system", "content": "mine"}, user("hi")]
        response = await call(aclient, "plain", {"model": "gpt-4", "messages": messages, "seed": 7})
        assert response.status_code == 200
        body, headers_seen = sent(afake)
        assert body == {"model": "gpt-4", "messages": messages, "seed": 7, "addons": []}
        assert not any(name.startswith("x-addon-token-") for name in headers_seen)

    async def test_addons_are_listed_with_urls_and_tokens(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        requested = [{"name": "calc"}, {"name": "blank"}, {"name": "search", "extra": 1}]
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": requested}
        assert (await call(aclient, "helper", body)).status_code == 200
        forwarded, headers_seen = sent(afake)
        # The assistant's addons first, then the request's, without repeats.
        assert forwarded["addons"] == [
            {"url": SEARCH_URL, "name": "search"},
            {"url": CALC_URL, "name": "calc"},
            {"url": "http://127.0.0.1:1/blank", "name": "blank"},
        ]
        tokens = {k: v for k, v in headers_seen.items() if k.startswith("x-addon-token-")}
        assert tokens == {"x-addon-token-0": SEARCH_TOKEN}  # calc: none; blank: blank

    async def test_token_header_names_the_position(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")]}
        body["addons"] = [{"name": "calc"}, {"name": "search"}]
        # A client's own addon token headers never reach the assistant.
        forged = {"x-addon-token-0": "forged", "X-Addon-Token-7": "forged"}
        assert (await call(aclient, "plain", body, **forged)).status_code == 200
        forwarded, headers_seen = sent(afake)
        assert [a["name"] for a in forwarded["addons"]] == ["calc", "search"]
        tokens = {k: v for k, v in headers_seen.items() if k.startswith("x-addon-token-")}
        assert tokens == {"x-addon-token-1": SEARCH_TOKEN}

    async def test_own_endpoint_and_defaults(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        assert (
            await call(aclient, "own-endpoint", {"model": "gpt-4", "messages": []})
        ).status_code == 200
        body, _ = sent(afake)
        assert afake.last()["path"] == "/openai/deployments/own-assistant/chat/completions"
        assert body["messages"] == [{"role": "system", "content": "Own."}]
        # Defaults are applied first, so a default `model` and `addons` count (spec 5.1).
        assert (await call(aclient, "with-defaults", {"messages": [user("hi")]})).status_code == 200
        body, _ = sent(afake)
        assert body["model"] == "gpt-4"
        assert body["addons"] == [{"url": CALC_URL, "name": "calc"}]

    async def test_the_base_assistant_is_rewritten_too(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": [{"name": "search"}]}
        assert (await call(aclient, "assistant", body)).status_code == 200
        forwarded, headers_seen = sent(afake)
        assert forwarded["addons"] == [{"url": SEARCH_URL, "name": "search"}]
        assert headers_seen["x-addon-token-0"] == SEARCH_TOKEN
        response = await call(aclient, "assistant", {"model": "nope", "messages": []})
        assert error_of(response) == (404, "No model: nope")

    async def test_models_and_applications_are_not_rewritten(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        raw = b'{"messages": [{"role": "system", "content": "s"}], "addons": [{"name": "x"}]}'
        for name in ("gpt-4", "some-app"):
            url = f"/openai/deployments/{name}/chat/completions"
            assert (await aclient.post(url, headers=headers(), content=raw)).status_code == 200
            assert afake.last()["body"] == raw.decode()

    def test_addon_tokens_are_never_logged(self, client: httpx.Client, gateway: Gateway) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": [{"name": "power-addon"}]}
        assert call_process(client, "helper", body, POWER_KEY).status_code == 200
        # The call was logged, at the most verbose level (its access line within 50 ms).
        eventually(lambda: "helper" in gateway.output())
        output = gateway.output()
        assert SEARCH_TOKEN not in output and POWER_TOKEN not in output

    def test_openai_client_with_an_assistant_deployment(
        self, gateway: Gateway, fake: FakeModel
    ) -> None:
        # The openai SDK as DIAL's examples use it: the assistant in the URL, the model in the
        # body, addons as an extra field.
        with openai.AzureOpenAI(
            azure_endpoint=gateway.url,
            azure_deployment="helper",
            api_key=KEY,
            api_version=API_VERSION,
            max_retries=0,
        ) as sdk:
            completion = sdk.chat.completions.create(
                model="gpt-4",
                messages=[
                    {"role": "system", "content": "ignored"},
                    {"role": "user", "content": "a"},
                ],
                extra_body={"addons": [{"name": "calc"}]},
            )
        assert completion.choices[0].message.content
        body, headers_seen = sent(fake)
        assert body["messages"][0] == {"role": "system", "content": "You help."}
        assert len(body["messages"]) == 2
        assert [a["name"] for a in body["addons"]] == ["search", "calc"]
        assert headers_seen["x-addon-token-0"] == SEARCH_TOKEN
        assert fake.last()["query_string"] == f"api-version={API_VERSION}"


class TestRefusals:
    async def test_unknown_addon(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        body = {"model": "gpt-4", "messages": [], "addons": [{"name": "calc"}, {"name": "nope"}]}
        assert error_of(await call(aclient, "helper", body)) == (404, "No addon: nope")
        assert afake.requests() == []

    async def test_forbidden_addon(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        body = {"model": "gpt-4", "messages": []}
        assert error_of(await call(aclient, "blocked", body)) == (
            403,
            "Forbidden addon: power-addon",
        )
        asked = {**body, "addons": [{"name": "power-addon"}]}
        assert error_of(await call(aclient, "plain", asked)) == (
            403,
            "Forbidden addon: power-addon",
        )
        assert afake.requests() == []
        assert (await call(aclient, "blocked", body, POWER_KEY)).status_code == 200
        assert sent(afake)[1]["x-addon-token-0"] == POWER_TOKEN

    async def test_unknown_model(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        response = await call(aclient, "helper", {"model": "gpt-5", "messages": []})
        assert error_of(response) == (404, "No model: gpt-5")
        # An application is no model.
        response = await call(aclient, "helper", {"model": "some-app", "messages": []})
        assert error_of(response) == (404, "No model: some-app")
        assert afake.requests() == []

    async def test_forbidden_model(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        response = await call(aclient, "plain", {"model": "secret-model", "messages": []})
        assert error_of(response) == (403, "Forbidden model: secret-model")
        assert afake.requests() == []
        response = await call(
            aclient, "plain", {"model": "secret-model", "messages": []}, POWER_KEY
        )
        assert response.status_code == 200

    async def test_missing_model(self, aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
        status, message = error_of(await call(aclient, "plain", {"messages": [user("hi")]}))
        assert status == 400 and '"model"' in message
        assert afake.requests() == []

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"model": "gpt-4", "messages": [], "addons": {"name": "calc"}}, '"addons"'),
            ({"model": "gpt-4", "messages": [], "addons": [{"title": "calc"}]}, '"name"'),
            ({"model": "gpt-4", "messages": "hi"}, '"messages"'),
        ],
    )
    async def test_malformed_request(
        self, aclient: httpx.AsyncClient, afake: InProcessFake, body: dict[str, Any], field: str
    ) -> None:
        status, message = error_of(await call(aclient, "helper", body))
        assert status == 400 and field in message
        assert afake.requests() == []

    async def test_assistant_access(self, aclient: httpx.AsyncClient) -> None:
        body = {"model": "gpt-4", "messages": []}
        assert error_of(await call(aclient, "private", body)) == (
            403,
            "Forbidden deployment: private",
        )
        assert (await call(aclient, "private", body, POWER_KEY)).status_code == 200
        response = await call(aclient, "no-such-assistant", body)
        assert error_of(response) == (404, "Unknown application: no-such-assistant")

    async def test_assistant_features_are_inherited_on_calls(
        self, aclient: httpx.AsyncClient, afake: InProcessFake
    ) -> None:
        # A per-request key (of a model call held open) may not call an assistant closed to it
        # through the shared `assistant.features`, and may call one that opens itself.
        slow = headers(**{"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "150"})
        chat = {"model": "gpt-4", "messages": [user("hi")], "stream": True}
        url = "/openai/deployments/gpt-4/chat/completions"
        async with aclient.stream("POST", url, headers=slow, json=chat) as stream:
            chunks = stream.aiter_raw()
            await anext(chunks)
            hop_key = sent(afake)[1]["api-key"]
            body = {"model": "gpt-4", "messages": []}
            response = await call(aclient, "helper", body, hop_key)
            assert error_of(response) == (403, "Deployment helper is not accessible by gpt-4")
            assert (await call(aclient, "open", body, hop_key)).status_code == 200
            async for _ in chunks:
                pass
