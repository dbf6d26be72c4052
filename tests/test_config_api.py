"""DIAL's Configuration API for keys and roles, and the key lifecycle (compatibility C81).

Real HTTP to an in-process Tollgate whose resource store is a folder of the test's own, and a
fake model upstream: keys made, changed, rotated, expired and deleted at run time must work (or
stop working) on the very next call, the secret must never come back, and every change must be
in the audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway_config import chat, error_of
from harness import FakeModel, start_gateway, stop
from inprocess import Gateways, InProcessFake, InProcessGateway

ADMIN_KEY = "config-api-admin-key-0123456789abcdef"
USER_KEY = "config-api-user-key-0123456789abcdef"
ADMIN = {"Api-Key": ADMIN_KEY}


def config(fake: InProcessFake) -> dict[str, Any]:
    return {
        "models": {
            "m": {"endpoint": fake.endpoint("m"), "userRoles": ["basic", "team"]},
            "limited": {"endpoint": fake.endpoint("limited"), "userRoles": ["metered"]},
        },
        "keys": {
            ADMIN_KEY: {"project": "ops", "roles": ["admin", "basic"]},
            USER_KEY: {"project": "users", "role": "basic"},
        },
        "roles": {"basic": {"limits": {}}, "admin": {}},
    }


def settings(folder: Path) -> dict[str, Any]:
    return {
        "access": {
            "admin": {"rules": [{"function": "EQUAL", "source": "roles", "targets": ["admin"]}]}
        },
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
    }


async def start(gateways: Gateways, fake: InProcessFake, folder: Path) -> InProcessGateway:
    return await gateways.start([config(fake)], settings=settings(folder))


async def call(
    client: httpx.AsyncClient, gw: InProcessGateway, key: str, model: str = "m"
) -> httpx.Response:
    return await client.post(
        f"{gw.url}/openai/deployments/{model}/chat/completions",
        headers={"Api-Key": key},
        json=chat(),
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "store"


async def test_a_key_made_at_run_time_works_at_once_and_its_secret_is_shown_once(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/ci-runner",
            headers=ADMIN,
            json={"project": "ci", "roles": ["basic"], "description": "the CI"},
        )
        assert made.status_code == 200, made.text
        secret = made.json()["key"]
        assert made.json() == {"name": "ci-runner", "key": secret}
        assert len(secret) >= 43 and made.headers["ETag"]
        assert made.headers["Cache-Control"] == "no-store"

        assert (await call(client, gw, secret)).status_code == 200

        shown = await client.get(f"{gw.url}/v1/keys/platform/ci-runner", headers=ADMIN)
        assert shown.status_code == 200
        body = shown.json()
        assert secret not in shown.text and "key" not in body
        assert body["project"] == "ci" and body["roles"] == ["basic"]
        assert body["status"] == "valid" and body["name"] == "ci-runner"
        assert body["fingerprint"] == hashlib.sha256(secret.encode()).hexdigest()[:8]
        assert shown.headers["ETag"] == made.headers["ETag"]

        # Who made it, as the listing says; the listing has no secret either.
        listing = await client.get(f"{gw.url}/v1/metadata/keys/platform/", headers=ADMIN)
        assert listing.status_code == 200
        items = listing.json()["items"]
        assert [item["name"] for item in items] == ["ci-runner"]
        assert items[0]["url"] == "keys/platform/ci-runner"
        assert items[0]["resourceType"] == "PROJECT_KEY" and items[0]["nodeType"] == "ITEM"
        assert "ops" in items[0]["author"] and secret not in listing.text

    # What the store keeps: the SHA-256 of the secret, never the secret.
    stored = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


async def test_only_administrators_reach_the_api(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        for method, path in (
            ("PUT", "/v1/keys/platform/x"),
            ("GET", "/v1/keys/platform/x"),
            ("DELETE", "/v1/roles/platform/x"),
            ("GET", "/v1/metadata/keys/platform/"),
            ("POST", "/v1/metadata/roles/platform/"),  # the caller first, then the method
            ("POST", "/v1/ops/keys/x/rotate"),
            ("GET", "/v1/admin/audit"),
            ("POST", "/v1/admin/apply"),
        ):
            refused = await client.request(
                method, gw.url + path, headers={"Api-Key": USER_KEY}, json={"project": "p"}
            )
            assert error_of(refused) == (403, "User must be admin"), (method, path)
        unknown = await client.get(f"{gw.url}/v1/keys/platform/x", headers={"Api-Key": "nope"})
        assert error_of(unknown) == (401, "Unknown api key")
        # Another bucket is not found, before the caller's rights are looked at (DIAL's order).
        other = await client.get(f"{gw.url}/v1/keys/public/x", headers={"Api-Key": USER_KEY})
        assert other.status_code == 404


async def test_dial_order_of_checks_names_methods_and_conditions(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    url = f"{gw.url}/v1/keys/platform"
    async with httpx.AsyncClient() as client:
        for bad in ("a%2Fb", "sp%20ace", "%2E%2E", "caf%C3%A9"):
            answer = await client.put(
                f"{url}/{bad}", headers=ADMIN, json={"project": "p", "role": "basic"}
            )
            assert error_of(answer) == (
                400,
                "Invalid entity name segment: must match ^[A-Za-z0-9._%:-]+$",
            ), bad
        posted = await client.post(f"{url}/fine", headers=ADMIN, json={})
        assert error_of(posted) == (405, "Not implemented")
        assert posted.headers["Allow"] == "GET, PUT, DELETE"
        listing = await client.delete(f"{gw.url}/v1/metadata/keys/platform/", headers=ADMIN)
        assert listing.status_code == 405 and listing.headers["Allow"] == "GET"

        created = await client.put(
            f"{url}/k1",
            headers={**ADMIN, "If-None-Match": "*"},
            json={"project": "p", "role": "basic"},
        )
        assert created.status_code == 200
        etag = created.headers["ETag"]
        again = await client.put(
            f"{url}/k1",
            headers={**ADMIN, "If-None-Match": "*"},
            json={"project": "p", "role": "basic"},
        )
        assert error_of(again) == (412, "Resource already exists")
        stale = await client.put(
            f"{url}/k1",
            headers={**ADMIN, "If-Match": "not-it"},
            json={"project": "q", "role": "basic"},
        )
        assert error_of(stale) == (412, "ETag not-it is rejected")
        fresh = await client.put(
            f"{url}/k1",
            headers={**ADMIN, "If-Match": f'"{etag}"'},
            json={"project": "q", "role": "basic"},
        )
        assert fresh.status_code == 200 and fresh.headers["ETag"] != etag
        # An update without `key` keeps the secret: no new one is shown.
        assert "key" not in fresh.json()
        unchanged = await client.get(
            f"{url}/k1", headers={**ADMIN, "If-None-Match": fresh.headers["ETag"]}
        )
        assert unchanged.status_code == 304
        weird = await client.put(
            f"{url}/k1",
            headers={**ADMIN, "If-None-Match": "abc"},
            json={"project": "q", "role": "basic"},
        )
        assert error_of(weird) == (400, "only header if-none-match=* is supported")
        missing = await client.put(
            f"{url}/nope",
            headers={**ADMIN, "If-Match": etag},
            json={"project": "q", "role": "basic"},
        )
        assert missing.status_code == 412
        gone = await client.delete(f"{url}/never-made", headers=ADMIN)
        assert error_of(gone) == (404, "Resource not found: keys/platform/never-made")
        stale_delete = await client.delete(f"{url}/k1", headers={**ADMIN, "If-Match": etag})
        assert stale_delete.status_code == 412
        deleted = await client.delete(
            f"{url}/k1", headers={**ADMIN, "If-Match": fresh.headers["ETag"]}
        )
        assert deleted.status_code == 204 and deleted.content == b""
        assert (await client.get(f"{url}/k1", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"roles": ["basic"]}, "Project key is undefined"),
        ({"project": "p"}, "Invalid key: at least one role must be assigned to the key p"),
        (
            {"project": "p", "roles": ["ghost"]},
            'Role "ghost" is not defined in roles and no userRoles lists it',
        ),
        (
            {"project": "p", "role": "basic", "allowedIpAddressRanges": ["1.2.3.4"]},
            "allowedIpAddressRanges: Invalid CIDR: 1.2.3.4",
        ),
        (
            {"project": "p", "role": "basic", "expiresAt": "tomorrow"},
            "expiresAt: expected an ISO 8601 date and time with its offset, such as "
            "2027-01-31T00:00:00Z",
        ),
        (
            {"project": "p", "role": "basic", "expiresAt": "2020-01-01T00:00:00Z"},
            "expiresAt: 2020-01-01T00:00:00.000Z is not later than the current time",
        ),
        (
            {"project": "p", "role": "basic", "apiKey": "s3cr3t-in-a-typo"},
            "Unknown field: apiKey (a key has project, roles, role, secured, "
            "allowedIpAddressRanges, expiresAt, description, displayName and key)",
        ),
        (
            {"project": "p", "role": "basic", "key": ADMIN_KEY},
            "Key secret is already used by a different key entity",
        ),
    ],
)
async def test_invalid_keys_get_400_and_nothing_is_written(
    gateways: Gateways, afake: InProcessFake, folder: Path, body: dict[str, Any], message: str
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        answer = await client.put(f"{gw.url}/v1/keys/platform/bad", headers=ADMIN, json=body)
        assert error_of(answer) == (400, message)
        assert "s3cr3t" not in answer.text
        assert (
            await client.get(f"{gw.url}/v1/keys/platform/bad", headers=ADMIN)
        ).status_code == 404
        for raw, expected in (
            (b"", "Request body must not be empty"),
            (b"[1]", "Request body must be a JSON object"),
            (b'{"key": "s3cr3t-unterminated', "Invalid JSON at line 1, column 29"),
        ):
            answer = await client.put(f"{gw.url}/v1/keys/platform/bad", headers=ADMIN, content=raw)
            assert error_of(answer) == (400, expected)
            assert "s3cr3t" not in answer.text
    assert not (folder / "dial" / "platform" / "keys").exists() or not any(
        (folder / "dial" / "platform" / "keys").iterdir()
    )


async def test_expiry_rotation_and_revocation_take_effect_on_the_next_call(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    if not gw.clock_injected:
        pytest.skip("the gateway reads the real clock")
    now = gw.clock()
    expires = now + 3_600_000
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/short-lived",
            headers=ADMIN,
            json={"project": "temp", "role": "basic", "expiresAt": expires},
        )
        old = made.json()["key"]
        assert (await call(client, gw, old)).status_code == 200

        rotated = await client.post(
            f"{gw.url}/v1/ops/keys/short-lived/rotate",
            headers=ADMIN,
            json={"gracePeriodSeconds": 60},
        )
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["key"]
        assert (
            new != old
            and rotated.json()["fingerprint"] == hashlib.sha256(new.encode()).hexdigest()[:8]
        )
        # Both work during the grace period, for the same project.
        assert (await call(client, gw, new)).status_code == 200
        assert (await call(client, gw, old)).status_code == 200
        shown = (await client.get(f"{gw.url}/v1/keys/platform/short-lived", headers=ADMIN)).json()
        assert "previousKeyExpiresAt" in shown

        gw.clock.advance(61_000)  # the grace period is over: the old secret is refused
        assert error_of(await call(client, gw, old)) == (401, "Unknown api key")
        assert (await call(client, gw, new)).status_code == 200

        gw.clock.advance(3_600_000)  # past expiresAt: the key itself is refused
        assert error_of(await call(client, gw, new)) == (401, "Unknown api key")
        shown = (await client.get(f"{gw.url}/v1/keys/platform/short-lived", headers=ADMIN)).json()
        assert shown["status"] == "expired"

        made = await client.put(
            f"{gw.url}/v1/keys/platform/to-revoke",
            headers=ADMIN,
            json={"project": "x", "role": "basic"},
        )
        secret = made.json()["key"]
        assert (await call(client, gw, secret)).status_code == 200
        assert (
            await client.delete(f"{gw.url}/v1/keys/platform/to-revoke", headers=ADMIN)
        ).status_code == 204
        assert error_of(await call(client, gw, secret)) == (401, "Unknown api key")


async def test_a_secret_given_in_a_put_replaces_the_old_at_once(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        url = f"{gw.url}/v1/keys/platform/own-secret"
        first = "first-own-secret-0123456789abcdef"
        second = "second-own-secret-0123456789abcdef"
        made = await client.put(
            url, headers=ADMIN, json={"project": "p", "role": "basic", "key": first}
        )
        assert made.json() == {"name": "own-secret"}  # nothing to show: the caller chose it
        assert (await call(client, gw, first)).status_code == 200
        await client.put(url, headers=ADMIN, json={"project": "p", "role": "basic", "key": second})
        assert error_of(await call(client, gw, first)) == (401, "Unknown api key")
        assert (await call(client, gw, second)).status_code == 200
        # Given as its digest, the secret never reaches Tollgate.
        third = "third-own-secret-0123456789abcdef"
        digest = hashlib.sha256(third.encode()).hexdigest()
        await client.put(
            url, headers=ADMIN, json={"project": "p", "role": "basic", "key": f"sha256:{digest}"}
        )
        assert (await call(client, gw, third)).status_code == 200


async def test_roles_made_at_run_time_limit_the_keys_that_hold_them(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        role = await client.put(
            f"{gw.url}/v1/roles/platform/metered",
            headers=ADMIN,
            json={"limits": {"limited": {"requestDay": 2}}},
        )
        assert role.status_code == 200, role.text
        shown = await client.get(f"{gw.url}/v1/roles/platform/metered", headers=ADMIN)
        assert shown.json()["limits"] == {"limited": {"requestDay": 2}}
        made = await client.put(
            f"{gw.url}/v1/keys/platform/metered-key",
            headers=ADMIN,
            json={"project": "meter", "role": "metered"},
        )
        secret = made.json()["key"]
        statuses = [(await call(client, gw, secret, "limited")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

        bad = await client.put(
            f"{gw.url}/v1/roles/platform/broken",
            headers=ADMIN,
            json={"limits": {"m": {"minute": "lots"}}},
        )
        assert bad.status_code == 400
        assert (
            await client.get(f"{gw.url}/v1/roles/platform/broken", headers=ADMIN)
        ).status_code == 404


async def test_every_change_is_audited_without_secrets(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        url = f"{gw.url}/v1/keys/platform/audited"
        made = await client.put(url, headers=ADMIN, json={"project": "a", "role": "basic"})
        first = made.json()["key"]
        await client.put(url, headers=ADMIN, json={"project": "b", "role": "basic"})
        rotated = await client.post(f"{gw.url}/v1/ops/keys/audited/rotate", headers=ADMIN, json={})
        second = rotated.json()["key"]
        await client.delete(url, headers=ADMIN)
        audit = await client.get(
            f"{gw.url}/v1/admin/audit", headers=ADMIN, params={"name": "audited"}
        )
        assert audit.status_code == 200
        entries = audit.json()["items"]
        assert [e["action"] for e in entries] == ["delete", "rotate", "update", "create"]
        assert all(
            e["actor"]
            == {"project": "ops", "key": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:8]}
            for e in entries
        )
        assert entries[2]["changes"]["project"] == {"from": "a", "to": "b"}
        assert entries[1]["changes"]["gracePeriodSeconds"] == 86400
        assert first not in audit.text and second not in audit.text
        paged = await client.get(f"{gw.url}/v1/admin/audit", headers=ADMIN, params={"limit": 2})
        assert len(paged.json()["items"]) == 2 and "nextToken" in paged.json()
        rest = await client.get(
            f"{gw.url}/v1/admin/audit",
            headers=ADMIN,
            params={"limit": 10, "token": paged.json()["nextToken"]},
        )
        assert [e["action"] for e in rest.json()["items"]] == ["update", "create"]
        # A bad `since` is a 400 with its reason, also in digits `int()` does not take.
        for since in ("²", "yesterday"):
            bad = await client.get(
                f"{gw.url}/v1/admin/audit", headers=ADMIN, params={"since": since}
            )
            status, message = error_of(bad)
            assert status == 400 and message.startswith("since: "), (since, message)


async def test_keys_survive_a_restart_and_a_file_reload_keeps_them(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/durable",
            headers=ADMIN,
            json={"project": "d", "role": "basic"},
        )
        secret = made.json()["key"]
        assert await gw.store.reload_now() is False  # the files did not change
        await gw.stop()
        gateways.started.remove(gw)
        again = await start(gateways, afake, folder)
        assert (await call(client, again, secret)).status_code == 200
        shown = await client.get(f"{again.url}/v1/keys/platform/durable", headers=ADMIN)
        assert shown.json()["project"] == "d"


async def test_the_store_unreachable_keeps_serving_and_refuses_changes(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/steady",
            headers=ADMIN,
            json={"project": "s", "role": "basic"},
        )
        secret = made.json()["key"]
        root = folder / "dial"
        moved = folder.with_name("store-away")
        root.rename(moved)
        root.write_text("not a folder")  # every read and write of the store now fails
        try:
            refused = await client.put(
                f"{gw.url}/v1/keys/platform/later",
                headers=ADMIN,
                json={"project": "s", "role": "basic"},
            )
            assert error_of(refused) == (
                503,
                "Resource store is not available, the change was not made",
            )
            assert (await call(client, gw, secret)).status_code == 200
            health = (await client.get(f"{gw.url}/health")).json()
            assert health["status"] == "degraded" and health["resources"]["healthy"] is False
        finally:
            root.unlink()
            moved.rename(root)
        for _ in range(50):
            made = await client.put(
                f"{gw.url}/v1/keys/platform/later",
                headers=ADMIN,
                json={"project": "s", "role": "basic"},
            )
            if made.status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert made.status_code == 200
        health = (await client.get(f"{gw.url}/health")).json()
        assert health["resources"]["healthy"] is True and health["resources"]["keys"] == 2


async def test_api_roles_shadow_file_roles_and_a_file_reload_keeps_them(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    """A role defined in the files and through the API is the API's; deleting it there
    reveals the file's again; a reload of changed files keeps API keys and roles."""
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/shadowed",
            headers=ADMIN,
            json={"project": "shadow", "role": "basic"},
        )
        secret = made.json()["key"]
        assert (await call(client, gw, secret)).status_code == 200  # the file's `basic`: no limit
        shadow = await client.put(
            f"{gw.url}/v1/roles/platform/basic",
            headers=ADMIN,
            json={"limits": {"m": {"requestDay": 2}}},
        )
        assert shadow.status_code == 200
        assert (await call(client, gw, secret)).status_code == 200
        assert (await call(client, gw, secret)).status_code == 429  # the API's `basic`

        # The files change (a new model): the reload keeps the API key and the API role.
        changed = config(afake)
        changed["models"]["extra"] = {"endpoint": afake.endpoint("extra")}
        gw.config_files[0].write_text(json.dumps(changed))
        assert await gw.store.reload_now() is True
        assert "extra" in gw.store.current.deployments
        assert (await call(client, gw, secret)).status_code == 429

        deleted = await client.delete(f"{gw.url}/v1/roles/platform/basic", headers=ADMIN)
        assert deleted.status_code == 204
        assert (await call(client, gw, secret)).status_code == 200  # the file's `basic` again


