"""Every call counted (issue 12, compatibility C71, C73): a 200 answer of a model that reports
no usage is charged Tollgate's own count of its tokens, and marked estimated.

Real HTTP to a real Tollgate (in process) and the fake model, which runs as an upstream that
never reports usage (`X-Fake-Usage: never`) or as OpenAI does (`on-request`: a stream has usage
only when `stream_options.include_usage` asks, which a model with `includeStreamUsage: false`
does not). The expected counts are worked out here with the `quicktok` encodings themselves,
not with Tollgate's counter.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import quicktok  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from harness import FakeModel, free_port, start_gateway, stop, write_json
from inprocess import InProcessFake, InProcessGateway, eventually_async, start_inprocess_gateway
from tollgate.fake_model import DEFAULT_REPLY
from tollgate.limits import tokens
from tollgate.pipeline import relay

KEY = "estimated-usage-key-0123456789abcdef"
UNLIMITED = 9223372036854775807
NEVER = {"X-Fake-Usage": "never"}
OPENAI = {"X-Fake-Usage": "on-request"}
MODES = {"never": NEVER, "on-request": OPENAI}
PROMPT = "Count the tokens of this prompt, please."
O200K = quicktok.get_encoding("o200k_base")
CL100K = quicktok.get_encoding("cl100k_base")
PRICING = {"unit": "token", "prompt": "0.001", "completion": "0.002"}
# One key per limit kind, usage mode and plain/streamed: each its own project and counters.
LIMIT_KEYS = {
    (kind, mode, streamed): f"est-{kind}-{mode}-{'stream' if streamed else 'plain'}-0123456789"
    for kind in ("tokens", "requests", "cost")
    for mode in MODES
    for streamed in (False, True)
}


def chat_prompt_tokens(count: Any, content: str = PROMPT) -> int:
    """OpenAI's rule for one user message: 3 + role + content, and 3 to prime the reply."""
    return 3 + count("user") + count(content) + 3


def quarter(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def config(fake: InProcessFake) -> dict[str, Any]:
    base = fake.url
    opted_out = {"includeStreamUsage": False, "pricing": PRICING}
    return {
        "models": {
            "gpt-4o": {"endpoint": fake.endpoint("gpt-4o"), "pricing": PRICING},
            "by-tokenizer": {
                "endpoint": fake.endpoint("by-tokenizer"),
                "overrideName": "gpt-4o",
                "tokenizerModel": "gpt-4",
            },
            "by-override": {
                "endpoint": fake.endpoint("by-override"),
                "overrideName": "gpt-4o-mini",
            },
            "house-model": {"endpoint": fake.endpoint("house-model")},
            "asks": {"endpoint": fake.endpoint("asks")},
            "opted-out": {"endpoint": fake.endpoint("opted-out"), **opted_out},
            "completion-model": {
                "type": "completion",
                "endpoint": fake.endpoint("completion-model", "completions"),
                "tokenizerModel": "gpt-4o",
            },
            "text-embedding-3-small": {
                "type": "embedding",
                "endpoint": fake.endpoint("text-embedding-3-small", "embeddings"),
            },
            "gpt-4o-responses": {"interfaces": {"openaiResponses": {"baseUrl": base}}},
            "claude-x": {"interfaces": {"anthropicMessages": {"baseUrl": base}}},
            "tight-tokens": {"endpoint": fake.endpoint("tight-tokens"), **opted_out},
            "tight-requests": {"endpoint": fake.endpoint("tight-requests"), **opted_out},
            "tight-cost": {"endpoint": fake.endpoint("tight-cost"), **opted_out},
        },
        "roles": {
            "tokens": {"limits": {"tight-tokens": {"day": "1"}}},
            "requests": {"limits": {"tight-requests": {"requestDay": "1"}}},
            # Any call costs more than this: the first is admitted, the next refused.
            "cost": {"costLimit": {"day": "0.000001"}},
        },
        "keys": {
            KEY: {"project": "estimated", "role": "user"},
            **{
                key: {"project": f"project-{key[:-10]}", "role": kind}
                for (kind, _, _), key in LIMIT_KEYS.items()
            },
        },
    }


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[tuple[InProcessGateway, int]]:
    metrics_port = free_port()
    gw = await start_inprocess_gateway(
        work_dir,
        [config(inprocess_fake)],
        settings={"metrics": {"port": metrics_port, "host": "127.0.0.1"}},
    )
    yield gw, metrics_port
    await gw.stop()


@pytest.fixture
async def aclient(
    agateway: tuple[InProcessGateway, int], afake: InProcessFake
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agateway[0].url, timeout=30) as http:
        yield http


async def call(
    client: httpx.AsyncClient,
    deployment: str,
    *,
    stream: bool,
    headers: dict[str, Any],
    key: str = KEY,
    api: str = "chat/completions",
    content: str = PROMPT,
) -> httpx.Response:
    if api == "completions":
        body: dict[str, Any] = {"prompt": content}
    elif api == "embeddings":
        body = {"input": content}
    else:
        body = {"messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    return await client.post(
        f"/openai/deployments/{deployment}/{api}",
        headers={"Api-Key": key, **headers},
        json=body,
    )


async def stats(client: httpx.AsyncClient, deployment: str, key: str = KEY) -> dict[str, Any]:
    answer = await client.get(f"/v1/deployments/{deployment}/limits", headers={"Api-Key": key})
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


async def used_tokens(client: httpx.AsyncClient, deployment: str, key: str = KEY) -> int:
    used: int = (await stats(client, deployment, key))["dayTokenStats"]["used"]
    return used


async def charged(
    client: httpx.AsyncClient, deployment: str, *, stream: bool, headers: dict[str, Any], **kw: Any
) -> int:
    """The tokens one call was charged."""
    before = await used_tokens(client, deployment)
    answer = await call(client, deployment, stream=stream, headers=headers, **kw)
    assert answer.status_code == 200, answer.text
    if stream:
        assert "data: " in answer.text
    return await used_tokens(client, deployment) - before


def estimated_count(text: str, deployment: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tollgate_usage_estimated_total" and sample.labels == {
                "deployment": deployment
            }:
                return sample.value
    return 0.0


async def scrape(port: int) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200
    return answer.text


# --- the estimate is the real count where an encoding fits ----------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_gpt_4o_is_counted_exactly_with_o200k(
    aclient: httpx.AsyncClient, stream: bool
) -> None:
    expected = chat_prompt_tokens(O200K.count) + O200K.count(DEFAULT_REPLY)
    assert await charged(aclient, "gpt-4o", stream=stream, headers=NEVER) == expected


