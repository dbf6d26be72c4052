"""Listings, single items and user info, filtered by `userRoles` (spec proxy 13, auth 4.2)."""

from __future__ import annotations

import httpx
import pytest

from gateway_config import DEFAULT_KEY, POWER_KEY, error_of, key_headers

pytestmark = pytest.mark.inprocess


@pytest.fixture
def client(aclient: httpx.AsyncClient) -> httpx.AsyncClient:
    """The in-process gateway on the shared test config (tests/inprocess.py)."""
    return aclient


ALL_FEATURES = {
    "rate",
    "tokenize",
    "truncate_prompt",
    "configuration",
    "system_prompt",
    "tools",
    "seed",
    "url_attachments",
    "folder_attachments",
    "allow_resume",
    "accessible_by_per_request_key",
}


def ids(response: httpx.Response) -> set[str]:
    body = response.json()
    assert body["object"] == "list"
    return {item["id"] for item in body["data"]}


async def get(client: httpx.AsyncClient, path: str, key: str = DEFAULT_KEY) -> httpx.Response:
    return await client.get(path, headers=key_headers(key))


class TestModels:
    async def test_listing_is_filtered_by_roles(self, client: httpx.AsyncClient) -> None:
        default = ids(await get(client, "/openai/models"))
        power = ids(await get(client, "/openai/models", POWER_KEY))
        assert "chat-model" in default and "power-model" not in default
        assert "power-model" in power
        assert "nobody-model" not in default | power  # userRoles [] admits nobody

    async def test_item_shape(self, client: httpx.AsyncClient) -> None:
        item = (await get(client, "/openai/models/chat-model")).json()
        assert item["id"] == item["model"] == item["reference"] == "chat-model"
        assert item["object"] == "model"
        assert item["display_name"] == "Chat Model" and item["display_version"] == "1.0"
        assert item["owner"] == "organization-owner" and item["status"] == "succeeded"
        assert item["created_at"] == item["updated_at"] == 1672534800
        assert set(item["features"]) == ALL_FEATURES
        assert item["features"]["rate"] is True and item["features"]["tools"] is True
        assert item["features"]["tokenize"] is False and item["features"]["system_prompt"] is True
        assert item["capabilities"]["chat_completion"] is True
        assert item["capabilities"]["embeddings"] is False
        assert item["limits"] == {"max_total_tokens": 1000, "max_prompt_tokens": 200}
        assert item["pricing"] == {"unit": "token", "prompt": "0.56", "completion": "0.67"}
        assert item["input_attachment_types"] == ["image/png"]
        assert item["max_input_attachments"] == 3
        assert "upstreams" not in item and "endpoint" not in item  # nothing secret is listed
        assert "icon_url" not in item  # null fields are omitted

    async def test_embedding_capabilities(self, client: httpx.AsyncClient) -> None:
        item = (await get(client, "/openai/models/embedding-model")).json()
        assert item["capabilities"]["embeddings"] is True
        assert item["capabilities"]["chat_completion"] is False

    async def test_single_item_codes(self, client: httpx.AsyncClient) -> None:
        assert (await get(client, "/openai/models/power-model")).status_code == 403
        assert (await get(client, "/openai/models/power-model", POWER_KEY)).status_code == 200
        assert (await get(client, "/openai/models/unknown")).status_code == 404
        assert (await get(client, "/openai/models/special%5B1m%5D")).json()["id"] == "special[1m]"


class TestDeployments:
    async def test_listing(self, client: httpx.AsyncClient) -> None:
        body = (await get(client, "/openai/deployments")).json()
        item = next(i for i in body["data"] if i["id"] == "chat-model")
        assert item["object"] == "deployment"
        assert item["scale_settings"] == {"scale_type": "standard"}
        assert item["features"]["rate"] is True
        assert "power-model" not in ids(await get(client, "/openai/deployments"))
        assert "echo-app" not in ids(await get(client, "/openai/deployments"))  # models only

    async def test_single(self, client: httpx.AsyncClient) -> None:
        assert (await get(client, "/openai/deployments/chat-model")).json()["id"] == "chat-model"
        assert (await get(client, "/openai/deployments/power-model")).status_code == 403
        # A call path used with GET is a lookup of an id with that suffix (spec proxy 3).
        assert (
            await get(client, "/openai/deployments/chat-model/chat/completions")
        ).status_code == 404


