"""The audit trail of API-managed keys and roles (compatibility C81).

Every change is one object in the resource store under `audit/`: who made it (the caller's
project and key fingerprint), when, what it did (`create`, `update`, `rotate`, `delete`,
`expire`, `grace-end`) and which fields changed, with their old and new values; never a secret
nor its digest (a new secret shows as its fingerprint). Objects are named
`audit/<inverted epoch ms>-<id>`, so a listing in key order is newest first, and an event
several instances would all record (a key expiring) has a name of its own, written only if
none exists yet: it is recorded once.

An entry whose write fails (the store unreachable) waits in memory and is written when the
store answers again; the change it records is already in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from tollgate.managed.entities import iso
from tollgate.storage.store import PreconditionFailed, ResourceStore, StorageError

log = logging.getLogger("tollgate.audit")

FOLDER = "audit/"
_TOP = 10**13  # epoch ms below the year 2286: inverted, they sort newest first
MAX_QUEUED = 10_000  # entries waiting for the store; older ones are dropped (and logged)
MAX_PAGE = 1000


def entry_key(at_ms: int, ident: str) -> str:
    return f"{FOLDER}{_TOP - at_ms:013d}-{ident}"


class AuditTrail:
    """Writes entries to the store, and reads them back newest first."""

    def __init__(self, store: ResourceStore, now_ms: Callable[[], int]) -> None:
        self._store = store
        self._now_ms = now_ms
        self._queued: deque[tuple[str, bytes, bool]] = deque()
        self._retrying: asyncio.Task[None] | None = None

    def entry(
        self,
        action: str,
        kind: str,
        name: str,
        actor: Mapping[str, Any] | None,
        changes: Mapping[str, Any] | None = None,
        *,
        at_ms: int | None = None,
    ) -> dict[str, Any]:
        at = self._now_ms() if at_ms is None else at_ms
        return {
            "time": iso(at),
            "timeMs": at,
            "action": action,
            "type": kind,
            "name": name,
            "actor": dict(actor) if actor is not None else {"system": "tollgate"},
            "changes": dict(changes or {}),
        }

    async def record(self, entry: dict[str, Any], *, once: str | None = None) -> None:
        """Write `entry`. `once`: a name for an event every instance sees (an expiry): only the
        first instance's entry is kept."""
        at = int(entry["timeMs"])
        if once is None:
            ident = secrets.token_hex(6)
        else:
            ident = "x" + hashlib.sha256(once.encode()).hexdigest()[:12]
        entry["id"] = f"{_TOP - at:013d}-{ident}"
        key = entry_key(at, ident)
        data = orjson.dumps(entry)
        try:
            await self._put(key, data, once is not None)
        except StorageError:
            self._queue(key, data, once is not None)

    async def _put(self, key: str, data: bytes, once: bool) -> None:
        with contextlib.suppress(PreconditionFailed):  # `once`: another instance wrote it
            await self._store.put(key, data, if_none_match=once)

    def _queue(self, key: str, data: bytes, once: bool) -> None:
        if len(self._queued) >= MAX_QUEUED:
            self._queued.popleft()
            log.error(
                "audit: the store is unreachable and %d entries wait; the oldest is dropped",
                MAX_QUEUED,
            )
        self._queued.append((key, data, once))
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        wait = 0.5
        while self._queued:
            await asyncio.sleep(wait)
            while self._queued:
                key, data, once = self._queued[0]
                try:
                    await self._put(key, data, once)
                except StorageError:
                    wait = min(wait * 2, 10.0)
                    break
                self._queued.popleft()

    @property
    def waiting(self) -> int:
        """Entries not yet in the store."""
        return len(self._queued)

    async def read(
        self,
        *,
        limit: int = 100,
        token: str | None = None,
        name: str | None = None,
        kind: str | None = None,
        since_ms: int | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Entries newest first, filtered; the token of the next page (None on the last)."""
        found: list[dict[str, Any]] = []
        while len(found) < limit:
            page = await self._store.list(FOLDER, limit=min(MAX_PAGE, max(limit, 100)), token=token)
            for index, info in enumerate(page.objects):
                blob = await self._store.get(info.key)
                if blob is None:
                    continue
                try:
                    entry = orjson.loads(blob.data)
                except orjson.JSONDecodeError:
                    continue
                if since_ms is not None and entry.get("timeMs", 0) < since_ms:
                    return found, None  # newest first: everything after is older
                if (name is None or entry.get("name") == name) and (
                    kind is None or entry.get("type") == kind
                ):
                    found.append(entry)
                    if len(found) >= limit:
                        more = index + 1 < len(page.objects) or page.next_token is not None
                        return found, info.key if more else None
            if page.next_token is None:
                return found, None
            token = page.next_token
        return found, token

    async def close(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        if self._queued:
            log.error("audit: %d entries could not be written before stopping", len(self._queued))