@pytest.mark.parametrize("stream", [False, True])
async def test_the_tokenizer_named_by_the_model_counts(
    aclient: httpx.AsyncClient, stream: bool
) -> None:
    """`tokenizerModel` first (cl100k for gpt-4), then `overrideName`, then the name, whose
    family Tollgate cannot place: bytes / 4."""
    reply = "Здравствуйте, мир! 日本語のテキスト"  # where the three counts differ
    headers: dict[str, Any] = {**NEVER, "X-Fake-Reply": reply.encode()}
    content = "Здравствуйте, мир"
    cases = {
        "by-tokenizer": chat_prompt_tokens(CL100K.count, content) + CL100K.count(reply),
        "by-override": chat_prompt_tokens(O200K.count, content) + O200K.count(reply),
        "house-model": chat_prompt_tokens(quarter, content) + quarter(reply),
    }
    assert len(set(cases.values())) == 3
    for deployment, expected in cases.items():
        used = await charged(aclient, deployment, stream=stream, headers=headers, content=content)
        assert used == expected, deployment


@pytest.mark.parametrize("stream", [False, True])
async def test_completions_are_counted(aclient: httpx.AsyncClient, stream: bool) -> None:
    expected = O200K.count(PROMPT) + O200K.count(DEFAULT_REPLY)
    used = await charged(
        aclient, "completion-model", stream=stream, headers=NEVER, api="completions"
    )
    assert used == expected


async def test_embeddings_are_counted_by_their_input(aclient: httpx.AsyncClient) -> None:
    used = await charged(
        aclient, "text-embedding-3-small", stream=False, headers=NEVER, api="embeddings"
    )
    assert used == CL100K.count(PROMPT)


