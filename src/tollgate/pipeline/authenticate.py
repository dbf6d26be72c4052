"""Step 1: who is calling (compatibility C8, C10).

Credentials come from `Api-Key` (any case), `Authorization` and, when neither is present,
`x-api-key`. Tollgate has no identity provider (compatibility C7), so every credential is an API
key: a project key from the config or a live per-request key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from multidict import CIMultiDictProxy

from tollgate.errors import (
    GatewayError,
    bad_authorization,
    unauthorized_missing,
    unknown_api_key,
)
from tollgate.pipeline.admit import wall_clock_ms
from tollgate.security.ip_ranges import client_address, forwarded_for
from tollgate.security.keys import ProjectKey, digest_of
from tollgate.security.per_request_keys import PerRequestKeys
from tollgate.security.principal import Principal
from tollgate.security.shared_keys import SharedKeys
from tollgate.snapshot import Snapshot

log = logging.getLogger("tollgate.keys")

# What `authenticate` returns for a key that may have been minted by another instance: the
# lookup in the shared store, to await.
RemoteLookup = Coroutine[Any, Any, Principal]


class ManagedKeys(Protocol):
    """The API-managed keys (`managed.registry.ManagedConfig`): looked up after the files'."""

    def lookup(self, digest: bytes) -> ProjectKey | None: ...


class KeyRefused(GatewayError):
    """A known key refused (expired): DIAL's 401 `Unknown api key` to the caller, and for the
    access log, the key and why (compatibility C81)."""

    __slots__ = ("principal", "reason")

    def __init__(self, principal: Principal, reason: str) -> None:
        super().__init__(401, "Unknown api key")
        self.principal = principal
        self.reason = reason


class Peer(Protocol):
    """Where the request came from; read only when a key restricts client addresses."""

    @property
    def remote(self) -> str | None: ...


class Authenticator:
    """Turns request headers into a `Principal`, or raises DIAL's 400/401/403.

    Synchronous for every key this instance knows; a key it does not know may be a per-request
    key minted by another instance (with a shared store): then the answer is the lookup to
    await (`RemoteLookup`), which raises 401 if the store does not know the key either.
    """

    __slots__ = (
        "_expired_logged",
        "_managed",
        "_now_ms",
        "_per_request",
        "_proxy_count",
        "_shared",
    )

    def __init__(
        self,
        per_request_keys: PerRequestKeys,
        proxy_count: int,
        shared: SharedKeys | None = None,
        managed: ManagedKeys | None = None,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._per_request = per_request_keys
        self._proxy_count = proxy_count
        self._shared = shared  # per-request keys may have been minted by another instance
        self._managed = managed
        self._now_ms = now_ms  # the clock `expiresAt` is checked by
        self._expired_logged: set[tuple[str, int]] = set()

    def authenticate(
        self, headers: CIMultiDictProxy[str], peer: Peer, snapshot: Snapshot
    ) -> Principal | RemoteLookup:
        api_key = _one(headers, "Api-Key")
        authorization = _one(headers, "Authorization")
        if authorization is None:
            if api_key is None:
                # Anthropic-SDK style, only when neither DIAL header is present (newer DIAL).
                api_key = _one(headers, "x-api-key")
                if api_key is None:
                    raise unauthorized_missing()
            return self._by_key(api_key, headers, peer, snapshot)

        # DIAL splits on single spaces and takes the second token as the credential.
        parts = authorization.split(" ", 2)
        scheme, token = parts[0], (parts[1] if len(parts) > 1 else "")
        if api_key is None:
            # Newer DIAL: `Authorization: Bearer <api key>` alone is an API key (OpenAI SDK).
            if scheme.lower() == "bearer" and token:
                return self._by_key(token, headers, peer, snapshot)
            raise bad_authorization()
        if not token or token == api_key:
            # The openai SDK sends the key in both headers; a bare `Bearer` adds nothing.
            return self._by_key(api_key, headers, peer, snapshot)

        # Two different credentials: only a per-request key may come with an `Authorization`
        # header (an interceptor passing on the user's token), compatibility C8.
        digest = digest_of(api_key)
        principal = self._per_request.resolve_digest(digest)
        if principal is not None:
            return principal
        if snapshot.keys.lookup_digest(digest) is not None or (
            self._managed is not None and self._managed.lookup(digest) is not None
        ):
            raise GatewayError(400, "Provided API key is not per request key")
        if self._shared is not None:
            return _remote(self._shared, digest)
        raise unknown_api_key()

    def _by_key(
        self, secret: str, headers: CIMultiDictProxy[str], peer: Peer, snapshot: Snapshot
    ) -> Principal | RemoteLookup:
        digest = digest_of(secret)
        key = snapshot.keys.lookup_digest(digest)
        if key is None and self._managed is not None:
            key = self._managed.lookup(digest)
        if key is not None:
            if key.expires_at_ms is not None and self._now_ms() >= key.expires_at_ms:
                raise self._expired(key)
            if key.allowed_ips is not None:
                address = client_address(peer.remote, forwarded_for(headers), self._proxy_count)
                if not key.allowed_ips.admits(address):
                    raise GatewayError(403, f"Access is forbidden from IP address: {address}")
            return key.principal
        principal = self._per_request.resolve_digest(digest)
        if principal is None:
            if self._shared is not None:
                return _remote(self._shared, digest)
            raise unknown_api_key()
        return principal

    def _expired(self, key: ProjectKey) -> KeyRefused:
        """DIAL's 401 for a key past its `expiresAt` (or an old secret past its grace), logged
        once per key and expiry; the access log names the reason on every call."""
        assert key.expires_at_ms is not None
        seen = (key.principal.key_fingerprint, key.expires_at_ms)
        if seen not in self._expired_logged:
            if len(self._expired_logged) > 10_000:
                self._expired_logged.clear()
            self._expired_logged.add(seen)
            log.warning(
                "refused key %s of project %s%s: expired at %s",
                key.principal.key_fingerprint,
                key.principal.project,
                "" if key.name is None else f" ({key.name})",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.expires_at_ms / 1000)),
            )
        return KeyRefused(key.principal, "key_expired")


def _one(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """The value of a credential header, which must not disagree with itself: two lines of one
    header with different credentials would let a proxy in front and Tollgate each pick a
    different caller (compatibility C69)."""
    values = headers.getall(name, ())
    if not values:
        return None
    if len(values) > 1 and any(other != values[0] for other in values):
        raise GatewayError(400, f"Header {name} is given more than once with different values")
    return values[0]


async def _remote(shared: SharedKeys, digest: bytes) -> Principal:
    """A per-request key minted by another instance, from the shared store."""
    principal = await shared.lookup(digest)
    if principal is None:
        raise unknown_api_key()
    return principal
