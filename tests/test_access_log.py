"""The access log (DECISIONS 12): one line per deployment call, answered or refused.

`--log-format json` (or `log.format`) makes every log line a JSON object; the access line of a
call carries its project, key fingerprint, deployment, status, tokens, cost, upstream, attempts,
duration and the trace id of its `traceparent`. Keys appear only as fingerprints (DECISIONS 11).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway_config import chat
from harness import FakeModel, Gateway, start_gateway, stop

KEY = "access-log-key-0123456789"
OTHER_KEY = "access-log-other-key-0123456789"
UPSTREAM_KEY = "access-log-upstream-secret-0123"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SECRETS = (KEY, OTHER_KEY, UPSTREAM_KEY)


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def config(fake: FakeModel) -> dict[str, Any]:
    return {
        "models": {
            "logged": {
                "endpoint": fake.endpoint("logged"),
                "upstreams": [{"endpoint": "http://logged-upstream", "key": UPSTREAM_KEY}],
                "pricing": {"unit": "token", "prompt": "0.25", "completion": "0.5"},
            },
            "private": {"endpoint": fake.endpoint("private"), "userRoles": ["vip"]},
            "once": {"endpoint": fake.endpoint("once")},
        },
        "keys": {
            KEY: {"project": "logging team", "role": "user"},
            OTHER_KEY: {"project": "other", "role": "user"},
        },
        "roles": {"user": {"limits": {"once": {"requestDay": "1"}}}},
    }


@pytest.fixture(scope="module")
def json_gateway(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    gw = start_gateway(work_dir, [config(fake_model)], extra_args=["--log-format", "json"])
    yield gw
    stop(gw.process)


def post(gw: Gateway, deployment: str, key: str = KEY, **extra: Any) -> httpx.Response:
    headers = {"Api-Key": key, "Content-Type": "application/json", "traceparent": TRACEPARENT}
    return httpx.post(
        f"{gw.url}/openai/deployments/{deployment}/chat/completions",
        headers=headers,
        json=chat("count these four", **extra),
        timeout=30,
    )


def json_lines(gw: Gateway) -> list[dict[str, Any]]:
    """Every log line; the start-up banner (printed, not logged) is the only other line."""
    lines = [line for line in gw.output().splitlines() if line.strip()]
    assert lines[0].startswith("Tollgate "), lines[0]
    return [orjson.loads(line) for line in lines[1:]]


def access_lines(gw: Gateway, count: int) -> list[dict[str, Any]]:
    """The access lines, once there are `count` of them (each is written as its call ends)."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in json_lines(gw) if e["logger"] == "tollgate.access"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_json_lines_carry_each_calls_facts(json_gateway: Gateway) -> None:
    gw = json_gateway
    before = len(access_lines(gw, 0))
    assert post(gw, "logged").status_code == 200
    assert post(gw, "logged", stream=True).status_code == 200
    lines = access_lines(gw, before + 2)[before:]
    assert len(lines) == 2
    for entry in lines:
        assert entry["level"] == "INFO" and entry["message"] == "call"
        assert entry["time"].endswith("Z")
        assert entry["project"] == "logging team"
        assert entry["key"] == fingerprint(KEY)
        assert entry["deployment"] == "logged"
        assert entry["status"] == 200
        # The fake counts words: 3 in the prompt, 5 in its answer.
        assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (
            3,
            5,
            8,
        )
        assert entry["cost_usd"] == pytest.approx(3 * 0.25 + 5 * 0.5)
        assert entry["upstream"] == f"sha256:{fingerprint(UPSTREAM_KEY)}"
        assert entry["attempts"] == 1
        assert entry["duration_ms"] > 0
        assert entry["trace_id"] == TRACE_ID


def test_refused_calls_are_logged_with_what_is_known(json_gateway: Gateway) -> None:
    gw = json_gateway
    before = len(access_lines(gw, 0))
    assert post(gw, "logged", key="no-such-key-0123456789").status_code == 401
    assert post(gw, "private").status_code == 403
    assert post(gw, "once", key=OTHER_KEY).status_code == 200
    assert post(gw, "once", key=OTHER_KEY).status_code == 429
    unknown, forbidden, first, limited = access_lines(gw, before + 4)[before:]

    assert unknown["status"] == 401 and unknown["deployment"] == "logged"
    assert "project" not in unknown and "key" not in unknown
    assert forbidden["status"] == 403 and forbidden["deployment"] == "private"
    assert forbidden["project"] == "logging team" and forbidden["key"] == fingerprint(KEY)
    assert forbidden["attempts"] == 0 and "upstream" not in forbidden
    assert first["status"] == 200 and first["project"] == "other"
    assert limited["status"] == 429 and limited["deployment"] == "once"
    assert limited["total_tokens"] == 0 and limited["attempts"] == 0


