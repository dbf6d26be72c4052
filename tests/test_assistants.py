"""Assistants and addons end to end (spec proxy 9): the request an assistant receives, and the
refusals, through a real Tollgate with the fake model as the assistant service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness import FakeModel, Gateway, start_gateway, stop

KEY = "assistants-key-default-0123456789"
POWER_KEY = "assistants-key-power-0123456789"
SEARCH_TOKEN = "search-addon-token-c0ffee-secret"
POWER_TOKEN = "power-addon-token-deadbeef-secret"
SEARCH_URL = "http://127.0.0.1:1/search"
CALC_URL = "http://127.0.0.1:1/calc"
API_VERSION = "2024-02-01"


def assistants_config(fake: FakeModel) -> dict[str, Any]:
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


# `client` and `fake` are conftest's: `client` talks to this module's `gateway`.


def headers(key: str = KEY, **extra: str) -> dict[str, str]:
    return {"Api-Key": key, "Content-Type": "application/json", **extra}


def call(
    client: httpx.Client, assistant: str, body: dict[str, Any], key: str = KEY, **extra: str
) -> httpx.Response:
    url = f"/openai/deployments/{assistant}/chat/completions"
    return client.post(url, headers=headers(key, **extra), json=body)


def sent(fake: FakeModel) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and (lower-cased) headers the assistant service received."""
    record = fake.last()
    return json.loads(record["body"]), {k.lower(): v for k, v in record["headers"]}


