"""Who is calling: the root caller's project and roles, however the call was authenticated."""

from __future__ import annotations

from typing import NamedTuple

_tuple_new = tuple.__new__


class ChainStep(NamedTuple):
    """Where a per-request key given to an interceptor stands in its chain (compatibility C40).

    DIAL keeps the same in the key's data (`interceptors`, `interceptorIndex`,
    `initialDeployment`, `initialDeploymentApi`).
    """

    interceptors: tuple[str, ...]  # the whole chain, in call order
    position: int  # of the interceptor holding the key, in `interceptors`
    deployment: str  # the deployment the client called, as its raw path segment
    api: str  # the API the client called: chat/completions, completions or embeddings

    @property
    def mid_chain(self) -> bool:
        return 0 <= self.position < len(self.interceptors)


class Principal(NamedTuple):
    """The identity a request acts as.

    A call made with a per-request key acts as the root caller (compatibility C39): same
    project, roles and `secured` flag; `source_deployment` names the deployment that received
    the key, and is `None` for a call made with a project key. `chain` is set only for a key
    given to an interceptor. (A named tuple: one is built for every hop, and tuples are the
    cheapest immutable objects to build.)

    `attachments`: for a per-request key, the resource URLs attached to the request that made
    it, which it may read (DIAL's `attachedFiles` and `attachedFolders`, a folder's URL ending
    in `/`; compatibility C93); None when nothing was attached, as for every other caller.
    """

    project: str
    roles: tuple[str, ...]
    role_set: frozenset[str]
    key_fingerprint: str
    secured: bool = False
    source_deployment: str | None = None
    chain: ChainStep | None = None
    attachments: frozenset[str] | None = None

    def via(self, deployment: str, attachments: frozenset[str] | None = None) -> Principal:
        """The same root caller, acting through a per-request key given to `deployment`, which
        may read `attachments` (compatibility C93)."""
        # Built as a plain tuple: a named tuple's own constructor, with its defaults, costs
        # about twice as much, and this runs on every hop.
        return _tuple_new(
            Principal,
            (
                self.project,
                self.roles,
                self.role_set,
                self.key_fingerprint,
                self.secured,
                deployment,
                None,
                attachments,
            ),
        )

    def via_interceptor(
        self, step: ChainStep, attachments: frozenset[str] | None = None
    ) -> Principal:
        """The same root caller, acting through the key given to the interceptor of `step`."""
        return Principal(
            self.project,
            self.roles,
            self.role_set,
            self.key_fingerprint,
            self.secured,
            step.interceptors[step.position],
            step,
            attachments,
        )
