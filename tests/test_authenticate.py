"""Authentication end to end: DIAL's header decision table, IP ranges, hashed keys (spec 3)."""

from __future__ import annotations

import httpx
import pytest

from gateway_config import (
    DEFAULT_KEY,
    HASHED_SECRET,
    IP_KEY,
    LOCAL_IP_KEY,
    NO_IP_KEY,
    POWER_KEY,
    chat,
    error_of,
    key_headers,
)
from inprocess import InProcessFake

pytestmark = pytest.mark.inprocess


@pytest.fixture
def client(aclient: httpx.AsyncClient) -> httpx.AsyncClient:
    """The in-process gateway on the shared test config (tests/inprocess.py)."""
    return aclient


@pytest.fixture
def fake(afake: InProcessFake) -> InProcessFake:
    """The in-process fake model, its records and faults cleared."""
    return afake


INFO = "/v1/user/info"


async def test_no_credentials_is_401(client: httpx.AsyncClient) -> None:
    assert error_of(await client.get(INFO)) == (
        401,
        "At least API-KEY or Authorization header must be provided",
    )


async def test_unknown_key_is_401(client: httpx.AsyncClient) -> None:
    assert error_of(await client.get(INFO, headers={"Api-Key": "nope"})) == (401, "Unknown api key")


