"""Per-request keys: minted for each upstream hop, dead when the hop ends (compatibility C38)."""

from __future__ import annotations

import base64
import os
import time
from typing import NamedTuple

from tollgate.security.keys import digest_of
from tollgate.security.principal import Principal

SWEEP_EVERY_S = 60.0
KEY_BYTES = 24  # 32 characters of base64url: DIAL's length and alphabet (192 bits)
RANDOM_POOL_BYTES = KEY_BYTES * 256


class Hop(NamedTuple):
    principal: Principal  # the root caller, acting through the hop's deployment (or interceptor)
    expires_at: float


class PerRequestKeys:
    """In-memory store of live per-request keys, keyed by the digest of the key.

    Keys live until their hop ends (`invalidate`) or their TTL (`perRequestApiKey.ttl`) passes,
    whichever comes first; expired keys are dropped on lookup and by a periodic sweep.
    """

    __slots__ = ("_hops", "_next_sweep", "_pool", "_pool_at", "_ttl_s")

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._hops: dict[bytes, Hop] = {}
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        self._pool = b""
        self._pool_at = 0

    def __len__(self) -> int:
        return len(self._hops)

    def mint(self, root: Principal, deployment: str) -> tuple[str, bytes]:
        """A fresh key for a hop to `deployment`; returns the key and its digest (the handle).

        32 characters of `0-9 a-z A-Z - _` from a CSPRNG, DIAL's format (192 bits).
        """
        return self.issue(root.via(deployment))

    def issue(self, principal: Principal) -> tuple[str, bytes]:
        """A fresh key acting as `principal` (an interceptor's carries its chain step)."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        key = base64.urlsafe_b64encode(self._random_bytes()).decode("ascii")
        digest = digest_of(key)
        self._hops[digest] = Hop(principal, now + self._ttl_s)
        return key, digest

    def _random_bytes(self) -> bytes:
        """Key material from the OS CSPRNG, fetched in batches: one system call per 256 keys
        instead of one per key. Each byte is used once."""
        at = self._pool_at
        if at + KEY_BYTES > len(self._pool):
            self._pool, at = os.urandom(RANDOM_POOL_BYTES), 0
        self._pool_at = at + KEY_BYTES
        return self._pool[at : at + KEY_BYTES]

    def resolve_digest(self, digest: bytes) -> Principal | None:
        hop = self._hops.get(digest)
        if hop is None:
            return None
        if time.monotonic() >= hop.expires_at:
            self._hops.pop(digest, None)
            return None
        return hop.principal

    def invalidate(self, digest: bytes) -> bool:
        """Forget the key; False when it was already gone."""
        return self._hops.pop(digest, None) is not None

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_EVERY_S
        expired = [digest for digest, hop in self._hops.items() if hop.expires_at <= now]
        for digest in expired:
            del self._hops[digest]
