"""The limits API: `/v1/deployments/{id}/limits`, `/v1/user/limits`, `/v1/user/usage`.

See compatibility C19.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST
from tollgate.errors import forbidden_deployment
from tollgate.http.responses import json_bytes_response
from tollgate.limits.ledger import EntityUsage, Ledger, usd
from tollgate.limits.policy import Limits
from tollgate.limits.windows import Instant, Period
from tollgate.pipeline.admit import bucket_of, wall_clock_ms
from tollgate.pipeline.resolve import resolve
from tollgate.security.principal import Principal
from tollgate.snapshot import Deployment, Kind, Snapshot, may_use

KINDS = {"model": Kind.MODEL, "application": Kind.APPLICATION, "assistant": Kind.ASSISTANT}


def _resets_at(snapshot: Snapshot, now: Instant, period: Period) -> str:
    """ISO-8601 with the schedule's offset, e.g. `2026-10-01T00:00:00+02:00` (compatibility C19)."""
    zone = snapshot.clock.schedule.zone
    return datetime.fromtimestamp(now.period_end(period), zone).isoformat()


def _stat(
    total: int | Decimal, used: int | Decimal, resets_at: str | None = None
) -> dict[str, Any]:
    stat: dict[str, Any] = {"total": _number(total), "used": _number(used)}
    if resets_at is not None:
        stat["resetsAt"] = resets_at
    return stat


def _number(value: int | Decimal) -> int | float:
    if isinstance(value, Decimal):
        return UNLIMITED if value >= UNLIMITED_COST else float(value)
    return value


def _cost_stats(
    snapshot: Snapshot, now: Instant, limits: Iterable[Decimal], used_nano: Iterable[int]
) -> dict[str, Any]:
    minute, day, week, month = (usd(n) for n in used_nano)
    l_minute, l_day, l_week, l_month = limits
    return {
        "minuteCostStats": _stat(l_minute, minute),
        "dayCostStats": _stat(l_day, day, _resets_at(snapshot, now, "day")),
        "weekCostStats": _stat(l_week, week, _resets_at(snapshot, now, "week")),
        "monthCostStats": _stat(l_month, month, _resets_at(snapshot, now, "month")),
    }


def _token_and_request_stats(
    snapshot: Snapshot, now: Instant, limits: Limits, usage: EntityUsage
) -> dict[str, Any]:
    t, r = limits.tokens, limits.requests
    return {
        "minuteTokenStats": _stat(t[0], usage.tokens[0]),
        "dayTokenStats": _stat(t[1], usage.tokens[1], _resets_at(snapshot, now, "day")),
        "weekTokenStats": _stat(t[2], usage.tokens[2], _resets_at(snapshot, now, "week")),
        "monthTokenStats": _stat(t[3], usage.tokens[3], _resets_at(snapshot, now, "month")),
        "hourRequestStats": _stat(r[0], usage.requests[0]),
        "dayRequestStats": _stat(r[1], usage.requests[1], _resets_at(snapshot, now, "day")),
    }


class LimitsApi:
    def __init__(self, ledger: Ledger, now_ms: Callable[[], int] = wall_clock_ms) -> None:
        self.ledger = ledger
        self._now_ms = now_ms

    def _limits(self, snapshot: Snapshot, principal: Principal, deployment: Deployment) -> Limits:
        return snapshot.limit_policy.limits(
            principal.role_set, deployment.name, deployment.user_roles
        )

    def _now(self, snapshot: Snapshot) -> Instant:
        return snapshot.clock.at(self._now_ms())

    async def deployment(
        self, snapshot: Snapshot, principal: Principal, raw_id: str
    ) -> web.StreamResponse:
        """Ten entries; the cost ones are the caller's budget and spend (compatibility C19)."""
        deployment = resolve(snapshot, raw_id)
        if not may_use(deployment.user_roles, principal.role_set):
            raise forbidden_deployment(deployment.name)
        now = self._now(snapshot)
        limits = self._limits(snapshot, principal, deployment)
        usage = await self.ledger.usage(bucket_of(principal), [deployment.name], now)
        body = _token_and_request_stats(snapshot, now, limits, usage.entities[deployment.name])
        body.update(_cost_stats(snapshot, now, limits.cost, usage.cost_nano))
        return json_bytes_response(orjson.dumps(body))

    async def user(
        self, request: web.Request, snapshot: Snapshot, principal: Principal, *, used_only: bool
    ) -> web.StreamResponse:
        """Every deployment of the asked types the caller may use (models by default); with
        `used_only`, those with any usage in their windows (compatibility C19)."""
        asked = request.query.get("deploymentTypes", "model")
        kinds = {KINDS[k.strip()] for k in asked.split(",") if k.strip() in KINDS}
        deployments = [
            d
            for d in snapshot.deployments.values()
            if d.kind in kinds and may_use(d.user_roles, principal.role_set)
        ]
        now = self._now(snapshot)
        usage = await self.ledger.usage(bucket_of(principal), [d.name for d in deployments], now)
        entries: dict[str, Any] = {}
        unlimited_cost = (UNLIMITED_COST,) * 4
        for deployment in sorted(deployments, key=lambda d: d.name):
            entity = usage.entities[deployment.name]
            if used_only and entity.idle:
                continue
            limits = self._limits(snapshot, principal, deployment)
            entry = _token_and_request_stats(snapshot, now, limits, entity)
            # Per deployment: the spend attributed to it, under no limit of its own.
            entry.update(_cost_stats(snapshot, now, unlimited_cost, entity.cost_nano))
            entries[deployment.name] = entry
        budget = snapshot.limit_policy.limits(principal.role_set, "", None).cost
        body: dict[str, Any] = {"deployments": entries}
        body.update(_cost_stats(snapshot, now, budget, usage.cost_nano))
        return json_bytes_response(orjson.dumps(body))