async def test_a_long_stream_is_read_past_what_is_kept(
    aclient: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound of what a stream keeps, its text is read as it goes: the count is the
    same."""
    monkeypatch.setattr(relay, "KEEP_FOR_ESTIMATE", 300)
    headers = {**NEVER, "X-Fake-Chunks": "200", "X-Fake-Chunk-Delay-Ms": "0"}
    answer = await call(
        aclient, "gpt-4o", stream=True, headers={**headers, "X-Fake-Usage": "always"}
    )
    reply = "".join(
        event["choices"][0]["delta"].get("content", "")
        for line in answer.text.splitlines()
        if line.startswith("data: {")
        for event in [orjson.loads(line[6:])]
        if event["choices"]
    )
    assert len(reply) > 600
    expected = chat_prompt_tokens(O200K.count) + O200K.count(reply)
    assert await charged(aclient, "gpt-4o", stream=True, headers=headers) == expected


async def test_responses_and_anthropic_answers_are_counted(aclient: httpx.AsyncClient) -> None:
    """The Responses API (o200k for a gpt-4o model) and the Messages API (bytes / 4 for a
    Claude model), plain and streamed."""
    for stream in (False, True):
        before = await used_tokens(aclient, "gpt-4o-responses")
        answer = await aclient.post(
            "/openai/v1/responses",
            headers={"Authorization": f"Bearer {KEY}", **NEVER},
            json={"model": "gpt-4o-responses", "input": PROMPT, "stream": stream},
        )
        assert answer.status_code == 200, answer.text
        expected = chat_prompt_tokens(O200K.count) + O200K.count(DEFAULT_REPLY)
        assert await used_tokens(aclient, "gpt-4o-responses") - before == expected, stream

        before = await used_tokens(aclient, "claude-x")
        answer = await aclient.post(
            "/anthropic/v1/messages",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", **NEVER},
            json={
                "model": "claude-x",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": stream,
            },
        )
        assert answer.status_code == 200, answer.text
        expected = chat_prompt_tokens(quarter) + quarter(DEFAULT_REPLY)
        assert await used_tokens(aclient, "claude-x") - before == expected, stream


# --- what is not estimated --------------------------------------------------------------------


async def test_reported_usage_is_charged_as_reported(
    aclient: httpx.AsyncClient, agateway: tuple[InProcessGateway, int]
) -> None:
    """An OpenAI-style stream Tollgate asked usage for is charged the upstream's count (the
    fake counts words: 7 for the prompt, 5 for the reply), and is not marked estimated."""
    before = estimated_count(await scrape(agateway[1]), "asks")
    assert await charged(aclient, "asks", stream=True, headers=OPENAI) == 7 + 5
    assert await charged(aclient, "asks", stream=False, headers={}) == 7 + 5
    assert estimated_count(await scrape(agateway[1]), "asks") == before


async def test_a_failed_call_is_not_estimated(aclient: httpx.AsyncClient) -> None:
    before = await used_tokens(aclient, "gpt-4o")
    answer = await call(aclient, "gpt-4o", stream=True, headers={**NEVER, "X-Fake-Status": "400"})
    assert answer.status_code == 400
    assert await used_tokens(aclient, "gpt-4o") == before


# --- limits trigger on streams as on plain calls --------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["tokens", "requests", "cost"])
async def test_limits_trigger_on_streams_as_on_plain_calls(
    aclient: httpx.AsyncClient, kind: str, mode: str, stream: bool
) -> None:
    """A token, request or cost limit lets the first call through and refuses the next, with
    an upstream that never reports usage and one that reports it only when asked (and is not
    asked: `includeStreamUsage: false`), streamed or not."""
    key = LIMIT_KEYS[(kind, mode, stream)]
    deployment = f"tight-{kind}"
    first = await call(aclient, deployment, stream=stream, headers=MODES[mode], key=key)
    assert first.status_code == 200, first.text
    assert "Hello" in first.text
    found = await stats(aclient, deployment, key)
    if kind == "requests":
        assert found["dayRequestStats"]["used"] == 1
    else:
        assert found["dayTokenStats"]["used"] > 0  # never charged 0
    if kind == "cost":
        assert found["dayCostStats"]["used"] > 0.000001
    second = await call(aclient, deployment, stream=stream, headers=MODES[mode], key=key)
    assert second.status_code == 429, second.text


# --- the mark: metric and access log ----------------------------------------------------------


async def test_an_estimate_is_counted_in_the_metric(
    aclient: httpx.AsyncClient, agateway: tuple[InProcessGateway, int]
) -> None:
    before = estimated_count(await scrape(agateway[1]), "opted-out")
    assert await charged(aclient, "opted-out", stream=True, headers=OPENAI) > 0
    assert await charged(aclient, "opted-out", stream=False, headers=NEVER) > 0
    # The plain call of an OpenAI-like upstream reports usage: not estimated.
    assert await charged(aclient, "opted-out", stream=False, headers=OPENAI) == 7 + 5
    assert estimated_count(await scrape(agateway[1]), "opted-out") == before + 2


async def test_encodings_are_read_at_start_and_never_on_reload(
    work_dir: Path, inprocess_fake: InProcessFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the gateway serves; not in a reload (reading one holds the GIL for up to half a
    second, which would stall every call) nor by a call (compatibility C73)."""
    monkeypatch.setattr(tokens, "_LOADED", {})
    path = write_json(
        work_dir / "estimated-preload.json",
        {"models": {"gpt-4o": {"endpoint": inprocess_fake.endpoint("gpt-4o")}}},
    )
    gw = await start_inprocess_gateway(work_dir, [path])
    try:
        assert tokens.loaded("gpt-4o")
        assert not tokens.loaded("gpt-4")
        write_json(
            path,
            {
                "models": {
                    "gpt-4o": {"endpoint": inprocess_fake.endpoint("gpt-4o")},
                    "new-one": {
                        "endpoint": inprocess_fake.endpoint("x"),
                        "tokenizerModel": "gpt-4",
                    },
                }
            },
        )
        assert await gw.store.reload()
        assert not tokens.loaded("gpt-4")  # estimated by its bytes until the next start
    finally:
        await gw.stop()


