"""Project API keys: lookup by SHA-256 digest, `sha256:` names, fingerprints.

The table never holds a plaintext secret: every key is stored under the SHA-256 digest of its
secret, whether the config named it by the secret itself or by `sha256:<hex>`. A lookup hashes
what the client sent and compares digests in constant time, so neither the table nor the
comparison tells anything about a secret that was not presented (compatibility C9, C10).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tollgate.security.ip_ranges import IpRanges
from tollgate.security.principal import Principal

HASHED_NAME = re.compile(r"sha256:([0-9a-fA-F]{64})")


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def fingerprint_of_digest(digest: bytes) -> str:
    """How logs name a key: the first 8 hex digits of its SHA-256."""
    return digest[:4].hex()


def digest_of_name(name: str) -> bytes:
    """The digest a `keys` entry stands for: given by a `sha256:` name, else hashed."""
    match = HASHED_NAME.fullmatch(name)
    return bytes.fromhex(match.group(1)) if match else digest_of(name)


def fingerprint_of_name(name: str) -> str:
    return "sha256:" + fingerprint_of_digest(digest_of_name(name)) + "…"


@dataclass(frozen=True, slots=True)
class ProjectKey:
    """A configured key, without its secret: the principal it authenticates, and where from."""

    principal: Principal
    allowed_ips: IpRanges | None  # None: any address (compatibility C11)


class KeyTable:
    """Immutable digest → key map built once per config snapshot."""

    __slots__ = ("_by_digest",)

    def __init__(self, entries: Iterable[tuple[bytes, ProjectKey]]) -> None:
        self._by_digest: Mapping[bytes, ProjectKey] = dict(entries)

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup_digest(self, digest: bytes) -> ProjectKey | None:
        # Comparing digests rather than secrets is what keeps this safe from timing attacks:
        # how long the lookup takes depends on the SHA-256 of the guess, which an attacker
        # cannot steer towards a prefix of a stored secret.
        return self._by_digest.get(digest)
