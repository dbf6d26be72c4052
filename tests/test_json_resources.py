"""DIAL's JSON resources on the resource store (issue 14; compatibility C86): conversations,
prompts and custom applications — PUT/GET/DELETE and metadata listings, with the Files API's
access rules and conditions, DIAL's statuses, messages and shapes; hostile paths never leave
the bucket; `resources.maxSize` bounds a body exactly.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aidial_client import AsyncDial
from aidial_client.types.prompt import Prompt

from gateway_config import error_of
from inprocess import Gateways, InProcessGateway

PROJECT_KEY = "json-resources-project-key-0123456789"
OTHER_KEY = "json-resources-other-key-0123456789"
ADMIN_KEY = "json-resources-admin-key-0123456789"
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ (DIAL's vector)
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
ME = {"Api-Key": PROJECT_KEY}
OTHER = {"Api-Key": OTHER_KEY}
ADMIN = {"Api-Key": ADMIN_KEY}
TYPES = {"conversations": "CONVERSATION", "prompts": "PROMPT", "applications": "APPLICATION"}
APP = {"endpoint": "http://application1/v1/completions", "display_name": "My app"}
BAD_QUERY = "Bad query parameters. Limit must be in [0, 1000] range. Recursive must be true/false"


def config() -> dict[str, Any]:
    return {
        "models": {},
        "keys": {
            PROJECT_KEY: {"project": "EPM-RTC-GPT", "role": "basic"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "basic"]},
        },
        "roles": {"basic": {"limits": {}}, "admin": {}},
    }


async def start(gateways: Gateways, folder: Path, **resources: Any) -> InProcessGateway:
    settings: dict[str, Any] = {
        "encryption": {"secret": "password", "key": "salt"},
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
    }
    if resources:
        settings["resources"] = resources
    return await gateways.start([config()], settings=settings)


def body_for(group: str, **extra: Any) -> dict[str, Any]:
    if group == "applications":
        return {**APP, **extra}
    return {"id": "c1", "name": "conversation", "folderId": "f", **extra}


async def put(
    client: httpx.AsyncClient,
    gw: InProcessGateway,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    data = content if content is not None else orjson.dumps(body)
    return await client.put(f"{gw.url}/v1/{url}", headers={**ME, **(headers or {})}, content=data)


@pytest.fixture
async def gw(gateways: Gateways, tmp_path: Path) -> InProcessGateway:
    return await start(gateways, tmp_path / "s")


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", list(TYPES))
async def test_round_trip(gw: InProcessGateway, group: str) -> None:
    url = f"{group}/{MINE}/folder/item 1@"
    async with httpx.AsyncClient() as client:
        before = time.time() * 1000
        sent = orjson.dumps(body_for(group))
        answer = await put(client, gw, url, content=sent)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        body = answer.json()
        etag = answer.headers["ETag"]
        created, updated = body.pop("createdAt"), body.pop("updatedAt")
        assert before - 2000 <= created <= updated <= time.time() * 1000 + 2000
        assert body == {
            "name": "item 1@",
            "parentPath": "folder",
            "bucket": MINE,
            "url": f"{group}/{MINE}/folder/item%201@",
            "nodeType": "ITEM",
            "resourceType": TYPES[group],
            "etag": etag,
        }
        assert list(answer.json()) == [
            "name",
            "parentPath",
            "bucket",
            "url",
            "nodeType",
            "resourceType",
            "createdAt",
            "updatedAt",
            "etag",
        ]
        got = await client.get(f"{gw.url}/v1/{group}/{MINE}/folder/item%201%40", headers=ME)
        assert got.status_code == 200
        assert got.headers["content-type"] == "application/json"
        assert got.headers["etag"] == etag
        if group == "applications":
            stored = got.json()
            assert stored["name"] == f"applications/{MINE}/folder/item%201@"
            assert stored["endpoint"] == APP["endpoint"]
            assert stored["user_roles"] is None and stored["forward_auth_token"] is False
            assert stored["reference"]
        else:
            assert got.content == sent  # stored as sent
            assert etag == hashlib.md5(sent).hexdigest()
        meta = await client.get(f"{gw.url}/v1/metadata/{url}", headers=ME)
        assert meta.status_code == 200
        assert meta.json() == answer.json()

        # Overwrite: createdAt kept, a new ETag.
        again = await put(client, gw, url, body_for(group, name="renamed"))
        assert again.status_code == 200
        assert again.json()["createdAt"] == created
        assert again.json()["updatedAt"] >= updated
        assert again.headers["ETag"] != etag

        deleted = await client.delete(f"{gw.url}/v1/{url}", headers=ME)
        assert deleted.status_code == 200 and deleted.content == b""
        for method in ("GET", "DELETE"):
            missing = await client.request(method, f"{gw.url}/v1/{url}", headers=ME)
            assert error_of(missing) == (404, f"Not found: {group}/{MINE}/folder/item%201@")
        missing = await client.get(f"{gw.url}/v1/metadata/{url}", headers=ME)
        assert error_of(missing) == (404, f"Not found: {group}/{MINE}/folder/item%201@")


async def test_aidial_client_prompt_round_trip(gw: InProcessGateway) -> None:
    dial = AsyncDial(api_key=PROJECT_KEY, base_url=gw.url)
    url = f"prompts/{MINE}/client/hello"
    saved = await dial.prompts.save(url, Prompt(id="p1", name="hello", folder_id="f", content="x"))
    assert saved.url == url
    assert (await dial.prompts.get(url)).content == "x"
    # The client's prompt metadata is a folder's listing (its `get_metadata` drops a `/`).
    listing = await dial.metadata.get("prompts", f"prompts/{MINE}/client/")
    assert [item.url for item in listing.items or ()] == [url]
    assert listing.items is not None and listing.items[0].updated_at > 0
    await dial.prompts.delete(url)
    with pytest.raises(Exception, match="Not found"):
        await dial.prompts.get(url)


# --- refusals ---------------------------------------------------------------------------------


async def test_bodies_and_folders(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient() as client:
        url = f"conversations/{MINE}/c"
        status, message = error_of(await put(client, gw, url, content=b"{not json"))
        assert status == 400
        assert message.startswith("Provided payload do not match required schema: ")
        assert "not valid JSON" in message
        for content in (b"", b"[1]", b'"text"', b"\xff\xfe"):
            status, message = error_of(await put(client, gw, url, content=content))
            assert status == 400, content
        assert error_of(await put(client, gw, url, content=b"[]"))[1] == (
            "Provided payload do not match required schema: the body must be a JSON object"
        )
        for method in ("PUT", "GET", "DELETE"):
            answer = await client.request(
                method, f"{gw.url}/v1/conversations/{MINE}/folder/", headers=ME, content=b"{}"
            )
            assert error_of(answer) == (
                400,
                f"Folder not allowed: conversations/{MINE}/folder/",
            ), method
        answer = await put(client, gw, f"prompts/{MINE}/p.", {"id": 1})
        assert error_of(answer) == (
            400,
            "Resource name and/or parent folders must not end with .(dot)",
        )
        answer = await put(client, gw, "prompts/testbucket/p", {})
        assert error_of(answer) == (400, "Url has invalid bucket: prompts/testbucket/p")
        answer = await put(client, gw, f"conversations/{MINE}/" + "1" * 900, {})
        assert error_of(answer) == (400, "Resource path exceeds max allowed size: 900")
        for method in ("POST", "PATCH"):
            answer = await client.request(method, f"{gw.url}/v1/{url}", headers=ME)
            assert answer.status_code == 405
            assert answer.headers["Allow"] == "GET, PUT, DELETE"
        answer = await client.put(f"{gw.url}/v1/metadata/{url}", headers=ME, content=b"{}")
        assert answer.status_code == 405 and answer.headers["Allow"] == "GET"


async def test_applications_are_validated(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient() as client:
        url = f"applications/{MINE}/app"
        answer = await put(client, gw, url, {"display_name": "no endpoint"})
        assert error_of(answer) == (400, "Application endpoint or function must be provided")
        for endpoint in ("ftp://x/y", "/relative", "file:///etc/passwd", "x"):
            status, message = error_of(await put(client, gw, url, {"endpoint": endpoint}))
            assert status == 400
            assert f"endpoint must be an absolute http(s) URL: {endpoint}" in message
        status, message = error_of(
            await put(client, gw, url, {**APP, "max_input_attachments": "x"})
        )
        assert status == 400 and "max_input_attachments" in message
        status, _ = error_of(await put(client, gw, url, {"function": {"runtime": "python"}}))
        assert status == 400
        # DIAL's overrides: no roles, no forwarded token, the URL as the name.
        answer = await put(
            client,
            gw,
            url,
            {**APP, "forwardAuthToken": True, "userRoles": ["x"], "name": "evil", "reference": "r"},
        )
        assert answer.status_code == 200, answer.text
        stored = (await client.get(f"{gw.url}/v1/{url}", headers=ME)).json()
        assert stored["name"] == url
        assert stored["forward_auth_token"] is False and stored["user_roles"] is None
        assert "forwardAuthToken" not in stored and "userRoles" not in stored
        assert stored["reference"] == "r"
        # Callable as a deployment (compatibility C92, tests/test_custom_apps.py): its
        # endpoint, `http://application1`, is tried and cannot be reached.
        call = await client.post(
            f"{gw.url}/openai/deployments/{url}/chat/completions",
            headers=ME,
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert call.status_code == 502


async def test_size_limit(gateways: Gateways, tmp_path: Path) -> None:
    gw = await start(gateways, tmp_path / "s", maxSize=1024)
    assert gw.gateway.resources_api.max_body_bytes == 1024

    def of_size(size: int) -> bytes:
        head = b'{"x":"'
        return head + b"a" * (size - len(head) - 2) + b'"}'

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for index in range(0, len(data), 100):
            yield data[index : index + 100]

    async with httpx.AsyncClient() as client:
        url = f"{gw.url}/v1/conversations/{MINE}/big"
        exact = await client.put(url, headers=ME, content=of_size(1024))
        assert exact.status_code == 200, exact.text
        over = await client.put(url, headers=ME, content=of_size(1025))
        assert error_of(over) == (413, "Request body is too large")
        exact = await client.put(url, headers=ME, content=chunked(of_size(1024)))
        assert exact.status_code == 200, exact.text
        over = await client.put(url, headers=ME, content=chunked(of_size(1025)))
        assert error_of(over) == (413, "Request body is too large")
        got = await client.get(url, headers=ME)
        assert got.content == of_size(1024)


# --- conditions -------------------------------------------------------------------------------


async def test_conditions(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient() as client:
        url = f"prompts/{MINE}/p"
        full = f"{gw.url}/v1/{url}"
        answer = await put(client, gw, url, {"a": 1}, {"If-Match": "abc"})
        assert error_of(answer) == (412, "If-match condition is failed for etag: null")
        answer = await put(client, gw, url, {"a": 1}, {"If-None-Match": "*"})
        assert answer.status_code == 200
        etag = answer.headers["ETag"]
        answer = await put(client, gw, url, {"a": 2}, {"If-None-Match": "*"})
        assert error_of(answer) == (412, "Resource already exists")
        answer = await put(client, gw, url, {"a": 2}, {"If-None-Match": f'"{etag}"'})
        assert error_of(answer) == (412, f"if-none-match condition is failed for etag: {etag}")
        answer = await put(client, gw, url, {"a": 2}, {"If-Match": "other"})
        assert error_of(answer) == (412, f"If-match condition is failed for etag: {etag}")
        answer = await put(client, gw, url, {"a": 2}, {"If-Match": f'"{etag}"'})
        assert answer.status_code == 200
        etag = answer.headers["ETag"]
        # GET: 304 for a matching If-None-Match, 412 for a failing If-Match.
        got = await client.get(full, headers={**ME, "If-None-Match": etag})
        assert got.status_code == 304 and got.headers["ETag"] == etag
        got = await client.get(full, headers={**ME, "If-None-Match": "*"})
        assert got.status_code == 304
        got = await client.get(full, headers={**ME, "If-None-Match": "other"})
        assert got.status_code == 200
        got = await client.get(full, headers={**ME, "If-Match": "other"})
        assert error_of(got) == (412, f"If-match condition is failed for etag: {etag}")
        got = await client.get(f"{full}-missing", headers={**ME, "If-Match": "x"})
        assert error_of(got) == (412, "If-match condition is failed for etag: null")
        # DELETE
        gone = await client.delete(full, headers={**ME, "If-Match": "other"})
        assert error_of(gone) == (412, f"If-match condition is failed for etag: {etag}")
        gone = await client.delete(full, headers={**ME, "If-None-Match": "*"})
        assert error_of(gone) == (412, "Resource already exists")
        gone = await client.delete(full, headers={**ME, "If-Match": etag})
        assert gone.status_code == 200
        gone = await client.delete(full, headers={**ME, "If-None-Match": "*"})
        assert error_of(gone) == (404, f"Not found: {url}")


# --- access -----------------------------------------------------------------------------------


async def test_access(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient() as client:
        mine = f"conversations/{MINE}/c"
        assert (await put(client, gw, mine, {"a": 1})).status_code == 200
        theirs = f"{gw.url}/v1/{mine}"
        for method in ("GET", "PUT", "DELETE"):
            answer = await client.request(method, theirs, headers=OTHER, content=b"{}")
            assert error_of(answer) == (403, f"You don't have an access to: {mine}"), method
        answer = await client.get(f"{gw.url}/v1/metadata/conversations/{MINE}/", headers=OTHER)
        assert error_of(answer) == (403, f"You don't have an access to: conversations/{MINE}/")
        answer = await put(client, gw, f"prompts/{THEIRS}/p", {"a": 1})
        assert error_of(answer) == (403, f"You don't have an access to: prompts/{THEIRS}/p")
        # public: read for all, write for administrators.
        public = "prompts/public/shared"
        answer = await put(client, gw, public, {"a": 1})
        assert error_of(answer) == (403, f"You don't have an access to: {public}")
        answer = await put(client, gw, public, {"a": 1}, ADMIN)
        assert answer.status_code == 200, answer.text
        assert answer.json()["bucket"] == "public"
        for key in (ME, OTHER):
            got = await client.get(f"{gw.url}/v1/{public}", headers=key)
            assert got.json() == {"a": 1}
            deleted = await client.delete(f"{gw.url}/v1/{public}", headers=key)
            assert deleted.status_code == 403
        listing = await client.get(
            f"{gw.url}/v1/metadata/prompts/public/?permissions=true", headers=OTHER
        )
        assert listing.json()["permissions"] == ["READ"]
        # Administrators read and write every bucket.
        got = await client.get(theirs, headers=ADMIN)
        assert got.json() == {"a": 1}
        answer = await client.delete(theirs, headers=ADMIN)
        assert answer.status_code == 200


async def test_hostile_paths_never_leave_the_bucket(gw: InProcessGateway, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        for path in (
            "..",
            "%2e%2e/x",
            "a/../../x",
            "a/%2E%2e/b",
            "a%2Fb",
            "a%5C..%5Cb",
            "a//b",
            "%00x",
            "{x}",
            "a%C0%AEb",
            ".tollgate-x",
        ):
            target = f"/v1/conversations/{MINE}/{path}".encode()
            for method in ("PUT", "GET", "DELETE"):
                # Sent as is: httpx would resolve `..` itself.
                request = httpx.Request(
                    method,
                    f"{gw.url}/v1/x",
                    headers=ME,
                    content=b"{}",
                    extensions={"target": target},
                )
                answer = await client.send(request)
                status, message = error_of(answer)
                assert status == 400, (path, method, message)
                assert message.startswith("Invalid path provided"), (path, message)
        written = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
        for path in written:
            relative = path.relative_to(tmp_path / "s").as_posix()
            assert "conversations" not in relative or "Keys/EPM-RTC-GPT/" in relative


# --- metadata ---------------------------------------------------------------------------------


async def test_listing_shape_and_paging(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient() as client:
        for name in ("folder/a", "folder/b", "folder/sub/c", "top"):
            assert (await put(client, gw, f"conversations/{MINE}/{name}", {})).status_code == 200
        base = f"{gw.url}/v1/metadata/conversations/{MINE}"
        root = await client.get(f"{base}/?permissions=true", headers=ME)
        assert root.status_code == 200
        body = root.json()
        assert body["name"] is None and body["parentPath"] is None
        assert body["nodeType"] == "FOLDER" and body["resourceType"] == "CONVERSATION"
        assert body["permissions"] == ["READ", "WRITE"]
        assert [item["url"] for item in body["items"]] == [
            f"conversations/{MINE}/folder/",
            f"conversations/{MINE}/top",
        ]
        assert body["items"][0]["items"] is None
        assert "nextToken" not in body
        folder = (await client.get(f"{base}/folder/", headers=ME)).json()
        assert folder["name"] == "folder" and folder["url"] == f"conversations/{MINE}/folder/"
        items = {item["name"]: item for item in folder["items"]}
        assert set(items) == {"a", "b", "sub"}
        item = items["a"]
        assert item["nodeType"] == "ITEM" and item["parentPath"] == "folder"
        assert "etag" not in item and "contentLength" not in item and "contentType" not in item
        assert isinstance(item["updatedAt"], int)
        assert items["sub"]["nodeType"] == "FOLDER"
        recursive = (await client.get(f"{base}/folder/?recursive=TRUE", headers=ME)).json()
        assert [i["name"] for i in recursive["items"]] == ["a", "b", "c"]
        # Paging: one at a time, tokens opaque.
        seen: list[str] = []
        token: str | None = None
        while True:
            params = {"limit": "1", "recursive": "true", **({"token": token} if token else {})}
            page = (await client.get(f"{base}/", headers=ME, params=params)).json()
            seen += [i["url"] for i in page["items"]]
            token = page.get("nextToken")
            if token is None:
                break
            assert "Keys" not in token
        assert seen == [
            f"conversations/{MINE}/folder/a",
            f"conversations/{MINE}/folder/b",
            f"conversations/{MINE}/folder/sub/c",
            f"conversations/{MINE}/top",
        ]
        empty = (await client.get(f"{base}/?limit=0", headers=ME)).json()
        assert empty["items"] == []
        dial = await client.get(
            f"{base}/", headers={**ME, "Accept": "application/vnd.dial.metadata+json"}
        )
        assert dial.headers["content-type"] == "application/vnd.dial.metadata+json"
        for query in ("limit=-1", "limit=1001", "limit=x", "recursive=yes", "recursive=1"):
            answer = await client.get(f"{base}/?{query}", headers=ME)
            assert error_of(answer) == (400, BAD_QUERY), query
        # Files keep their own message.
        answer = await client.get(f"{gw.url}/v1/metadata/files/{MINE}/?limit=-1", headers=ME)
        assert error_of(answer) == (400, "Limit is out of allowed range: [0, 1000]")
        missing = await client.get(f"{base}/nothing/", headers=ME)
        assert error_of(missing) == (404, f"Not found: conversations/{MINE}/nothing/")
        # Prompts and conversations are apart.
        prompts = (await client.get(f"{gw.url}/v1/metadata/prompts/{MINE}/", headers=ME)).json()
        assert prompts["items"] == [] and prompts["resourceType"] == "PROMPT"
