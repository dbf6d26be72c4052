"""Per-request keys of hops: minted for each hop, published for other instances, dead when the
hop ends (compatibility C38)."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import SharedKeys


class HopKey(NamedTuple):
    key: str  # sent upstream as `Api-Key`
    handle: bytes  # its digest: what ends it
    # The key's publication in the shared store, under way (None without one): it must have
    # landed before the key is sent, and before the key is revoked.
    publishing: asyncio.Future[None] | None


class HopKeys:
    """This instance's per-request keys, and their copies in the shared store (Redis)."""

    __slots__ = ("keys", "shared")

    def __init__(self, keys: PerRequestKeys, shared: SharedKeys | None) -> None:
        self.keys = keys
        self.shared = shared

    def open(self, principal: Principal) -> HopKey:
        """A key acting as `principal` (the root caller through the hop's deployment, or an
        interceptor's step). Its publication starts at once, so that it can leave in the same
        write as the call's admission: one round trip instead of two."""
        key, handle = self.keys.issue(principal)
        shared = self.shared
        publishing = (
            None if shared is None else asyncio.ensure_future(shared.publish(handle, principal))
        )
        return HopKey(key, handle, publishing)

    async def close(self, hop: HopKey) -> None:
        """The hop is over: its key dies here and in the shared store."""
        if hop.publishing is not None and not hop.publishing.done():
            await hop.publishing  # a refused call: its key's SET must not land after the DEL
        self.end(hop.handle)

    def end(self, handle: bytes) -> None:
        """The key dies now (it may be called twice: harmless)."""
        if self.keys.invalidate(handle) and self.shared is not None:
            self.shared.revoke(handle)
