"""Attachments and per-request keys (spec resources 7.1 rules 3 and 4, 7.2; compatibility C93):
what a request attaches must be readable by its caller, or the call is refused before anything
is forwarded or charged; the hop's per-request key may then read exactly that (a folder: what
lies below it), and write in its app-data folder.

Upstreams: `apps/resource_app.py` (an application that downloads with the key it was given
and reports what it got) and the in-process fake model.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from apps.resource_app import ResourceApp, start_resource_app
from inprocess import Gateways, InProcessFake, InProcessGateway, listening_socket
from tollgate.errors import GatewayError
from tollgate.pipeline.attachments import attached_urls
from tollgate.resources.encryption import BucketCipher
from tollgate.resources.paths import parse_url
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import SharedKeys

PROJECT_KEY = "attachments-project-key-0123456789"
OTHER_KEY = "attachments-other-key-0123456789"
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ (DIAL's vector)
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
ME = {"Api-Key": PROJECT_KEY}
OTHER = {"Api-Key": OTHER_KEY}
APP = "resource-app"
METADATA = "application/vnd.dial.metadata+json"


@pytest.fixture
def app_socket() -> Iterator[socket.socket]:
    sock = listening_socket()
    yield sock
    sock.close()


@pytest.fixture
async def gw(
    gateways: Gateways, tmp_path: Path, afake: InProcessFake, app_socket: socket.socket
) -> InProcessGateway:
    app_port = app_socket.getsockname()[1]

    def app_at(name: str) -> str:
        return f"http://127.0.0.1:{app_port}/openai/deployments/{name}/chat/completions"

    config = {
        "models": {
            "chat-model": {"type": "chat", "endpoint": afake.endpoint("chat-model")},
            "guarded-model": {"endpoint": afake.endpoint("guarded"), "interceptors": ["reader"]},
        },
        "applications": {APP: {"endpoint": app_at(APP)}},
        "interceptors": {"reader": {"endpoint": app_at("reader")}},
        "keys": {
            PROJECT_KEY: {"project": "EPM-RTC-GPT", "role": "basic"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
        },
        "roles": {"basic": {"limits": {}}},
    }
    settings = {
        "encryption": {"secret": "password", "key": "salt"},
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(tmp_path / "s")}},
    }
    return await gateways.start([config], settings=settings)


@pytest.fixture
async def app(gw: InProcessGateway, app_socket: socket.socket) -> AsyncIterator[ResourceApp]:
    started = await start_resource_app(gw.url, sock=app_socket)
    yield started
    await started.stop()


@pytest.fixture
async def client(gw: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        yield http


async def upload(
    client: httpx.AsyncClient, url: str, text: str, headers: dict[str, str] = ME
) -> None:
    answer = await client.put(
        f"/v1/{url}", headers=headers, files={"attachment": ("f.txt", text.encode(), "text/plain")}
    )
    assert answer.status_code == 200, answer.text


def message(*attachments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "content": "look at this",
        "custom_content": {"attachments": list(attachments)},
        **extra,
    }


def file(url: str, kind: str = "text/plain") -> dict[str, Any]:
    return {"type": kind, "url": url, "title": url.rpartition("/")[2]}


async def call(
    client: httpx.AsyncClient,
    messages: list[dict[str, Any]],
    *steps: dict[str, Any],
    deployment: str = APP,
    headers: dict[str, str] = ME,
    api: str = "chat/completions",
    **body: Any,
) -> httpx.Response:
    payload = {
        "messages": messages,
        "custom_fields": {"configuration": {"actions": list(steps)}},
        **body,
    }
    return await client.post(
        f"/openai/deployments/{deployment}/{api}", headers=headers, json=payload
    )


def results(answer: httpx.Response) -> list[Any]:
    assert answer.status_code == 200, answer.text
    content: list[Any] = json.loads(answer.json()["choices"][0]["message"]["content"])
    return content


def error(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["message"]


def read(url: str) -> dict[str, Any]:
    return {"op": "read", "url": url}


# --- the app reads what was attached ----------------------------------------------------------


async def test_the_app_reads_an_attachment_the_caller_owns(
    client: httpx.AsyncClient, app: ResourceApp
) -> None:
    url = f"files/{MINE}/docs/report 1.txt"
    await upload(client, url, "quarterly numbers")
    answer = await call(client, [message(file(url))], {"op": "read_attached"})
    [[got]] = results(answer)
    assert (got["status"], got["body"]) == (200, "quarterly numbers")
    # Rule 3 of the key, not rule 1: the app's own bucket is another one.
    [request] = app.requests()
    key = dict(request["headers"])["Api-Key"]
    assert key != PROJECT_KEY


async def test_an_attachment_the_caller_cannot_read_refuses_the_call(
    client: httpx.AsyncClient, app: ResourceApp, afake: InProcessFake
) -> None:
    theirs = f"files/{THEIRS}/secret.txt"
    await upload(client, theirs, "not yours", OTHER)
    answer = await call(client, [message(file(theirs))], {"op": "read_attached"})
    assert error(answer) == (403, f"Access denied to the file {theirs}")
    assert app.requests() == []  # never called
    # A model call is refused the same way, before it is counted.
    refused = await call(client, [message(file(theirs))], deployment="chat-model")
    assert error(refused) == (403, f"Access denied to the file {theirs}")
    assert afake.requests() == []
    stats = (await client.get("/v1/deployments/chat-model/limits", headers=ME)).json()
    assert stats["dayRequestStats"]["used"] == 0
    ok = await call(client, [{"role": "user", "content": "hi"}], deployment="chat-model")
    assert ok.status_code == 200, ok.text
    stats = (await client.get("/v1/deployments/chat-model/limits", headers=ME)).json()
    assert stats["dayRequestStats"]["used"] == 1
    # The owner may attach it.
    [[got]] = results(
        await call(client, [message(file(theirs))], {"op": "read_attached"}, headers=OTHER)
    )
    assert got["status"] == 200


async def test_the_key_reads_nothing_that_was_not_attached(
    client: httpx.AsyncClient, app: ResourceApp
) -> None:
    attached, other = f"files/{MINE}/a.txt", f"files/{MINE}/b.txt"
    await upload(client, attached, "a")
    await upload(client, other, "b")
    got = results(await call(client, [message(file(attached))], read(attached), read(other)))
    assert [g["status"] for g in got] == [200, 403]
    assert json.loads(got[1]["body"])["error"]["message"] == (
        f"You don't have an access to: {other}"
    )
    # Without attachments the key reads nothing of the caller's.
    got = results(await call(client, [{"role": "user", "content": "x"}], read(attached)))
    assert got[0]["status"] == 403


async def test_absolute_and_data_urls_are_ignored(
    client: httpx.AsyncClient, app: ResourceApp
) -> None:
    mine = f"files/{MINE}/a.txt"
    await upload(client, mine, "a")
    messages = [
        message(
            file("https://example.com/picture.png", "image/png"),
            file("data:text/plain;base64,aGk=", "text/plain"),
            content=[
                {"type": "text", "text": "and these"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "HTTP://example.com/x.png"}},
            ],
        )
    ]
    got = results(await call(client, messages, read(mine)))
    assert got[0]["status"] == 403  # nothing was granted
    assert len(app.requests()) == 1


async def test_a_folder_attachment_covers_what_lies_below(
    client: httpx.AsyncClient, app: ResourceApp
) -> None:
    inside, deeper = f"files/{MINE}/docs/a.txt", f"files/{MINE}/docs/sub/b.txt"
    outside = f"files/{MINE}/elsewhere.txt"
    for url in (inside, deeper, outside):
        await upload(client, url, url)
    folder = f"files/{MINE}/docs/"
    got = results(
        await call(client, [message(file(folder))], read(inside), read(deeper), read(outside))
    )
    assert [g["status"] for g in got] == [200, 200, 403]
    assert got[1]["body"] == deeper
    listing = results(
        await call(client, [message(file(folder))], {"op": "read", "url": f"metadata/{folder}"})
    )
    assert listing[0]["status"] == 200
    names = [i["name"] for i in json.loads(listing[0]["body"])["items"]]
    assert names == ["a.txt", "sub"]


async def test_every_place_dial_looks_at(client: httpx.AsyncClient, app: ResourceApp) -> None:
    """`image_url` parts, stages' attachments, metadata attachments (their `metadata/` taken
    off), and an embeddings request's `custom_input`."""
    urls = [f"files/{MINE}/{name}.txt" for name in ("image", "stage", "meta", "input")]
    for url in urls:
        await upload(client, url, url)
    image, stage, meta, custom = urls
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}],
        },
        {
            "role": "assistant",
            "content": "",
            "custom_content": {
                "stages": [{"name": "s", "attachments": [file(stage)]}],
                "attachments": [{"type": METADATA, "url": f"metadata/{meta}"}],
            },
        },
    ]
    got = results(await call(client, messages, read(image), read(stage), read(meta)))
    assert [g["status"] for g in got] == [200, 200, 200]
    bad = [
        {"role": "user", "content": "", "custom_content": {"attachments": [file(meta, METADATA)]}}
    ]
    assert error(await call(client, bad)) == (
        400,
        f"Url of metadata attachment must start with metadata/: {meta}",
    )
    embeddings = await call(
        client,
        [],
        read(custom),
        api="embeddings",
        input=["text"],
        custom_input=["text", {"type": "text/plain", "url": custom}],
    )
    assert results(embeddings)[0]["status"] == 200
    theirs = f"files/{THEIRS}/x.txt"
    refused = await call(client, [], api="embeddings", custom_input=[[file(theirs)]])
    assert error(refused) == (403, f"Access denied to the file {theirs}")


