"""DIAL's Files API on the resource store (issue 14; compatibility C83, C84): upload, download,
delete and metadata in the caller's own bucket, with DIAL's statuses, messages and shapes;
hostile paths never leave the bucket; uploads are atomic even when the process is killed; a
large file goes through in bounded memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aidial_client import AsyncDial

from gateway_config import error_of
from harness import Gateway, eventually, kill, start_gateway, stop
from inprocess import Gateways, InProcessFake, InProcessGateway

PROJECT_KEY = "files-api-project-key-0123456789"
OTHER_KEY = "files-api-other-key-0123456789"
ADMIN_KEY = "files-api-admin-key-0123456789"
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ (DIAL's vector)
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
ME = {"Api-Key": PROJECT_KEY}
OTHER = {"Api-Key": OTHER_KEY}
ADMIN = {"Api-Key": ADMIN_KEY}
MiB = 1 << 20


def config(fake: InProcessFake | None = None) -> dict[str, Any]:
    models = {} if fake is None else {"m": {"endpoint": fake.endpoint("m")}}
    return {
        "models": models,
        "keys": {
            PROJECT_KEY: {"project": "EPM-RTC-GPT", "role": "basic"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "basic"]},
        },
        "roles": {"basic": {"limits": {}}, "admin": {}},
    }


def settings(folder: Path, **storage: Any) -> dict[str, Any]:
    return {
        "encryption": {"secret": "password", "key": "salt"},
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}, **storage},
    }


async def start(
    gateways: Gateways, afake: InProcessFake, folder: Path, **storage: Any
) -> InProcessGateway:
    return await gateways.start([config(afake)], settings=settings(folder, **storage))


def upload_files(data: bytes, name: str = "file.txt", ctype: str | None = "text/custom") -> Any:
    return {"attachment": (name, data) if ctype is None else (name, data, ctype)}


async def put(
    client: httpx.AsyncClient,
    gw: InProcessGateway,
    path: str,
    data: bytes = b"Test file content",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    return await client.put(
        f"{gw.url}/v1/files/{path}",
        headers={**ME, **(headers or {})},
        files=upload_files(data, **kwargs),
    )


# --- upload, download, delete ------------------------------------------------------------------


async def test_upload_answers_dials_file_metadata(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    async with httpx.AsyncClient() as client:
        before = time.time() * 1000
        answer = await put(client, gw, f"{MINE}/file.txt")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert answer.headers["ETag"] == "ac79653edeb65ab5563585f2d5f14fe9"  # DIAL's test value
        assert answer.headers["content-type"] == "application/json"
        created = body.pop("createdAt")
        updated = body.pop("updatedAt")
        assert before - 2000 <= created <= updated <= time.time() * 1000 + 2000
        assert body == {
            "name": "file.txt",
            "parentPath": None,
            "bucket": MINE,
            "url": f"files/{MINE}/file.txt",
            "nodeType": "ITEM",
            "resourceType": "FILE",
            "etag": "ac79653edeb65ab5563585f2d5f14fe9",
            "contentLength": 17,
            "contentType": "text/custom",
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
            "contentLength",
            "contentType",
        ]
        got = await client.get(f"{gw.url}/v1/files/{MINE}/file.txt", headers=ME)
        assert got.status_code == 200
        assert got.content == b"Test file content"
        assert got.headers["content-type"] == "text/custom"
        assert got.headers["content-length"] == "17"
        assert got.headers["etag"] == "ac79653edeb65ab5563585f2d5f14fe9"
        assert got.headers["access-control-allow-origin"] == "*"

        # Overwrite: createdAt kept, updatedAt moves, new ETag.
        await asyncio.sleep(0.01)
        again = await put(client, gw, f"{MINE}/file.txt", b"new content")
        assert again.status_code == 200
        assert again.json()["createdAt"] == created
        assert again.json()["updatedAt"] >= updated
        assert again.json()["etag"] == hashlib.md5(b"new content").hexdigest()

        # Nested paths: parentPath decoded, url encoded.
        nested = await put(
            client, gw, f"{MINE}/docs/my%20folder/report%20v2.pdf", name="r.pdf", ctype=None
        )
        assert nested.status_code == 200
        assert nested.json()["parentPath"] == "docs/my folder"
        assert nested.json()["name"] == "report v2.pdf"
        assert nested.json()["url"] == f"files/{MINE}/docs/my%20folder/report%20v2.pdf"
        assert nested.json()["contentType"] == "application/pdf"  # guessed from the name
        assert (tmp_path / "s/dial/Keys/EPM-RTC-GPT/files/docs/my folder/report v2.pdf").is_file()

        deleted = await client.delete(f"{gw.url}/v1/files/{MINE}/file.txt", headers=ME)
        assert deleted.status_code == 200
        assert deleted.content == b""
        assert error_of(await client.get(f"{gw.url}/v1/files/{MINE}/file.txt", headers=ME)) == (
            404,
            f"Not found: files/{MINE}/file.txt",
        )
        # Newest DIAL: a missing file cannot be deleted.
        assert error_of(await client.delete(f"{gw.url}/v1/files/{MINE}/file.txt", headers=ME)) == (
            404,
            f"Not found: files/{MINE}/file.txt",
        )


async def test_content_types_of_a_part(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    async with httpx.AsyncClient() as client:
        typed = await put(client, gw, f"{MINE}/a.bin", name="picture.png", ctype="image/x-mine")
        assert typed.json()["contentType"] == "image/x-mine"
        guessed = await put(client, gw, f"{MINE}/b.bin", name="picture.png", ctype=None)
        assert guessed.json()["contentType"] == "image/png"
        unknown = await put(client, gw, f"{MINE}/c", name="blob", ctype=None)
        assert unknown.json()["contentType"] == "application/octet-stream"
        # Any field name; form fields before the file part are skipped.
        fields = await client.put(
            f"{gw.url}/v1/files/{MINE}/d.txt",
            headers=ME,
            data={"note": "not a file"},
            files={"file": ("d.txt", b"ddd")},
        )
        assert fields.status_code == 200, fields.text
        assert fields.json()["contentType"] == "text/plain"
        got = await client.get(f"{gw.url}/v1/files/{MINE}/d.txt", headers=ME)
        assert got.content == b"ddd"


async def test_upload_refusals(gateways: Gateways, afake: InProcessFake, tmp_path: Path) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    url = f"{gw.url}/v1/files"
    async with httpx.AsyncClient() as client:
        assert error_of(await put(client, gw, f"{MINE}/")) == (400, "File name is missing")
        assert error_of(await put(client, gw, f"{MINE}/folder/")) == (400, "File name is missing")
        assert error_of(await put(client, gw, "testbucket/")) == (
            400,
            "Url has invalid bucket: files/testbucket/",
        )
        dot = "Resource name and/or parent folders must not end with .(dot)"
        assert error_of(await put(client, gw, f"{MINE}/file.")) == (400, dot)
        assert error_of(await put(client, gw, f"{MINE}/folder1./file")) == (400, dot)
        assert error_of(await client.put(f"{url}/{MINE}/x", headers=ME, content=b"raw body")) == (
            400,
            "Content-Type must be multipart/form-data",
        )
        # A multipart body with no file part.
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n'
            f"--{boundary}--\r\n"
        ).encode()
        no_file = await client.put(
            f"{url}/{MINE}/x",
            headers={**ME, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            content=body,
        )
        assert error_of(no_file) == (400, "File part is missing in the multipart body")
        assert (await client.get(f"{url}/{MINE}/x", headers=ME)).status_code == 404
        assert (await client.patch(f"{url}/{MINE}/x", headers=ME)).status_code == 405


async def test_size_limit(gateways: Gateways, afake: InProcessFake, tmp_path: Path) -> None:
    gw = await start(gateways, afake, tmp_path / "s", maxUploadedFileSize=1000)
    message = (413, "File size exceeds the limit of 1000 bytes")
    async with httpx.AsyncClient() as client:
        assert (await put(client, gw, f"{MINE}/ok", b"x" * 1000)).status_code == 200
        # Streamed past the limit (no Content-Length): refused while reading, nothing kept.
        boundary = "lim1t"

        async def body() -> AsyncIterator[bytes]:
            yield (
                f"--{boundary}\r\nContent-Disposition: form-data; name=f; filename=big\r\n\r\n"
            ).encode()
            for _ in range(20):
                yield b"y" * 100
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = await client.put(
            f"{gw.url}/v1/files/{MINE}/ok",
            headers={**ME, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            content=body(),
        )
        assert error_of(streamed) == message
        kept = await client.get(f"{gw.url}/v1/files/{MINE}/ok", headers=ME)
        assert kept.content == b"x" * 1000
        # Announced by Content-Length: refused before the body is read.
        announced = await put(client, gw, f"{MINE}/big", b"z" * 200_000)
        assert error_of(announced) == message
        assert (await client.get(f"{gw.url}/v1/files/{MINE}/big", headers=ME)).status_code == 404


async def test_default_size_limit_is_dials(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    assert gw.gateway.resources_api.max_upload_bytes == 536870912


async def test_conditions(gateways: Gateways, afake: InProcessFake, tmp_path: Path) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    file = f"{gw.url}/v1/files/{MINE}/c.txt"
    async with httpx.AsyncClient() as client:
        # If-Match on a missing file: 412 (newest DIAL); If-None-Match: * creates.
        assert (
            await put(client, gw, f"{MINE}/c.txt", headers={"If-Match": "abc"})
        ).status_code == 412
        created = await put(client, gw, f"{MINE}/c.txt", b"one", headers={"If-None-Match": "*"})
        assert created.status_code == 200
        etag = created.headers["ETag"]
        assert error_of(
            await put(client, gw, f"{MINE}/c.txt", b"two", headers={"If-None-Match": "*"})
        ) == (412, "Resource already exists")
        assert error_of(
            await put(client, gw, f"{MINE}/c.txt", b"two", headers={"If-Match": "nope"})
        ) == (412, f"If-match condition is failed for etag: {etag}")
        assert error_of(
            await put(client, gw, f"{MINE}/c.txt", b"two", headers={"If-None-Match": f'"{etag}"'})
        ) == (412, f"if-none-match condition is failed for etag: {etag}")
        assert (await client.get(file, headers=ME)).content == b"one"
        # Quoted, unquoted, weak and listed tags all match.
        for tag in (etag, f'"{etag}"', f'W/"{etag}"', f'"other", "{etag}"', "*"):
            replaced = await put(client, gw, f"{MINE}/c.txt", b"one", headers={"If-Match": tag})
            assert replaced.status_code == 200, tag
            assert replaced.headers["ETag"] == etag  # same bytes, same ETag
        # GET: If-None-Match matching → 304 with the ETag; If-Match not matching → 412.
        for tag in (etag, f'"{etag}"', "*"):
            cached = await client.get(file, headers={**ME, "If-None-Match": tag})
            assert cached.status_code == 304
            assert cached.headers["ETag"] == etag
            assert cached.content == b""
        assert (await client.get(file, headers={**ME, "If-None-Match": '"x"'})).status_code == 200
        assert error_of(await client.get(file, headers={**ME, "If-Match": '"x"'})) == (
            412,
            f"If-match condition is failed for etag: {etag}",
        )
        assert (await client.get(file, headers={**ME, "If-Match": f'"{etag}"'})).content == b"one"
        # DELETE honours If-Match.
        assert error_of(await client.delete(file, headers={**ME, "If-Match": "x"})) == (
            412,
            f"If-match condition is failed for etag: {etag}",
        )
        assert (await client.delete(file, headers={**ME, "If-Match": etag})).status_code == 200
        assert (await client.delete(file, headers={**ME, "If-Match": "*"})).status_code == 404


async def test_folders_are_not_files(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    async with httpx.AsyncClient() as client:
        await put(client, gw, f"{MINE}/folder/inside.txt")
        got = await client.get(f"{gw.url}/v1/files/{MINE}/folder/", headers=ME)
        assert error_of(got) == (400, "Can't download a folder")
        gone = await client.delete(f"{gw.url}/v1/files/{MINE}/folder/", headers=ME)
        assert error_of(gone) == (400, "Can't delete a folder")
        # A folder named as a file is not a file.
        assert (await client.get(f"{gw.url}/v1/files/{MINE}/folder", headers=ME)).status_code == 404


# --- access -----------------------------------------------------------------------------------


async def test_access(gateways: Gateways, afake: InProcessFake, tmp_path: Path) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    async with httpx.AsyncClient() as client:
        assert (await put(client, gw, f"{MINE}/private.txt")).status_code == 200
        mine = f"files/{MINE}/private.txt"
        for method in ("GET", "DELETE"):
            refused = await client.request(method, f"{gw.url}/v1/{mine}", headers=OTHER)
            assert error_of(refused) == (403, f"You don't have an access to: {mine}")
        meta = await client.get(f"{gw.url}/v1/metadata/{mine}", headers=OTHER)
        assert error_of(meta) == (403, f"You don't have an access to: {mine}")
        root = await client.get(f"{gw.url}/v1/metadata/files/{MINE}/", headers=OTHER)
        assert error_of(root) == (403, f"You don't have an access to: files/{MINE}/")
        into_theirs = await put(client, gw, f"{THEIRS}/x.txt")
        assert error_of(into_theirs) == (403, f"You don't have an access to: files/{THEIRS}/x.txt")
        assert not (tmp_path / "s/dial/Keys/EPM-RTC-RAIL").exists()
        # The message names the URL as given (encoded).
        odd = await put(client, gw, f"{THEIRS}/a%20b")
        assert error_of(odd) == (403, f"You don't have an access to: files/{THEIRS}/a%20b")

        # Public: written by administrators only, read by anyone.
        public = await put(client, gw, "public/shared.txt")
        assert error_of(public) == (403, "You don't have an access to: files/public/shared.txt")
        by_admin = await client.put(
            f"{gw.url}/v1/files/public/shared.txt", headers=ADMIN, files=upload_files(b"pub")
        )
        assert by_admin.status_code == 200
        assert by_admin.json()["bucket"] == "public"
        for key in ME, OTHER:
            read = await client.get(f"{gw.url}/v1/files/public/shared.txt", headers=key)
            assert read.content == b"pub"
        listed = await client.get(f"{gw.url}/v1/metadata/files/public/", headers=OTHER)
        assert [item["name"] for item in listed.json()["items"]] == ["shared.txt"]
        assert error_of(
            await client.delete(f"{gw.url}/v1/files/public/shared.txt", headers=ME)
        ) == (403, "You don't have an access to: files/public/shared.txt")
        # Administrators read and write every bucket (DIAL's rule 2).
        assert (await client.get(f"{gw.url}/v1/{mine}", headers=ADMIN)).status_code == 200
        # No key: 401 before anything else.
        assert (await client.get(f"{gw.url}/v1/{mine}")).status_code == 401


# Spelled so that no client normalises them away (raw `..` and `.` are tried over a socket).
HOSTILE = [
    "%2e%2e/x",
    "%2E%2e/%2e%2E/etc/passwd",
    ".%2e/x",
    "a%2F..%2F..%2Fx",
    "a%2Fb",
    "a%5C..%5Cx",
    "a%5cb",
    "a%00b",
    "x%00",
    "a//b",
    "%",
    "a%zz",
    "%C0%AE%C0%AE/x",
    ".tollgate-tmp",
    "a%7Bb%7D",
]


async def test_hostile_paths_never_leave_the_bucket(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    folder = tmp_path / "s"
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        await put(client, gw, f"{MINE}/a/b")  # something for a traversal to find
        before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        for hostile in HOSTILE:
            for method in ("PUT", "GET", "DELETE"):
                url = f"{gw.url}/v1/files/{MINE}/{hostile}"
                if method == "PUT":
                    answer = await client.put(url, headers=ME, files=upload_files(b"evil"))
                else:
                    answer = await client.request(method, url, headers=ME)
                # A path with `..` may be normalised by the client or refused by the gateway:
                # either way it never reads or writes outside the bucket.
                assert answer.status_code in (400, 404), (hostile, method, answer.text)
                if answer.status_code == 400:
                    message = error_of(answer)[1]
                    assert message.startswith(
                        ("Invalid path provided", "Wrong path provided", "Resource name", "Url ")
                    ), (hostile, message)
            meta = await client.get(f"{gw.url}/v1/metadata/files/{MINE}/{hostile}", headers=ME)
            assert meta.status_code in (400, 404), (hostile, meta.text)
        after = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert [p for p in after if ".tollgate-" not in p] == [
            p for p in before if ".tollgate-" not in p
        ]

    # Over a raw socket too: the client normalises nothing.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for hostile in (
            "../../../../etc/passwd",
            "..",
            "a/../../x",
            ".",
            "a/./b",
            "..%2F..%2Fx",
            "a\\..\\..\\x",
            "%2e%2e",
        ):
            request = (
                f"GET /v1/files/{MINE}/{hostile} HTTP/1.1\r\nHost: x\r\n"
                f"Api-Key: {PROJECT_KEY}\r\n\r\n"
            ).encode()
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            assert status.split()[1] in (b"400", b"404"), (hostile, status)
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = await reader.readexactly(length)
            assert b"root:" not in body
    finally:
        writer.close()


# --- metadata ---------------------------------------------------------------------------------


async def test_metadata(gateways: Gateways, afake: InProcessFake, tmp_path: Path) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    meta = f"{gw.url}/v1/metadata/files/{MINE}"
    async with httpx.AsyncClient() as client:
        root = await client.get(f"{meta}/", headers=ME, params={"permissions": "true"})
        assert root.status_code == 200
        assert root.json() == {
            "name": None,
            "parentPath": None,
            "bucket": MINE,
            "url": f"files/{MINE}/",
            "nodeType": "FOLDER",
            "resourceType": "FILE",
            "items": [],
            "permissions": ["READ", "WRITE"],
        }
        assert error_of(await client.get(f"{meta}/folder/", headers=ME)) == (
            404,
            f"Not found: files/{MINE}/folder/",
        )
        assert error_of(await client.get(f"{meta}/nothing.txt", headers=ME)) == (
            404,
            f"Not found: files/{MINE}/nothing.txt",
        )
        await put(client, gw, f"{MINE}/top.txt", b"top")
        await put(client, gw, f"{MINE}/folder/a.txt", b"aa")
        await put(client, gw, f"{MINE}/folder/sub/b.json", b"{}", ctype="application/json")

        item = await client.get(f"{meta}/folder/a.txt", headers=ME)
        assert item.status_code == 200
        body = item.json()
        assert body["name"] == "a.txt" and body["parentPath"] == "folder"
        assert body["contentLength"] == 2 and body["contentType"] == "text/custom"
        assert body["etag"] == hashlib.md5(b"aa").hexdigest()
        assert body["nodeType"] == "ITEM" and "createdAt" in body

        listing = await client.get(f"{meta}/", headers=ME)
        items = listing.json()["items"]
        assert [(i["name"], i["nodeType"]) for i in items] == [
            ("folder", "FOLDER"),
            ("top.txt", "ITEM"),
        ]
        assert items[0] == {
            "name": "folder",
            "parentPath": None,
            "bucket": MINE,
            "url": f"files/{MINE}/folder/",
            "nodeType": "FOLDER",
            "resourceType": "FILE",
            "items": None,
        }
        assert "etag" not in items[1]  # listing items carry none (spec 6.3)
        assert items[1]["contentLength"] == 3
        assert items[1]["contentType"] == "text/plain"  # a listing's type: from the name
        assert "etag" not in items[1]
        assert "nextToken" not in listing.json()

        folder = (await client.get(f"{meta}/folder/", headers=ME)).json()
        assert folder["name"] == "folder" and folder["url"] == f"files/{MINE}/folder/"
        assert [i["url"] for i in folder["items"]] == [
            f"files/{MINE}/folder/a.txt",
            f"files/{MINE}/folder/sub/",
        ]
        recursive = await client.get(f"{meta}/", headers=ME, params={"recursive": "true"})
        assert [(i["parentPath"], i["name"]) for i in recursive.json()["items"]] == [
            ("folder", "a.txt"),
            ("folder/sub", "b.json"),
            (None, "top.txt"),
        ]
        assert all(i["nodeType"] == "ITEM" for i in recursive.json()["items"])

        # Pages: limit and the opaque token.
        seen: list[str] = []
        token: str | None = None
        while True:
            params = {"recursive": "true", "limit": "1", **({"token": token} if token else {})}
            page = (await client.get(f"{meta}/", headers=ME, params=params)).json()
            seen += [i["url"] for i in page["items"]]
            token = page.get("nextToken")
            if token is None:
                break
            assert "Keys" not in token and "EPM" not in token
        assert seen == [i["url"] for i in recursive.json()["items"]]
        zero = await client.get(f"{meta}/", headers=ME, params={"limit": "0"})
        assert zero.status_code == 200 and zero.json()["items"] == []

        for bad in ("-1", "1001", "ten", ""):
            refused = await client.get(f"{meta}/", headers=ME, params={"limit": bad})
            assert error_of(refused) == (400, "Limit is out of allowed range: [0, 1000]"), bad
        assert (
            await client.get(f"{meta}/", headers=ME, params={"limit": "1000"})
        ).status_code == 200

        custom = await client.get(
            f"{meta}/", headers={**ME, "Accept": "application/vnd.dial.metadata+json"}
        )
        assert custom.headers["content-type"] == "application/vnd.dial.metadata+json"
        assert (await client.get(f"{meta}/", headers=ME)).headers["content-type"] == (
            "application/json"
        )
        # A folder emptied is gone; the root stays.
        await client.delete(f"{gw.url}/v1/files/{MINE}/folder/sub/b.json", headers=ME)
        assert (await client.get(f"{meta}/folder/sub/", headers=ME)).status_code == 404
        posted = await client.post(f"{meta}/", headers=ME)
        assert posted.status_code == 405


# --- aidial-client ----------------------------------------------------------------------------


async def test_aidial_client_round_trip(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    dial = AsyncDial(api_key=PROJECT_KEY, base_url=gw.url)
    bucket = await dial.bucket.get_bucket()
    assert bucket == MINE
    url = f"files/{bucket}/client/hello world.txt"
    uploaded = await dial.files.upload(url=url, file=("hello world.txt", b"hello", "text/plain"))
    assert uploaded.url == f"files/{MINE}/client/hello%20world.txt"
    assert uploaded.content_length == 5
    assert uploaded.content_type == "text/plain"
    downloaded = await dial.files.download(url)
    assert await downloaded.aget_content() == b"hello"
    # (The client drops a folder's trailing `/`, so it reads items' metadata only.)
    item = await dial.files.get_metadata(url)
    assert item.url == uploaded.url
    assert item.etag == hashlib.md5(b"hello").hexdigest()
    await dial.files.delete(url)
    with pytest.raises(Exception, match="Not found"):
        await dial.files.download(url)


async def test_interrupted_upload_leaves_nothing(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await start(gateways, afake, tmp_path / "s")
    async with httpx.AsyncClient() as client:
        await put(client, gw, f"{MINE}/kept.txt", b"old")
    boundary = "cut"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=f; filename=kept.txt\r\n\r\n"
    ).encode()
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        (
            f"PUT /v1/files/{MINE}/kept.txt HTTP/1.1\r\nHost: x\r\nApi-Key: {PROJECT_KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + 10 * MiB}\r\n\r\n"
        ).encode()
        + head
        + b"n" * MiB
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient() as client:
        kept = await client.get(f"{gw.url}/v1/files/{MINE}/kept.txt", headers=ME)
        assert kept.content == b"old"
        listing = await client.get(
            f"{gw.url}/v1/metadata/files/{MINE}/", headers=ME, params={"recursive": "true"}
        )
        assert [i["name"] for i in listing.json()["items"]] == ["kept.txt"]


# --- real processes ---------------------------------------------------------------------------


def process_settings(folder: Path, **storage: Any) -> dict[str, Any]:
    return settings(folder, **storage)


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def multipart_head(boundary: str, name: str) -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: form-data; name=attachment; "
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()


def pattern(size: int, seed: int = 0) -> Iterator[bytes]:
    """`size` bytes made on the fly, 1 MiB at a time."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    sent = 0
    while sent < size:
        piece = block[: min(MiB, size - sent)]
        sent += len(piece)
        yield piece


