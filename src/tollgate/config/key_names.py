"""How a `keys` entry's name stands for a secret: the secret itself, or `sha256:<hex>`.

Pure functions of names and digests, used by the loader (to name a key in a message without
showing it), the snapshot (to build the key table) and the routing and security packages.
The prefix `sha256:` is matched in any case (`SHA256:` too), and a name that starts with it
must be followed by exactly 64 hex digits (`check_name`): anything else is refused rather than
taken as a plaintext secret, so that a published digest never authenticates by itself.
"""

from __future__ import annotations

import hashlib
import re

HASHED_PREFIX = "sha256:"
HASHED_NAME = re.compile(r"sha256:([0-9a-f]{64})", re.IGNORECASE)


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def fingerprint_of_digest(digest: bytes) -> str:
    """How logs name a key: the first 8 hex digits of its SHA-256."""
    return digest[:4].hex()


def is_hashed_name(name: str) -> bool:
    """Whether `name` claims to be a digest (`sha256:` in any case), well formed or not."""
    return name[: len(HASHED_PREFIX)].lower() == HASHED_PREFIX


def check_name(name: str) -> str:
    """`name` if it may name a key; a `sha256:` name that is not 64 hex digits raises."""
    if is_hashed_name(name) and HASHED_NAME.fullmatch(name) is None:
        raise ValueError(
            "a key named sha256:... must be followed by exactly 64 hex digits, the SHA-256 of "
            "its secret (`tollgate keys new` prints one); a secret cannot start with sha256:"
        )
    return name


def digest_of_name(name: str) -> bytes:
    """The digest a `keys` entry stands for: given by a `sha256:` name, else hashed."""
    match = HASHED_NAME.fullmatch(name)
    return bytes.fromhex(match.group(1)) if match else digest_of(name)


def fingerprint_of_name(name: str) -> str:
    return "sha256:" + fingerprint_of_digest(digest_of_name(name)) + "…"