async def test_a_malformed_resource_url_is_400(client: httpx.AsyncClient, app: ResourceApp) -> None:
    for url, text in (
        ("files/nobucket/a.txt", "Url has invalid bucket: files/nobucket/a.txt"),
        (f"files/{MINE}/../x", "Invalid path provided ../x"),
        ("report.txt", "Url has less than two segments: report.txt"),
    ):
        assert error(await call(client, [message(file(url))])) == (400, text)
    assert app.requests() == []


async def test_the_key_writes_in_its_appdata_folder_only(
    client: httpx.AsyncClient, app: ResourceApp
) -> None:
    got = results(
        await call(
            client,
            [{"role": "user", "content": "x"}],
            {"op": "write_appdata", "name": "made.txt", "text": "made by the app"},
            {"op": "write", "url": f"files/{MINE}/not-appdata.txt", "text": "no"},
        )
    )
    assert got[0]["status"] == 200, got[0]
    assert got[0]["url"] == f"files/{MINE}/appdata/{APP}/made.txt"
    assert got[1]["status"] == 403
    made = await client.get(f"/v1/files/{MINE}/appdata/{APP}/made.txt", headers=ME)
    assert (made.status_code, made.text) == (200, "made by the app")


async def test_the_apps_callback_may_attach_what_it_was_given(
    client: httpx.AsyncClient, app: ResourceApp, afake: InProcessFake
) -> None:
    """The app passes the attachment on to a model: its key may read it (rule 3), so the
    model's key may too."""
    url = f"files/{MINE}/a.txt"
    await upload(client, url, "a")
    got = results(
        await call(client, [message(file(url))], {"op": "call", "deployment": "chat-model"})
    )
    assert got[0]["status"] == 200, got[0]
    sent = json.loads(afake.last()["body"])
    assert sent["messages"][0]["custom_content"]["attachments"][0]["url"] == url


