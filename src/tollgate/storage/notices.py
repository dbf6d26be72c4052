"""Change notices: "this key changed", published by the writer, heard by every instance.

With Redis configured, a Redis pub/sub channel (`tollgate:storage:[<prefix>/]changes`) carries
each `Change` as JSON to every instance subscribed, in well under a second; without Redis, an
in-process fan-out serves the one instance. A notice is a hint, not the data: a subscriber
reads the key from the store (a lost notice is caught by the next full scan, as DIAL's
polling safety net does; compatibility C80). A subscriber sees its own instance's notices too;
`Change.sender` says whose it is.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson
from redis.exceptions import RedisError

from tollgate.storage.store import StoreUnavailable

log = logging.getLogger("tollgate.storage")

Action = Literal["CREATE", "UPDATE", "DELETE"]
QUEUE_BOUND = 10_000  # notices a slow subscriber may fall behind by before the oldest are dropped
_RECONNECT_S = (0.05, 0.2, 1.0)  # waits between tries to subscribe again after Redis fails


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one key (DIAL's `ResourceEvent`: url, action, timestamp, etag, sender)."""

    key: str
    action: Action
    etag: str | None = None
    timestamp_ms: int = 0
    sender: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> Change:
        fields = orjson.loads(data)
        if not isinstance(fields, dict) or fields.get("action") not in (
            "CREATE",
            "UPDATE",
            "DELETE",
        ):
            raise ValueError("not a change notice")
        return cls(
            key=str(fields["key"]),
            action=fields["action"],
            etag=None if fields.get("etag") is None else str(fields["etag"]),
            timestamp_ms=int(fields.get("timestamp_ms") or 0),
            sender=str(fields.get("sender") or ""),
        )


class Subscription(abc.ABC):
    """Every change published since `ChangeNotices.subscribe` returned it, in order, until
    `aclose` (or the notices' `close`) ends it."""

    def __aiter__(self) -> Subscription:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Change: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...


class ChangeNotices(abc.ABC):
    """Publish a key's change; subscribe to every change (one `Subscription` per listener)."""

    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex

    def change(self, key: str, action: Action, etag: str | None = None) -> Change:
        """A notice from this instance, stamped now."""
        return Change(key, action, etag, int(time.time() * 1000), self.instance_id)

    @abc.abstractmethod
    async def publish(self, change: Change) -> None:
        """Tell every subscriber (on every instance); `StoreUnavailable` when the channel is
        down (the change itself is stored: peers catch up at their next scan)."""

    @abc.abstractmethod
    async def subscribe(self) -> Subscription:
        """A subscription that hears every change published after this returns."""

    async def close(self) -> None:  # noqa: B027
        """End every subscription and release connections."""


class LocalNotices(ChangeNotices):
    """One instance: a queue per subscriber, filled by `publish`."""

    def __init__(self, instance_id: str | None = None) -> None:
        super().__init__(instance_id)
        self._subscriptions: set[_LocalSubscription] = set()

    async def publish(self, change: Change) -> None:
        for subscription in list(self._subscriptions):
            subscription.offer(change)

    async def subscribe(self) -> Subscription:
        subscription = _LocalSubscription(self._subscriptions)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.offer(None)


class _LocalSubscription(Subscription):
    def __init__(self, registry: set[_LocalSubscription]) -> None:
        self._registry = registry
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(QUEUE_BOUND)
        self._ended = False

    def offer(self, item: Change | None) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()  # drop the oldest: a notice is only a hint

    async def __anext__(self) -> Change:
        if self._ended:
            raise StopAsyncIteration
        change = await self._queue.get()
        if change is None:
            await self.aclose()
            raise StopAsyncIteration
        return change

    async def aclose(self) -> None:
        self._ended = True
        self._registry.discard(self)


class RedisNotices(ChangeNotices):
    """Many instances: Redis pub/sub on one channel (a cluster broadcasts PUBLISH to every node,
    so one node's connection hears it all). `client` is a `redis.asyncio.Redis`."""

    def __init__(self, client: Any, channel: str, instance_id: str | None = None) -> None:
        super().__init__(instance_id)
        self._client = client
        self.channel = channel
        self._subscriptions: set[_RedisSubscription] = set()

    async def publish(self, change: Change) -> None:
        try:
            await self._client.publish(self.channel, change.to_json())
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"change notices: {exc}") from None

    async def subscribe(self) -> Subscription:
        subscription = _RedisSubscription(self._client, self.channel, self._subscriptions)
        try:
            await subscription.connect()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"change notices: {exc}") from None
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()


class _RedisSubscription(Subscription):
    def __init__(self, client: Any, channel: str, registry: set[_RedisSubscription]) -> None:
        self._client = client
        self._channel = channel
        self._registry = registry
        self._pubsub: Any = None
        self._ended = False
        self._failures = 0

    async def connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def __anext__(self) -> Change:
        while not self._ended:
            try:
                if self._pubsub is None:
                    await self.connect()
                    self._failures = 0
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                # Redis went away: subscribe again; what passed meanwhile is caught by a scan.
                log.warning("storage: change notices interrupted (%s), resubscribing", exc)
                await self._drop()
                await asyncio.sleep(_RECONNECT_S[min(self._failures, len(_RECONNECT_S) - 1)])
                self._failures += 1
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                return Change.from_json(message["data"])
            except (ValueError, KeyError, TypeError):
                log.warning("storage: ignored a malformed change notice")
        raise StopAsyncIteration

    async def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def aclose(self) -> None:
        self._ended = True
        self._registry.discard(self)
        await self._drop()
