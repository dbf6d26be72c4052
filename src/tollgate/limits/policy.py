"""Which limits apply to a caller and a deployment (compatibility C15).

Token and request limits: the field-wise maximum over the caller's roles that grant access to
the deployment and define a limit for it; else `roles.default.limits[<deployment>]`; else
unlimited. Cost limits: the field-wise maximum of `costLimit` over all the caller's roles; else
`roles.default.costLimit`; else unlimited. Results are cached per role set and deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, Config, CostLimit, Limit

DEFAULT_ROLE = "default"  # a plain role name, the fallback for limits only (compatibility C15)
TOKEN_WINDOWS = ("minute", "day", "week", "month")
REQUEST_WINDOWS = ("hour", "day")
COST_WINDOWS = ("minute", "day", "week", "month")
MAX_CACHED = 65536
NANO_PER_USD = 10**9


@dataclass(frozen=True, slots=True)
class Limits:
    """The effective limits of one caller on one deployment. UNLIMITED means no limit."""

    tokens: tuple[int, int, int, int]  # minute, day, week, month
    requests: tuple[int, int]  # hour, day
    cost: tuple[Decimal, Decimal, Decimal, Decimal]  # USD: minute, day, week, month

    # Derived once (a Limits is cached per role set and deployment), read on every call.
    positive: bool = field(init=False)  # DIAL refuses with 403 when any limit is <= 0
    unlimited: bool = field(init=False)  # nothing to check: the call is only counted
    # Cost limits in whole nano-dollars, UNLIMITED where there is none: what ledgers compare.
    cost_nano: tuple[int, int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "positive", min(self.tokens) > 0 and min(self.requests) > 0)
        minute, day, week, month = (
            min(int(limit * NANO_PER_USD), UNLIMITED) for limit in self.cost
        )
        object.__setattr__(self, "cost_nano", (minute, day, week, month))
        object.__setattr__(
            self,
            "unlimited",
            all(limit >= UNLIMITED for limit in (*self.tokens, *self.requests))
            and all(limit >= UNLIMITED_COST for limit in self.cost),
        )


def _limit_fields(limit: Limit) -> tuple[int, ...]:
    return (limit.minute, limit.day, limit.week, limit.month, limit.request_hour, limit.request_day)


def _cost_fields(limit: CostLimit) -> tuple[Decimal, ...]:
    return (limit.minute, limit.day, limit.week, limit.month)


NO_LIMIT = Limit()
NO_COST_LIMIT = CostLimit()


class LimitPolicy:
    """Built once per config snapshot."""

    __slots__ = ("_cache", "_config")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._cache: dict[tuple[frozenset[str], str, frozenset[str] | None], Limits] = {}

    def limits(
        self, roles: frozenset[str], deployment: str, user_roles: frozenset[str] | None
    ) -> Limits:
        key = (roles, deployment, user_roles)
        found = self._cache.get(key)
        if found is None:
            found = self._compute(roles, deployment, user_roles)
            if len(self._cache) < MAX_CACHED:
                self._cache[key] = found
        return found

    def _compute(
        self, roles: frozenset[str], deployment: str, user_roles: frozenset[str] | None
    ) -> Limits:
        config_roles = self._config.roles
        granting = roles if user_roles is None else roles & user_roles
        entries = [
            config_roles[name].limits[deployment]
            for name in sorted(granting)
            if name in config_roles and deployment in config_roles[name].limits
        ]
        if not entries:
            default = config_roles.get(DEFAULT_ROLE)
            fallback = default.limits.get(deployment) if default is not None else None
            entries = [fallback or NO_LIMIT]
        # Field-wise maximum, never a sum; an unset field is unlimited, so it wins
        # (compatibility C15).
        fields = [max(values) for values in zip(*map(_limit_fields, entries), strict=True)]

        cost_entries = [
            config_roles[name].cost_limit
            for name in sorted(roles)
            if name in config_roles and config_roles[name].cost_limit is not None
        ]
        if not cost_entries:
            default = config_roles.get(DEFAULT_ROLE)
            cost_entries = [
                default.cost_limit if default is not None and default.cost_limit else NO_COST_LIMIT
            ]
        costs = [
            max(values)
            for values in zip(*map(_cost_fields, (c for c in cost_entries if c)), strict=True)
        ]
        return Limits(
            tokens=(fields[0], fields[1], fields[2], fields[3]),
            requests=(fields[4], fields[5]),
            cost=(costs[0], costs[1], costs[2], costs[3]),
        )
