"""Resource change events for `POST /v1/ops/resource/subscribe` (compatibility C94).

A write of a file, conversation, prompt or application is published, after it is committed, as
a change notice (`tollgate.storage.notices`: Redis pub/sub when configured, so every instance
hears it; in process otherwise) under the object's storage key. Each instance keeps one
subscription to the notices and hands each change to the listeners of its key: however many
clients subscribe, an instance holds one Redis subscription.

A notice is a hint: a lost one (Redis away) is a missed event, never a wrong one; a client
that must not miss a change reads the resource again when it reconnects, as with DIAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from tollgate.storage.notices import Change, ChangeNotices
from tollgate.storage.store import StorageError

log = logging.getLogger("tollgate.resources")

Action = Literal["CREATE", "UPDATE", "DELETE"]
STAMP_PRECISION = timedelta(milliseconds=1)
LISTENER_BOUND = 1000  # changes a slow client may fall behind by; then it is closed


class Listener:
    """The changes of a set of storage keys, for one subscriber; `None` ends it (the instance
    is stopping, or the client fell too far behind)."""

    __slots__ = ("keys", "queue")

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue(LISTENER_BOUND + 1)

    def offer(self, change: Change | None) -> bool:
        """False when the listener is full (and so ended)."""
        if self.queue.qsize() >= LISTENER_BOUND and change is not None:
            self.queue.put_nowait(None)
            return False
        self.queue.put_nowait(change)
        return True


class ResourceEvents:
    def __init__(self, notices: ChangeNotices) -> None:
        self.notices = notices
        self._by_key: dict[str, set[Listener]] = {}
        self._hub: asyncio.Task[None] | None = None
        self._closed = False

    # --- writers

    async def publish(self, key: str, action: Action, etag: str | None = None) -> None:
        """Tell every instance's subscribers; a channel that is down loses the event (logged),
        never the write."""
        try:
            await self.notices.publish(self.notices.change(key, action, etag))
        except StorageError as exc:
            log.warning("resource event for %s not published: %s", key, exc)

    @staticmethod
    def written(created_at: datetime | None, started: datetime) -> Action:
        """CREATE for an object the write made (its `created_at` is the write's own, stamped
        at its commit; a store may keep it to the millisecond), else UPDATE (it kept the
        replaced object's)."""
        if created_at is None or created_at >= started - STAMP_PRECISION:
            return "CREATE"
        return "UPDATE"

    # --- subscribers

    async def listen(self, keys: Iterable[str]) -> Listener:
        listener = Listener(frozenset(keys))
        if self._closed:
            listener.offer(None)
            return listener
        for key in listener.keys:
            self._by_key.setdefault(key, set()).add(listener)
        if self._hub is None or self._hub.done():
            subscription = await self.notices.subscribe()
            self._hub = asyncio.create_task(self._run(subscription), name="resource-events")
        return listener

    def listening(self) -> int:
        """How many subscribers are listening (for `/health` and tests)."""
        return len({listener for listeners in self._by_key.values() for listener in listeners})

    def forget(self, listener: Listener) -> None:
        for key in listener.keys:
            listeners = self._by_key.get(key)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._by_key[key]

    async def _run(self, subscription: object) -> None:
        try:
            async for change in subscription:  # type: ignore[attr-defined]
                for listener in list(self._by_key.get(change.key, ())):
                    if not listener.offer(change):
                        self.forget(listener)
        except asyncio.CancelledError:
            raise
        except Exception:  # the hub must not die silently: the next listener starts another
            log.exception("resource events stopped")
        finally:
            with contextlib.suppress(Exception):
                await subscription.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        """End every subscriber's stream (at shutdown, so that none holds the grace period)."""
        self._closed = True
        for listeners in list(self._by_key.values()):
            for listener in list(listeners):
                listener.offer(None)
        self._by_key.clear()
        if self._hub is not None:
            self._hub.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._hub
