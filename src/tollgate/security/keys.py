"""Project API keys: lookup by SHA-256 digest, `sha256:` names, fingerprints.

The table never holds a plaintext secret: every key is stored under the SHA-256 digest of its
secret, whether the config named it by the secret itself or by `sha256:<hex>`. A lookup hashes
what the client sent and compares digests in constant time, so neither the table nor the
comparison tells anything about a secret that was not presented (compatibility C9, C10).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tollgate.config import chunked

# The name and digest helpers live in config (the loader needs them); re-exported here.
from tollgate.config.key_names import (
    HASHED_NAME,
    digest_of,
    digest_of_name,
    fingerprint_of_digest,
    fingerprint_of_name,
)
from tollgate.security.ip_ranges import IpRanges
from tollgate.security.principal import Principal

__all__ = [
    "HASHED_NAME",
    "KeyTable",
    "ProjectKey",
    "digest_of",
    "digest_of_name",
    "fingerprint_of_digest",
    "fingerprint_of_name",
]


@dataclass(frozen=True, slots=True)
class ProjectKey:
    """A configured key, without its secret: the principal it authenticates, and where from."""

    principal: Principal
    allowed_ips: IpRanges | None  # None: any address (compatibility C11)
    # Epoch ms from which the key is refused (`expiresAt`, compatibility C81); None: never.
    expires_at_ms: int | None = None
    # The key's entity name when it is API-managed (logs name it); None for a file key.
    name: str | None = None


class KeyTable:
    """Immutable digest → key map built once per config snapshot."""

    __slots__ = ("_by_digest",)

    def __init__(
        self, entries: dict[bytes, ProjectKey] | Iterable[tuple[bytes, ProjectKey]]
    ) -> None:
        # A dict is kept as it is (the snapshot builds one: no second copy of 100,000 keys).
        self._by_digest: Mapping[bytes, ProjectKey] = (
            entries if isinstance(entries, dict) else dict(entries)
        )

    def __len__(self) -> int:
        return len(self._by_digest)

    def take_apart(self) -> None:
        """Empty the table a key at a time (see `config.chunked`): for a table that nobody
        uses any more, released in a worker thread without holding the GIL long."""
        assert isinstance(self._by_digest, dict)
        chunked.dispose([self._by_digest], owned=True)

    def lookup_digest(self, digest: bytes) -> ProjectKey | None:
        # Comparing digests rather than secrets is what keeps this safe from timing attacks:
        # how long the lookup takes depends on the SHA-256 of the guess, which an attacker
        # cannot steer towards a prefix of a stored secret.
        return self._by_digest.get(digest)