def error_of(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.status_code, response.json()["error"]["message"]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


class TestRewrite:
    def test_prompt_replaces_system_messages(self, client: httpx.Client, fake: FakeModel) -> None:
        messages = [
            {"role": "system", "content": "old rules"},
            user("hi"),
            {"role": "system", "content": "more old rules"},
            user("there"),
        ]
        response = call(client, "helper", {"model": "gpt-4", "messages": messages})
        assert response.status_code == 200
        body, _ = sent(fake)
        assert body["messages"] == [
            {"role": "system", "content": "You help."},
            user("hi"),
            user("there"),
        ]
        assert body["model"] == "gpt-4"
        # Sent to the shared assistant endpoint.
        assert fake.last()["path"] == "/openai/deployments/assistant/chat/completions"

    def test_no_prompt_leaves_messages_alone(self, client: httpx.Client, fake: FakeModel) -> None:
        messages = [{"role": "system", "content": "mine"}, user("hi")]
        response = call(client, "plain", {"model": "gpt-4", "messages": messages, "seed": 7})
        assert response.status_code == 200
        body, headers_seen = sent(fake)
        assert body == {"model": "gpt-4", "messages": messages, "seed": 7, "addons": []}
        assert not any(name.startswith("x-addon-token-") for name in headers_seen)

    def test_addons_are_listed_with_urls_and_tokens(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        requested = [{"name": "calc"}, {"name": "blank"}, {"name": "search", "extra": 1}]
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": requested}
        assert call(client, "helper", body).status_code == 200
        forwarded, headers_seen = sent(fake)
        # The assistant's addons first, then the request's, without repeats.
        assert forwarded["addons"] == [
            {"url": SEARCH_URL, "name": "search"},
            {"url": CALC_URL, "name": "calc"},
            {"url": "http://127.0.0.1:1/blank", "name": "blank"},
        ]
        tokens = {k: v for k, v in headers_seen.items() if k.startswith("x-addon-token-")}
        assert tokens == {"x-addon-token-0": SEARCH_TOKEN}  # calc: none; blank: blank

    def test_token_header_names_the_position(self, client: httpx.Client, fake: FakeModel) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")]}
        body["addons"] = [{"name": "calc"}, {"name": "search"}]
        # A client's own addon token headers never reach the assistant.
        forged = {"x-addon-token-0": "forged", "X-Addon-Token-7": "forged"}
        assert call(client, "plain", body, **forged).status_code == 200
        forwarded, headers_seen = sent(fake)
        assert [a["name"] for a in forwarded["addons"]] == ["calc", "search"]
        tokens = {k: v for k, v in headers_seen.items() if k.startswith("x-addon-token-")}
        assert tokens == {"x-addon-token-1": SEARCH_TOKEN}

    def test_own_endpoint_and_defaults(self, client: httpx.Client, fake: FakeModel) -> None:
        assert call(client, "own-endpoint", {"model": "gpt-4", "messages": []}).status_code == 200
        body, _ = sent(fake)
        assert fake.last()["path"] == "/openai/deployments/own-assistant/chat/completions"
        assert body["messages"] == [{"role": "system", "content": "Own."}]
        # Defaults are applied first, so a default `model` and `addons` count (spec 5.1).
        assert call(client, "with-defaults", {"messages": [user("hi")]}).status_code == 200
        body, _ = sent(fake)
        assert body["model"] == "gpt-4"
        assert body["addons"] == [{"url": CALC_URL, "name": "calc"}]

    def test_the_base_assistant_is_rewritten_too(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": [{"name": "search"}]}
        assert call(client, "assistant", body).status_code == 200
        forwarded, headers_seen = sent(fake)
        assert forwarded["addons"] == [{"url": SEARCH_URL, "name": "search"}]
        assert headers_seen["x-addon-token-0"] == SEARCH_TOKEN
        response = call(client, "assistant", {"model": "nope", "messages": []})
        assert error_of(response) == (404, "No model: nope")

    def test_models_and_applications_are_not_rewritten(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        raw = b'{"messages": [{"role": "system", "content": "s"}], "addons": [{"name": "x"}]}'
        for name in ("gpt-4", "some-app"):
            url = f"/openai/deployments/{name}/chat/completions"
            assert client.post(url, headers=headers(), content=raw).status_code == 200
            assert fake.last()["body"] == raw.decode()

    def test_addon_tokens_are_never_logged(self, client: httpx.Client, gateway: Gateway) -> None:
        body = {"model": "gpt-4", "messages": [user("hi")], "addons": [{"name": "power-addon"}]}
        assert call(client, "helper", body, POWER_KEY).status_code == 200
        output = gateway.output()
        assert "helper" in output  # the call was logged, at the most verbose level
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
    def test_unknown_addon(self, client: httpx.Client, fake: FakeModel) -> None:
        body = {"model": "gpt-4", "messages": [], "addons": [{"name": "calc"}, {"name": "nope"}]}
        assert error_of(call(client, "helper", body)) == (404, "No addon: nope")
        assert fake.requests() == []

    def test_forbidden_addon(self, client: httpx.Client, fake: FakeModel) -> None:
        body = {"model": "gpt-4", "messages": []}
        assert error_of(call(client, "blocked", body)) == (403, "Forbidden addon: power-addon")
        asked = {**body, "addons": [{"name": "power-addon"}]}
        assert error_of(call(client, "plain", asked)) == (403, "Forbidden addon: power-addon")
        assert fake.requests() == []
        assert call(client, "blocked", body, POWER_KEY).status_code == 200
        assert sent(fake)[1]["x-addon-token-0"] == POWER_TOKEN

    def test_unknown_model(self, client: httpx.Client, fake: FakeModel) -> None:
        response = call(client, "helper", {"model": "gpt-5", "messages": []})
        assert error_of(response) == (404, "No model: gpt-5")
        # An application is no model.
        response = call(client, "helper", {"model": "some-app", "messages": []})
        assert error_of(response) == (404, "No model: some-app")
        assert fake.requests() == []

    def test_forbidden_model(self, client: httpx.Client, fake: FakeModel) -> None:
        response = call(client, "plain", {"model": "secret-model", "messages": []})
        assert error_of(response) == (403, "Forbidden model: secret-model")
        assert fake.requests() == []
        response = call(client, "plain", {"model": "secret-model", "messages": []}, POWER_KEY)
        assert response.status_code == 200

    def test_missing_model(self, client: httpx.Client, fake: FakeModel) -> None:
        status, message = error_of(call(client, "plain", {"messages": [user("hi")]}))
        assert status == 400 and '"model"' in message
        assert fake.requests() == []

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"model": "gpt-4", "messages": [], "addons": {"name": "calc"}}, '"addons"'),
            ({"model": "gpt-4", "messages": [], "addons": [{"title": "calc"}]}, '"name"'),
            ({"model": "gpt-4", "messages": "hi"}, '"messages"'),
        ],
    )
    def test_malformed_request(
        self, client: httpx.Client, fake: FakeModel, body: dict[str, Any], field: str
    ) -> None:
        status, message = error_of(call(client, "helper", body))
        assert status == 400 and field in message
        assert fake.requests() == []

    def test_assistant_access(self, client: httpx.Client) -> None:
        body = {"model": "gpt-4", "messages": []}
        assert error_of(call(client, "private", body)) == (403, "Forbidden deployment: private")
        assert call(client, "private", body, POWER_KEY).status_code == 200
        response = call(client, "no-such-assistant", body)
        assert error_of(response) == (404, "Unknown application: no-such-assistant")

    def test_assistant_features_are_inherited_on_calls(
        self, client: httpx.Client, fake: FakeModel
    ) -> None:
        # A per-request key (of a model call held open) may not call an assistant closed to it
        # through the shared `assistant.features`, and may call one that opens itself.
        slow = headers(**{"X-Fake-Chunks": "3", "X-Fake-Chunk-Delay-Ms": "150"})
        chat = {"model": "gpt-4", "messages": [user("hi")], "stream": True}
        url = "/openai/deployments/gpt-4/chat/completions"
        with client.stream("POST", url, headers=slow, json=chat) as stream:
            chunks = stream.iter_raw()
            next(chunks)
            hop_key = sent(fake)[1]["api-key"]
            body = {"model": "gpt-4", "messages": []}
            response = call(client, "helper", body, hop_key)
            assert error_of(response) == (403, "Deployment helper is not accessible by gpt-4")
            assert call(client, "open", body, hop_key).status_code == 200
            for _ in chunks:
                pass
