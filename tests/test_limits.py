"""Role limits end to end: tokens, requests, cost, roles, counters, the limits API (spec 5-6)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import Upstream
from inprocess import (
    Clock,
    Gateways,
    InProcessFake,
    InProcessGateway,
    clock_injectable,
    eventually_async,
    start_inprocess_gateway,
)

pytestmark = pytest.mark.inprocess

UNLIMITED = 9223372036854775807
KEY_A1 = "limits-key-a1-0123456789"
KEY_A2 = "limits-key-a2-0123456789"  # same project as A1
KEY_B = "limits-key-b-0123456789"
KEY_COMBO = "limits-key-combo-0123456789"
KEY_OTHER = "limits-key-other-0123456789"
KEY_SPENDER = "limits-key-spender-0123456789"


def limits_config(fake: Upstream) -> dict[str, Any]:
    def model(name: str, **extra: Any) -> dict[str, Any]:
        return {"type": "chat", "endpoint": fake.endpoint(name), **extra}

    return {
        "models": {
            "tok-model": model("tok-model"),
            "req-model": model("req-model"),
            "day-model": model("day-model"),
            "neg-model": model("neg-model"),
            "combo-model": model("combo-model"),
            "free-model": model("free-model"),
            "priced-model": model(
                "priced-model", pricing={"unit": "token", "prompt": "0.001", "completion": "0.002"}
            ),
            "char-model": model(
                "char-model",
                pricing={"unit": "char_without_whitespace", "prompt": "0.01", "completion": "0.1"},
            ),
            "power-model": model("power-model", userRoles=["role-a"]),
        },
        "applications": {"app": {"endpoint": fake.endpoint("app")}},
        "keys": {
            KEY_A1: {"project": "proj-a", "role": "default"},
            KEY_A2: {"project": "proj-a", "role": "default"},
            KEY_B: {"project": "proj-b", "role": "default"},
            KEY_COMBO: {"project": "proj-combo", "roles": ["role-a", "role-b"]},
            KEY_OTHER: {"project": "proj-other", "role": "other"},
            KEY_SPENDER: {"project": "proj-spender", "roles": ["spender"]},
        },
        "roles": {
            "default": {
                "limits": {
                    "tok-model": {"minute": "30", "day": "1000"},
                    "req-model": {"requestHour": 2},
                    "day-model": {"day": 20},
                    "neg-model": {"day": -1},
                    "combo-model": {"minute": 10},
                    "free-model": {},
                }
            },
            "role-a": {"limits": {"combo-model": {"minute": 100}, "power-model": {"minute": 5}}},
            "role-b": {"limits": {"combo-model": {"minute": 200}}},
            "spender": {"costLimit": {"day": "0.05"}},
        },
    }


@pytest.fixture(scope="module")
async def gateway(work_dir: Path, inprocess_fake: InProcessFake) -> AsyncIterator[InProcessGateway]:
    gw = await start_inprocess_gateway(work_dir, [limits_config(inprocess_fake)])
    yield gw
    await gw.stop()


@pytest.fixture
async def client(gateway: InProcessGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        yield http


async def call(
    client: httpx.AsyncClient, key: str, model: str, reply_words: int = 9, **extra: Any
) -> httpx.Response:
    """One chat call of 1 prompt token and `reply_words` completion tokens."""
    headers = {"Api-Key": key, "Content-Type": "application/json"}
    headers["X-Fake-Reply"] = " ".join(["w"] * reply_words)
    body = {"messages": [{"role": "user", "content": "x"}], **extra}
    return await client.post(
        f"/openai/deployments/{model}/chat/completions", headers=headers, json=body
    )


async def limits_of(client: httpx.AsyncClient, key: str, model: str) -> dict[str, Any]:
    response = await client.get(f"/v1/deployments/{model}/limits", headers={"Api-Key": key})
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()
    return stats


async def test_token_minute_limit(client: httpx.AsyncClient) -> None:
    assert (await call(client, KEY_B, "tok-model")).status_code == 200  # 10 tokens
    assert (await call(client, KEY_B, "tok-model", reply_words=24)).status_code == 200  # 35: over
    refused = await call(client, KEY_B, "tok-model")
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert error == {
        "message": "Hit token rate limit. Minute limit: 35 / 30 tokens. Day limit: 35 / 1000 "
        f"tokens. Week limit: 35 / {UNLIMITED} tokens. Month limit: 35 / {UNLIMITED} tokens.",
        "display_message": "You've exceeded your minute token limit",
        "code": "429",
    }
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_request_hour_limit(client: httpx.AsyncClient) -> None:
    assert (await call(client, KEY_B, "req-model")).status_code == 200
    assert (await call(client, KEY_B, "req-model")).status_code == 200
    refused = await call(client, KEY_B, "req-model")
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == (
        f"Hit request rate limit. Hour limit: 2 / 2 requests. Day limit: 2 / {UNLIMITED} requests."
    )
    assert refused.json()["error"]["display_message"] == "You've exceeded your hourly request limit"
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    # A refused call is not counted.
    assert (await limits_of(client, KEY_B, "req-model"))["hourRequestStats"]["used"] == 2


async def test_day_limit_retry_after_is_the_next_day(client: httpx.AsyncClient) -> None:
    assert (await call(client, KEY_B, "day-model", reply_words=30)).status_code == 200
    refused = await call(client, KEY_B, "day-model")
    assert refused.status_code == 429
    assert refused.json()["error"]["display_message"] == "You've exceeded your daily token limit"
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    assert abs(int(refused.headers["Retry-After"]) - (midnight - now).total_seconds()) < 5


async def test_non_positive_limit_is_403(client: httpx.AsyncClient) -> None:
    refused = await call(client, KEY_B, "neg-model")
    assert refused.status_code == 403
    assert refused.json() == {"error": {"message": "Access denied", "code": "403"}}
    assert "Retry-After" not in refused.headers


async def test_roles_combine_by_field_wise_maximum(client: httpx.AsyncClient) -> None:
    stats = await limits_of(client, KEY_COMBO, "combo-model")
    assert stats["minuteTokenStats"]["total"] == 200
    assert stats["dayTokenStats"]["total"] == UNLIMITED


async def test_default_role_is_the_fallback(client: httpx.AsyncClient) -> None:
    # KEY_OTHER holds only "other", which defines nothing: `default` applies.
    assert (await limits_of(client, KEY_OTHER, "tok-model"))["minuteTokenStats"]["total"] == 30
    # A role that grants access but defines no limit for the model falls back too... and a
    # role with a limit for it takes precedence over `default`.
    assert (await limits_of(client, KEY_COMBO, "power-model"))["minuteTokenStats"]["total"] == 5


async def test_unlimited_models_still_count(client: httpx.AsyncClient) -> None:
    assert (await call(client, KEY_B, "free-model")).status_code == 200
    stats = await limits_of(client, KEY_B, "free-model")
    assert stats["minuteTokenStats"] == {"total": UNLIMITED, "used": 10}
    assert stats["hourRequestStats"] == {"total": UNLIMITED, "used": 1}


async def test_keys_of_a_project_share_counters(client: httpx.AsyncClient) -> None:
    assert (await call(client, KEY_A1, "tok-model", reply_words=29)).status_code == 200  # 30 tokens
    refused = await call(client, KEY_A2, "tok-model")
    assert refused.status_code == 429
    assert (await limits_of(client, KEY_A2, "tok-model"))["minuteTokenStats"]["used"] == 30


async def test_limits_api_figures(client: httpx.AsyncClient) -> None:
    key = "limits-api-key-0123456789"
    # A fresh project: its own gateway config key is not needed, reuse proj-other's key.
    before = await limits_of(client, KEY_OTHER, "free-model")
    assert (await call(client, KEY_OTHER, "free-model", reply_words=4)).status_code == 200
    assert (
        await call(client, KEY_OTHER, "free-model", reply_words=4, stream=True)
    ).status_code == 200
    stats = await limits_of(client, KEY_OTHER, "free-model")
    assert set(stats) == {
        "minuteTokenStats",
        "dayTokenStats",
        "weekTokenStats",
        "monthTokenStats",
        "hourRequestStats",
        "dayRequestStats",
        "minuteCostStats",
        "dayCostStats",
        "weekCostStats",
        "monthCostStats",
    }
    for window in ("minute", "day", "week", "month"):
        gained = stats[f"{window}TokenStats"]["used"] - before[f"{window}TokenStats"]["used"]
        assert gained == 10, window
    assert stats["dayRequestStats"]["used"] - before["dayRequestStats"]["used"] == 2
    assert "resetsAt" in stats["dayTokenStats"] and "resetsAt" not in stats["minuteTokenStats"]
    assert "resetsAt" in stats["monthCostStats"] and "resetsAt" not in stats["hourRequestStats"]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert stats["dayTokenStats"]["resetsAt"] == f"{tomorrow}T00:00:00+00:00"
    del key

    user_limits = (await client.get("/v1/user/limits", headers={"Api-Key": KEY_OTHER})).json()
    assert "free-model" in user_limits["deployments"]
    assert "power-model" not in user_limits["deployments"]  # no access
    assert "app" not in user_limits["deployments"]  # models only by default
    entry = user_limits["deployments"]["free-model"]
    assert entry["dayTokenStats"] == {k: stats["dayTokenStats"][k] for k in entry["dayTokenStats"]}
    with_apps = (
        await client.get(
            "/v1/user/limits",
            params={"deploymentTypes": "model,application"},
            headers={"Api-Key": KEY_OTHER},
        )
    ).json()
    assert "app" in with_apps["deployments"]
    usage = (await client.get("/v1/user/usage", headers={"Api-Key": KEY_OTHER})).json()
    assert "free-model" in usage["deployments"]
    assert "req-model" not in usage["deployments"]  # never used by this project


async def test_limits_api_errors(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/deployments/power-model/limits", headers={"Api-Key": KEY_B})
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "Forbidden deployment: power-model"
    response = await client.get("/v1/deployments/unknown/limits", headers={"Api-Key": KEY_B})
    assert response.json()["error"]["message"] == "Unknown application: unknown"


async def test_cost_limit_with_token_pricing(client: httpx.AsyncClient) -> None:
    # 1 prompt token x 0.001 + 20 completion tokens x 0.002 = $0.041 per call; limit $0.05/day.
    assert (await call(client, KEY_SPENDER, "priced-model", reply_words=20)).status_code == 200
    stats = await limits_of(client, KEY_SPENDER, "priced-model")
    assert stats["dayCostStats"]["used"] == pytest.approx(0.041)
    assert stats["dayCostStats"]["total"] == pytest.approx(0.05)
    assert (
        await call(client, KEY_SPENDER, "priced-model", reply_words=20)
    ).status_code == 200  # 0.082
    refused = await call(client, KEY_SPENDER, "priced-model")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["message"].startswith("Hit cost rate limit. Minute limit: $0.08 / $")
    assert "Day limit: $0.08 / $0.05." in error["message"]
    assert error["display_message"] == "You've exceeded your daily cost limit"
    # Cost limits span every model of the role.
    assert (await call(client, KEY_SPENDER, "char-model")).status_code == 429


async def test_cost_with_character_pricing(client: httpx.AsyncClient) -> None:
    # Prompt "x" (1 char x 0.01) + reply "ab cd" (4 chars x 0.1) = $0.41.
    headers = {"Api-Key": KEY_B, "Content-Type": "application/json", "X-Fake-Reply": "ab cd"}
    body = {"messages": [{"role": "user", "content": "x"}]}
    url = "/openai/deployments/char-model/chat/completions"
    assert (await client.post(url, headers=headers, json=body)).status_code == 200
    assert (
        await client.post(url, headers=headers, json=body | {"stream": True})
    ).status_code == 200
    stats = await limits_of(client, KEY_B, "char-model")
    assert stats["dayCostStats"]["used"] == pytest.approx(0.82)
    per_model = (await client.get("/v1/user/limits", headers={"Api-Key": KEY_B})).json()
    assert per_model["deployments"]["char-model"]["dayCostStats"]["used"] == pytest.approx(0.82)
    assert per_model["deployments"]["char-model"]["dayCostStats"]["total"] == UNLIMITED


async def test_per_request_key_counts_for_the_root_caller(
    client: httpx.AsyncClient, afake: InProcessFake
) -> None:
    headers = {
        "Api-Key": KEY_A1,
        "Content-Type": "application/json",
        "X-Fake-Chunks": "4",
        "X-Fake-Chunk-Delay-Ms": "100",
    }
    body = {"stream": True, "messages": [{"role": "user", "content": "x"}]}
    before = (await limits_of(client, KEY_A1, "free-model"))["dayRequestStats"]["used"]
    async with client.stream(
        "POST", "/openai/deployments/free-model/chat/completions", headers=headers, json=body
    ) as stream:
        chunks = stream.aiter_raw()
        await anext(chunks)
        hop_key = dict(afake.last()["headers"])["Api-Key"]
        assert (await call(client, hop_key, "free-model")).status_code == 200
        async for _ in chunks:
            pass
    after = (await limits_of(client, KEY_A2, "free-model"))["dayRequestStats"]["used"]
    assert after - before == 2  # the stream and the call made with its hop's key


async def test_disconnect_mid_stream_is_charged(
    client: httpx.AsyncClient, gateway: InProcessGateway
) -> None:
    before = (await limits_of(client, KEY_COMBO, "combo-model"))["dayTokenStats"]["used"]
    headers = {
        "Api-Key": KEY_COMBO,
        "Content-Type": "application/json",
        "X-Fake-Reply": "a b c d e f g h",
        "X-Fake-Chunk-Delay-Ms": "100",
    }
    body = {"stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with (
        httpx.AsyncClient() as other,
        other.stream(
            "POST",
            f"{gateway.url}/openai/deployments/combo-model/chat/completions",
            headers=headers,
            json=body,
        ) as stream,
    ):
        await anext(stream.aiter_raw())  # then hang up

    async def charged() -> bool:
        stats = await limits_of(client, KEY_COMBO, "combo-model")
        return bool(stats["dayTokenStats"]["used"] != before)

    await eventually_async(charged)
    assert (await limits_of(client, KEY_COMBO, "combo-model"))["dayTokenStats"][
        "used"
    ] - before == 9


async def test_applications_are_not_limited(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await call(client, KEY_B, "app")).status_code == 200


async def _burst(url: str, key: str, model: str, calls: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        headers = {
            "Api-Key": key,
            "Content-Type": "application/json",
            "X-Fake-Reply": " ".join(["w"] * 99),
            "X-Fake-Delay-Ms": "200",
        }
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 99}
        responses = await asyncio.gather(
            *(
                http.post(
                    f"/openai/deployments/{model}/chat/completions", headers=headers, json=body
                )
                for _ in range(calls)
            )
        )
        return [r.status_code for r in responses]


@pytest.mark.parametrize("mode", ["dial", "reserve"])
async def test_concurrent_burst(gateways: Gateways, afake: InProcessFake, mode: str) -> None:
    """50 concurrent calls of 100 tokens against a 1,000-token minute limit (DECISIONS 8)."""
    config = {
        "models": {"burst-model": {"endpoint": afake.endpoint("burst-model")}},
        "keys": {"burst-key-0123456789": {"project": "burst", "role": "default"}},
        "roles": {"default": {"limits": {"burst-model": {"minute": 1000}}}},
    }
    gw = await gateways.start([config], env={"aidial.limits.admission": mode})
    statuses = await _burst(gw.url, "burst-key-0123456789", "burst-model", 50)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        answer = await http.get(
            "/v1/deployments/burst-model/limits", headers={"Api-Key": "burst-key-0123456789"}
        )
        stats = answer.json()
    admitted = statuses.count(200)
    charged = stats["minuteTokenStats"]["used"]
    print(f"\nadmission={mode}: admitted {admitted} of 50, charged {charged} tokens (limit 1000)")
    assert set(statuses) <= {200, 429}
    assert charged == admitted * 100
    if mode == "dial":
        # DIAL's rule checks consumed usage only: every call in flight passes.
        assert admitted == 50
    else:
        # Each call reserves its prompt estimate plus max_tokens (99): at most the limit.
        assert charged <= 1000 and admitted >= 8


async def test_restart_keeps_usage_with_the_embedded_store(
    work_dir: Path, afake: InProcessFake
) -> None:
    """DECISIONS 10: counters are persisted to SQLite and read back at start-up (a gateway
    stopped as SIGTERM stops it, another started on the same file)."""
    config = {
        "models": {"kept-model": {"endpoint": afake.endpoint("kept-model")}},
        "keys": {"kept-key-0123456789": {"project": "kept", "role": "default"}},
        "roles": {"default": {"limits": {"kept-model": {"day": 10000, "requestDay": 100}}}},
    }
    usage_file = str(work_dir / "kept-usage.sqlite")
    env = {"aidial.limits.embedded.file": usage_file}
    headers = {"Api-Key": "kept-key-0123456789"}

    async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
        response = await http.get("/v1/deployments/kept-model/limits", headers=headers)
        result: dict[str, Any] = response.json()
        return result

    first = await start_inprocess_gateway(work_dir, [config], env=env)
    try:
        async with httpx.AsyncClient(base_url=first.url) as http:
            for _ in range(3):
                assert (await call(http, "kept-key-0123456789", "kept-model")).status_code == 200
            before = await stats(http)
    finally:
        await first.stop()  # a graceful stop flushes the counters
    assert before["dayTokenStats"]["used"] == 30

    second = await start_inprocess_gateway(work_dir, [config], env=env)
    try:
        async with httpx.AsyncClient(base_url=second.url) as http:
            after = await stats(http)
            for window in (
                "dayTokenStats",
                "weekTokenStats",
                "monthTokenStats",
                "dayRequestStats",
            ):
                assert after[window]["used"] == before[window]["used"], window
            assert (await call(http, "kept-key-0123456789", "kept-model")).status_code == 200
            assert (await stats(http))["dayTokenStats"]["used"] == 40
    finally:
        await second.stop()


async def test_reserve_mode_admits_a_call_whose_estimate_exceeds_the_limit(
    gateways: Gateways, afake: InProcessFake
) -> None:
    """The estimate (1,024 completion tokens by default) is capped at the limit: a lone call
    still goes through; the next waits for the window."""
    config = {
        "models": {"small-model": {"endpoint": afake.endpoint("small-model")}},
        "keys": {"small-key-0123456789": {"project": "small", "role": "default"}},
        "roles": {"default": {"limits": {"small-model": {"minute": 100}}}},
    }
    gw = await gateways.start([config], env={"aidial.limits.admission": "reserve"})
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await call(http, "small-key-0123456789", "small-model")).status_code == 200
        refused = await call(http, "small-key-0123456789", "small-model")
        assert refused.status_code == 429
        assert "Minute limit: 10 / 100 tokens." in refused.json()["error"]["message"]


async def test_a_minute_later_the_minute_window_admits_again(
    gateways: Gateways, afake: InProcessFake
) -> None:
    """The gateway's wall clock decides the windows: moved on a minute, the spent minute
    limit admits again, and the day's count still holds the earlier calls."""
    if not clock_injectable():
        pytest.skip("this Gateway reads the real clock")
    config = limits_config(afake)
    clock = Clock()
    day_ms = 86_400_000
    clock.freeze(clock() // day_ms * day_ms + day_ms // 2)  # noon: a minute on stays in the day
    gw = await gateways.start([config], clock=clock)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        assert (await call(http, KEY_B, "tok-model", reply_words=34)).status_code == 200  # 35
        assert (await call(http, KEY_B, "tok-model")).status_code == 429
        clock.advance(60_000)
        assert (await call(http, KEY_B, "tok-model")).status_code == 200
        stats = await limits_of(http, KEY_B, "tok-model")
        assert stats["minuteTokenStats"]["used"] == 10
        assert stats["dayTokenStats"]["used"] == 45