async def test_an_interceptors_key_reads_the_attachments_too(
    client: httpx.AsyncClient, app: ResourceApp, afake: InProcessFake
) -> None:
    url = f"files/{MINE}/a.txt"
    await upload(client, url, "for the interceptor")
    got = results(
        await call(
            client, [message(file(url))], {"op": "read_attached"}, deployment="guarded-model"
        )
    )
    assert got[0][0]["body"] == "for the interceptor"
    theirs = f"files/{THEIRS}/x.txt"
    refused = await call(client, [message(file(theirs))], deployment="guarded-model")
    assert error(refused) == (403, f"Access denied to the file {theirs}")
    assert app.requests()[0]["path"] == "/openai/deployments/reader/chat/completions"
    assert len(app.requests()) == 1


# --- pieces -----------------------------------------------------------------------------------


def test_attached_urls_in_order() -> None:
    request = {
        "messages": [
            {"content": [{"type": "image_url", "image_url": {"url": "files/b/1"}}, "junk"]},
            {"custom_content": {"attachments": [{"url": "files/b/2"}, {"url": 3}, "x"]}},
            {"custom_content": {"stages": [{"attachments": [{"url": "files/b/3"}]}, None]}},
            {"custom_content": {"attachments": [{"type": METADATA, "url": "metadata/files/b/4"}]}},
            {"custom_content": {"attachments": [{"url": "s3://bucket/key"}, {"url": ""}]}},
            "not a message",
        ],
        "custom_input": ["text", {"url": "files/b/5"}, [{"url": "files/b/6"}, "t"], 7],
    }
    assert attached_urls(request) == [f"files/b/{n}" for n in range(1, 7)]
    assert attached_urls({"messages": "nope", "custom_input": {"url": "files/b/1"}}) == []
    with pytest.raises(GatewayError) as refused:
        attached_urls(
            {
                "messages": [
                    {"custom_content": {"attachments": [{"type": METADATA, "url": "files/b/x"}]}}
                ]
            }
        )
    assert refused.value.status == 400


