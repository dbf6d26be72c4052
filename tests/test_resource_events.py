"""`POST /v1/ops/resource/subscribe` (compatibility C94): DIAL's event stream of resource
changes — CREATE, UPDATE and DELETE of the listed items with their ETags, heartbeats, DIAL's
refusals, READ checked again for every event (a revoked share stops the events), events
from another instance over Redis, and a stream that ends at once when the server stops.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway_config import error_of
from harness import start_gateway, stop
from inprocess import Gateways, InProcessGateway, eventually_async
from redis_server import redis_server_binary, start_redis_server, stop_redis_server

OWNER_KEY = "events-owner-key-0123456789abcdef"
OTHER_KEY = "events-other-key-0123456789abcdef"
OWNER = {"Api-Key": OWNER_KEY}
OTHER = {"Api-Key": OTHER_KEY}
MINE = "3CcedGxCx23EwiVbVmscVktScRyf46KypuBQ65miviST"  # Keys/EPM-RTC-GPT/
THEIRS = "7G9WZNcoY26Vy9D7bEgbv6zqbJGfyDp9KZyEbJR4XMZt"  # Keys/EPM-RTC-RAIL/
SUBSCRIBE = "/v1/ops/resource/subscribe"
WAIT_S = 10.0  # a generous bound on waiting for an event: never a timing assertion


def config() -> dict[str, Any]:
    return {
        "models": {},
        "keys": {
            OWNER_KEY: {"project": "EPM-RTC-GPT", "role": "basic"},
            OTHER_KEY: {"project": "EPM-RTC-RAIL", "role": "basic"},
        },
        "roles": {"basic": {}},
    }


def settings(folder: Path, heartbeat_ms: int = 60000, **more: Any) -> dict[str, Any]:
    return {
        "encryption": {"secret": "password", "key": "salt"},
        "storage": {"overrides": {"jclouds.filesystem.basedir": str(folder)}},
        "resources": {"heartbeatPeriod": heartbeat_ms},
        **more,
    }


class Events:
    """One subscription's stream, read in the background: its data events and comments."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.response.aiter_lines():
            if line.startswith("data: "):
                await self.queue.put(orjson.loads(line[len("data: ") :]))
            elif line.startswith(":"):
                await self.queue.put(line)
        await self.queue.put(None)  # the stream ended

    async def next(self) -> Any:
        return await asyncio.wait_for(self.queue.get(), WAIT_S)

    async def next_event(self) -> Any:
        """The next data event, heartbeats skipped."""
        while True:
            item = await self.next()
            if not isinstance(item, str):
                return item


