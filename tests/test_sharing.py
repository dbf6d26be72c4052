"""DIAL's Share API and invitations (issue 14; compatibility C88), in process: DIAL's
conformance scenarios (share, accept, read and write as the recipient, revoke, discard, copy,
a deleted resource, move), its messages, newest DIAL's `roles.<r>.share` limits (the most
permissive role per field, the shortest TTL of a request, the limit snapshotted at share
time, expiry), a burst of concurrent accepts that never admits more than the limit, forged
invitation ids, and the 403 a per-request key gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aidial_client import AsyncDial
from aiohttp import web

from gateway_config import error_of
from inprocess import Gateways, InProcessGateway

OWNER_KEY = "sharing-owner-key-0123456789abcdef"
OTHER_KEY = "sharing-other-key-0123456789abcdef"
THIRD_KEY = "sharing-third-key-0123456789abcdef"
ADMIN_KEY = "sharing-admin-key-0123456789abcdef"
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/ (DIAL's vector)
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
OWNER = {"Api-Key": OWNER_KEY}
OTHER = {"Api-Key": OTHER_KEY}
THIRD = {"Api-Key": THIRD_KEY}
ADMIN = {"Api-Key": ADMIN_KEY}
CONVERSATION = {"id": "c1", "name": "conversation", "messages": []}
CROWD = 30  # keys of their own projects, for the bursts
HOUR_MS = 3_600_000
LIMIT_EXCEEDED = "Limit is exceeded on the number of accepted users for the resource: "


def crowd_key(index: int) -> str:
    return f"sharing-crowd-key-{index:02d}-0123456789abcdef"


def config(roles: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {
        OWNER_KEY: {"project": "EPM-RTC-GPT", "roles": ["basic"]},
        OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
        THIRD_KEY: {"project": "third", "role": "basic"},
        ADMIN_KEY: {"project": "ops", "roles": ["admin"]},
    }
    keys.update({crowd_key(i): {"project": f"crowd-{i}", "role": "basic"} for i in range(CROWD)})
    return {
        "models": {},
        "keys": keys,
        "roles": {"basic": {}, "admin": {}, **(roles or {})},
        **more,
    }


def settings(folder: Path, **more: Any) -> dict[str, Any]:
    return {
        "encryption": {"secret": "password", "key": "salt"},
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
        **more,
    }


@pytest.fixture
async def gw(gateways: Gateways, tmp_path: Path) -> InProcessGateway:
    return await gateways.start([config()], settings=settings(tmp_path / "store"))


@pytest.fixture
async def http(gw: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as client:
        yield client


async def put(http: httpx.AsyncClient, url: str, body: Any = None, who: Any = OWNER) -> None:
    answer = await http.put(f"/v1/{url}", headers=who, content=orjson.dumps(body or CONVERSATION))
    assert answer.status_code == 200, answer.text


async def share(
    http: httpx.AsyncClient, resources: list[dict[str, Any]], who: Any = OWNER, **extra: Any
) -> str:
    """The invitation id of a new share."""
    answer = await http.post(
        "/v1/ops/resource/share/create",
        headers=who,
        json={"invitationType": "link", "resources": resources, **extra},
    )
    assert answer.status_code == 200, answer.text
    link = answer.json()["invitationLink"]
    assert link.startswith("/v1/invitations/")
    return str(link.rsplit("/", 1)[1])


async def accept(http: httpx.AsyncClient, invitation: str, who: Any) -> httpx.Response:
    return await http.get(f"/v1/invitations/{invitation}", params={"accept": "true"}, headers=who)


async def listed(http: httpx.AsyncClient, who: Any, with_: str, *types: str, **extra: Any) -> Any:
    answer = await http.post(
        "/v1/ops/resource/share/list",
        headers=who,
        json={"resourceTypes": list(types or ["CONVERSATION"]), "with": with_, **extra},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["resources"]


def refusal(answer: httpx.Response) -> tuple[int, str]:
    return error_of(answer)


# --- DIAL's scenarios ---------------------------------------------------------------------


async def test_a_shared_conversation_is_read_by_the_recipient_and_listed_on_both_sides(
    http: httpx.AsyncClient,
) -> None:
    url = f"conversations/{MINE}/folder/conversation%201%40"
    canonical = f"conversations/{MINE}/folder/conversation%201@"  # DIAL keeps `@` as it is
    await put(http, url)
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 403
    invitation = await share(http, [{"url": url}])

    # Any caller may read an invitation; only the owner sees who accepted it.
    seen = await http.get(f"/v1/invitations/{invitation}", headers=THIRD)
    assert seen.status_code == 200
    body = seen.json()
    assert body["id"] == invitation
    assert body["resources"] == [{"url": canonical, "permissions": ["READ"]}]
    assert body["author"] == "EPM-RTC-GPT"
    assert body["expireAt"] - body["createdAt"] == 72 * HOUR_MS  # CONVERSATION's default TTL
    assert "acceptedUserLocations" not in body

    answer = await accept(http, invitation, OTHER)
    assert answer.status_code == 200 and answer.content == b""
    got = await http.get(f"/v1/{url}", headers=OTHER)
    assert got.status_code == 200 and got.json() == CONVERSATION
    meta = await http.get(f"/v1/metadata/{url}", params={"permissions": "true"}, headers=OTHER)
    assert meta.status_code == 200 and meta.json()["permissions"] == ["READ"]
    # READ only: no writes, no deletes; the third project still has nothing.
    assert (await http.put(f"/v1/{url}", headers=OTHER, json={})).status_code == 403
    assert (await http.delete(f"/v1/{url}", headers=OTHER)).status_code == 403
    assert (await http.get(f"/v1/{url}", headers=THIRD)).status_code == 403

    entry = {
        "name": "conversation 1@",
        "parentPath": "folder",
        "bucket": MINE,
        "url": canonical,
        "nodeType": "ITEM",
        "resourceType": "CONVERSATION",
        "permissions": ["READ"],
    }
    assert await listed(http, OWNER, "others") == [entry]
    assert await listed(http, OTHER, "me") == [entry]
    assert await listed(http, OTHER, "me", "PROMPT") == []
    assert await listed(http, THIRD, "me") == []
    with_info = await listed(http, OWNER, "others", includeUserInfo=True)
    assert with_info[0]["sharedWith"] == [{"user": "EPM-RTC-RAIL", "permissions": ["READ"]}]
    assert (await listed(http, OTHER, "me", includeUserInfo=True))[0]["author"] == "EPM-RTC-GPT"

    owner_view = (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).json()
    assert owner_view["acceptedUserLocations"] == ["Keys/EPM-RTC-RAIL/"]
    mine = (await http.get("/v1/invitations", headers=OWNER)).json()
    assert [inv["id"] for inv in mine["invitations"]] == [invitation]
    assert (await http.get("/v1/invitations", headers=OTHER)).json() == {"invitations": []}
    # Accepting again changes nothing.
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert await listed(http, OTHER, "me") == [entry]


async def test_a_write_share_lets_the_recipient_write_but_not_read(
    http: httpx.AsyncClient,
) -> None:
    url = f"conversations/{MINE}/w"
    await put(http, url)
    invitation = await share(http, [{"url": url, "permissions": ["WRITE"]}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    written = await http.put(f"/v1/{url}", headers=OTHER, json={"id": "changed"})
    assert written.status_code == 200
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 403  # READ not implied
    assert (await http.get(f"/v1/{url}", headers=OWNER)).json() == {"id": "changed"}


async def test_invitation_errors_are_dials(http: httpx.AsyncClient) -> None:
    url = f"conversations/{MINE}/own"
    await put(http, url)
    invitation = await share(http, [{"url": url}])
    assert refusal(await accept(http, invitation, OWNER)) == (
        400,
        f"Resource {url} already belong to you",
    )
    assert refusal(await http.get("/v1/invitations/asdasd", headers=OWNER)) == (
        404,
        "No invitation found for ID asdasd",
    )
    assert refusal(await http.delete("/v1/invitations/asdasd", headers=OWNER)) == (
        404,
        "No invitation found for IDasdasd",
    )
    assert refusal(await http.delete(f"/v1/invitations/{invitation}", headers=OTHER)) == (
        403,
        "You are not invitation owner",
    )
    # Forged ids: a bucket name (the same cipher), and an id with a character changed.
    for forged in (MINE, THEIRS, invitation[:-1] + ("A" if invitation[-1] != "A" else "B")):
        assert (await http.get(f"/v1/invitations/{forged}", headers=OTHER)).status_code == 404
        assert (await accept(http, forged, OTHER)).status_code == 404

    # The owner deletes it: gone for everyone; access already granted stays (DIAL).
    other = await share(http, [{"url": url}])
    assert (await accept(http, other, OTHER)).status_code == 200
    assert (await http.delete(f"/v1/invitations/{other}", headers=OWNER)).status_code == 200
    assert (await http.get(f"/v1/invitations/{other}", headers=OTHER)).status_code == 404
    assert (await accept(http, other, THIRD)).status_code == 404
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 200


async def test_deleting_a_shared_resource_drops_its_invitations_and_access(
    http: httpx.AsyncClient,
) -> None:
    url = f"conversations/{MINE}/gone"
    await put(http, url)
    invitation = await share(http, [{"url": url}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert (await http.delete(f"/v1/{url}", headers=OWNER)).status_code == 200
    assert (await http.get("/v1/invitations", headers=OWNER)).json() == {"invitations": []}
    assert await listed(http, OTHER, "me") == []
    assert await listed(http, OWNER, "others") == []
    await put(http, url)  # made again: not shared again
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 403


async def test_create_checks_its_body_as_dial(http: httpx.AsyncClient) -> None:
    mine = f"conversations/{MINE}/c"
    theirs = f"conversations/{THEIRS}/c"
    incorrect = "Can't initiate share request. Incorrect body"
    dotted, public = f"conversations/{MINE}/../x", "conversations/public/x"
    cases: list[tuple[Any, str]] = [
        (b"not json", incorrect),
        ({"invitationType": "link"}, incorrect),
        ({"resources": [{"link": mine}]}, incorrect),
        ({"resources": [{"url": mine}], "invitationType": "pigeon"}, incorrect),
        ({"resources": []}, "No resources provided"),
        # Newest DIAL: another's resource may be shared only with SHARE on it (re-sharing).
        (
            {"resources": [{"url": theirs}]},
            f"Resource {theirs} is not allowed to be shared by the user",
        ),
        (
            {"resources": [{"url": mine}, {"url": theirs}]},
            "You're not allowed to share resources of different owners in a single request",
        ),
        ({"resources": [{"url": dotted}]}, f"Incorrect resource link provided {dotted}"),
        ({"resources": [{"url": public}]}, f"Incorrect resource link provided {public}"),
        ({"resources": [{"url": "nothing"}]}, "Incorrect resource link provided nothing"),
        (
            {"resources": [{"url": mine}, {"url": f"metadata/{mine}"}]},
            f"Duplicated resource: {mine}",
        ),
        (
            {"resources": [{"url": mine, "permissions": ["SHARE"]}]},
            "You're not allowed to share a resource with the permission SHARE only. "
            "This permission is allowed along with READ and/or WRITE",
        ),
        ({"resources": [{"url": mine, "permissions": ["ADMIN"]}]}, incorrect),
        (
            {"resources": [{"url": mine}], "maxAcceptedUsers": 0},
            "maxAcceptedUsers must be a positive integer",
        ),
    ]
    for body, message in cases:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        answer = await http.post("/v1/ops/resource/share/create", headers=OWNER, content=content)
        assert refusal(answer) == (400, message), body
    # Nothing was made by any of them.
    assert (await http.get("/v1/invitations", headers=OWNER)).json() == {"invitations": []}
    # A `metadata/` prefix is allowed, and existence is not checked (DIAL).
    assert await share(http, [{"url": f"metadata/{mine}"}, {"url": f"files/{MINE}/folder/"}])


async def test_list_and_revoke_and_discard_check_their_bodies(http: httpx.AsyncClient) -> None:
    for body in ({}, {"resourceTypes": []}, {"resourceTypes": ["NOPE"]}, {"resourceTypes": "X"}):
        answer = await http.post("/v1/ops/resource/share/list", headers=OWNER, json=body)
        assert refusal(answer) == (400, "Can't list shared resources. Incorrect body")
    revoke = "/v1/ops/resource/share/revoke"
    assert refusal(await http.post(revoke, headers=OWNER, json={"x": 1})) == (
        400,
        "Can't REVOKE shared resources. Incorrect body",
    )
    assert refusal(await http.post(revoke, headers=OWNER, json={"resources": []})) == (
        400,
        "No resources provided",
    )
    theirs = f"conversations/{THEIRS}/c"
    answer = await http.post(revoke, headers=OWNER, json={"resources": [{"url": theirs}]})
    assert refusal(answer) == (400, "You are only allowed to revoke access from own resources")
    answer = await http.post(revoke, headers=OWNER, json={"resources": [{"url": "bad"}]})
    assert refusal(answer) == (400, "Incorrect resource link provided bad")
    # Revoking what was never shared is a no-op.
    mine = f"conversations/{MINE}/never"
    assert (
        await http.post(revoke, headers=OWNER, json={"resources": [{"url": mine}]})
    ).status_code == 200
    discard = "/v1/ops/resource/share/discard"
    assert refusal(await http.post(discard, headers=OTHER, json={"resources": []})) == (
        400,
        "No resources provided",
    )
    assert refusal(await http.get("/v1/ops/resource/share/list", headers=OWNER))[0] == 405


async def test_revoke_takes_permissions_away_and_discard_gives_them_back(
    http: httpx.AsyncClient,
) -> None:
    url = f"conversations/{MINE}/rw"
    await put(http, url)
    invitation = await share(http, [{"url": url, "permissions": ["READ", "WRITE"]}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert (await accept(http, invitation, THIRD)).status_code == 200
    revoke = "/v1/ops/resource/share/revoke"
    answer = await http.post(
        revoke, headers=OWNER, json={"resources": [{"url": url, "permissions": ["WRITE"]}]}
    )
    assert answer.status_code == 200
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 200
    assert (await http.put(f"/v1/{url}", headers=OTHER, json={})).status_code == 403
    # The invitation now gives READ only.
    left = (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).json()
    assert left["resources"] == [{"url": url, "permissions": ["READ"]}]
    assert (await listed(http, OTHER, "me"))[0]["permissions"] == ["READ"]

    # The recipient discards: gone for it, kept for the third project.
    discard = "/v1/ops/resource/share/discard"
    answer = await http.post(discard, headers=OTHER, json={"resources": [{"url": url}]})
    assert answer.status_code == 200
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 403
    assert await listed(http, OTHER, "me") == []
    assert (await http.get(f"/v1/{url}", headers=THIRD)).status_code == 200
    shared_with = (await listed(http, OWNER, "others", includeUserInfo=True))[0]["sharedWith"]
    assert shared_with == [{"user": "third", "permissions": ["READ"]}]

    # Revoking everything: nobody reads it, and the invitation, left with nothing, is gone.
    answer = await http.post(revoke, headers=OWNER, json={"resources": [{"url": url}]})
    assert answer.status_code == 200
    assert (await http.get(f"/v1/{url}", headers=THIRD)).status_code == 403
    assert (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).status_code == 404
    assert await listed(http, OWNER, "others") == []


async def test_a_shared_folder_covers_everything_below_it(http: httpx.AsyncClient) -> None:
    await put(http, f"conversations/{MINE}/team/a")
    await put(http, f"conversations/{MINE}/team/sub/b")
    await put(http, f"conversations/{MINE}/private")
    await put(http, f"prompts/{MINE}/team/p", {"content": "x"})
    invitation = await share(http, [{"url": f"conversations/{MINE}/team/"}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert (
        await http.get(f"/v1/conversations/{MINE}/team/sub/b", headers=OTHER)
    ).status_code == 200
    folder = await http.get(f"/v1/metadata/conversations/{MINE}/team/", headers=OTHER)
    assert folder.status_code == 200
    assert [item["name"] for item in folder.json()["items"]] == ["a", "sub"]
    assert (await http.get(f"/v1/conversations/{MINE}/private", headers=OTHER)).status_code == 403
    # A folder share is of its type only.
    assert (await http.get(f"/v1/prompts/{MINE}/team/p", headers=OTHER)).status_code == 403
    entry = (await listed(http, OTHER, "me"))[0]
    assert entry["nodeType"] == "FOLDER" and entry["items"] is None
    assert entry["url"] == f"conversations/{MINE}/team/"


async def test_share_copy_gives_the_recipients_the_new_resource(http: httpx.AsyncClient) -> None:
    source, target = f"conversations/{MINE}/s", f"files/{MINE}/attachment.txt"
    await put(http, source)
    upload = await http.put(
        f"/v1/{target}", headers=OWNER, files={"attachment": ("attachment.txt", b"hello")}
    )
    assert upload.status_code == 200
    invitation = await share(http, [{"url": source}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert (await http.get(f"/v1/{target}", headers=OTHER)).status_code == 403
    copy = "/v1/ops/resource/share/copy"
    answer = await http.post(
        copy, headers=OWNER, json={"sourceUrl": source, "destinationUrl": target}
    )
    assert answer.status_code == 200, answer.text
    got = await http.get(f"/v1/{target}", headers=OTHER)
    assert got.status_code == 200 and got.content == b"hello"
    assert [e["url"] for e in await listed(http, OTHER, "me", "FILE")] == [target]
    missing = f"files/{MINE}/missing.txt"
    cases = [
        ({"destinationUrl": target}, "sourceUrl must be provided"),
        ({"sourceUrl": source}, "destinationUrl must be provided"),
        (
            {"sourceUrl": source, "destinationUrl": source},
            "source and destination cannot be the same",
        ),
        (
            {"sourceUrl": f"conversations/{THEIRS}/x", "destinationUrl": target},
            "sourceUrl does not belong to the user",
        ),
        (
            {"sourceUrl": source, "destinationUrl": f"files/{THEIRS}/x"},
            "destinationUrl does not belong to the user",
        ),
        (
            {"sourceUrl": missing, "destinationUrl": target},
            f"source resource {missing} does not exists",
        ),
        (
            {"sourceUrl": source, "destinationUrl": missing},
            f"destination resource {missing} dos not exists",
        ),
    ]
    for body, message in cases:
        assert refusal(await http.post(copy, headers=OWNER, json=body)) == (400, message), body
    answer = await http.post(copy, headers=OWNER, content=b"[")
    assert refusal(answer) == (
        400,
        "Can't initiate copy shared access request. Incorrect body provided",
    )


# --- limits -----------------------------------------------------------------------------------


async def start_with_roles(
    gateways: Gateways, tmp_path: Path, roles: dict[str, Any], **more: Any
) -> InProcessGateway:
    cfg = config(roles)
    for key in (OWNER_KEY,):
        cfg["keys"][key]["roles"] = list(more.pop("owner_roles", ["basic"]))
    return await gateways.start([cfg], settings=settings(tmp_path / "store", **more))


async def test_max_accepted_users_is_dials_limit(gateways: Gateways, tmp_path: Path) -> None:
    roles = {
        "basic": {"share": {"CONVERSATION": {"max_accepted_users": "1"}}},
    }
    gw = await start_with_roles(gateways, tmp_path, roles)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        url = f"conversations/{MINE}/limited"
        await put(http, url)
        invitation = await share(http, [{"url": url}])
        assert (await accept(http, invitation, OTHER)).status_code == 200
        assert refusal(await accept(http, invitation, THIRD)) == (400, f"{LIMIT_EXCEEDED}{url}")
        assert (await http.get(f"/v1/{url}", headers=THIRD)).status_code == 403
        # The one who accepted may accept again (already counted).
        assert (await accept(http, invitation, OTHER)).status_code == 200


async def test_limits_per_field_across_roles_ttl_and_the_snapshot(
    gateways: Gateways, tmp_path: Path
) -> None:
    roles = {
        "basic": {"share": {"CONVERSATION": {"max_accepted_users": 1, "invitation_ttl": 100}}},
        "team": {
            "share": {
                "CONVERSATION": {"max_accepted_users": 2, "invitation_ttl": -1},
                "PROMPT": {"invitation_ttl": "5"},
            }
        },
    }
    gw = await start_with_roles(gateways, tmp_path, roles, owner_roles=["basic", "team"])
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        conversation, prompt = f"conversations/{MINE}/c", f"prompts/{MINE}/p"
        await put(http, conversation)
        await put(http, prompt, {"content": "x"})
        only_conversation = await share(http, [{"url": conversation}])
        body = (await http.get(f"/v1/invitations/{only_conversation}", headers=OWNER)).json()
        # max(100, default 72) hours: -1 is the default, and it takes part in the max.
        assert body["expireAt"] - body["createdAt"] == 100 * HOUR_MS
        both = await share(http, [{"url": conversation}, {"url": prompt}])
        body = (await http.get(f"/v1/invitations/{both}", headers=OWNER)).json()
        assert body["expireAt"] - body["createdAt"] == 5 * HOUR_MS  # the shortest TTL
        # max(1, 2) recipients for the conversation; the prompt is unlimited by default.
        assert (await accept(http, both, OTHER)).status_code == 200
        assert (await accept(http, both, THIRD)).status_code == 200
        assert refusal(await accept(http, both, {"Api-Key": crowd_key(0)})) == (
            400,
            f"{LIMIT_EXCEEDED}{conversation}",
        )
        # All or nothing: the prompt was not granted to the refused caller.
        assert (
            await http.get(f"/v1/{prompt}", headers={"Api-Key": crowd_key(0)})
        ).status_code == 403

        # The limit is snapshotted at share time: a role change later does not move it...
        role = await http.put(
            "/v1/roles/platform/team",
            headers=ADMIN,
            json={"share": {"CONVERSATION": {"max_accepted_users": 5}}},
        )
        assert role.status_code == 200, role.text
        assert refusal(await accept(http, both, {"Api-Key": crowd_key(1)}))[0] == 400
        # ...until the owner shares it again (the latest share wins).
        again = await share(http, [{"url": conversation}])
        for index in (1, 2, 3):
            assert (await accept(http, again, {"Api-Key": crowd_key(index)})).status_code == 200
        assert refusal(await accept(http, again, {"Api-Key": crowd_key(4)})) == (
            400,
            f"{LIMIT_EXCEEDED}{conversation}",
        )


async def test_applications_default_to_ten_recipients(gateways: Gateways, tmp_path: Path) -> None:
    gw = await start_with_roles(gateways, tmp_path, {})
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        url = f"applications/{MINE}/app"
        await put(http, url, {"endpoint": "http://127.0.0.1:9/v1/chat/completions"})
        invitation = await share(http, [{"url": url}])
        answers = [await accept(http, invitation, {"Api-Key": crowd_key(i)}) for i in range(11)]
        assert [a.status_code for a in answers] == [200] * 10 + [400]
        assert refusal(answers[-1]) == (400, f"{LIMIT_EXCEEDED}{url}")


async def test_an_expired_invitation_is_not_found(
    gw: InProcessGateway, http: httpx.AsyncClient
) -> None:
    url = f"conversations/{MINE}/soon"
    await put(http, url)
    invitation = await share(http, [{"url": url}])
    gw.clock.advance(72 * HOUR_MS + 1000)
    message = f"No invitation found for ID {invitation}"
    assert refusal(await http.get(f"/v1/invitations/{invitation}", headers=OTHER)) == (404, message)
    assert refusal(await accept(http, invitation, OTHER)) == (404, message)
    assert (await http.get("/v1/invitations", headers=OWNER)).json() == {"invitations": []}


async def test_invitations_ttl_in_seconds_sets_the_default_ttl(
    gateways: Gateways, tmp_path: Path
) -> None:
    gw = await gateways.start(
        [config()], settings=settings(tmp_path / "s", invitations={"ttlInSeconds": 60})
    )
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        await put(http, f"conversations/{MINE}/x")
        invitation = await share(http, [{"url": f"conversations/{MINE}/x"}])
        body = (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).json()
        assert body["expireAt"] - body["createdAt"] == 60_000


async def test_the_invitations_own_cap(http: httpx.AsyncClient) -> None:
    url = f"conversations/{MINE}/capped"
    await put(http, url)
    invitation = await share(http, [{"url": url}], maxAcceptedUsers=2)
    assert (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).json()[
        "maxAcceptedUsers"
    ] == 2
    assert (await accept(http, invitation, OTHER)).status_code == 200
    assert (await accept(http, invitation, THIRD)).status_code == 200
    assert refusal(await accept(http, invitation, {"Api-Key": crowd_key(0)})) == (
        400,
        "The limit of maximum accepted invites is reached",
    )
    assert (await accept(http, invitation, OTHER)).status_code == 200  # already in


async def test_a_burst_of_accepts_never_admits_more_than_the_limit(
    gateways: Gateways, tmp_path: Path
) -> None:
    roles = {"basic": {"share": {"CONVERSATION": {"max_accepted_users": 5}}}}
    gw = await start_with_roles(gateways, tmp_path, roles)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as http:
        url = f"conversations/{MINE}/popular"
        await put(http, url)
        invitation = await share(http, [{"url": url}])
        answers = await asyncio.gather(
            *(accept(http, invitation, {"Api-Key": crowd_key(i)}) for i in range(CROWD))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200] * 5 + [400] * (CROWD - 5)
        for answer in answers:
            if answer.status_code == 400:
                assert refusal(answer) == (400, f"{LIMIT_EXCEEDED}{url}")
        readers = [
            i
            for i in range(CROWD)
            if (await http.get(f"/v1/{url}", headers={"Api-Key": crowd_key(i)})).status_code == 200
        ]
        winners = [i for i, a in enumerate(answers) if a.status_code == 200]
        assert readers == winners
        shared_with = (await listed(http, OWNER, "others", includeUserInfo=True))[0]["sharedWith"]
        assert len(shared_with) == 5


# --- moves and copies ---------------------------------------------------------------------


async def test_move_and_copy_as_dial(http: httpx.AsyncClient) -> None:
    move = "/v1/ops/resource/move"
    source, target = f"conversations/{MINE}/a", f"conversations/{MINE}/moved/b"
    await put(http, source)
    await put(http, target, {"id": "old"})
    body = {"sourceUrl": source, "destinationUrl": target}
    assert refusal(await http.post(move, headers=OWNER, json=body)) == (
        400,
        f"Can't move resource {source} to {target}, because destination resource already exists",
    )
    invitation = await share(http, [{"url": source}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    answer = await http.post(move, headers=OWNER, json={**body, "overwrite": True})
    assert answer.status_code == 200, answer.text
    assert (await http.get(f"/v1/{source}", headers=OWNER)).status_code == 404
    assert (await http.get(f"/v1/{target}", headers=OWNER)).json() == CONVERSATION
    # Within the bucket the share follows the resource, and so does the invitation.
    assert (await http.get(f"/v1/{target}", headers=OTHER)).status_code == 200
    assert [e["url"] for e in await listed(http, OTHER, "me")] == [target]
    moved = (await http.get(f"/v1/invitations/{invitation}", headers=OWNER)).json()
    assert moved["resources"][0]["url"] == target

    cases: list[tuple[dict[str, Any], tuple[int, str]]] = [
        ({"destinationUrl": target}, (400, "sourceUrl must be provided")),
        ({"sourceUrl": target}, (400, "destinationUrl must be provided")),
        (
            {"sourceUrl": target, "destinationUrl": f"prompts/{MINE}/x"},
            (400, "source and destination resources must be the same type"),
        ),
        (
            {"sourceUrl": target, "destinationUrl": target},
            (400, "source and destination resources cannot be the same"),
        ),
        (
            {
                "sourceUrl": f"conversations/{MINE}/moved/",
                "destinationUrl": f"conversations/{MINE}/x/",
            },
            (400, "Moving folders is not supported"),
        ),
        (
            {
                "sourceUrl": f"conversations/{MINE}/none",
                "destinationUrl": f"conversations/{MINE}/y",
            },
            (400, f"Source resource conversations/{MINE}/none does not exist"),
        ),
        (
            {"sourceUrl": f"conversations/{THEIRS}/x", "destinationUrl": f"conversations/{MINE}/y"},
            (403, "no read and write access to source resource"),
        ),
        (
            {"sourceUrl": target, "destinationUrl": f"conversations/{THEIRS}/y"},
            (403, "no write access to destination resource"),
        ),
    ]
    for case, expected in cases:
        assert refusal(await http.post(move, headers=OWNER, json=case)) == expected, case
    # A recipient with READ may copy into its own bucket, not move.
    copy = "/v1/ops/resource/copy"
    mine = f"conversations/{THEIRS}/copied"
    assert refusal(
        await http.post(move, headers=OTHER, json={"sourceUrl": target, "destinationUrl": mine})
    ) == (403, "no read and write access to source resource")
    answer = await http.post(
        copy, headers=OTHER, json={"sourceUrl": target, "destinationUrl": mine}
    )
    assert answer.status_code == 200, answer.text
    assert (await http.get(f"/v1/{mine}", headers=OTHER)).json() == CONVERSATION
    assert (await http.get(f"/v1/{target}", headers=OWNER)).status_code == 200  # copy keeps it


async def test_a_move_to_another_bucket_drops_the_shares(http: httpx.AsyncClient) -> None:
    source, target = f"conversations/{MINE}/to-public", "conversations/public/published"
    await put(http, source)
    invitation = await share(http, [{"url": source}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    move = "/v1/ops/resource/move"
    body = {"sourceUrl": source, "destinationUrl": target}
    # Only administrators write the public bucket...
    assert refusal(await http.post(move, headers=OWNER, json=body)) == (
        403,
        "no write access to destination resource",
    )
    # ...and an administrator moves the owner's resource there.
    assert (await http.post(move, headers=ADMIN, json=body)).status_code == 200
    assert (await http.get(f"/v1/{target}", headers=THIRD)).status_code == 200
    assert (await http.get("/v1/invitations", headers=OWNER)).json() == {"invitations": []}
    assert await listed(http, OTHER, "me") == []


async def test_aidial_client_moves_and_copies_files(gw: InProcessGateway) -> None:
    client = AsyncDial(base_url=gw.url, api_key=OWNER_KEY)
    await client.files.upload(f"files/{MINE}/a.txt", ("a.txt", b"alpha", "text/plain"))
    await client.files.copy_to(f"files/{MINE}/a.txt", f"files/{MINE}/b.txt")
    await client.files.move_to(f"files/{MINE}/a.txt", f"files/{MINE}/c/a.txt")
    for url in (f"files/{MINE}/b.txt", f"files/{MINE}/c/a.txt"):
        downloaded = await client.files.download(url)
        assert b"".join([chunk async for chunk in downloaded]) == b"alpha"
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get(f"/v1/files/{MINE}/a.txt", headers=OWNER)).status_code == 404


# --- per-request keys ---------------------------------------------------------------------


async def test_per_request_keys_get_dials_403_on_the_share_api(
    gateways: Gateways, tmp_path: Path
) -> None:
    """An application, called by the owner, tries the Share API with its per-request key."""
    seen: list[tuple[str, int, str]] = []
    where: dict[str, str] = {}

    async def application(request: web.Request) -> web.Response:
        key = {"Api-Key": request.headers["Api-Key"]}
        async with httpx.AsyncClient(base_url=where["gateway"], timeout=30) as http:
            for method, path, body in (
                ("POST", "/v1/ops/resource/share/create", {"resources": [{"url": "x"}]}),
                ("POST", "/v1/ops/resource/share/list", {"resourceTypes": ["FILE"]}),
                ("GET", "/v1/invitations", None),
            ):
                answer = await http.request(method, path, headers=key, json=body)
                seen.append((path, answer.status_code, answer.json()["error"]["message"]))
        return web.json_response(
            {
                "id": "1",
                "object": "chat.completion",
                "created": 0,
                "model": "share-app",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    app = web.Application()
    app.router.add_post("/{tail:.*}", application)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        endpoint = f"http://127.0.0.1:{port}/openai/deployments/share-app/chat/completions"
        cfg = config(applications={"share-app": {"endpoint": endpoint}})
        gw = await gateways.start([cfg], settings=settings(tmp_path / "s"))
        where["gateway"] = gw.url
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            answer = await http.post(
                "/openai/deployments/share-app/chat/completions",
                headers=OWNER,
                json={"messages": [{"role": "user", "content": "hi"}]},
            )
            assert answer.status_code == 200, answer.text
    finally:
        await runner.cleanup()
    message = "The Share API is not allowed for per-request keys"
    assert [(path, status, text) for path, status, text in seen] == [
        ("/v1/ops/resource/share/create", 403, message),
        ("/v1/ops/resource/share/list", 403, message),
        ("/v1/invitations", 403, message),
    ]


async def test_an_owner_has_a_bounded_number_of_open_invitations(
    gw: InProcessGateway, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tollgate.http import resource_ops

    monkeypatch.setattr(resource_ops, "MAX_INVITATIONS", 3)
    url = f"conversations/{MINE}/many"
    await put(http, url)
    made = [await share(http, [{"url": url}]) for _ in range(3)]
    answer = await http.post(
        "/v1/ops/resource/share/create", headers=OWNER, json={"resources": [{"url": url}]}
    )
    assert refusal(answer) == (
        400,
        "Too many invitations: at most 3 may be open at once; delete some or let them expire",
    )
    # Deleting one, or letting them expire, makes room again.
    assert (await http.delete(f"/v1/invitations/{made[0]}", headers=OWNER)).status_code == 200
    await share(http, [{"url": url}])
    gw.clock.advance(73 * HOUR_MS)
    for _ in range(3):
        await share(http, [{"url": url}])


async def test_a_retried_delete_finishes_the_clean_up_of_shares(
    gw: InProcessGateway, http: httpx.AsyncClient
) -> None:
    """A delete whose share clean-up did not happen (the object is gone, the owner's record
    still grants it): the retried DELETE answers 404 and drops the grants, so a resource made
    again at the URL is not shared."""
    url = f"conversations/{MINE}/half-deleted"
    await put(http, url)
    invitation = await share(http, [{"url": url}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    await gw.gateway.resource_store.delete("Keys/EPM-RTC-GPT/conversations/half-deleted")
    assert (await http.delete(f"/v1/{url}", headers=OWNER)).status_code == 404
    await put(http, url)
    assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 403
    assert (await http.get("/v1/invitations", headers=OWNER)).json() == {"invitations": []}


async def test_a_moved_application_is_named_by_its_new_url(http: httpx.AsyncClient) -> None:
    source, target = f"applications/{MINE}/app", f"applications/{MINE}/apps/renamed"
    await put(http, source, {"endpoint": "http://127.0.0.1:9/v1/chat/completions"})
    reference = (await http.get(f"/v1/{source}", headers=OWNER)).json()["reference"]
    for operation, destination in (("copy", f"{target}-copy"), ("move", target)):
        answer = await http.post(
            f"/v1/ops/resource/{operation}",
            headers=OWNER,
            json={"sourceUrl": source, "destinationUrl": destination},
        )
        assert answer.status_code == 200, answer.text
        moved = (await http.get(f"/v1/{destination}", headers=OWNER)).json()
        assert moved["name"] == destination
        assert moved["endpoint"] == "http://127.0.0.1:9/v1/chat/completions"
        assert moved["reference"] == reference
    assert (await http.get(f"/v1/{source}", headers=OWNER)).status_code == 404


async def test_a_reader_of_a_custom_application_gets_its_application_data(
    http: httpx.AsyncClient,
) -> None:
    """Spec 6.2: the definition (its endpoint) is for those who may write it; a caller that
    may only read it, by a share or in `public`, gets DIAL's ApplicationData."""
    url = f"applications/{MINE}/shared-app"
    endpoint = "http://10.1.2.3:8080/secret-path/v1/chat/completions"
    await put(http, url, {"endpoint": endpoint, "displayName": "Shared app"})
    full = (await http.get(f"/v1/{url}", headers=OWNER)).json()
    assert full["endpoint"] == endpoint and full["name"] == url
    invitation = await share(http, [{"url": url}])
    assert (await accept(http, invitation, OTHER)).status_code == 200
    seen = await http.get(f"/v1/{url}", headers=OTHER)
    assert seen.status_code == 200, seen.text
    data = seen.json()
    assert data["id"] == url and data["application"] == url
    assert data["display_name"] == "Shared app"
    assert "endpoint" not in data and "secret-path" not in seen.text
    etag = seen.headers["ETag"]
    again = await http.get(f"/v1/{url}", headers={**OTHER, "If-None-Match": etag})
    assert again.status_code == 304 and again.headers["ETag"] == etag
    stale = await http.get(f"/v1/{url}", headers={**OTHER, "If-Match": "other"})
    assert refusal(stale) == (412, f"If-match condition is failed for etag: {etag}")
    # With WRITE as well, the recipient sees the definition.
    both = await share(http, [{"url": url, "permissions": ["READ", "WRITE"]}])
    assert (await accept(http, both, OTHER)).status_code == 200
    assert (await http.get(f"/v1/{url}", headers=OTHER)).json()["endpoint"] == endpoint
    # Public: administrators write it, everyone else reads its ApplicationData.
    public = "applications/public/team-app"
    await put(http, public, {"endpoint": endpoint}, who=ADMIN)
    assert (await http.get(f"/v1/{public}", headers=ADMIN)).json()["endpoint"] == endpoint
    seen = await http.get(f"/v1/{public}", headers=THIRD)
    assert seen.status_code == 200 and "endpoint" not in seen.json()


