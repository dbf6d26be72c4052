"""Per-request keys shared through Redis, so a hop's key works on every instance.

See compatibility C38.

Each instance keeps the keys it minted in memory (the fast path); with Redis configured it also
publishes them, under the digest of the key (never the key itself), with the TTL of
`perRequestApiKey.ttl`, and deletes them when their hop ends. A key minted elsewhere is looked
up in Redis. Redis being unreachable only narrows keys to the instance that minted them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from tollgate.limits.resilient import store_errors
from tollgate.security.principal import ChainStep, Principal

log = logging.getLogger("tollgate.keys")


class RemoteKeyLookup(Exception):
    """Raised by the (synchronous) authenticator: this key may live on another instance."""

    def __init__(self, digest: bytes, *, with_authorization: bool) -> None:
        super().__init__("per-request key not minted here")
        self.digest = digest
        self.with_authorization = with_authorization


class SharedKeys:
    def __init__(
        self,
        client: Any,
        ttl_s: float,
        store_healthy: Callable[[], bool],
        prefix: str = "tollgate",
    ) -> None:
        self._client = client
        # While the limits store is known to be down, keys stay local instead of each hop
        # waiting for Redis to fail again.
        self._store_healthy = store_healthy
        self._ttl_ms = max(int(ttl_s * 1000), 1)
        self._prefix = prefix
        self._errors = store_errors()
        self._background: set[asyncio.Task[None]] = set()

    def _name(self, digest: bytes) -> str:
        return f"{self._prefix}:prk:{digest.hex()}"

    async def publish(self, digest: bytes, principal: Principal) -> None:
        if not self._store_healthy():
            return
        # An interceptor's key carries its chain step (compatibility C40), so that the interceptor's
        # callback may land on any instance; other keys store `null` there.
        chain = principal.chain
        value = orjson.dumps(
            [
                principal.project,
                principal.roles,
                principal.key_fingerprint,
                principal.secured,
                principal.source_deployment,
                None
                if chain is None
                else [chain.interceptors, chain.position, chain.deployment, chain.api],
            ]
        )
        try:
            await self._client.set(self._name(digest), value, px=self._ttl_ms)
        except self._errors as exc:
            log.warning("per-request key not shared (store unreachable: %s)", type(exc).__name__)

    async def lookup(self, digest: bytes) -> Principal | None:
        if not self._store_healthy():
            return None
        try:
            value = await self._client.get(self._name(digest))
        except self._errors as exc:
            log.warning("per-request key lookup failed: %s", type(exc).__name__)
            return None
        if value is None:
            return None
        project, roles, fingerprint, secured, source, *rest = orjson.loads(value)
        # Five fields: published by a Tollgate from before interceptor chains; no chain then.
        chain = rest[0] if rest else None
        return Principal(
            project,
            tuple(roles),
            frozenset(roles),
            fingerprint,
            secured,
            source,
            None if chain is None else ChainStep(tuple(chain[0]), chain[1], chain[2], chain[3]),
        )

    def revoke(self, digest: bytes) -> None:
        """Delete in the background: the hop is over, its answer need not wait for Redis."""
        task = asyncio.get_running_loop().create_task(self._delete(digest))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete(self, digest: bytes) -> None:
        try:
            await self._client.delete(self._name(digest))
        except self._errors as exc:
            log.warning("per-request key not revoked (store unreachable: %s)", type(exc).__name__)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
