"""Many instances on one Redis: shared limits and per-request keys; Redis failing (DECISIONS 10)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import FakeModel, Gateway, kill, start_gateway, stop
from redis_server import RedisServer, start_redis_server, stop_redis_server

KEY = "shared-key-0123456789"
OTHER_KEY = "shared-other-key-0123456789"


def shared_config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {
            "req-model": {"endpoint": fake.endpoint("req-model")},
            "tok-model": {"endpoint": fake.endpoint("tok-model")},
            "free-model": {"endpoint": fake.endpoint("free-model")},
        },
        "keys": {
            KEY: {"project": "shared", "role": "default"},
            OTHER_KEY: {"project": "shared", "role": "default"},
        },
        "roles": {
            "default": {
                "limits": {
                    "req-model": {"requestHour": 5},
                    "tok-model": {"minute": 100},
                    "free-model": {},
                }
            }
        },
    }


def call(url: str, model: str, key: str = KEY, words: int = 9) -> httpx.Response:
    return httpx.post(
        f"{url}/openai/deployments/{model}/chat/completions",
        headers={
            "Api-Key": key,
            "Content-Type": "application/json",
            "X-Fake-Reply": " ".join(["w"] * words),
        },
        json={"messages": [{"role": "user", "content": "x"}]},
        timeout=30,
    )


def stats(url: str, model: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/deployments/{model}/limits", headers={"Api-Key": KEY})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def redis(work_dir: Path) -> Iterator[RedisServer]:
    server = start_redis_server(work_dir / "redis-shared")
    yield server
    stop_redis_server(server)


@pytest.fixture(scope="module")
def trio(work_dir: Path, fake_model: FakeModel, redis: RedisServer) -> Iterator[list[Gateway]]:
    env = {"aidial.redis.singleServerConfig.address": redis.url}
    gateways = [start_gateway(work_dir, [shared_config(fake_model)], env=env) for _ in range(3)]
    yield gateways
    for gw in gateways:
        stop(gw.process)


def test_request_limit_holds_across_instances(trio: list[Gateway]) -> None:
    urls = itertools.cycle(gw.url for gw in trio)
    statuses = [call(next(urls), "req-model").status_code for _ in range(9)]
    assert statuses.count(200) == 5 and statuses.count(429) == 4
    for gw in trio:  # every instance sees the same counters
        assert stats(gw.url, "req-model")["hourRequestStats"]["used"] == 5


def test_token_limit_holds_across_instances(trio: list[Gateway]) -> None:
    a, b, c = (gw.url for gw in trio)
    assert call(a, "tok-model", words=59).status_code == 200  # 60 tokens
    assert call(b, "tok-model", words=59).status_code == 200  # 120: over
    refused = call(c, "tok-model")
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(
        "Hit token rate limit. Minute limit: 120 / 100 tokens."
    )


def test_project_keys_share_counters_across_instances(trio: list[Gateway]) -> None:
    before = stats(trio[0].url, "free-model")["dayRequestStats"]["used"]
    assert call(trio[1].url, "free-model", key=OTHER_KEY).status_code == 200
    assert call(trio[2].url, "free-model", key=KEY).status_code == 200
    assert stats(trio[0].url, "free-model")["dayRequestStats"]["used"] == before + 2


def test_per_request_keys_work_on_every_instance(
    trio: list[Gateway], fake_model: FakeModel
) -> None:
    fake_model.clear()
    headers = {
        "Api-Key": KEY,
        "Content-Type": "application/json",
        "X-Fake-Chunks": "4",
        "X-Fake-Chunk-Delay-Ms": "150",
    }
    body = {"stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream(
        "POST",
        f"{trio[0].url}/openai/deployments/free-model/chat/completions",
        headers=headers,
        json=body,
    ) as stream:
        chunks = stream.iter_raw()
        next(chunks)
        hop_key = dict(fake_model.last()["headers"])["Api-Key"]
        for gw in trio[1:]:
            info = httpx.get(f"{gw.url}/v1/user/info", headers={"Api-Key": hop_key})
            assert info.json() == {"roles": ["default"], "project": "shared"}
        assert call(trio[2].url, "free-model", key=hop_key).status_code == 200
        for _ in chunks:
            pass

    def revoked_everywhere() -> bool:
        return all(
            httpx.get(f"{gw.url}/v1/user/info", headers={"Api-Key": hop_key}).status_code == 401
            for gw in trio
        )

    eventually(revoked_everywhere)


def test_redis_down_and_back_with_local_fallback(work_dir: Path, fake_model: FakeModel) -> None:
    """`local`: keep serving on per-instance counters; push them to Redis when it returns."""
    directory = work_dir / "redis-durable"
    redis = start_redis_server(directory, durable=True)
    env = {"aidial.redis.singleServerConfig.address": redis.url}
    first = start_gateway(work_dir, [shared_config(fake_model)], env=env)
    second = start_gateway(work_dir, [shared_config(fake_model)], env=env)
    try:
        assert call(first.url, "free-model").status_code == 200
        assert stats(second.url, "free-model")["dayTokenStats"]["used"] == 10

        kill(redis.process)
        for _ in range(3):
            assert call(first.url, "free-model").status_code == 200
        health = httpx.get(f"{first.url}/health").json()
        assert health["status"] == "degraded" and health["limits"]["healthy"] is False
        assert "limits store unreachable" in first.output()

        redis = start_redis_server(directory, port=redis.port, durable=True)
        # What the first instance counted alone reaches Redis: the second one sees it all.
        eventually(lambda: stats(second.url, "free-model")["dayTokenStats"]["used"] == 40)
        assert stats(second.url, "free-model")["dayRequestStats"]["used"] == 4
        eventually(lambda: httpx.get(f"{first.url}/health").json()["limits"]["healthy"])
    finally:
        stop(first.process)
        stop(second.process)
        stop_redis_server(redis)


def test_redis_down_with_closed_failure_mode(work_dir: Path, fake_model: FakeModel) -> None:
    redis = start_redis_server(work_dir / "redis-closed")
    env = {
        "aidial.redis.singleServerConfig.address": redis.url,
        "aidial.limits.onStoreFailure": "closed",
    }
    gw = start_gateway(work_dir, [shared_config(fake_model)], env=env)
    try:
        assert call(gw.url, "free-model").status_code == 200
        kill(redis.process)
        refused = call(gw.url, "free-model")
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "Limits store is unavailable"
        assert gw.process.poll() is None
    finally:
        stop(gw.process)