async def subscribe(
    http: httpx.AsyncClient, urls: list[str], who: Any = OWNER
) -> AsyncIterator[Events]:
    async with http.stream(
        "POST", SUBSCRIBE, headers=who, json={"resources": [{"url": u} for u in urls]}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = Events(response)
        try:
            yield events
        finally:
            events.task.cancel()


@pytest.fixture
async def gw(gateways: Gateways, tmp_path: Path) -> InProcessGateway:
    return await gateways.start([config()], settings=settings(tmp_path / "store"))


async def test_a_subscriber_sees_creates_updates_and_deletes(gw: InProcessGateway) -> None:
    url = f"conversations/{MINE}/live"
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        async for events in _one(subscribe(http, [url, f"files/{MINE}/other.txt"])):
            before = int(time.time() * 1000)
            made = await http.put(f"/v1/{url}", headers=OWNER, json={"v": 1})
            event = await events.next_event()
            assert event == {
                "url": url,
                "action": "CREATE",
                "timestamp": event["timestamp"],
                "etag": made.headers["ETag"],
            }
            assert before - 1000 <= event["timestamp"] <= int(time.time() * 1000) + 1000
            changed = await http.put(f"/v1/{url}", headers=OWNER, json={"v": 2})
            event = await events.next_event()
            assert (event["action"], event["etag"]) == ("UPDATE", changed.headers["ETag"])
            # Changes of resources not listed are not sent.
            await http.put(f"/v1/conversations/{MINE}/unlisted", headers=OWNER, json={})
            assert (await http.delete(f"/v1/{url}", headers=OWNER)).status_code == 200
            event = await events.next_event()
            assert event["action"] == "DELETE" and "etag" not in event
            # A file listed and uploaded, then moved away: CREATE, then DELETE.
            upload = await http.put(
                f"/v1/files/{MINE}/other.txt",
                headers=OWNER,
                files={"file": ("other.txt", b"x", "text/plain")},
            )
            assert upload.status_code == 200
            assert (await events.next_event())["action"] == "CREATE"
            moved = await http.post(
                "/v1/ops/resource/move",
                headers=OWNER,
                json={"sourceUrl": f"files/{MINE}/other.txt", "destinationUrl": f"files/{MINE}/b"},
            )
            assert moved.status_code == 200
            event = await events.next_event()
            assert (event["url"], event["action"]) == (f"files/{MINE}/other.txt", "DELETE")


async def _one(generator: AsyncIterator[Events]) -> AsyncIterator[Events]:
    async for events in generator:
        yield events
        return


async def test_heartbeats_come_when_nothing_changes(gateways: Gateways, tmp_path: Path) -> None:
    gw = await gateways.start([config()], settings=settings(tmp_path / "s", heartbeat_ms=100))
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        async for events in _one(subscribe(http, [f"prompts/{MINE}/p"])):
            assert await events.next() == ": heartbeat"
            assert await events.next() == ": heartbeat"


async def test_refusals_are_dials(gw: InProcessGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        cases: list[tuple[Any, tuple[int, str]]] = [
            ({}, (400, "resources list must be provided")),
            ({"resources": []}, (400, "resources list must be provided")),
            ({"resources": [{"uri": "x"}]}, (400, "resources list must be provided")),
            (
                {"resources": [{"url": f"conversations/{MINE}/folder/"}]},
                (400, f"resource folder is not supported: conversations/{MINE}/folder/"),
            ),
            (
                {"resources": [{"url": f"conversations/{THEIRS}/c"}]},
                (403, f"Resource is not allowed: conversations/{THEIRS}/c"),
            ),
            ({"resources": [{"url": "nope/x/y"}]}, (400, "Unsupported resource type: nope")),
        ]
        for body, expected in cases:
            answer = await http.post(SUBSCRIBE, headers=OWNER, json=body)
            assert error_of(answer) == expected, body
        assert (await http.get(SUBSCRIBE, headers=OWNER)).status_code == 405


async def test_a_recipient_hears_changes_only_while_it_may_read(gw: InProcessGateway) -> None:
    url = f"conversations/{MINE}/shared"
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        assert (await http.put(f"/v1/{url}", headers=OWNER, json={})).status_code == 200
        shared = await http.post(
            "/v1/ops/resource/share/create", headers=OWNER, json={"resources": [{"url": url}]}
        )
        link = shared.json()["invitationLink"]
        assert (await http.get(link, params={"accept": "true"}, headers=OTHER)).status_code == 200
        async for events in _one(subscribe(http, [url], who=OTHER)):
            await http.put(f"/v1/{url}", headers=OWNER, json={"v": 1})
            assert (await events.next_event())["action"] == "UPDATE"
            revoked = await http.post(
                "/v1/ops/resource/share/revoke", headers=OWNER, json={"resources": [{"url": url}]}
            )
            assert revoked.status_code == 200
            await http.put(f"/v1/{url}", headers=OWNER, json={"v": 2})
            # The owner's own subscription proves the changes were published meanwhile.
            async for mine in _one(subscribe(http, [url])):
                await http.put(f"/v1/{url}", headers=OWNER, json={"v": 3})
                assert (await mine.next_event())["action"] == "UPDATE"
            assert events.queue.empty()  # the recipient got none of the two


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
async def test_events_reach_subscribers_on_another_instance(
    gateways: Gateways, tmp_path: Path
) -> None:
    redis = start_redis_server(tmp_path / "redis")
    try:
        shared = settings(
            tmp_path / "one-store",
            redis={"singleServerConfig": {"address": f"redis://127.0.0.1:{redis.port}"}},
        )
        a = await gateways.start([config()], settings=shared)
        b = await gateways.start([config()], settings=shared)
        url = f"prompts/{MINE}/across"
        async with (
            httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
            httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
        ):
            async for events in _one(subscribe(on_a, [url])):
                made = await on_b.put(f"/v1/{url}", headers=OWNER, json={"content": "x"})
                event = await events.next_event()
                assert (event["action"], event["etag"]) == ("CREATE", made.headers["ETag"])
    finally:
        await gateways.stop_all()
        stop_redis_server(redis)


async def test_a_subscription_ends_when_the_server_stops(tmp_path: Path) -> None:
    """SIGTERM with a grace period of 60 s: the stream ends (and the process exits) well
    before the grace period would have cut it."""
    tree = settings(tmp_path / "store")
    tree["server"] = {"shutdownGracePeriod": 60000}
    gateway = start_gateway(tmp_path, [config()], settings=tree)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            async for events in _one(subscribe(http, [f"prompts/{MINE}/p"])):
                gateway.process.send_signal(signal.SIGTERM)
                assert await events.next() is None  # the stream ended
        assert await asyncio.to_thread(gateway.process.wait, 30) == 0
    finally:
        stop(gateway.process)


async def test_a_subscriber_that_leaves_holds_nothing(gw: InProcessGateway) -> None:
    """aiohttp does not cancel a handler whose client left: the stream looks for itself, so
    the listener is released (well before a heartbeat of 60 s would have found out)."""
    events = gw.gateway.resource_events
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        async for _ in _one(subscribe(http, [f"prompts/{MINE}/left"])):
            assert events.listening() == 1
    await eventually_async(lambda: events.listening() == 0, timeout=WAIT_S)
