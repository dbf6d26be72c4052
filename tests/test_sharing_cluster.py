"""Accepting an invitation is atomic across instances (issue 14; compatibility C88): real
`tollgate serve` processes on one store, a burst of accepts spread over all of them.

- Three instances on one Redis and one filesystem store: 45 callers accept at once an
  invitation whose resources have room for 7; exactly 7 are admitted, everywhere.
- The same on the S3 provider (moto's server), where the store's conditional write
  (`If-Match`) is what keeps the count.
- A revoke made through one instance is seen by the others on the next call (the owner's
  record is read on each access, never cached).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from harness import Gateway, start_gateway, stop
from redis_server import redis_server_binary, start_redis_server, stop_redis_server
from s3_server import start_s3_server, stop_s3_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
]

OWNER_KEY = "cluster-share-owner-key-0123456789"
OWNER = {"Api-Key": OWNER_KEY}
CROWD = 45
ROOM = 7
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/
LIMIT_EXCEEDED = "Limit is exceeded on the number of accepted users for the resource: "


def crowd_key(index: int) -> str:
    return f"cluster-share-crowd-{index:02d}-0123456789"


def config() -> dict[str, Any]:
    keys: dict[str, Any] = {OWNER_KEY: {"project": "EPM-RTC-GPT", "role": "sharer"}}
    keys.update({crowd_key(i): {"project": f"crowd-{i}", "role": "basic"} for i in range(CROWD)})
    return {
        "models": {},
        "keys": keys,
        "roles": {
            "basic": {},
            "sharer": {"share": {"CONVERSATION": {"max_accepted_users": ROOM}}},
        },
    }


def settings(storage: dict[str, Any], redis_port: int | None = None) -> dict[str, Any]:
    tree: dict[str, Any] = {"encryption": {"secret": "password", "key": "salt"}, "storage": storage}
    if redis_port is not None:
        tree["redis"] = {"singleServerConfig": {"address": f"redis://127.0.0.1:{redis_port}"}}
    return tree


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    return httpx.AsyncClient(timeout=60, limits=limits)


async def burst(gateways: list[Gateway], url: str) -> None:
    """The owner shares `url` through the first instance; every caller of the crowd accepts
    at once, through the instances in turn; exactly ROOM get in, on every instance."""
    async with client() as http:
        first = gateways[0].url
        made = await http.put(f"{first}/v1/{url}", headers=OWNER, content=orjson.dumps({"a": 1}))
        assert made.status_code == 200, made.text
        shared = await http.post(
            f"{first}/v1/ops/resource/share/create",
            headers=OWNER,
            json={"resources": [{"url": url}]},
        )
        assert shared.status_code == 200, shared.text
        link = shared.json()["invitationLink"]

        async def accept(index: int) -> httpx.Response:
            gw = gateways[index % len(gateways)]
            return await http.get(
                f"{gw.url}{link}", params={"accept": "true"}, headers={"Api-Key": crowd_key(index)}
            )

        answers = await asyncio.gather(*(accept(i) for i in range(CROWD)))
        statuses = [answer.status_code for answer in answers]
        assert sorted(statuses) == [200] * ROOM + [400] * (CROWD - ROOM), [
            (a.status_code, a.text) for a in answers if a.status_code not in (200, 400)
        ]
        for answer in answers:
            if answer.status_code == 400:
                assert answer.json()["error"]["message"] == f"{LIMIT_EXCEEDED}{url}"
        winners = {i for i, status in enumerate(statuses) if status == 200}
        # Every instance agrees on who reads it: the winners, and nobody else.
        for gw in gateways:
            readers = set()
            for index in range(CROWD):
                got = await http.get(f"{gw.url}/v1/{url}", headers={"Api-Key": crowd_key(index)})
                assert got.status_code in (200, 403)
                if got.status_code == 200:
                    readers.add(index)
            assert readers == winners, gw.url
        listed = await http.post(
            f"{gateways[-1].url}/v1/ops/resource/share/list",
            headers=OWNER,
            json={"resourceTypes": ["CONVERSATION"], "with": "others", "includeUserInfo": True},
        )
        assert len(listed.json()["resources"][0]["sharedWith"]) == ROOM

        # A revoke through the last instance holds on the first at once.
        someone = min(winners)
        revoked = await http.post(
            f"{gateways[-1].url}/v1/ops/resource/share/revoke",
            headers=OWNER,
            json={"resources": [{"url": url}]},
        )
        assert revoked.status_code == 200
        got = await http.get(f"{first}/v1/{url}", headers={"Api-Key": crowd_key(someone)})
        assert got.status_code == 403


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def test_three_instances_on_one_redis_and_one_folder_admit_exactly_the_limit(
    work: Path,
) -> None:
    redis = start_redis_server(work / "redis")
    gateways: list[Gateway] = []
    try:
        storage = {"overrides": {"jclouds.filesystem.basedir": str(work / "shared-store")}}
        for _ in range(3):
            gateways.append(start_gateway(work, [config()], settings=settings(storage, redis.port)))
        await burst(gateways, f"conversations/{MINE}/popular")
    finally:
        for gw in gateways:
            stop(gw.process)
        stop_redis_server(redis)


async def test_three_instances_on_one_s3_bucket_admit_exactly_the_limit(work: Path) -> None:
    s3 = start_s3_server(work / "s3")
    gateways: list[Gateway] = []
    try:
        storage = s3.new_bucket_storage()
        for _ in range(3):
            gateways.append(start_gateway(work, [config()], settings=settings(storage)))
        await burst(gateways, f"conversations/{MINE}/on-s3")
    finally:
        for gw in gateways:
            stop(gw.process)
        stop_s3_server(s3)
