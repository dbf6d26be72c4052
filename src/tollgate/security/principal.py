"""Who is calling: the root caller's project and roles, however the call was authenticated."""

from __future__ import annotations

from typing import NamedTuple


class Principal(NamedTuple):
    """The identity a request acts as.

    A call made with a per-request key acts as the root caller (spec auth-limits 3.5): same
    project, roles and `secured` flag; `source_deployment` names the deployment that received
    the key, and is `None` for a call made with a project key. (A named tuple: one is built for
    every hop, and tuples are the cheapest immutable objects to build.)
    """

    project: str
    roles: tuple[str, ...]
    role_set: frozenset[str]
    key_fingerprint: str
    secured: bool = False
    source_deployment: str | None = None

    def via(self, deployment: str) -> Principal:
        """The same root caller, acting through a per-request key given to `deployment`."""
        return Principal(
            self.project, self.roles, self.role_set, self.key_fingerprint, self.secured, deployment
        )