def test_no_secret_in_any_line(json_gateway: Gateway) -> None:
    gw = json_gateway
    assert post(gw, "logged").status_code == 200
    output = gw.output()
    for secret in SECRETS:
        assert secret not in output
        assert hashlib.sha256(secret.encode()).hexdigest() not in output


def test_text_format(work_dir: Path, fake_model: FakeModel) -> None:
    gw = start_gateway(work_dir, [config(fake_model)])
    try:
        assert post(gw, "logged").status_code == 200
        deadline = time.monotonic() + 10
        while "tollgate.access" not in gw.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next(x for x in gw.output().splitlines() if "tollgate.access" in x)
        assert " INFO tollgate.access: call " in line
        # A value with a space is quoted; the rest are bare.
        assert 'project="logging team"' in line
        assert f"key={fingerprint(KEY)}" in line
        assert "deployment=logged status=200" in line
        assert f"trace_id={TRACE_ID}" in line
        assert KEY not in gw.output() and UPSTREAM_KEY not in gw.output()
    finally:
        stop(gw.process)


def test_level_and_switch(work_dir: Path, fake_model: FakeModel) -> None:
    """`log.level: WARNING` silences the access log; so does `log.access: false`."""
    for env in ({"aidial.log.level": "WARNING"}, {"aidial.log.access": "false"}):
        gw = start_gateway(work_dir, [config(fake_model)], env=env, log_level="")
        try:
            assert post(gw, "logged").status_code == 200
            assert post(gw, "logged", key="no-such-key-0123456789").status_code == 401
            time.sleep(0.2)
            assert "tollgate.access" not in gw.output()
        finally:
            stop(gw.process)


def test_trace_ids() -> None:
    from tollgate.observability.calls import trace_id

    assert trace_id({"traceparent": TRACEPARENT}) == TRACE_ID
    assert trace_id({"traceparent": TRACEPARENT.upper()}) == TRACE_ID
    assert trace_id({}) is None
    for bad in (f"00-{'0' * 32}-00f067aa0ba902b7-01", "00-abc-def-01", "garbage"):
        assert trace_id({"traceparent": bad}) is None


def test_buffered_lines_are_written_when_the_gateway_stops(
    work_dir: Path, fake_model: FakeModel
) -> None:
    """Lines are written in batches (logs.FLUSH_AFTER_S); a SIGTERM right after calls loses
    none of them."""
    gw = start_gateway(work_dir, [config(fake_model)], extra_args=["--log-format", "json"])
    try:
        for _ in range(5):
            assert post(gw, "logged").status_code == 200
    finally:
        stop(gw.process)
    assert gw.process.returncode == 0
    lines = [e for e in json_lines(gw) if e["logger"] == "tollgate.access"]
    assert len(lines) == 5
    assert all(e["status"] == 200 and e["deployment"] == "logged" for e in lines)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_an_estimated_charge_is_marked(log_format: str) -> None:
    """A call charged Tollgate's estimate (its answer reported no usage) says so:
    `"usage_estimated": true` / `usage_estimated=true`; other calls' lines have no such field
    (compatibility C71)."""
    import os

    from tollgate.observability.logs import AccessLog

    read, write = os.pipe()
    try:
        log = AccessLog("json" if log_format == "json" else "text", fd=write)
        facts = ("team", "abcd1234", None, "gpt-4o", 200, (12, 6, 18), 3150, "#0", 1, 2.5, None)
        for estimated in (True, False):
            log.later(lambda *args: args, (*facts, estimated))
        log.flush()
        estimated_line, reported_line = os.read(read, 65536).decode().splitlines()
    finally:
        os.close(read)
        os.close(write)
    if log_format == "json":
        estimated_entry = orjson.loads(estimated_line)
        assert estimated_entry["usage_estimated"] is True
        assert estimated_entry["total_tokens"] == 18
        assert "usage_estimated" not in orjson.loads(reported_line)
    else:
        assert " total_tokens=18 usage_estimated=true cost_usd=0.00000315 " in estimated_line
        assert "usage_estimated" not in reported_line
        assert " total_tokens=18 cost_usd=0.00000315 " in reported_line
