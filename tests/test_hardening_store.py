"""Hardening of the shared store (issue 11): a wrong Redis address noticed at start-up and
outages logged once (item 18), and a per-request key that outlives its hop after a Redis stall
(item 10). A private redis-server; real gateway processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway_config import chat, key_headers
from harness import FakeModel, Gateway, free_port, start_gateway, stop
from redis_server import RedisServer, redis_server_binary, start_redis_server, stop_redis_server

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="needs redis-server")

KEY = "store-key-0123456789"
POLL_S = 0.05
PATIENCE_S = 20.0


def until(condition: Any, what: str) -> None:
    """Poll `condition` until it holds (bounded: a test that hangs is a failure too)."""
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(POLL_S)


def _config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {"m": {"endpoint": fake.endpoint("m")}},
        "keys": {KEY: {"project": "p", "role": "r"}},
        "roles": {"r": {"limits": {"m": {"minute": "1000000"}}}},
    }


def _settings(port: int) -> dict[str, Any]:
    return {"redis": {"singleServerConfig": {"address": f"redis://127.0.0.1:{port}"}}}


def _health(gw: Gateway) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{gw.url}/health").json()
    return body


def _call(gw: Gateway, key: str = KEY, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/openai/deployments/m/chat/completions",
        headers={**key_headers(key), **headers},
        json=chat(),
        timeout=30,
    )


def test_a_wrong_redis_address_starts_degraded_and_recovers(
    work_dir: Path, fake_model: FakeModel
) -> None:
    port = free_port()  # nothing listens there yet
    gw = start_gateway(work_dir, [_config(fake_model)], settings=_settings(port))
    server: RedisServer | None = None
    try:
        health = _health(gw)
        assert health["status"] == "degraded" and health["limits"]["healthy"] is False
        output = gw.output()
        lines = [line for line in output.splitlines() if "limits store unreachable" in line]
        assert len(lines) == 1 and "at start-up" in lines[0], output
        for _ in range(5):  # served on this instance's counters meanwhile
            assert _call(gw).status_code == 200
        server = start_redis_server(work_dir / f"redis-{port}", port=port)
        until(lambda: _health(gw)["status"] == "ok", "/health ok once Redis listens")
        assert _call(gw).status_code == 200
    finally:
        stop(gw.process)
        if server is not None:
            stop_redis_server(server)
    output = gw.output()
    assert output.count("limits store unreachable") == 1, output
    assert output.count("limits store reachable again") == 1, output
    # Not one line per call: the calls made while Redis was away logged nothing of their own.
    assert output.count("per-request key") <= 1, output


@pytest.fixture
def shared(work_dir: Path, fake_model: FakeModel) -> Iterator[tuple[Gateway, RedisServer]]:
    server = start_redis_server(work_dir / f"redis-{free_port()}")
    gw = start_gateway(work_dir, [_config(fake_model)], settings=_settings(server.port))
    yield gw, server
    stop(gw.process)
    stop_redis_server(server)


def test_a_key_whose_revocation_stalled_is_refused_and_revoked_later(
    shared: tuple[Gateway, RedisServer], fake: FakeModel
) -> None:
    gw, server = shared
    store = redis.Redis(port=server.port)
    answers: list[httpx.Response] = []
    # A call that takes a while upstream: its key is published when it starts.
    slow = threading.Thread(target=lambda: answers.append(_call(gw, **{"X-Fake-Delay-Ms": "1500"})))
    slow.start()
    until(lambda: store.keys("tollgate:prk:*"), "the hop's key published")
    # Writes stall for longer than the client's timeout (1 s) after the hop ends: its DEL (and
    # its settle) fail.
    store.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
    slow.join()
    assert answers[0].status_code == 200
    hop_key = dict(fake.last()["headers"])["Api-Key"]
    store.set("tollgate-test:probe", 1)  # returns once the pause is over
    until(lambda: _health(gw)["status"] == "ok", "the store healthy again after the pause")
    assert store.keys("tollgate:prk:*")  # the DEL did not land: Redis still holds the key
    # The hop is over; this instance refuses its key although Redis still holds it.
    refused = _call(gw, hop_key)  # a charged call, as the hop's deployment
    assert refused.status_code == 401, refused.text
    # ... and the DEL is retried until it lands.
    until(lambda: not store.keys("tollgate:prk:*"), "the revoked key deleted from Redis")
    assert _call(gw, hop_key).status_code == 401
    output = gw.output()
    assert output.count("per-request keys: store unreachable") == 1, output
