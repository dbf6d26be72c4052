"""Routing: which upstream a call goes to, and what its failures do (compatibility C31-C36).

See `tollgate.routing.balancer` for the API and how the forward step drives it.
"""

from tollgate.routing.balancer import (
    MAX_ATTEMPTS,
    RETRIABLE_STATUSES,
    AttemptPlan,
    Balancers,
    DeploymentBalancer,
    Exhaustion,
    UpstreamSet,
    UpstreamState,
    backoff_seconds,
    is_retriable,
    retriable_statuses,
    retry_after_seconds,
    upstream_headers,
)

__all__ = [
    "MAX_ATTEMPTS",
    "RETRIABLE_STATUSES",
    "AttemptPlan",
    "Balancers",
    "DeploymentBalancer",
    "Exhaustion",
    "UpstreamSet",
    "UpstreamState",
    "backoff_seconds",
    "is_retriable",
    "retriable_statuses",
    "retry_after_seconds",
    "upstream_headers",
]
