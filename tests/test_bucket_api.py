"""`GET /v1/bucket` (compatibility C82, C83): the caller's bucket name as DIAL makes it.

With DIAL's `encryption.secret` and `encryption.key`, the names are DIAL's to the letter (the
vectors of DIAL Core's own tests); without them Tollgate makes a pair once, keeps it in the
resource store, and every instance on that store answers the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gateway_config import chat
from inprocess import Gateways, InProcessFake

PROJECT_KEY = "bucket-api-project-key-0123456789"
OTHER_KEY = "bucket-api-other-key-0123456789"


def config(fake: InProcessFake) -> dict[str, Any]:
    return {
        "models": {"m": {"endpoint": fake.endpoint("m")}},
        "keys": {
            PROJECT_KEY: {"project": "EPM-RTC-GPT", "role": "default"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "default"},
        },
    }


def settings(folder: Path, **encryption: str) -> dict[str, Any]:
    tree: dict[str, Any] = {"storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}}}
    if encryption:
        tree["encryption"] = encryption
    return tree


async def test_bucket_names_are_dials_with_dials_settings(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    gw = await gateways.start(
        [config(afake)], settings=settings(tmp_path / "s", secret="password", key="salt")
    )
    async with httpx.AsyncClient() as client:
        mine = await client.get(f"{gw.url}/v1/bucket", headers={"Api-Key": PROJECT_KEY})
        assert mine.status_code == 200
        assert mine.json() == {"bucket": "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"}
        other = await client.get(f"{gw.url}/v1/bucket", headers={"Api-Key": OTHER_KEY})
        assert other.json() == {"bucket": "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"}
        refused = await client.get(f"{gw.url}/v1/bucket")
        assert refused.status_code == 401
        posted = await client.post(f"{gw.url}/v1/bucket", headers={"Api-Key": PROJECT_KEY})
        assert posted.status_code == 405


async def test_a_per_request_key_gets_its_applications_bucket_and_appdata(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    """DIAL's example: the per-request key of deployment `EPM-RTC-RAIL`, called by project
    `EPM-RTC-GPT`."""
    cfg = config(afake)
    cfg["models"]["EPM-RTC-RAIL"] = {"endpoint": afake.endpoint("EPM-RTC-RAIL")}
    gw = await gateways.start(
        [cfg], settings=settings(tmp_path / "s", secret="password", key="salt")
    )
    headers = {"Api-Key": PROJECT_KEY, "X-Fake-Chunks": "4", "X-Fake-Chunk-Delay-Ms": "300"}
    url = f"{gw.url}/openai/deployments/EPM-RTC-RAIL/chat/completions"
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", url, headers=headers, json={"stream": True, **chat()}) as stream,
    ):
        chunks = stream.aiter_raw()
        await chunks.__anext__()
        hop_key = dict(afake.last()["headers"])["Api-Key"]
        answer = await client.get(f"{gw.url}/v1/bucket", headers={"Api-Key": hop_key})
        assert answer.json() == {
            "bucket": "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt",
            "appdata": "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST/appdata/EPM-RTC-RAIL",
        }
        async for _ in chunks:
            pass


async def test_without_settings_every_instance_on_one_store_agrees(
    gateways: Gateways, afake: InProcessFake, tmp_path: Path
) -> None:
    folder = tmp_path / "shared"
    first = await gateways.start([config(afake)], settings=settings(folder))
    second = await gateways.start([config(afake)], settings=settings(folder))
    elsewhere = await gateways.start([config(afake)], settings=settings(tmp_path / "other"))
    async with httpx.AsyncClient() as client:
        names = [
            (await client.get(f"{gw.url}/v1/bucket", headers={"Api-Key": PROJECT_KEY})).json()
            for gw in (first, second, elsewhere)
        ]
    assert names[0] == names[1] and names[0] != names[2]
    assert names[0]["bucket"].isalnum()
    # The pair is kept in the store; the secret of the pair is not shown anywhere.
    assert (folder / "dial" / "platform" / "encryption.json").is_file()
