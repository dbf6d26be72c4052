"""`tollgate usage`: current usage and remaining limits per project and deployment.

Read from the store the settings name: Redis (`redis.*`, the counters every instance shares)
or else the embedded SQLite file (`limits.embedded.file`), opened read-only so that a running
gateway is not disturbed. The embedded file is written every `limits.embedded.flushInterval`,
so a running gateway's last moments may not be in it yet.

The figures are the ledgers' own (`Ledger.usage`, as the limits API reads them). Usage is
counted per project (all its keys share it, compatibility C14); the limits shown are those
of the project's keys taken together, i.e. of a key holding all their roles (DIAL takes the
field-wise maximum across a caller's roles, compatibility C15).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from tollgate.config.schema import UNLIMITED, UNLIMITED_COST
from tollgate.limits.ledger import BucketUsage, Ledger, usd
from tollgate.limits.windows import Instant, Period
from tollgate.pipeline.admit import bucket_of
from tollgate.security.principal import Principal
from tollgate.settings import Settings
from tollgate.snapshot import Kind, Snapshot, may_use

TOKEN_WINDOWS = ("minute", "day", "week", "month")
REQUEST_WINDOWS = ("hour", "day")
CALENDAR: dict[str, Period] = {"day": "day", "week": "week", "month": "month"}


class UsageError(Exception):
    """The store cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    roles: frozenset[str]  # of all its keys


def projects(snapshot: Snapshot, only: str | None = None) -> list[Project]:
    roles: dict[str, set[str]] = {}
    for key in snapshot.config.keys.values():
        if key.project and (only is None or key.project == only):
            roles.setdefault(key.project, set()).update(key.merged_roles())
    return [Project(name, frozenset(roles[name])) for name in sorted(roles)]


def _window(used: int | Decimal, limit: int | Decimal, resets_at: str | None) -> dict[str, Any]:
    unlimited = limit >= (UNLIMITED_COST if isinstance(limit, Decimal) else UNLIMITED)
    number = float if isinstance(used, Decimal) else int
    entry: dict[str, Any] = {
        "used": number(used),
        "limit": None if unlimited else number(limit),
        "remaining": None if unlimited else number(max(limit - used, 0)),
    }
    if resets_at is not None:
        entry["resetsAt"] = resets_at
    return entry


def _resets(snapshot: Snapshot, now: Instant, window: str) -> str | None:
    period = CALENDAR.get(window)
    if period is None:
        return None
    return datetime.fromtimestamp(now.period_end(period), snapshot.clock.schedule.zone).isoformat()


def report_of(
    snapshot: Snapshot, project: Project, usage: BucketUsage, now: Instant
) -> dict[str, Any]:
    """One project's figures: its total cost, then each deployment used or limited."""
    policy = snapshot.limit_policy
    budget = policy.limits(project.roles, "", None).cost
    cost = {
        w: _window(usd(n), limit, _resets(snapshot, now, w))
        for w, n, limit in zip(TOKEN_WINDOWS, usage.cost_nano, budget, strict=True)
    }
    deployments: dict[str, Any] = {}
    for name in sorted(usage.entities):
        entity = usage.entities[name]
        deployment = snapshot.deployments.get(name)
        limited = (
            deployment is not None
            and deployment.kind is Kind.MODEL
            and may_use(deployment.user_roles, project.roles)
        )
        limits = policy.limits(
            project.roles, name, deployment.user_roles if deployment is not None else None
        )
        has_limit = any(t < UNLIMITED for t in (*limits.tokens, *limits.requests))
        if entity.idle and not (limited and has_limit):
            continue  # an unused deployment is shown when a limit of its own applies
        tokens, requests = (
            (limits.tokens, limits.requests)
            if limited
            # Applications are not limited (compatibility C14).
            else ((UNLIMITED,) * 4, (UNLIMITED,) * 2)
        )
        deployments[name] = {
            "tokens": {
                w: _window(u, limit, _resets(snapshot, now, w))
                for w, u, limit in zip(TOKEN_WINDOWS, entity.tokens, tokens, strict=True)
            },
            "requests": {
                w: _window(u, limit, _resets(snapshot, now, w))
                for w, u, limit in zip(REQUEST_WINDOWS, entity.requests, requests, strict=True)
            },
            # The spend attributed to the deployment: the limits are the project's (above).
            "cost": {
                w: float(usd(n)) for w, n in zip(TOKEN_WINDOWS, entity.cost_nano, strict=True)
            },
        }
    return {"cost": cost, "deployments": deployments}


