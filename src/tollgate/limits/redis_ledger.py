"""The shared ledger: counters in Redis, each check-and-charge one Lua call.

See compatibility C17 and C58.

`RedisLedger` keeps exactly what `MemoryLedger` keeps and answers exactly as it does; the Lua
scripts in `lua/` are the three critical sections (`admit`, `extend`, `settle`) and one read
(`usage`).

Time is the gateway's clock, not Redis TIME: slot indexes and calendar period ids are computed
here from the `Instant` the caller passes, so both ledgers see the same windows, and instances
sharing a Redis agree as far as their clocks do.

Key layout: every key of one caller bucket carries the bucket as its Redis Cluster hash tag, so a
script only ever touches one slot (`{...}` in the bucket is escaped as `%7B`/`%7D`, `%` as `%25`):

    <prefix>:{<bucket>}:entities  set: every entity the bucket used
    <prefix>:{<bucket>}:h         hash: the caller's total cost (sliding minute, calendar) and,
                                  under `<entity>|`, each entity's tokens (sliding minute,
                                  calendar), requests (sliding hour, calendar day) and
                                  attributed cost

Each window is a few fields of the hash (`lua/windows.lua`): a script reads it with one HMGET
and writes it with one HSET, and a sliding window keeps its running total, so a call costs four
Redis commands (two per script) whatever the number of windows and slots.

TTLs only collect idle keys: both keys' TTL is set to `KEY_TTL_S` at the first write of each
day. A window ends by the slot index or period id stored in it, never by a TTL, so refreshing
one cannot keep a window alive (LiteLLM's issue 14204 was that bug).

Numbers: counts are integers added with HINCRBY; Lua compares and sums them as doubles, exact
while every count, window total, amount and limit stays below 2^53 (9.007e15 tokens, or
$9,007,199.25 in nano-dollars per window).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from tollgate.config.schema import UNLIMITED
from tollgate.limits.ledger import (
    Ask,
    BucketUsage,
    Charge,
    EntityUsage,
    Kind,
    Ledger,
    Refusal,
    retry_after_s,
)
from tollgate.limits.usage import clamp
from tollgate.limits.windows import (
    HOUR,
    MINUTE,
    Instant,
)

# The longest month (31 days, plus a DST hour), the day between TTL refreshes, and margin.
KEY_TTL_S = 35 * 24 * 60 * 60
KEY_TTL = str(KEY_TTL_S)
_KINDS: dict[str, Kind] = {"token": "token", "request": "request", "cost": "cost"}


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        lua = files("tollgate.limits").joinpath("lua")
        source = "\n".join(lua.joinpath(part).read_text("utf-8") for part in ("windows.lua", name))
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


ADMIT = _Script.load("admit.lua")
EXTEND = _Script.load("extend.lua")
SETTLE = _Script.load("settle.lua")
USAGE = _Script.load("usage.lua")


class _Redis:
    """The one place that touches redis-py, whose annotations are loose: replies are `object`."""

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        self._client = client

    async def run(self, script: _Script, keys: Sequence[str], args: Sequence[str]) -> object:
        """EVALSHA; on NOSCRIPT (a restarted or flushed server), EVAL, which caches it again on
        the node that owns the keys (so this works on Redis Cluster too)."""
        try:
            reply: object = await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            reply = await self._client.eval(script.source, len(keys), *keys, *args)
        return reply

    async def members(self, key: str) -> list[str]:
        found: set[bytes | str] = await self._client.smembers(key)
        return sorted(_text(member) for member in found)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(f"unexpected Redis reply {value!r}")


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            # A stored count Redis wrote from a Lua number of 2^53 or more: `%.17g` text
            # (`9.2233720368547748e+18`), exact as a double (windows.lua caps every count).
            return int(float(value))
    raise TypeError(f"unexpected Redis reply {value!r}")


def _list(value: object) -> list[object]:
    if isinstance(value, list):
        return value
    raise TypeError(f"unexpected Redis reply {value!r}")


def _tag(bucket: str) -> str:
    """The bucket as a hash tag body: no braces inside, never empty, one bucket per tag."""
    escaped = bucket.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return escaped or "%"


def _limit(limit: int | None) -> str:
    return "" if limit is None or limit >= UNLIMITED else str(limit)


def _periods(at: Instant) -> list[str]:
    return [str(at.day), str(at.week), str(at.month)]


def _ends(at: Instant) -> list[str]:
    """The ends of `at`'s periods, then `at` in whole seconds: what tells a moment of the
    stored period from one of another (a changed `rateLimitSchedule`, see windows.lua)."""
    return [str(at.day_end), str(at.week_end), str(at.month_end), str(at.ms // 1000)]


class RedisLedger(Ledger):
    """Counters in Redis (or Redis Cluster), shared by every instance that uses the same prefix.

    The client is the caller's: this ledger neither opens nor closes it.
    """

    def __init__(self, client: Redis | RedisCluster, prefix: str = "tollgate") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a Redis key prefix must not contain '{' or '}' (the hash tag)")
        self._redis = _Redis(client)
        self._prefix = prefix

    def _bucket_key(self, bucket: str) -> str:
        return f"{self._prefix}:{{{_tag(bucket)}}}:"

    async def admit(self, ask: Ask) -> Refusal | None:
        base = self._bucket_key(ask.bucket)
        now = ask.now
        limits = ask.limits
        cost_limits = limits.cost_nano
        reply = await self._redis.run(
            ADMIT,
            [base + "entities", base + "h"],
            [
                ask.entity,
                "1" if ask.reserve else "0",
                str(clamp(ask.tokens)),
                str(clamp(ask.cost_nano)),
                str(now.ms // MINUTE.width_ms),
                str(now.ms // HOUR.width_ms),
                *_periods(now),
                *map(_limit, limits.tokens),
                *map(_limit, limits.requests),
                *map(_limit, cost_limits),
                KEY_TTL,
                *_ends(now),
            ],
        )
        if not isinstance(reply, list):
            return None
        kind = _KINDS[_text(reply[0])]
        used = tuple(_int(n) for n in _list(reply[1]))
        exceeded = tuple(_text(name) for name in _list(reply[2]))
        flat = _list(reply[3])
        slots = {_int(flat[i]): _int(flat[i + 1]) for i in range(0, len(flat), 2)}
        # The thresholds below are MemoryLedger.admit's, kept identical so both ledgers answer
        # the same Retry-After.
        if kind == "token":
            threshold = (
                limits.tokens[0] - ask.tokens + 1
                if ask.reserve and ask.tokens
                else limits.tokens[0]
            )
            retry = retry_after_s(exceeded, slots, MINUTE, now, threshold)
            return Refusal(kind, used, limits.tokens, exceeded, retry)
        if kind == "request":
            retry = retry_after_s(exceeded, slots, HOUR, now, limits.requests[0])
            return Refusal(kind, used, limits.requests, exceeded, retry)
        threshold = (
            cost_limits[0] - ask.cost_nano + 1 if ask.reserve and ask.cost_nano else cost_limits[0]
        )
        return Refusal(
            kind,
            used,
            cost_limits,
            exceeded,
            retry_after_s(exceeded, slots, MINUTE, now, threshold),
        )

    async def extend(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        base = self._bucket_key(ask.bucket)
        limits = ask.limits
        at = ask.now
        slot = MINUTE.slot(at.ms)
        reply = await self._redis.run(
            EXTEND,
            [base + "entities", base + "h"],
            [
                ask.entity,
                str(clamp(tokens)),
                str(clamp(cost_nano)),
                str(now.ms // MINUTE.width_ms),
                *_periods(now),
                *map(_limit, limits.tokens),
                *map(_limit, limits.cost_nano),
                str(clamp(ask.tokens)),
                str(clamp(ask.cost_nano)),
                str(slot) if slot >= MINUTE.oldest_live_slot(now.ms) else "",
                *_periods(at),
                str(at.ms // 1000),
                KEY_TTL,
                *_ends(now),
            ],
        )
        if not isinstance(reply, list):
            ask.tokens += tokens
            ask.cost_nano += cost_nano
            ask.now = now
            return None
        kind = _KINDS[_text(reply[0])]
        used = tuple(_int(n) for n in _list(reply[1]))
        exceeded = tuple(_text(name) for name in _list(reply[2]))
        flat = _list(reply[3])
        slots = {_int(flat[i]): _int(flat[i + 1]) for i in range(0, len(flat), 2)}
        # MemoryLedger.extend's threshold, so both ledgers answer the same Retry-After.
        window_limits = limits.tokens if kind == "token" else limits.cost_nano
        held, extra = (ask.tokens, tokens) if kind == "token" else (ask.cost_nano, cost_nano)
        retry = retry_after_s(exceeded, slots, MINUTE, now, window_limits[0] - held - extra + 1)
        return Refusal(kind, used, window_limits, exceeded, retry)

    async def settle(self, charge: Charge) -> None:
        base = self._bucket_key(charge.bucket)
        now = charge.now
        at = charge.reserved_at
        if at is None or not (charge.reserved_tokens or charge.reserved_cost_nano):
            release_tokens = release_cost = "0"
            reserved_slot = reserved_s = ""
            reserved_periods = ["", "", ""]
        else:
            release_tokens = str(clamp(charge.reserved_tokens))
            release_cost = str(clamp(charge.reserved_cost_nano))
            slot = MINUTE.slot(at.ms)
            reserved_slot = str(slot) if slot >= MINUTE.oldest_live_slot(now.ms) else ""
            reserved_periods = _periods(at)
            reserved_s = str(at.ms // 1000)
        await self._redis.run(
            SETTLE,
            [base + "entities", base + "h"],
            [
                charge.entity,
                str(clamp(charge.tokens)),
                str(clamp(charge.cost_nano)),
                str(now.ms // MINUTE.width_ms),
                *_periods(now),
                release_tokens,
                release_cost,
                reserved_slot,
                *reserved_periods,
                KEY_TTL,
                *_ends(now),
                reserved_s,
            ],
        )

    async def usage(self, bucket: str, entities: Iterable[str] | None, now: Instant) -> BucketUsage:
        base = self._bucket_key(bucket)
        names = await self._redis.members(base + "entities") if entities is None else list(entities)
        reply = await self._redis.run(
            USAGE,
            [base + "h"],
            [
                str(now.ms // MINUTE.width_ms),
                str(now.ms // HOUR.width_ms),
                *_periods(now),
                str(now.ms // 1000),
                *names,
            ],
        )
        n = [_int(value) for value in _list(reply)]
        report = BucketUsage(cost_nano=(n[0], n[1], n[2], n[3]))
        for index, name in enumerate(names):
            e = n[4 + 10 * index : 14 + 10 * index]
            report.entities[name] = EntityUsage(
                tokens=(e[0], e[1], e[2], e[3]),
                requests=(e[4], e[5]),
                cost_nano=(e[6], e[7], e[8], e[9]),
            )
        return report
