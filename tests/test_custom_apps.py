"""Custom applications callable as deployments (spec resources 6.4; compatibility C92): a
definition stored with `PUT /v1/applications/{bucket}/{path}` is called as
`applications/<bucket>/<path>` by whoever may read it, with a per-request key of its own, and
shown in the applications' listings.

Upstreams: the in-process fake model, and `apps/resource_app.py` (an application that uses
Tollgate with the key it was given).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from apps.resource_app import ResourceApp, start_resource_app
from inprocess import Gateways, InProcessFake, InProcessGateway
from tollgate.resources.encryption import BucketCipher

PROJECT_KEY = "custom-apps-project-key-0123456789"
OTHER_KEY = "custom-apps-other-key-0123456789"
ADMIN_KEY = "custom-apps-admin-key-0123456789"
LIMITED_KEY = "custom-apps-limited-key-0123456789"
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ (DIAL's vector)
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
ME = {"Api-Key": PROJECT_KEY}
OTHER = {"Api-Key": OTHER_KEY}
ADMIN = {"Api-Key": ADMIN_KEY}
APP_ID = f"applications/{MINE}/folder/my-app"
PER_REQUEST_KEY = re.compile(r"[0-9a-zA-Z_-]{32}")
API_VERSION = "2024-02-01"


def config(fake: InProcessFake) -> dict[str, Any]:
    return {
        "models": {"chat-model": {"type": "chat", "endpoint": fake.endpoint("chat-model")}},
        "applications": {"config-app": {"endpoint": fake.endpoint("config-app")}},
        "keys": {
            PROJECT_KEY: {"project": "EPM-RTC-GPT", "role": "basic"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "basic"]},
            LIMITED_KEY: {"project": "limited", "role": "limited"},
        },
        "roles": {
            "basic": {"limits": {}},
            "admin": {},
            "limited": {"limits": {"chat-model": {"day": "3"}}},
        },
    }


async def start(
    gateways: Gateways, folder: Path, fake: InProcessFake, **applications: Any
) -> InProcessGateway:
    settings: dict[str, Any] = {
        "encryption": {"secret": "password", "key": "salt"},
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
    }
    if applications:
        settings["applications"] = applications
    return await gateways.start([config(fake)], settings=settings)


@pytest.fixture
async def gw(gateways: Gateways, tmp_path: Path, afake: InProcessFake) -> InProcessGateway:
    return await start(gateways, tmp_path / "s", afake)


@pytest.fixture
async def client(gw: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        yield http


@pytest.fixture
async def resource_app(gw: InProcessGateway) -> AsyncIterator[ResourceApp]:
    app = await start_resource_app(gw.url)
    yield app
    await app.stop()


async def put_app(
    client: httpx.AsyncClient, url: str, definition: dict[str, Any], headers: dict[str, str] = ME
) -> None:
    answer = await client.put(f"/v1/{url}", headers=headers, content=orjson.dumps(definition))
    assert answer.status_code == 200, answer.text


async def call(
    client: httpx.AsyncClient,
    deployment: str,
    headers: dict[str, str] = ME,
    **body: Any,
) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": "hello there"}], **body}
    return await client.post(
        f"/openai/deployments/{deployment}/chat/completions", headers=headers, json=payload
    )


def actions(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"custom_fields": {"configuration": {"actions": list(steps)}}}


def results(answer: httpx.Response) -> list[Any]:
    assert answer.status_code == 200, answer.text
    content: list[Any] = json.loads(answer.json()["choices"][0]["message"]["content"])
    return content


def error(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["message"]


# --- calls ------------------------------------------------------------------------------------


async def test_owner_calls_its_app_with_the_openai_sdk(
    gw: InProcessGateway, client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    await put_app(
        client,
        APP_ID,
        {
            "endpoint": afake.endpoint("custom-app"),
            "displayName": "My app",
            "defaults": {"temperature": 0.25},
        },
    )
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=gw.url, api_key=PROJECT_KEY, api_version=API_VERSION, max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(
            model=APP_ID,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Fake-Reply": "one two three"},
        )
        assert completion.choices[0].message.content == "one two three"
        stream = await sdk.chat.completions.create(
            model=APP_ID,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Fake-Reply": "a b c"},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p for p in pieces if p) == "a b c"
    recorded = afake.requests()
    assert [r["path"] for r in recorded] == ["/openai/deployments/custom-app/chat/completions"] * 2
    first = recorded[0]
    sent = json.loads(first["body"])
    assert sent["temperature"] == 0.25  # the stored definition's `defaults`
    assert first["raw_path"].endswith("?api-version=2024-02-01")
    key = dict(first["headers"])["Api-Key"]
    assert PER_REQUEST_KEY.fullmatch(key) and key != PROJECT_KEY
    assert PROJECT_KEY not in json.dumps(recorded)


async def test_the_apps_key_acts_as_the_caller_through_the_app(
    gw: InProcessGateway, client: httpx.AsyncClient, resource_app: ResourceApp
) -> None:
    """The key the app gets names the app as its source: its own bucket is the app's, its
    app data is in the caller's bucket (spec resources 2.1)."""
    await put_app(client, APP_ID, {"endpoint": resource_app.endpoint()})
    answer = await call(client, APP_ID, **actions({"op": "bucket"}))
    [bucket] = results(answer)
    assert bucket["status"] == 200
    cipher = BucketCipher("password", "salt")
    assert json.loads(bucket["body"]) == {
        "bucket": cipher.encrypt(f"Keys/{APP_ID}/"),
        "appdata": f"{MINE}/appdata/{APP_ID}",
    }


