"""Step 6b: the usage a call is counted with, estimated when a successful answer reported none.

(Being built for issue 12: for now the upstream's usage, as reported.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollgate.limits.usage import Usage
    from tollgate.pipeline.call import Call


def counted_usage(call: Call) -> Usage | None:
    """The usage `call` is counted with, once its answer was relayed."""
    relayed = call.relayed
    return None if relayed is None else relayed.usage