async def collect(
    settings: Settings, snapshot: Snapshot, only: str | None = None
) -> dict[str, Any]:
    """The whole report, as `--json` prints it."""
    from tollgate.limits.store import redis_client

    chosen = projects(snapshot, only)
    if only is not None and not chosen:
        raise UsageError(f"no key of project {only!r} in the config")
    client = redis_client(settings)
    ledger: Ledger
    if client is not None:
        from tollgate.limits.redis_ledger import RedisLedger

        ledger = RedisLedger(client)
        store = {"store": "redis"}
    else:
        ledger = _embedded(settings)
        store = {"store": "embedded", "file": settings.usage_file or ""}
    now = snapshot.clock.at(time.time_ns() // 1_000_000)
    at = datetime.fromtimestamp(now.ms / 1000).astimezone().isoformat(timespec="seconds")
    report: dict[str, Any] = {**store, "at": at}
    entries: dict[str, Any] = {}
    try:
        for project in chosen:
            principal = Principal(project.name, (), project.roles, "")
            # Every model the project may use, and every deployment it used.
            names = {
                d.name
                for d in snapshot.deployments.values()
                if d.kind is Kind.MODEL and may_use(d.user_roles, project.roles)
            }
            used = await ledger.usage(bucket_of(principal), None, now)
            names.update(used.entities)
            usage = await ledger.usage(bucket_of(principal), sorted(names), now)
            entries[project.name] = report_of(snapshot, project, usage, now)
    except Exception as exc:
        if client is None:
            raise
        raise UsageError(f"cannot read usage from Redis: {type(exc).__name__}: {exc}") from exc
    finally:
        if client is not None:
            await client.aclose()
    report["projects"] = entries
    return report


def _embedded(settings: Settings) -> Ledger:
    import sqlite3
    from pathlib import Path

    from tollgate.limits.memory import MemoryLedger

    path = settings.usage_file
    if not path:
        raise UsageError("limits.embedded.file is empty: usage is kept in memory only")
    if not Path(path).is_file():
        raise UsageError(f"no usage file at {path} (limits.embedded.file)")
    try:
        return MemoryLedger.read_only(path)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read usage file {path}: {exc}") from exc


# --- the table ---------------------------------------------------------------------------


def _number(value: int | float) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _cell(name: str, window: dict[str, Any]) -> str:
    used = _number(window["used"])
    if window["limit"] is None:
        return f"{name} {used}/∞"
    return f"{name} {used}/{_number(window['limit'])} ({_number(window['remaining'])} left)"


def table(report: dict[str, Any]) -> str:
    where = "Redis" if report["store"] == "redis" else f"embedded file {report['file']}"
    lines = [f"Usage at {report['at']} from {where}"]
    if not report["projects"]:
        lines.append("no project has a key in the config")
    for name, entry in report["projects"].items():
        lines.append("")
        lines.append(f"project {name}")
        cost = "  ".join(_cell(w, v) for w, v in entry["cost"].items())
        lines.append(f"  {'cost (USD)':<14}{cost}")
        if not entry["deployments"]:
            lines.append("  no usage, no limit")
        for deployment, figures in entry["deployments"].items():
            lines.append(f"  {deployment}")
            for label, key in (("tokens", "tokens"), ("requests", "requests")):
                cells = "  ".join(_cell(w, v) for w, v in figures[key].items())
                lines.append(f"    {label:<12}{cells}")
            spend = "  ".join(f"{w} {_number(v)}" for w, v in figures["cost"].items())
            lines.append(f"    {'cost (USD)':<12}{spend}")
    return "\n".join(lines)


def run(
    settings_file: str | None, config_files: Sequence[str], project: str | None, as_json: bool
) -> int:
    """The command: 0, or 1 with a message on standard error."""
    import asyncio
    import sys

    import orjson

    from tollgate.config.load import ConfigError
    from tollgate.config_store import load_snapshot
    from tollgate.settings import SettingsError, load_settings

    overrides = {"config": {"files": list(config_files)}} if config_files else None
    try:
        settings = load_settings(settings_file, overrides=overrides)
        snapshot = load_snapshot(settings.config_files, overwrite_arrays=settings.overwrite_arrays)
        report = asyncio.run(collect(settings, snapshot, project))
    except (SettingsError, ConfigError, UsageError) as exc:
        print(f"tollgate usage: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(table(report))
    return 0