async def test_bulk_validate_and_apply_as_dial(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    manifests = [
        {
            "kind": "Key",
            "name": "keys/platform/bulk-key",
            "spec": {"project": "b", "roles": ["bulk", "basic"]},
        },
        {"kind": "Role", "name": "roles/platform/bulk", "spec": {"limits": {}}},
    ]
    async with httpx.AsyncClient() as client:
        checked = await client.post(
            f"{gw.url}/v1/admin/validate", headers=ADMIN, json={"manifests": manifests}
        )
        assert checked.status_code == 200, checked.text
        # Applied in DIAL's order (roles before keys), so the key may use the batch's role.
        assert checked.json() == {
            "valid": 2,
            "failed": 0,
            "results": [
                {"entityId": "roles/platform/bulk", "status": "VALID"},
                {"entityId": "keys/platform/bulk-key", "status": "VALID"},
            ],
        }
        assert (
            await client.get(f"{gw.url}/v1/roles/platform/bulk", headers=ADMIN)
        ).status_code == 404

        bad = [
            *manifests,
            {"kind": "Key", "name": "keys/public/x", "spec": {"project": "b", "role": "bulk"}},
            {"kind": "Model", "name": "models/platform/m2", "spec": {}},
            {"kind": "Gadget", "name": "x/platform/y", "spec": {}},
        ]
        refused = await client.post(
            f"{gw.url}/v1/admin/apply", headers=ADMIN, json={"manifests": bad}
        )
        assert refused.status_code == 422
        results = {r["entityId"]: r for r in refused.json()["results"]}
        assert (
            results["keys/public/x"]["error"]
            == "'name' bucket segment must be 'platform', got 'public'"
        )
        assert results["models/platform/m2"]["status"] == "FAILED"
        assert results["x/platform/y"]["error"] == "Unknown kind: Gadget"
        assert results["roles/platform/bulk"]["status"] == "SKIPPED"
        assert (
            await client.get(f"{gw.url}/v1/roles/platform/bulk", headers=ADMIN)
        ).status_code == 404

        applied = await client.post(
            f"{gw.url}/v1/admin/apply", headers=ADMIN, json={"manifests": manifests}
        )
        assert applied.status_code == 200
        body = applied.json()
        assert body["applied"] == 2 and body["failed"] == 0
        secret = body["results"][1]["key"]  # made for the new key, shown once
        assert (await call(client, gw, secret)).status_code == 200

        for raw, message in (
            (b"{", "Invalid JSON at line 1, column 2"),
            (b"{}", "Missing or invalid 'manifests' array"),
            (b'{"manifests": [{"name": "x"}]}', "manifests[0].kind must be a string"),
            (
                b'{"manifests": [{"kind": "Bundle"}]}',
                "Bundle kind is not allowed in /v1/admin/apply",
            ),
        ):
            answer = await client.post(f"{gw.url}/v1/admin/apply", headers=ADMIN, content=raw)
            assert error_of(answer) == (400, message)


async def test_a_per_request_key_is_never_an_administrator_of_keys(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    headers = {**ADMIN, "X-Fake-Chunks": "4", "X-Fake-Chunk-Delay-Ms": "300"}
    body = {"stream": True, **chat()}
    afake.clear()
    url = f"{gw.url}/openai/deployments/m/chat/completions"
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", url, headers=headers, json=body) as stream,
    ):
        chunks = stream.aiter_raw()
        await chunks.__anext__()
        hop_key = dict(afake.last()["headers"])["Api-Key"]
        assert hop_key != ADMIN_KEY
        refused = await client.put(
            f"{gw.url}/v1/keys/platform/from-hop",
            headers={"Api-Key": hop_key},
            json={"project": "p", "role": "basic"},
        )
        assert error_of(refused) == (403, "User must be admin")
        async for _ in chunks:
            pass


async def test_listing_pages_and_item_metadata(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        for index in range(5):
            await client.put(
                f"{gw.url}/v1/keys/platform/page-{index}",
                headers=ADMIN,
                json={"project": "p", "role": "basic"},
            )
        url = f"{gw.url}/v1/metadata/keys/platform/"
        first = (await client.get(url, headers=ADMIN, params={"limit": 2})).json()
        assert [i["name"] for i in first["items"]] == ["page-0", "page-1"]
        second = (
            await client.get(url, headers=ADMIN, params={"limit": 2, "token": first["nextToken"]})
        ).json()
        assert [i["name"] for i in second["items"]] == ["page-2", "page-3"]
        last = (
            await client.get(url, headers=ADMIN, params={"limit": 2, "token": second["nextToken"]})
        ).json()
        assert [i["name"] for i in last["items"]] == ["page-4"] and "nextToken" not in last
        item = await client.get(url + "page-3", headers=ADMIN)
        assert item.json()["name"] == "page-3" and item.json()["etag"]
        missing = await client.get(url + "nope", headers=ADMIN)
        assert error_of(missing) == (404, "Not found: keys/platform/nope")
        for params in ({"limit": "1001"}, {"limit": "x"}, {"recursive": "maybe"}):
            bad = await client.get(url, headers=ADMIN, params=params)
            assert error_of(bad) == (
                400,
                "Bad query parameters. Limit must be in [0, 1000] range. "
                "Recursive must be true/false",
            )
        roles = (await client.get(f"{gw.url}/v1/metadata/roles/platform/", headers=ADMIN)).json()
        assert roles["items"] == [] and roles["resourceType"] == "ROLE"


def test_a_file_key_past_its_expiry_is_refused_and_the_access_log_says_why(
    work_dir: Path, fake_model: FakeModel
) -> None:
    """`expiresAt` works on keys of the config files too; the refused call's access line
    names the key, its project and the reason, never the secret."""
    expired = "config-api-expired-file-key-0123456789"
    current = "config-api-current-file-key-0123456789"
    gw = start_gateway(
        work_dir,
        [
            {
                "models": {"m": {"endpoint": fake_model.endpoint("m")}},
                "keys": {
                    expired: {"project": "old", "role": "r", "expiresAt": "2020-01-01T00:00:00Z"},
                    current: {"project": "new", "role": "r", "expiresAt": "2999-01-01T00:00:00Z"},
                },
            }
        ],
    )
    try:
        url = f"{gw.url}/openai/deployments/m/chat/completions"
        refused = httpx.post(url, headers={"Api-Key": expired}, json=chat())
        assert error_of(refused) == (401, "Unknown api key")
        assert httpx.post(url, headers={"Api-Key": current}, json=chat()).status_code == 200
    finally:
        stop(gw.process)
    log = gw.log.read_text()
    fingerprint = hashlib.sha256(expired.encode()).hexdigest()[:8]
    line = next(line for line in log.splitlines() if "status=401" in line)
    assert f"key={fingerprint}" in line and "project=old" in line and "reason=key_expired" in line
    assert expired not in log and current not in log


async def test_a_rotation_without_grace_ends_every_old_secret(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    """A leaked key: `gracePeriodSeconds: 0` refuses at once the secret it replaces and those
    earlier rotations left in their grace period."""
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/leaky",
            headers=ADMIN,
            json={"project": "l", "role": "basic"},
        )
        secrets = [made.json()["key"]]
        rotate = f"{gw.url}/v1/ops/keys/leaky/rotate"
        for _ in range(2):
            answer = await client.post(rotate, headers=ADMIN, json={"gracePeriodSeconds": 3600})
            secrets.append(answer.json()["key"])
        assert [(await call(client, gw, s)).status_code for s in secrets] == [200, 200, 200]
        last = await client.post(rotate, headers=ADMIN, json={"gracePeriodSeconds": 0})
        assert "previousKeyExpiresAt" not in last.json()
        assert [(await call(client, gw, s)).status_code for s in secrets] == [401, 401, 401]
        assert (await call(client, gw, last.json()["key"])).status_code == 200


async def test_instances_on_one_folder_without_redis_catch_up_on_a_reload(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    """Without Redis nobody tells the other instance: it finds the change at its next rescan,
    or at once on `POST /v1/ops/config/reload` (which rescans the store, as DIAL's does)."""
    first = await start(gateways, afake, folder)
    second = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{first.url}/v1/keys/platform/shared",
            headers=ADMIN,
            json={"project": "s", "role": "basic"},
        )
        secret = made.json()["key"]
        assert error_of(await call(client, second, secret)) == (401, "Unknown api key")
        reloaded = await client.post(f"{second.url}/v1/ops/config/reload", headers=ADMIN)
        assert reloaded.status_code == 200
        assert (await call(client, second, secret)).status_code == 200
        await client.delete(f"{first.url}/v1/keys/platform/shared", headers=ADMIN)
        await client.post(f"{second.url}/v1/ops/config/reload", headers=ADMIN)
        assert error_of(await call(client, second, secret)) == (401, "Unknown api key")


async def test_a_roles_share_limits_are_checked_on_put(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    """DIAL's `share` of a role (compatibility C87): both spellings, numbers or numeric
    strings; a bad value is 400 with the schema's message and nothing is stored."""
    gw = await start(gateways, afake, folder)
    url = f"{gw.url}/v1/roles/platform/sharing"
    async with httpx.AsyncClient() as client:
        share = {"FILE": {"maxAcceptedUsers": "5", "invitation_ttl": 24}}
        made = await client.put(url, headers=ADMIN, json={"share": share})
        assert made.status_code == 200
        assert (await client.get(url, headers=ADMIN)).json()["share"] == share
        bad = await client.put(
            f"{url}-bad", headers=ADMIN, json={"share": {"FILE": {"max_accepted_users": "lots"}}}
        )
        assert error_of(bad) == (
            400,
            "share.FILE.max_accepted_users: expected a whole number, got 'lots'",
        )
        assert (await client.get(f"{url}-bad", headers=ADMIN)).status_code == 404


async def test_a_condition_that_is_not_utf8_is_refused_with_its_bytes_escaped(
    gateways: Gateways, afake: InProcessFake, folder: Path
) -> None:
    """`If-Match: \\x98` (found by the schema fuzzer): the 412 echoes it escaped, never a 500."""
    gw = await start(gateways, afake, folder)
    async with httpx.AsyncClient() as client:
        made = await client.put(
            f"{gw.url}/v1/keys/platform/odd", headers=ADMIN, json={"project": "p", "role": "basic"}
        )
        assert made.status_code == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /v1/ops/keys/odd/rotate HTTP/1.1\r\nHost: t\r\nIf-Match: \x98\r\n"
        + f"Api-Key: {ADMIN_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 412 "), answer
    assert orjson.loads(body) == {"error": {"message": "ETag \\udc98 is rejected", "code": "412"}}