async def test_an_encoding_not_read_yet_is_not_read_by_a_call(
    aclient: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until its encoding is read, a model's estimate is bytes / 4, not a stall of the loop."""
    monkeypatch.setattr(tokens, "_LOADED", {})
    expected = chat_prompt_tokens(quarter) + quarter(DEFAULT_REPLY)
    assert await charged(aclient, "gpt-4o", stream=True, headers=NEVER) == expected
    assert not tokens.loaded("gpt-4o")


def test_the_access_log_marks_an_estimate(work_dir: Path, fake_model: FakeModel) -> None:
    """`"usage_estimated": true` on the JSON access line of an estimated call only."""
    models = {"gpt-4o": {"endpoint": fake_model.endpoint("gpt-4o"), "pricing": PRICING}}
    gw = start_gateway(
        work_dir,
        [{"models": models, "keys": {KEY: {"project": "logged", "role": "user"}}}],
        extra_args=["--log-format", "json"],
    )
    try:
        for usage in ("never", "always"):
            answer = httpx.post(
                f"{gw.url}/openai/deployments/gpt-4o/chat/completions",
                headers={"Api-Key": KEY, "X-Fake-Usage": usage},
                json={"messages": [{"role": "user", "content": PROMPT}], "stream": True},
                timeout=30,
            )
            assert answer.status_code == 200
        lines: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = [
                orjson.loads(line)
                for line in gw.output().splitlines()
                if '"tollgate.access"' in line
            ]
    finally:
        stop(gw.process)
    assert len(lines) == 2, gw.output()
    estimated, reported = lines
    expected = chat_prompt_tokens(O200K.count) + O200K.count(DEFAULT_REPLY)
    assert estimated["usage_estimated"] is True
    assert estimated["total_tokens"] == expected
    assert estimated["prompt_tokens"] == chat_prompt_tokens(O200K.count)
    assert float(estimated["cost_usd"]) > 0
    assert "usage_estimated" not in reported
    assert reported["total_tokens"] == 7 + 5


async def test_a_client_that_leaves_mid_stream_is_charged_what_was_produced(
    aclient: httpx.AsyncClient,
) -> None:
    """The client goes after the first chunk of a stream that will report no usage: the relay
    reads the upstream on, and the call is charged the whole answer's estimate, not 0."""
    headers = {**NEVER, "X-Fake-Chunks": "20", "X-Fake-Chunk-Delay-Ms": "20"}
    complete = await call(
        aclient, "gpt-4o", stream=True, headers={**headers, "X-Fake-Usage": "always"}
    )
    reply = "".join(
        event["choices"][0]["delta"].get("content", "")
        for line in complete.text.splitlines()
        if line.startswith("data: {")
        for event in [orjson.loads(line[6:])]
        if event["choices"]
    )
    expected = chat_prompt_tokens(O200K.count) + O200K.count(reply)
    before = await used_tokens(aclient, "gpt-4o")
    async with aclient.stream(
        "POST",
        "/openai/deployments/gpt-4o/chat/completions",
        headers={"Api-Key": KEY, **headers},
        json={"messages": [{"role": "user", "content": PROMPT}], "stream": True},
    ) as answer:
        assert answer.status_code == 200
        async for _ in answer.aiter_bytes():
            break  # and leave

    async def charged_in_full() -> bool:
        return await used_tokens(aclient, "gpt-4o") - before == expected

    await eventually_async(charged_in_full)