async def test_another_project_is_refused(client: httpx.AsyncClient, afake: InProcessFake) -> None:
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("custom-app")})
    answer = await call(client, APP_ID, OTHER)
    assert error(answer) == (403, f"You don't have an access to: {APP_ID}")
    assert afake.requests() == []
    listed = await client.get(f"/openai/applications/{APP_ID}", headers=OTHER)
    assert error(listed) == (403, f"You don't have an access to: {APP_ID}")


async def test_a_public_app_is_callable_by_anyone(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    url = "applications/public/shared/team-app"
    await put_app(client, url, {"endpoint": afake.endpoint("team-app")}, ADMIN)
    for headers in (ME, OTHER, ADMIN):
        answer = await call(client, url, headers)
        assert answer.status_code == 200, answer.text
    refused = await client.put(
        f"/v1/{url}", headers=OTHER, content=orjson.dumps({"endpoint": afake.endpoint("evil")})
    )
    assert refused.status_code == 403
    assert len(afake.requests()) == 3


async def test_a_shared_app_is_callable_by_the_recipient(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("custom-app")})
    assert error(await call(client, APP_ID, OTHER))[0] == 403
    shared = await client.post(
        "/v1/ops/resource/share/create", headers=ME, json={"resources": [{"url": APP_ID}]}
    )
    assert shared.status_code == 200, shared.text
    accepted = await client.get(f"{shared.json()['invitationLink']}?accept=true", headers=OTHER)
    assert accepted.status_code == 200, accepted.text
    assert (await call(client, APP_ID, OTHER)).status_code == 200
    revoked = await client.post(
        "/v1/ops/resource/share/revoke", headers=ME, json={"resources": [{"url": APP_ID}]}
    )
    assert revoked.status_code == 200, revoked.text
    assert error(await call(client, APP_ID, OTHER))[0] == 403


async def test_missing_and_invalid_ids(client: httpx.AsyncClient, afake: InProcessFake) -> None:
    missing = f"applications/{MINE}/missing"
    assert error(await call(client, missing)) == (404, f"Application is not found: {missing}")
    # Someone else's bucket: refused before anything is read, so nothing is told about it.
    theirs = f"applications/{THEIRS}/missing"
    assert error(await call(client, theirs)) == (403, f"You don't have an access to: {theirs}")
    folder = f"applications/{MINE}/folder/"
    assert error(await call(client, folder)) == (404, f"Invalid application url: {folder}")
    bucketless = "applications/notabucket/x"
    assert error(await call(client, bucketless)) == (404, f"Unknown application: {bucketless}")
    assert error(await call(client, "no-such-model")) == (
        404,
        "Unknown application: no-such-model",
    )
    assert afake.requests() == []


async def test_changed_and_deleted_apps_take_effect_at_once(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("first")})
    assert (await call(client, APP_ID)).status_code == 200
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("second")})
    assert (await call(client, APP_ID)).status_code == 200
    assert [r["path"] for r in afake.requests()] == [
        "/openai/deployments/first/chat/completions",
        "/openai/deployments/second/chat/completions",
    ]
    deleted = await client.delete(f"/v1/{APP_ID}", headers=ME)
    assert deleted.status_code == 200, deleted.text
    assert error(await call(client, APP_ID)) == (404, f"Application is not found: {APP_ID}")
    assert len(afake.requests()) == 2


async def test_dials_overrides_hold_whatever_is_stored(
    gw: InProcessGateway, client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    """`userRoles` and `forwardAuthToken` of a stored object are ignored, even when it was
    written straight into the store (by DIAL, or before Tollgate checked it); attempts are
    capped at five."""
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("custom-app")})
    cipher = await gw.gateway.resources_api.cipher()
    key = f"{cipher.decrypt(MINE)}applications/folder/my-app"
    store = gw.gateway.resource_store
    stored = orjson.loads((await store.get(key)).data)  # type: ignore[union-attr]
    stored |= {"userRoles": [], "forwardAuthToken": True, "maxRetryAttempts": 1000}
    await store.put(key, orjson.dumps(stored))
    answer = await call(client, APP_ID)  # `userRoles: []` would admit nobody
    assert answer.status_code == 200, answer.text
    afake.clear()
    afake.add_fault({"status": 502})  # retriable, but at most five attempts
    assert (await call(client, APP_ID)).status_code == 502
    assert len(afake.requests()) <= 5