def test_killed_mid_upload_keeps_the_old_version(work_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "store"
    gateway_settings = process_settings(folder)
    gw = start_gateway(work_dir, [config()], settings=gateway_settings)
    restarted: Gateway | None = None
    try:
        old = b"".join(pattern(3 * MiB, seed=1))
        first = httpx.put(
            f"{gw.url}/v1/files/{MINE}/big.bin",
            headers=ME,
            files={"attachment": ("big.bin", old, "application/x-old")},
            timeout=30,
        )
        assert first.status_code == 200, first.text
        etag = first.headers["ETag"]
        assert etag == hashlib.md5(old).hexdigest()

        # 64 MiB, sent slowly (chunked: no Content-Length), killed at half.
        boundary = "k1ll"
        size = 64 * MiB
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(
            (
                f"PUT /v1/files/{MINE}/big.bin HTTP/1.1\r\nHost: x\r\nApi-Key: {PROJECT_KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )

        def chunk(data: bytes) -> None:
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        chunk(multipart_head(boundary, "big.bin"))
        sent = 0
        for piece in pattern(size, seed=2):
            chunk(piece)
            sent += len(piece)
            time.sleep(0.005)
            if sent >= size // 2:
                break

        def half_written() -> bool:
            partial = [p for p in folder.rglob(".tollgate-*") if p.is_file()]
            return any(p.stat().st_size >= size // 4 for p in partial)

        eventually(half_written)  # the gateway has written a good part of the new version out
        kill(gw.process)
        sock.close()

        restarted = start_gateway(work_dir, [config()], settings=gateway_settings)
        got = httpx.get(f"{restarted.url}/v1/files/{MINE}/big.bin", headers=ME, timeout=30)
        assert got.status_code == 200
        assert got.headers["ETag"] == etag
        assert got.headers["content-type"] == "application/x-old"
        assert got.content == old
        listing = httpx.get(
            f"{restarted.url}/v1/metadata/files/{MINE}/",
            headers=ME,
            params={"recursive": "true"},
        ).json()
        assert [(i["name"], i["contentLength"]) for i in listing["items"]] == [
            ("big.bin", len(old))
        ]
        # No partial object anywhere in the store's folder but Tollgate's own temporaries.
        files = [p for p in folder.rglob("*") if p.is_file() and ".tollgate-" not in str(p)]
        assert sorted(p.name for p in files) == ["big.bin", "encryption.json"] or sorted(
            p.name for p in files
        ) == ["big.bin"]
    finally:
        kill(gw.process)
        if restarted is not None:
            stop(restarted.process)


LARGE = int(os.environ.get("TOLLGATE_FILES_LARGE_MIB", "1024")) * MiB


def test_large_file_in_bounded_memory(work_dir: Path, tmp_path: Path) -> None:
    gw = start_gateway(
        work_dir,
        [config()],
        settings=process_settings(tmp_path / "store", maxUploadedFileSize=2 * LARGE),
    )
    try:
        pid = gw.process.pid
        start_rss = rss_kib(pid, "VmRSS")
        boundary = "1g"
        sent_md5 = hashlib.md5()

        def body() -> Iterator[bytes]:
            yield multipart_head(boundary, "large.bin")
            for piece in pattern(LARGE, seed=3):
                sent_md5.update(piece)
                yield piece
            yield f"\r\n--{boundary}--\r\n".encode()

        began = time.monotonic()
        up = httpx.put(
            f"{gw.url}/v1/files/{MINE}/large.bin",
            headers={**ME, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            content=body(),
            timeout=300,
        )
        upload_s = time.monotonic() - began
        assert up.status_code == 200, up.text
        assert up.json()["contentLength"] == LARGE
        assert up.headers["ETag"] == sent_md5.hexdigest()

        got_md5 = hashlib.md5()
        received = 0
        began = time.monotonic()
        with httpx.stream(
            "GET", f"{gw.url}/v1/files/{MINE}/large.bin", headers=ME, timeout=300
        ) as down:
            assert down.status_code == 200
            assert int(down.headers["content-length"]) == LARGE
            for piece in down.iter_raw(MiB):
                got_md5.update(piece)
                received += len(piece)
        download_s = time.monotonic() - began
        assert received == LARGE
        assert got_md5.hexdigest() == sent_md5.hexdigest()
        peak = rss_kib(pid, "VmHWM")
        grown_mib = (peak - start_rss) / 1024
        print(
            f"\n{LARGE // MiB} MiB: upload {LARGE / MiB / upload_s:.0f} MB/s, "
            f"download {LARGE / MiB / download_s:.0f} MB/s, RSS start {start_rss // 1024} MiB, "
            f"peak {peak // 1024} MiB (+{grown_mib:.0f} MiB)"
        )
        assert grown_mib < 100
    finally:
        stop(gw.process)


async def test_an_upload_larger_than_resources_max_size_is_bounded_by_the_file_limit_only(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    """Browsers and DIAL Chat announce an upload's Content-Length: a file above
    `resources.maxSize` (the bound of every other body) but within
    `storage.maxUploadedFileSize` is stored; any other body above it is still 413."""
    tree = settings(tmp_path / "s", maxUploadedFileSize=100_000)
    tree["resources"] = {"maxSize": 2_000}
    gw = await gateways.start([config(afake)], settings=tree)
    async with httpx.AsyncClient() as client:
        stored = await put(client, gw, f"{MINE}/large", b"L" * 50_000)
        assert stored.status_code == 200, stored.text
        assert stored.json()["contentLength"] == 50_000
        too_big = await client.post(
            f"{gw.url}/openai/deployments/m/chat/completions", headers=ME, content=b"x" * 5_000
        )
        assert error_of(too_big) == (413, "Request body is too large")


async def test_a_form_with_a_broken_part_header_is_a_400(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    """A NUL in a part's header (found by the schema fuzzer): 400, not a server error."""
    gw = await start(gateways, afake, tmp_path / "s")
    body = (
        b'--b0\r\nContent-Disposition: form-data; name="a\x00b"\r\n\r\n{}\r\n'
        b'--b0\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\nPNG\r\n'
        b"--b0--\r\n"
    )
    async with httpx.AsyncClient() as client:
        answer = await client.put(
            f"{gw.url}/v1/files/{MINE}/f.png",
            headers={**ME, "Content-Type": "multipart/form-data; boundary=b0"},
            content=body,
        )
        assert error_of(answer) == (400, "Invalid multipart body")
        missing = await client.get(f"{gw.url}/v1/files/{MINE}/f.png", headers=ME)
        assert missing.status_code == 404  # nothing was written