def test_escaped_field_names_are_read_as_parsed() -> None:
    escaped = b'{"messages":[{"custom\\u005fcontent":{"attachments":[{"url":"files/b/x"}]}}]}'
    assert attached_urls(orjson.loads(escaped)) == ["files/b/x"]


def test_covered_by() -> None:
    cipher = BucketCipher("password", "salt")
    item = parse_url(f"files/{MINE}/a b/c/d.txt", cipher)
    assert item.covered_by(frozenset({f"files/{MINE}/a%20b/c/d.txt"}))
    assert item.covered_by(frozenset({f"files/{MINE}/a%20b/"}))
    assert item.covered_by(frozenset({f"files/{MINE}/"}))
    assert not item.covered_by(frozenset({f"files/{MINE}/a%20b/c/d.txt/"}))
    assert not item.covered_by(frozenset({f"files/{MINE}/a%20b/c/d"}))
    assert not item.covered_by(frozenset({f"conversations/{MINE}/a%20b/"}))
    assert not item.covered_by(frozenset({f"files/{THEIRS}/a%20b/"}))
    folder = parse_url(f"files/{MINE}/a b/c/", cipher)
    assert folder.covered_by(frozenset({f"files/{MINE}/a%20b/c/"}))
    assert not folder.covered_by(frozenset({f"files/{MINE}/a%20b/c/x"}))


class _Redis:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def set(self, name: str, value: bytes, px: int) -> None:
        self.values[name] = value

    async def get(self, name: str) -> bytes | None:
        return self.values.get(name)


async def test_a_keys_attachments_reach_other_instances() -> None:
    redis = _Redis()
    keys = SharedKeys(redis, 60, store_healthy=lambda: True)
    root = Principal("p", ("r",), frozenset({"r"}), "fp")
    attached = frozenset({"files/b/x", "files/b/folder/"})
    await keys.publish(b"1", root.via("app", attached))
    await keys.publish(b"2", root.via("app"))
    assert (await keys.lookup(b"1")) == root.via("app", attached)
    assert (await keys.lookup(b"2")) == root.via("app")
    # What a Tollgate from before attachments published: six fields.
    redis.values[keys._name(b"3")] = orjson.dumps(["p", ["r"], "fp", False, "app", None])
    assert (await keys.lookup(b"3")) == root.via("app")