async def test_a_stored_object_that_is_no_definition(
    gw: InProcessGateway, client: httpx.AsyncClient
) -> None:
    cipher = await gw.gateway.resources_api.cipher()
    key = f"{cipher.decrypt(MINE)}applications/broken"
    await gw.gateway.resource_store.put(key, b'{"endpoint": "ftp://nowhere"}')
    url = f"applications/{MINE}/broken"
    assert error(await call(client, url)) == (404, f"Application is not found: {url}")


async def test_usage_of_the_apps_callbacks_is_the_callers(
    client: httpx.AsyncClient, resource_app: ResourceApp, afake: InProcessFake
) -> None:
    """The app calls a model with its key: the tokens count for the caller, within the
    caller's limits (compatibility C14, C39)."""
    await put_app(client, APP_ID, {"endpoint": resource_app.endpoint()})
    shared = await client.post(
        "/v1/ops/resource/share/create", headers=ME, json={"resources": [{"url": APP_ID}]}
    )
    link = shared.json()["invitationLink"]
    limited = {"Api-Key": LIMITED_KEY}
    assert (await client.get(f"{link}?accept=true", headers=limited)).status_code == 200
    callback = actions({"op": "call", "deployment": "chat-model"})
    [first] = results(await call(client, APP_ID, limited, **callback))
    assert first["status"] == 200, first
    tokens = json.loads(first["body"])["usage"]["total_tokens"]
    assert tokens >= 3
    stats = (await client.get("/v1/deployments/chat-model/limits", headers=limited)).json()
    assert stats["dayTokenStats"] == {
        "total": 3,
        "used": tokens,
        "resetsAt": stats["dayTokenStats"]["resetsAt"],
    }
    # The app's owner used nothing; the next callback of the limited caller is refused.
    mine = (await client.get("/v1/deployments/chat-model/limits", headers=ME)).json()
    assert mine["dayTokenStats"]["used"] == 0
    [second] = results(await call(client, APP_ID, limited, **callback))
    assert second["status"] == 429
    assert afake.requests()[-1]["path"] == "/openai/deployments/chat-model/chat/completions"
    assert len(afake.requests()) == 1


# --- listings ---------------------------------------------------------------------------------


async def test_the_single_item_is_dials_application_data(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    await put_app(
        client,
        APP_ID,
        {
            "endpoint": afake.endpoint("custom-app"),
            "display_name": "My app",
            "reference": "ref-1",
            "features": {"rateEndpoint": afake.endpoint("custom-app", "rate")},
        },
    )
    answer = await client.get(f"/openai/applications/{APP_ID}", headers=ME)
    assert answer.status_code == 200, answer.text
    item = answer.json()
    assert item["id"] == item["application"] == APP_ID
    assert (item["display_name"], item["reference"], item["object"]) == (
        "My app",
        "ref-1",
        "application",
    )
    assert item["features"]["rate"] is True
    missing = f"applications/{MINE}/missing"
    assert error(await client.get(f"/openai/applications/{missing}", headers=ME)) == (
        404,
        f"Application is not found: {missing}",
    )
    config_app = await client.get("/openai/applications/config-app", headers=ME)
    assert config_app.json()["id"] == "config-app"


async def listed_ids(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    answer = await client.get("/openai/applications", headers=headers)
    assert answer.status_code == 200, answer.text
    return [item["id"] for item in answer.json()["data"]]


async def test_listing_leaves_custom_apps_out_by_default(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    await put_app(client, APP_ID, {"endpoint": afake.endpoint("custom-app")})
    assert await listed_ids(client, ME) == ["config-app"]


async def test_listing_with_include_custom_apps(
    gateways: Gateways, tmp_path: Path, afake: InProcessFake
) -> None:
    gw = await start(gateways, tmp_path / "s", afake, includeCustomApps=True)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
        endpoint = afake.endpoint("custom-app")
        await put_app(client, APP_ID, {"endpoint": endpoint, "display_name": "Mine"})
        await put_app(client, f"applications/{MINE}/second", {"endpoint": endpoint})
        theirs = f"applications/{THEIRS}/theirs"
        await put_app(client, theirs, {"endpoint": endpoint}, OTHER)
        public = "applications/public/everyone"
        await put_app(client, public, {"endpoint": endpoint}, ADMIN)
        mine = [APP_ID, f"applications/{MINE}/second"]
        assert await listed_ids(client, ME) == ["config-app", *mine, public]
        assert await listed_ids(client, OTHER) == ["config-app", theirs, public]
        # Shared (a folder: what is below it) with the other project.
        shared = await client.post(
            "/v1/ops/resource/share/create",
            headers=ME,
            json={"resources": [{"url": f"applications/{MINE}/folder/"}]},
        )
        link = shared.json()["invitationLink"]
        assert (await client.get(f"{link}?accept=true", headers=OTHER)).status_code == 200
        assert await listed_ids(client, OTHER) == ["config-app", theirs, APP_ID, public]
        body = (await client.get("/openai/applications", headers=OTHER)).json()
        item = next(i for i in body["data"] if i["id"] == APP_ID)
        assert item["display_name"] == "Mine"
        assert body["object"] == "list"