@pytest.mark.parametrize("header", ["Api-Key", "api-key", "API-KEY", "aPi-KeY"])
async def test_api_key_header_in_any_case(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get(INFO, headers={header: DEFAULT_KEY})
    assert response.status_code == 200
    assert response.json() == {"roles": ["default"], "project": "proj-a"}


async def test_key_is_case_sensitive(client: httpx.AsyncClient) -> None:
    assert (await client.get(INFO, headers={"Api-Key": DEFAULT_KEY.upper()})).status_code == 401


async def test_bearer_token_alone_is_an_api_key(client: httpx.AsyncClient) -> None:
    response = await client.get(INFO, headers={"Authorization": f"Bearer {POWER_KEY}"})
    assert response.status_code == 200
    assert response.json() == {"roles": ["power-user", "default"], "project": "proj-b"}


@pytest.mark.parametrize("value", [f"Basic {DEFAULT_KEY}", DEFAULT_KEY, "Bearer"])
async def test_authorization_without_bearer_token_is_401(
    client: httpx.AsyncClient, value: str
) -> None:
    assert error_of(await client.get(INFO, headers={"Authorization": value})) == (
        401,
        "Bad Authorization header",
    )


async def test_bearer_with_unknown_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get(INFO, headers={"Authorization": "Bearer unknown"})
    assert error_of(response) == (401, "Unknown api key")


async def test_both_headers_with_the_same_key_as_the_openai_sdk_sends(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Api-Key": DEFAULT_KEY, "Authorization": f"Bearer {DEFAULT_KEY}"}
    assert (await client.get(INFO, headers=headers)).json()["project"] == "proj-a"


async def test_api_key_with_bare_bearer_uses_the_api_key(client: httpx.AsyncClient) -> None:
    headers = {"Api-Key": DEFAULT_KEY, "Authorization": "Bearer"}
    assert (await client.get(INFO, headers=headers)).status_code == 200


async def test_project_key_with_a_different_authorization_is_400(client: httpx.AsyncClient) -> None:
    headers = {"Api-Key": DEFAULT_KEY, "Authorization": "Bearer some-user-token"}
    assert error_of(await client.get(INFO, headers=headers)) == (
        400,
        "Provided API key is not per request key",
    )


async def test_unknown_key_with_a_different_authorization_is_401(client: httpx.AsyncClient) -> None:
    headers = {"Api-Key": "unknown", "Authorization": "Bearer some-user-token"}
    assert error_of(await client.get(INFO, headers=headers)) == (401, "Unknown api key")


async def test_x_api_key_when_no_dial_header(client: httpx.AsyncClient) -> None:
    assert (await client.get(INFO, headers={"x-api-key": POWER_KEY})).json()["project"] == "proj-b"
    # Api-Key wins over x-api-key.
    both = {"x-api-key": POWER_KEY, "Api-Key": DEFAULT_KEY}
    assert (await client.get(INFO, headers=both)).json()["project"] == "proj-a"


async def test_sha256_named_key(client: httpx.AsyncClient) -> None:
    response = await client.get(INFO, headers={"Api-Key": HASHED_SECRET})
    assert response.json() == {"roles": ["default"], "project": "proj-hashed"}
    # The name itself is not a credential.
    import hashlib

    name = "sha256:" + hashlib.sha256(HASHED_SECRET.encode()).hexdigest()
    assert (await client.get(INFO, headers={"Api-Key": name})).status_code == 401


class TestIpRanges:
    """The session gateway runs with apiKeyValidation.proxyCount = 1."""

    async def test_peer_outside_the_range_is_403(self, client: httpx.AsyncClient) -> None:
        assert error_of(await client.get(INFO, headers={"Api-Key": IP_KEY})) == (
            403,
            "Access is forbidden from IP address: 127.0.0.1",
        )

    async def test_address_from_the_trusted_proxy(self, client: httpx.AsyncClient) -> None:
        headers = {"Api-Key": IP_KEY, "X-Forwarded-For": "10.1.2.3"}
        assert (await client.get(INFO, headers=headers)).status_code == 200

    async def test_a_forged_first_element_does_not_help(self, client: httpx.AsyncClient) -> None:
        headers = {"Api-Key": IP_KEY, "X-Forwarded-For": "10.1.2.3, 192.168.7.7"}
        assert error_of(await client.get(INFO, headers=headers)) == (
            403,
            "Access is forbidden from IP address: 192.168.7.7",
        )

    async def test_loopback_range(self, client: httpx.AsyncClient) -> None:
        assert (await client.get(INFO, headers={"Api-Key": LOCAL_IP_KEY})).status_code == 200

    async def test_empty_list_admits_nobody(self, client: httpx.AsyncClient) -> None:
        headers = {"Api-Key": NO_IP_KEY, "X-Forwarded-For": "127.0.0.1"}
        assert (await client.get(INFO, headers=headers)).status_code == 403

    async def test_applies_to_calls_too(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/openai/deployments/chat-model/chat/completions",
            headers=key_headers(IP_KEY),
            json=chat(),
        )
        assert response.status_code == 403


class TestPerRequestKeys:
    """A per-request key acts as the root caller while its hop is alive (spec auth-limits 3.5)."""

    async def test_lives_exactly_as_long_as_its_hop(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        headers = key_headers(POWER_KEY) | {
            "X-Fake-Chunks": "6",
            "X-Fake-Chunk-Delay-Ms": "150",
        }
        async with client.stream(
            "POST",
            "/openai/deployments/chat-model/chat/completions",
            headers=headers,
            json=chat(stream=True),
        ) as stream:
            chunks = stream.aiter_raw()
            await anext(chunks)  # the upstream has started answering: the hop lives until the end
            hop_key = str(dict(fake.last()["headers"])["Api-Key"])
            assert hop_key not in (POWER_KEY, DEFAULT_KEY) and len(hop_key) == 32

            # The root caller's identity, roles and access.
            info = await client.get(INFO, headers={"Api-Key": hop_key})
            assert info.json() == {"roles": ["power-user", "default"], "project": "proj-b"}
            call = await client.post(
                "/openai/deployments/power-model/chat/completions",
                headers=key_headers(hop_key),
                json=chat(),
            )
            assert call.status_code == 200
            # ...with an Authorization header of its own (an interceptor passing a user token).
            both = {"Api-Key": hop_key, "Authorization": "Bearer user-token"}
            assert (await client.get(INFO, headers=both)).status_code == 200
            # A deployment closed to per-request keys refuses it.
            refused = await client.post(
                "/openai/deployments/no-prk-model/chat/completions",
                headers=key_headers(hop_key),
                json=chat(),
            )
            assert error_of(refused) == (
                403,
                "Deployment no-prk-model is not accessible by chat-model",
            )
            assert b"[DONE]" in b"".join([chunk async for chunk in chunks])
        after = await client.get(INFO, headers={"Api-Key": hop_key})
        assert error_of(after) == (401, "Unknown api key")

    async def test_each_hop_gets_a_fresh_key(
        self, client: httpx.AsyncClient, fake: InProcessFake
    ) -> None:
        for _ in range(2):
            await client.post(
                "/openai/deployments/chat-model/chat/completions",
                headers=key_headers(),
                json=chat(),
            )
        keys = [dict(r["headers"])["Api-Key"] for r in fake.requests()]
        assert len(keys) == 2 and keys[0] != keys[1]
        for key in keys:  # both hops ended: both keys are dead
            assert (await client.get(INFO, headers={"Api-Key": key})).status_code == 401
