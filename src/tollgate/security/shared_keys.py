"""Per-request keys shared through Redis, so a hop's key works on every instance.

See compatibility C38.

Each instance keeps the keys it minted in memory (the fast path); with Redis configured it also
publishes them, under the digest of the key (never the key itself), with the TTL of
`perRequestApiKey.ttl`, and deletes them when their hop ends. A key minted elsewhere is looked
up in Redis. Redis being unreachable only narrows keys to the instance that minted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from tollgate.errors import store_errors
from tollgate.security.principal import ChainStep, Principal

log = logging.getLogger("tollgate.keys")


REVOKE_RETRY_FIRST_S = 0.25  # first retry of a DEL that failed; doubled up to the cap
REVOKE_RETRY_MAX_S = 5.0
REVOKE_BATCH = 256  # DELs in flight at once when retrying


class SharedKeys:
    """Publishes, looks up and revokes per-request keys in Redis.

    A revoked key is remembered here until its DEL lands in Redis (or its TTL passes): this
    instance refuses it meanwhile, even if Redis still holds it. A DEL that fails (Redis down,
    or a stall such as `CLIENT PAUSE ... WRITE`) is retried in the background, with back-off,
    until it lands or the key's TTL has passed. Store failures are logged once per outage:
    when the first command fails, and when a command succeeds again.
    """

    def __init__(
        self,
        client: Any,
        ttl_s: float,
        store_healthy: Callable[[], bool],
        prefix: str = "tollgate",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        # While the limits store is known to be down, keys stay local instead of each hop
        # waiting for Redis to fail again.
        self._store_healthy = store_healthy
        self._ttl_ms = max(int(ttl_s * 1000), 1)
        self._prefix = prefix
        self._clock = clock
        self._errors = store_errors()
        self._background: set[asyncio.Task[None]] = set()
        # Revoked keys whose DEL has not landed yet: digest -> when their TTL has surely passed.
        self._revoked: dict[bytes, float] = {}
        self._retrying: asyncio.Task[None] | None = None
        self._closing = False
        self._outage = False

    def _name(self, digest: bytes) -> str:
        return f"{self._prefix}:prk:{digest.hex()}"

    @property
    def unrevoked(self) -> int:
        """Revoked keys whose DEL has not reached Redis yet."""
        return len(self._revoked)

    # --- one log line per outage

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning(
                "per-request keys: store unreachable (%s while it %s); keys stay on the "
                "instance that minted them, revocations are retried until they land",
                type(exc).__name__,
                what,
            )

    def _answered(self) -> None:
        if self._outage:
            self._outage = False
            log.warning(
                "per-request keys: store reachable again (%d revocations still to retry)",
                len(self._revoked),
            )

    # --- the public methods

    async def publish(self, digest: bytes, principal: Principal) -> None:
        if not self._store_healthy():
            return
        # An interceptor's key carries its chain step (compatibility C40), so that the interceptor's
        # callback may land on any instance; other keys store `null` there.
        chain = principal.chain
        attachments = principal.attachments
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
                # What the request attached, which the key may read (compatibility C93).
                None if attachments is None else sorted(attachments),
            ]
        )
        try:
            await self._client.set(self._name(digest), value, px=self._ttl_ms)
        except self._errors as exc:
            self._failed("shared a key", exc)
            return
        self._answered()

    async def lookup(self, digest: bytes) -> Principal | None:
        if self._is_revoked(digest) or not self._store_healthy():
            return None
        try:
            value = await self._client.get(self._name(digest))
        except self._errors as exc:
            self._failed("looked a key up", exc)
            return None
        self._answered()
        if value is None or self._is_revoked(digest):  # revoked while the GET was out
            return None
        project, roles, fingerprint, secured, source, *rest = orjson.loads(value)
        # Five fields: published by a Tollgate from before interceptor chains; no chain then.
        # Six: from before attachments; none then.
        chain = rest[0] if rest else None
        attachments = rest[1] if len(rest) > 1 else None
        return Principal(
            project,
            tuple(roles),
            frozenset(roles),
            fingerprint,
            secured,
            source,
            None if chain is None else ChainStep(tuple(chain[0]), chain[1], chain[2], chain[3]),
            None if attachments is None else frozenset(attachments),
        )

    def revoke(self, digest: bytes) -> None:
        """Delete in the background: the hop is over, its answer need not wait for Redis.

        The key is refused here from now on, whether or not the DEL lands."""
        # Its Redis TTL started when it was published, before now: this bound is safe.
        self._revoked[digest] = self._clock() + self._ttl_ms / 1000
        if not self._store_healthy() or self._retrying is not None:
            # The store is down, or DELs are failing already: the retry loop takes it.
            self._retry_later()
            return
        task = asyncio.get_running_loop().create_task(self._delete(digest))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        self._closing = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying
        if self._revoked:
            log.warning(
                "per-request keys: %d revoked keys may stay in the store until their TTL "
                "(their DEL never landed)",
                len(self._revoked),
            )

    # --- revocation

    def _is_revoked(self, digest: bytes) -> bool:
        until = self._revoked.get(digest)
        if until is None:
            return False
        if self._clock() >= until:  # its TTL has passed: Redis forgot it too
            del self._revoked[digest]
            return False
        return True

    async def _delete(self, digest: bytes) -> None:
        try:
            await self._client.delete(self._name(digest))
        except self._errors as exc:
            self._failed("revoked a key", exc)
            self._retry_later()
            return
        self._revoked.pop(digest, None)
        self._answered()

    def _retry_later(self) -> None:
        if self._retrying is None and not self._closing:
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        """DEL every revoked key still in `_revoked`, with back-off, until none is left.

        Bounded: a key leaves `_revoked` once its DEL lands or its TTL passes."""
        wait = REVOKE_RETRY_FIRST_S
        try:
            while self._revoked:
                await asyncio.sleep(wait)
                now = self._clock()
                for digest in [d for d, until in self._revoked.items() if now >= until]:
                    del self._revoked[digest]
                if not self._store_healthy():
                    wait = min(wait * 2, REVOKE_RETRY_MAX_S)
                    continue
                try:
                    await self._delete_all(list(self._revoked))
                except Exception as exc:  # a store error, or a reply this client did not expect
                    self._failed("revoked a key", exc)
                    wait = min(wait * 2, REVOKE_RETRY_MAX_S)
                    continue
                self._answered()
                wait = REVOKE_RETRY_FIRST_S
        finally:
            self._retrying = None

    async def _delete_all(self, digests: list[bytes]) -> None:
        """DEL each key (one key per command: in a cluster they live in different slots);
        those that landed leave `_revoked`; the first failure is raised."""
        for at in range(0, len(digests), REVOKE_BATCH):
            batch = digests[at : at + REVOKE_BATCH]
            results = await asyncio.gather(
                *(self._client.delete(self._name(d)) for d in batch), return_exceptions=True
            )
            failure: BaseException | None = None
            for digest, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    failure = failure or result
                else:
                    self._revoked.pop(digest, None)
            if failure is not None:
                raise failure
