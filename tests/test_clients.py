"""Real clients against a real Tollgate: the `openai` SDK and `aidial-client` (spec proxy 15)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from aidial_client import AsyncDial, Dial

from gateway_config import DEFAULT_KEY, POWER_KEY
from harness import FakeModel, Gateway

API_VERSION = "2024-02-01"


@pytest.fixture
def azure(gateway: Gateway) -> Iterator[openai.AzureOpenAI]:
    client = openai.AzureOpenAI(
        api_key=DEFAULT_KEY, api_version=API_VERSION, azure_endpoint=gateway.url, max_retries=0
    )
    yield client
    client.close()


@pytest.fixture
def dial(gateway: Gateway) -> Iterator[Dial]:
    client = Dial(api_key=DEFAULT_KEY, base_url=gateway.url, api_version=API_VERSION)
    yield client
    client.close()


class TestOpenAiSdk:
    def test_chat(self, azure: openai.AzureOpenAI, fake: FakeModel) -> None:
        completion = azure.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "one two"}]
        )
        assert completion.choices[0].message.content == "Hello from the fake model."
        assert completion.usage is not None and completion.usage.total_tokens == 7
        recorded = fake.last()
        assert recorded["path"] == "/openai/deployments/chat-model/chat/completions"
        assert recorded["query_string"] == f"api-version={API_VERSION}"

    def test_streamed_chat(self, azure: openai.AzureOpenAI) -> None:
        stream = azure.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Fake-Reply": "alpha beta gamma"},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "alpha beta gamma"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

    def test_embeddings(self, azure: openai.AzureOpenAI) -> None:
        result = azure.embeddings.create(model="embedding-model", input=["a b", "c"])
        assert [item.index for item in result.data] == [0, 1]
        assert result.usage.prompt_tokens == 3

    def test_errors_surface_as_sdk_exceptions(self, gateway: Gateway) -> None:
        client = openai.AzureOpenAI(
            api_key="wrong", api_version=API_VERSION, azure_endpoint=gateway.url, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="chat-model", messages=[])
        assert "Unknown api key" in str(caught.value)
        with pytest.raises(openai.PermissionDeniedError):
            openai.AzureOpenAI(
                api_key=DEFAULT_KEY,
                api_version=API_VERSION,
                azure_endpoint=gateway.url,
                max_retries=0,
            ).chat.completions.create(model="power-model", messages=[])

    def test_plain_openai_client_with_bearer_key(self, gateway: Gateway) -> None:
        client = openai.OpenAI(
            api_key=POWER_KEY,
            base_url=f"{gateway.url}/openai/deployments/power-model",
            max_retries=0,
        )
        completion = client.chat.completions.create(
            model="power-model", messages=[{"role": "user", "content": "x"}]
        )
        assert completion.choices[0].message.content


class TestAidialClient:
    def test_chat(self, dial: Dial) -> None:
        response = dial.chat.completions.create(
            deployment_name="chat-model", messages=[{"role": "user", "content": "hi there"}]
        )
        assert response.choices[0].message.content == "Hello from the fake model."
        assert response.usage is not None and response.usage.prompt_tokens == 2

    def test_streamed_chat(self, dial: Dial) -> None:
        chunks = list(
            dial.chat.completions.create(
                deployment_name="chat-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_headers={"X-Fake-Reply": "one two three four"},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "one two three four"

    def test_embeddings_through_its_openai_client(self, dial: Dial) -> None:
        # aidial-client has no embeddings API of its own; it carries a configured AzureOpenAI
        # and passes its auth headers per call, as its chat API does.
        result = dial.chat.completions.openai_client.embeddings.create(
            model="embedding-model",
            input="some words here",
            extra_query={"api-version": API_VERSION},
            extra_headers={
                "Authorization": openai.Omit(),
                "api-key": openai.Omit(),
                **dial.auth_headers(),
            },
        )
        assert len(result.data) == 1 and result.usage.total_tokens == 3

    def test_listings_and_identity(self, dial: Dial) -> None:
        names = {deployment.id for deployment in dial.deployments.list()}
        assert "chat-model" in names and "power-model" not in names
        model = dial.model.get("chat-model")
        assert model.id == "chat-model"
        applications = {application.id for application in dial.application.list()}
        assert applications == {"echo-app"}
        info = dial.user.info()
        assert info.project == "proj-a" and info.roles == ["default"]

    async def test_async_streamed_chat(self, gateway: Gateway) -> None:
        client = AsyncDial(api_key=DEFAULT_KEY, base_url=gateway.url, api_version=API_VERSION)
        try:
            stream = await client.chat.completions.create(
                deployment_name="chat-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
            pieces = [c.choices[0].delta.content async for c in stream if c.choices]
            assert "".join(p or "" for p in pieces) == "Hello from the fake model."
        finally:
            await client.aclose()