async def test_one_request_names_a_bounded_number_of_resources(http: httpx.AsyncClient) -> None:
    many = [{"url": f"files/{MINE}/f{i}"} for i in range(5001)]
    for action in ("create", "revoke", "discard"):
        answer = await http.post(
            f"/v1/ops/resource/share/{action}", headers=OWNER, json={"resources": many}
        )
        assert refusal(answer) == (400, "Too many resources: at most 5000 in one request")
    assert await share(http, many[:5000])  # the bound itself is allowed


# --- re-sharing (newest DIAL) -------------------------------------------------------------


async def test_a_recipient_with_share_re_shares_read_only(
    gateways: Gateways, tmp_path: Path
) -> None:
    roles = {"basic": {"share": {"CONVERSATION": {"max_accepted_users": 3}}}}
    gw = await start_with_roles(gateways, tmp_path, roles)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        folder, url = f"conversations/{MINE}/team/", f"conversations/{MINE}/team/plan"
        await put(http, url)
        first = await share(http, [{"url": folder, "permissions": ["READ", "SHARE"]}])
        assert (await accept(http, first, OTHER)).status_code == 200
        # The owner's own share of the conversation snapshots its limit (3); a re-share
        # snapshots none, and a URL never shared by its owner has the type's default (DIAL).
        await share(http, [{"url": url}])
        meta = await http.get(f"/v1/metadata/{url}", params={"permissions": "true"}, headers=OTHER)
        assert meta.json()["permissions"] == ["READ", "SHARE"]

        # The recipient re-shares a conversation under the folder: READ only.
        create = "/v1/ops/resource/share/create"
        answer = await http.post(
            create,
            headers=OTHER,
            json={"resources": [{"url": url, "permissions": ["READ", "WRITE"]}]},
        )
        assert refusal(answer) == (
            400,
            f"Re-shared resource {url} is not allowed to be shared with the permission WRITE",
        )
        again = await share(http, [{"url": url}], who=OTHER)
        seen = (await http.get(f"/v1/invitations/{again}", headers=OTHER)).json()
        assert seen["author"] == "EPM-RTC-RAIL"
        assert seen["resources"] == [
            {
                "url": url,
                "permissions": ["READ"],
                "author": "EPM-RTC-GPT",
                "sharedBy": "EPM-RTC-RAIL",
            }
        ]
        assert "createdBy" not in seen
        # It is the re-sharer's invitation: listed and deletable by it, not by the owner's list.
        mine = (await http.get("/v1/invitations", headers=OTHER)).json()["invitations"]
        assert [inv["id"] for inv in mine] == [again]
        owned = (await http.get("/v1/invitations", headers=OWNER)).json()["invitations"]
        assert first in [inv["id"] for inv in owned] and again not in [inv["id"] for inv in owned]

        assert (await accept(http, again, THIRD)).status_code == 200
        assert (await http.get(f"/v1/{url}", headers=THIRD)).status_code == 200
        assert (await http.put(f"/v1/{url}", headers=THIRD, json={})).status_code == 403
        # Without SHARE, no further re-share.
        answer = await http.post(create, headers=THIRD, json={"resources": [{"url": url}]})
        assert refusal(answer) == (400, f"Resource {url} is not allowed to be shared by the user")
        # The owner's limit counts every recipient of the URL, however they came (OTHER holds
        # the folder, another URL: THIRD and two more fill the conversation's 3).
        assert (await accept(http, again, {"Api-Key": crowd_key(0)})).status_code == 200
        assert (await accept(http, again, {"Api-Key": crowd_key(1)})).status_code == 200
        assert refusal(await accept(http, again, {"Api-Key": crowd_key(2)})) == (
            400,
            f"{LIMIT_EXCEEDED}{url}",
        )
        assert refusal(await http.delete(f"/v1/invitations/{again}", headers=THIRD)) == (
            403,
            "You are not invitation owner",
        )

        # The owner takes SHARE back: the re-share can no longer be accepted, and the
        # re-sharer deletes it.
        revoke = await http.post(
            "/v1/ops/resource/share/revoke",
            headers=OWNER,
            json={"resources": [{"url": folder, "permissions": ["SHARE"]}]},
        )
        assert revoke.status_code == 200
        assert (await http.get(f"/v1/{url}", headers=OTHER)).status_code == 200  # READ stays
        assert (await accept(http, again, {"Api-Key": crowd_key(3)})).status_code == 404
        assert (await http.delete(f"/v1/invitations/{again}", headers=OTHER)).status_code == 200
        assert (await http.get("/v1/invitations", headers=OTHER)).json() == {"invitations": []}
        answer = await http.post(create, headers=OTHER, json={"resources": [{"url": url}]})
        assert refusal(answer) == (400, f"Resource {url} is not allowed to be shared by the user")


async def test_a_rate_call_is_never_taken_for_a_resource(http: httpx.AsyncClient) -> None:
    """`POST /v1/<id>/rate` is the feature endpoint whatever the id starts with."""
    for deployment in ("files", f"applications/{MINE}/app", "conversations/x"):
        answer = await http.post(f"/v1/{deployment}/rate", headers=OWNER, json={"responseId": "r"})
        assert refusal(answer) == (404, f"Unknown application: {deployment}"), deployment