class TestApplications:
    async def test_listing_and_item(self, client: httpx.AsyncClient) -> None:
        assert ids(await get(client, "/openai/applications")) == {"echo-app"}
        assert ids(await get(client, "/openai/applications", POWER_KEY)) == {
            "echo-app",
            "power-app",
        }
        item = (await get(client, "/openai/applications/echo-app")).json()
        assert item["application"] == "echo-app" and item["object"] == "application"
        assert item["description"] == "repeats things"
        assert item["features"]["system_prompt"] is False and item["features"]["rate"] is True
        assert item["defaults"] == {"custom_fields": {"configuration": {"x": 1}}}

    async def test_single_resolves_like_a_call(self, client: httpx.AsyncClient) -> None:
        assert error_of(await get(client, "/openai/applications/chat-model")) == (
            404,
            "Application is not found: chat-model",
        )
        assert error_of(await get(client, "/openai/applications/missing")) == (
            404,
            "Unknown application: missing",
        )
        assert error_of(await get(client, "/openai/applications/power-app")) == (
            403,
            "Forbidden deployment: power-app",
        )


class TestAssistantsAndAddons:
    async def test_assistants(self, client: httpx.AsyncClient) -> None:
        assert ids(await get(client, "/openai/assistants")) == {"helper-assistant"}
        assert ids(await get(client, "/openai/assistants", POWER_KEY)) == {
            "helper-assistant",
            "power-assistant",
        }
        item = (await get(client, "/openai/assistants/helper-assistant")).json()
        assert item["assistant"] == "helper-assistant" and item["object"] == "assistant"
        assert item["addons"] == ["search-addon"]
        assert item["features"]["rate"] is True  # inherited from assistant.features
        # The synthetic base assistant is callable but never listed.
        assert (await get(client, "/openai/assistants/assistant")).status_code == 404

    async def test_addons(self, client: httpx.AsyncClient) -> None:
        assert ids(await get(client, "/openai/addons")) == {"search-addon"}
        item = (await get(client, "/openai/addons/search-addon")).json()
        assert item["addon"] == "search-addon" and item["display_name"] == "Search"
        assert "endpoint" not in item
        assert (await get(client, "/openai/addons/power-addon")).status_code == 403


class TestV1:
    async def test_all_deployments(self, client: httpx.AsyncClient) -> None:
        items = (await get(client, "/v1/deployments")).json()
        assert isinstance(items, list)
        names = {item["id"] for item in items}
        assert {"chat-model", "echo-app"} <= names
        assert not {"power-model", "power-app", "nobody-model"} & names

    async def test_one_deployment(self, client: httpx.AsyncClient) -> None:
        assert (await get(client, "/v1/deployments/echo-app")).json()["object"] == "application"
        assert (await get(client, "/v1/deployments/chat-model")).json()["object"] == "model"
        assert (await get(client, "/v1/deployments/power-model")).status_code == 403
        assert (await get(client, "/v1/deployments/missing")).status_code == 404

    @pytest.mark.parametrize(
        ("key", "expected"),
        [
            (DEFAULT_KEY, {"roles": ["default"], "project": "proj-a"}),
            (POWER_KEY, {"roles": ["power-user", "default"], "project": "proj-b"}),
        ],
    )
    async def test_user_info(
        self, client: httpx.AsyncClient, key: str, expected: dict[str, object]
    ) -> None:
        response = await get(client, "/v1/user/info", key)
        assert response.json() == expected
        assert list(response.json()) == ["roles", "project"]
