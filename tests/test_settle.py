"""The settle step: what a finished call is charged, and in which periods."""

from __future__ import annotations

from typing import Any

from tollgate.config.schema import Config
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.usage import Usage
from tollgate.pipeline.admit import Admission, Ticket, wall_clock_ms
from tollgate.pipeline.call import Call
from tollgate.pipeline.relay import Relayed
from tollgate.pipeline.settle import charge_for
from tollgate.security.principal import Principal
from tollgate.snapshot import build_snapshot

CALLER = Principal("proj", ("default",), frozenset({"default"}), "fp")
BODY = b'{"messages": []}'


def snapshot(timezone: str) -> Any:
    config = Config.model_validate(
        {
            "models": {"m": {"type": "chat", "endpoint": "http://127.0.0.1:1/v1/chat"}},
            "roles": {"default": {"limits": {"m": {"day": "1000000"}}}},
            "rateLimitSchedule": {"timezone": timezone},
        }
    )
    return build_snapshot(config)


async def test_a_call_admitted_before_a_schedule_change_is_charged_in_the_new_period() -> None:
    """A reload moves the day to another zone while a call is in flight: its tokens land in
    the new day, beside those of calls admitted since, instead of starting the day over."""
    ledger = MemoryLedger(path=None)
    admission = Admission(ledger, reserve=False, default_completion_tokens=0)
    before, after = snapshot("UTC"), snapshot("Pacific/Kiritimati")  # UTC+14: another day
    deployment_before, deployment_after = before.resolve("m"), after.resolve("m")
    assert deployment_before is not None and deployment_after is not None

    before_call = call_on(before, deployment_before)
    in_flight = admission.admit_now(before_call)
    assert in_flight is not None
    # The reload: a call admitted and settled under the new schedule.
    fresh_call = call_on(after, deployment_after)
    fresh = admission.admit_now(fresh_call)
    assert fresh is not None
    ledger.settle_now(finished(fresh_call, fresh, 100, after))
    # The call admitted before the reload ends now.
    ledger.settle_now(finished(before_call, in_flight, 50, after))

    usage = await ledger.usage("Keys/proj", ["m"], after.clock.at(in_flight.ask.now.ms))
    assert usage.entities["m"].tokens[1] == 150  # the new day holds both calls


def call_on(snapshot: Any, deployment: Any) -> Call:
    call = Call(None, CALLER, snapshot, "m", "chat")  # type: ignore[arg-type]
    call.deployment, call.body = deployment, BODY
    return call


def finished(call: Call, ticket: Ticket, tokens: int, current: Any) -> Any:
    """The call's charge once it relayed a 200 that used `tokens`, by `current`'s clock."""
    from aiohttp import web

    call.relayed = Relayed(web.Response(), Usage(0, 0, tokens), b"", False)
    return charge_for(call, ticket, current.clock, wall_clock_ms())
