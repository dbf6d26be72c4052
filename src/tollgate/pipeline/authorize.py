"""Step 3: may this caller use this deployment (compatibility C12, C13)."""

from __future__ import annotations

from tollgate.errors import GatewayError, forbidden_deployment
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, may_use


def authorize(principal: Principal, deployment: Deployment) -> None:
    if not may_use(deployment.user_roles, principal.role_set):
        raise forbidden_deployment(deployment.name)
    if principal.source_deployment is not None and not deployment.accessible_by_per_request_key:
        raise GatewayError(
            403,
            f"Deployment {deployment.name} is not accessible by {principal.source_deployment}",
        )
