"""The call object: one request's context, carried through the steps of the pipeline.

Each step reads what the steps before it found and adds what it learns: authentication the
principal, resolution the deployment, admission the ticket, the hop the relayed answer, the
observer's note what the metrics and the access log report. A step takes the call, not eight
arguments (as DIAL Core's `ProxyContext`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from tollgate.observability.calls import CallNote
    from tollgate.pipeline.admit import Ticket
    from tollgate.pipeline.relay import Relayed
    from tollgate.security.principal import Principal
    from tollgate.snapshot import Deployment, Snapshot


class Call:
    """A deployment call (or a feature, interceptor or route hop) in flight."""

    __slots__ = (
        "api",
        "body",
        "chained",
        "deployment",
        "handle",
        "note",
        "parsed",
        "principal",
        "raw_id",
        "relayed",
        "request",
        "snapshot",
        "ticket",
    )

    def __init__(
        self,
        request: web.Request,
        principal: Principal,
        snapshot: Snapshot,
        raw_id: str = "",
        api: str = "",
        note: CallNote | None = None,
    ) -> None:
        self.request = request
        self.principal = principal
        self.snapshot = snapshot  # the config the call started with, kept to its end
        self.raw_id = raw_id  # the deployment id as the path has it (percent-encoded)
        self.api = api  # chat/completions, completions or embeddings
        self.note = note  # None when metrics, the access log and traces are all off
        self.chained = False  # reached through the end of an interceptor chain
        self.deployment: Deployment | None = None
        self.body = b""
        self.parsed: dict[str, Any] = {}
        self.handle: bytes | None = None  # the digest of the hop's per-request key
        self.ticket: Ticket | None = None  # None: no limits apply, or not admitted yet
        self.relayed: Relayed | None = None

    def continued(self, principal: Principal, raw_id: str, api: str) -> Call:
        """The same request going on as another call (the deployment at a chain's end)."""
        call = Call(self.request, principal, self.snapshot, raw_id, api, self.note)
        call.chained = True
        return call
