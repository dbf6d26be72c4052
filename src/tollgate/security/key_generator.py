"""New project API keys for `tollgate keys new` (compatibility C10, C54).

A key is 256 random bits from the operating system's CSPRNG, written in URL-safe base64 so it
survives headers, shells and JSON without escaping. The config needs only its `sha256:` name.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tollgate.security.keys import digest_of, fingerprint_of_digest

KEY_BYTES = 32  # 256 bits
DEFAULT_PROJECT = "my-project"
DEFAULT_ROLE = "default"  # DIAL's fallback role name (compatibility C15)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A fresh secret with the names the config and the logs use for it."""

    secret: str = field(repr=False)
    project: str
    roles: tuple[str, ...]

    @property
    def name(self) -> str:
        """The `keys` entry name that stands for the secret: `sha256:<64 hex digits>`."""
        return "sha256:" + digest_of(self.secret).hex()

    @property
    def fingerprint(self) -> str:
        """How logs name the key: the first 8 hex digits of its SHA-256."""
        return fingerprint_of_digest(digest_of(self.secret))

    def entry(self) -> dict[str, Any]:
        """`{"sha256:…": {"project": …, "roles": […]}}`, ready for the `keys` object."""
        return {self.name: {"project": self.project, "roles": list(self.roles)}}


def new_key(project: str = DEFAULT_PROJECT, roles: Sequence[str] = (DEFAULT_ROLE,)) -> NewKey:
    if not project:
        raise ValueError("the project must not be empty")  # DIAL: `Project key is undefined`
    if not roles or not all(roles):
        raise ValueError("a key needs at least one non-empty role")
    return NewKey(secrets.token_urlsafe(KEY_BYTES), project, tuple(roles))
