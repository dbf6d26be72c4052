"""Hard budgets (issue 12, compatibility C79): with `limits.enforceDuringStream`, a stream is cut
with the API's own error event when the caller's token or cost limit would be crossed, and the
call is charged what was produced, within one block of the limit.

Real HTTP to real Tollgates (in process) and the fake model streaming long answers (thousands of
events, `X-Fake-Chunks`); the real `openai` and `anthropic` SDKs read the streams. Usage is read
from the gateway's ledger; the Redis case runs two gateways on one private redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from inprocess import InProcessFake, InProcessGateway, eventually_async, start_inprocess_gateway
from redis_server import RedisServer, start_redis_server, stop_redis_server
from tollgate.config.schema import UNLIMITED, UNLIMITED_COST, RateLimitSchedule
from tollgate.errors import GatewayError
from tollgate.limits.api_usage import OPENAI as OPENAI_FORMAT
from tollgate.limits.cost import Prices, token_cost
from tollgate.limits.ledger import Ask, BucketUsage, Ledger, Refusal
from tollgate.limits.memory import MemoryLedger
from tollgate.limits.policy import Limits
from tollgate.limits.tokens import estimate_tokens
from tollgate.limits.usage import Usage
from tollgate.limits.windows import Clock, Instant, Schedule
from tollgate.pipeline.budget import BLOCK_TOKENS, StreamBudget, error_event

TOKEN_LIMIT = 600
NANO_PER_TOKEN = 1_000  # both prices: $0.000001 a token
COST_LIMIT_NANO = 600_000  # $0.0006: 600 tokens' worth
PRICING = {"unit": "token", "prompt": "0.000001", "completion": "0.000001"}
# A long answer: 4000 events of one word each, one every millisecond (four seconds in all),
# which a limit of 600 tokens cuts after a few hundred.
LONG = {"X-Fake-Chunks": "4000", "X-Fake-Chunk-Delay-Ms": "1"}
FULL_S = 4.0
MODELS = {"chat": "chat-model", "responses": "resp-model", "anthropic": "claude-model"}
_keys = itertools.count()


def config(fake: InProcessFake, keys: dict[str, dict[str, str]]) -> dict[str, Any]:
    base = fake.url
    return {
        "models": {
            "chat-model": {"endpoint": fake.endpoint("chat-model"), "pricing": PRICING},
            "resp-model": {
                "interfaces": {"openaiResponses": {"baseUrl": base}},
                "pricing": PRICING,
            },
            "claude-model": {
                "interfaces": {"anthropicMessages": {"baseUrl": base}},
                "pricing": PRICING,
            },
        },
        "roles": {
            "tokens": {"limits": {name: {"day": str(TOKEN_LIMIT)} for name in MODELS.values()}},
            "cost": {"costLimit": {"day": str(COST_LIMIT_NANO / 10**9)}},
        },
        "keys": keys,
    }


# Keys made up front, each its own project (its own counters): one per test and limit kind.
KEYS = {
    f"enforce-{kind}-{n:03d}-0123456789abcdef": {"project": f"enforce-{kind}-{n:03d}", "role": kind}
    for kind in ("tokens", "cost")
    for n in range(40)
}


def new_key(kind: str) -> str:
    """A key (of a project of its own) whose role has a `kind` limit ("tokens" or "cost")."""
    n = next(_keys)
    return f"enforce-{kind}-{n:03d}-0123456789abcdef"


def bucket(key: str) -> str:
    return f"Keys/{KEYS[key]['project']}"


async def usage(gw: InProcessGateway, key: str) -> BucketUsage:
    now = gw.store.current.clock.at(gw.clock())
    return await gw.gateway.ledger.usage(bucket(key), None, now)


async def charged(gw: InProcessGateway, key: str, model: str) -> tuple[int, int]:
    """Tokens charged to `model` today, and the caller's cost today (nano-dollars)."""
    report = await usage(gw, key)
    entity = report.entities.get(model)
    return (entity.tokens[1] if entity is not None else 0), report.cost_nano[1]


async def settled(gw: InProcessGateway, key: str, model: str) -> tuple[int, int]:
    """`charged`, once the calls the client has finished reading are settled.

    A call is settled as its handler returns, a few turns of the loop after the client read
    the end of its answer (on Redis, in a task of the settler, which `drain` waits for)."""
    await asyncio.sleep(0.2)
    await gw.gateway.settler.drain()
    return await charged(gw, key, model)


@pytest.fixture(scope="module")
async def enforcing(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    gw = await start_inprocess_gateway(
        work_dir,
        [config(inprocess_fake, KEYS)],
        settings={"limits": {"enforceDuringStream": True}},
    )
    yield gw
    await gw.stop()


def openai_chat(gw: InProcessGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url=f"{gw.url}/openai/deployments/chat-model", max_retries=0
    )


def openai_v1(gw: InProcessGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=f"{gw.url}/openai/v1", max_retries=0)


def claude(gw: InProcessGateway, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=f"{gw.url}/anthropic", max_retries=0)


async def stream_chat(gw: InProcessGateway, key: str) -> tuple[str, openai.APIError | None]:
    """A long chat stream through the openai SDK: the text it read, and the error it raised."""
    text = ""
    stream = await openai_chat(gw, key).chat.completions.create(
        model="chat-model",
        messages=[{"role": "user", "content": "Tell a long story"}],
        stream=True,
        extra_headers=LONG,
    )
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    except openai.APIError as error:
        return text, error
    return text, None


async def stream_responses(gw: InProcessGateway, key: str) -> tuple[str, list[Any]]:
    """A long Responses stream through the openai SDK: its text and every event."""
    stream = await openai_v1(gw, key).responses.create(
        model="resp-model", input="Tell a long story", stream=True, extra_headers=LONG
    )
    text = ""
    events = []
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            text += event.delta
    return text, events


async def stream_claude(
    gw: InProcessGateway, key: str
) -> tuple[str, anthropic.APIStatusError | None]:
    text = ""
    try:
        async with claude(gw, key).messages.stream(
            model="claude-model",
            max_tokens=8000,
            messages=[{"role": "user", "content": "Tell a long story"}],
            extra_headers=LONG,
        ) as stream:
            async for piece in stream.text_stream:
                text += piece
    except anthropic.APIStatusError as error:
        return text, error
    return text, None


def refused_message(kind: str) -> str:
    return "Hit token rate limit." if kind == "tokens" else "Hit cost rate limit."


async def next_call_status(gw: InProcessGateway, key: str, api: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        if api == "chat":
            return await http.post(
                "/openai/deployments/chat-model/chat/completions",
                headers={"Api-Key": key},
                json={"messages": [{"role": "user", "content": "Hi"}]},
            )
        if api == "responses":
            return await http.post(
                "/openai/v1/responses",
                headers={"Api-Key": key},
                json={"model": "resp-model", "input": "Hi"},
            )
        return await http.post(
            "/anthropic/v1/messages",
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
            json={
                "model": "claude-model",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )


# The fake's Anthropic stream reports its prompt (a word count) in `message_start`, fewer
# tokens than Tollgate counted for it: the call is charged that prompt, so its charge may end
# that much below the limit its running count reached.
PROMPT_SLACK = 16


def assert_within_a_block(kind: str, tokens: int, cost_nano: int, slack: int = 0) -> None:
    """The charge passed the limit (the cut came when the count would cross it), by less than
    one block; without enforcement the 4000-word answer would be charged several times it."""
    if kind == "tokens":
        assert TOKEN_LIMIT - slack < tokens <= TOKEN_LIMIT + BLOCK_TOKENS, tokens
    else:
        lowest = COST_LIMIT_NANO - slack * NANO_PER_TOKEN
        assert lowest < cost_nano <= COST_LIMIT_NANO + BLOCK_TOKENS * NANO_PER_TOKEN, cost_nano
        assert cost_nano == tokens * NANO_PER_TOKEN


# --- the three APIs, a token limit and a cost limit ----------------------------------------------


@pytest.mark.parametrize("kind", ["tokens", "cost"])
async def test_a_chat_stream_is_cut_with_dials_error_event(
    enforcing: InProcessGateway, kind: str
) -> None:
    key = new_key(kind)
    started = time.monotonic()
    text, error = await stream_chat(enforcing, key)
    elapsed = time.monotonic() - started
    assert error is not None, "the stream ran to its end"
    assert error.message.startswith(refused_message(kind)), error.message
    assert isinstance(error.body, dict) and error.body["code"] == "429"
    assert error.body["display_message"].startswith("You've exceeded your daily")
    assert text  # the answer was relayed up to the limit
    # The upstream was not read to its end: the cut came long before the answer would.
    assert elapsed < FULL_S * 0.75, elapsed
    tokens, cost = await settled(enforcing, key, "chat-model")
    assert_within_a_block(kind, tokens, cost)
    refused = await next_call_status(enforcing, key, "chat")
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(refused_message(kind))


async def test_a_chat_stream_ends_with_the_error_then_done(enforcing: InProcessGateway) -> None:
    """On the wire: whole events, then DIAL's error body as a data event, then `[DONE]`."""
    key = new_key("tokens")
    async with (
        httpx.AsyncClient(base_url=enforcing.url, timeout=30) as http,
        http.stream(
            "POST",
            "/openai/deployments/chat-model/chat/completions",
            headers={"Api-Key": key, **LONG},
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True},
        ) as answer,
    ):
        assert answer.status_code == 200
        body = b"".join([part async for part in answer.aiter_raw()])
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    assert events[-3].startswith(b'data: {"error":{"message":"Hit token rate limit.')
    assert b'"code":"429"' in events[-3]
    assert all(event.startswith(b"data: {") for event in events[:-2])


@pytest.mark.parametrize("kind", ["tokens", "cost"])
async def test_a_responses_stream_is_cut_with_an_error_event(
    enforcing: InProcessGateway, kind: str
) -> None:
    key = new_key(kind)
    text, events = await stream_responses(enforcing, key)
    last = events[-1]
    assert last.type == "error", [event.type for event in events[-3:]]
    assert last.code == "rate_limit_exceeded"
    assert last.message.startswith(refused_message(kind))
    assert last.sequence_number == events[-2].sequence_number + 1
    assert text and not any(event.type == "response.completed" for event in events)
    tokens, cost = await settled(enforcing, key, "resp-model")
    assert_within_a_block(kind, tokens, cost)
    assert (await next_call_status(enforcing, key, "responses")).status_code == 429


@pytest.mark.parametrize("kind", ["tokens", "cost"])
async def test_an_anthropic_stream_is_cut_with_a_rate_limit_error(
    enforcing: InProcessGateway, kind: str
) -> None:
    key = new_key(kind)
    text, error = await stream_claude(enforcing, key)
    assert error is not None, "the stream ran to its end"
    assert isinstance(error.body, dict)
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert error.body["error"]["message"].startswith(refused_message(kind))
    assert text
    tokens, cost = await settled(enforcing, key, "claude-model")
    # Anthropic reported the prompt in `message_start`; the completion is Tollgate's count.
    assert_within_a_block(kind, tokens, cost, slack=PROMPT_SLACK)
    refused = await next_call_status(enforcing, key, "anthropic")
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"


async def test_a_short_stream_within_the_limits_is_untouched(enforcing: InProcessGateway) -> None:
    key = new_key("tokens")
    text, error = await stream_chat_short(enforcing, key)
    assert error is None and text == "Hello from the fake model."
    tokens, _ = await settled(enforcing, key, "chat-model")
    assert 0 < tokens < 100  # the upstream's own usage, as without enforcement


async def stream_chat_short(gw: InProcessGateway, key: str) -> tuple[str, Exception | None]:
    stream = await openai_chat(gw, key).chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text, None


async def test_a_client_that_leaves_is_not_charged_past_the_limit(
    enforcing: InProcessGateway,
) -> None:
    """The relay drains the upstream for usage when the client leaves (compatibility C29),
    but not past the limits."""
    key = new_key("tokens")
    async with (
        httpx.AsyncClient(base_url=enforcing.url, timeout=30) as http,
        http.stream(
            "POST",
            "/openai/deployments/chat-model/chat/completions",
            headers={"Api-Key": key, **LONG},
            json={"messages": [{"role": "user", "content": "Hi"}], "stream": True},
        ) as answer,
    ):
        async for _ in answer.aiter_raw():
            break  # one read, then gone
    # Reservations never pass the limit; the charge of the count does, when the drain stops.
    seen: list[int] = []

    async def charged_past_the_limit() -> bool:
        seen.append((await charged(enforcing, key, "chat-model"))[0])
        return seen[-1] > TOKEN_LIMIT

    await eventually_async(charged_past_the_limit)
    await asyncio.sleep(FULL_S)  # the answer's whole length: nothing more comes
    tokens, _ = await charged(enforcing, key, "chat-model")
    assert tokens == seen[-1] <= TOKEN_LIMIT + BLOCK_TOKENS


# --- concurrency and Redis -------------------------------------------------------------------


async def test_concurrent_streams_of_one_caller_stay_within_the_limit(
    enforcing: InProcessGateway,
) -> None:
    key = new_key("tokens")
    results = await asyncio.gather(*(stream_chat(enforcing, key) for _ in range(4)))
    assert all(error is not None for _, error in results)
    tokens, _ = await settled(enforcing, key, "chat-model")
    # Each stream may pass the limit by what it counted past its last block, no more.
    assert TOKEN_LIMIT < tokens <= TOKEN_LIMIT + 4 * BLOCK_TOKENS, tokens


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis_server(server)


async def test_two_gateways_on_one_redis_share_the_running_count(
    work_dir: Path, inprocess_fake: InProcessFake, redis_server: RedisServer
) -> None:
    settings = {
        "limits": {"enforceDuringStream": True},
        "redis": {"singleServerConfig": {"address": f"redis://127.0.0.1:{redis_server.port}"}},
    }
    one = await start_inprocess_gateway(work_dir, [config(inprocess_fake, KEYS)], settings=settings)
    two = await start_inprocess_gateway(work_dir, [config(inprocess_fake, KEYS)], settings=settings)
    try:
        for kind in ("tokens", "cost"):
            key = new_key(kind)
            results = await asyncio.gather(
                stream_chat(one, key),
                stream_chat(two, key),
                stream_chat(one, key),
                stream_chat(two, key),
            )
            assert all(error is not None for _, error in results)
            await settled(two, key, "chat-model")  # the calls of each gateway settled
            tokens, cost = await settled(one, key, "chat-model")
            assert (tokens, cost) == await charged(two, key, "chat-model")  # one count
            if kind == "tokens":
                assert TOKEN_LIMIT < tokens <= TOKEN_LIMIT + 4 * BLOCK_TOKENS, tokens
            else:
                assert COST_LIMIT_NANO < cost <= COST_LIMIT_NANO + 4 * BLOCK_TOKENS * 1_000, (
                    tokens,
                    cost,
                    [(len(text), str(error)) for text, error in results],
                )
            for gw in (one, two):
                assert (await next_call_status(gw, key, "chat")).status_code == 429
    finally:
        await one.stop()
        await two.stop()


# --- the setting off, and reserve mode -------------------------------------------------------


async def test_with_the_setting_off_a_stream_runs_to_its_end(
    work_dir: Path, inprocess_fake: InProcessFake
) -> None:
    gw = await start_inprocess_gateway(work_dir, [config(inprocess_fake, KEYS)])
    try:
        assert gw.settings.enforce_during_stream is False
        key = new_key("tokens")
        text, error = await stream_chat(gw, key)
        assert error is None
        assert len(text.split()) == 4000
        tokens, _ = await settled(gw, key, "chat-model")
        assert tokens > 4000  # the whole answer, as DIAL charges it: the limit was overshot
        assert (await next_call_status(gw, key, "chat")).status_code == 429
    finally:
        await gw.stop()


async def test_reserve_mode_cuts_at_the_limit_too(
    work_dir: Path, inprocess_fake: InProcessFake
) -> None:
    gw = await start_inprocess_gateway(
        work_dir,
        [config(inprocess_fake, KEYS)],
        settings={"limits": {"enforceDuringStream": True, "admission": "reserve"}},
    )
    try:
        for kind in ("tokens", "cost"):
            key = new_key(kind)
            _, error = await stream_chat(gw, key)
            assert error is not None and error.message.startswith(refused_message(kind))
            tokens, cost = await settled(gw, key, "chat-model")
            assert_within_a_block(kind, tokens, cost)
    finally:
        await gw.stop()


# --- the budget itself: blocks, whole events, the error events ------------------------------


class CountingLedger(MemoryLedger):
    """The embedded ledger, counting how often a stream's reservation is extended."""

    def __init__(self) -> None:
        super().__init__(None)
        self.extensions = 0

    def extend_now(self, ask: Ask, tokens: int, cost_nano: int, now: Instant) -> Refusal | None:
        self.extensions += 1
        return super().extend_now(ask, tokens, cost_nano, now)


def chat_event(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":' + orjson.dumps(text) + b"}}]}\n\n"


def budget_of(ledger: Ledger, limits: Limits, prices: Prices | None, ask_tokens: int = 0) -> Any:
    ask = Ask("Keys/unit", "m", limits, CLOCK.at(T0), reserve=bool(ask_tokens), tokens=ask_tokens)
    assert ledger.admit_now(ask) is None
    prompt_cost = Decimal(0) if prices is None else token_cost(prices, Usage(10, 0, 10))
    return StreamBudget(
        ledger,
        ask,
        usage_format=OPENAI_FORMAT,
        prompt=10,
        count=estimate_tokens,
        prices=prices,
        prompt_cost=prompt_cost,
        clock=lambda: CLOCK.at(T0 + 1000),
    )


CLOCK = Clock(Schedule.of(RateLimitSchedule()))
T0 = 1_780_000_000_000
PRICES = Prices("token", Decimal("0.000001"), Decimal("0.000002"), None, None)
WORD = " word"  # 5 bytes: 2 tokens at bytes/4


def limits_of(day_tokens: int = UNLIMITED, day_cost: Decimal = UNLIMITED_COST) -> Limits:
    return Limits(
        (UNLIMITED, day_tokens, UNLIMITED, UNLIMITED),
        (UNLIMITED, UNLIMITED),
        (UNLIMITED_COST, day_cost, UNLIMITED_COST, UNLIMITED_COST),
    )


async def relay_events(budget: Any, events: int) -> tuple[int, bool]:
    """What the relay does with each event: the events sent, and whether it was cut."""
    sent = 0
    for _ in range(events):
        chunk = budget.take(chat_event(WORD))
        if budget.due and not await budget.extend():
            return sent, True
        sent += bool(chunk)
    return sent, False


@pytest.mark.parametrize(
    "limits",
    [
        limits_of(day_tokens=100_000),
        # $0.2 a day: 100,000 completion tokens at $0.000002; a block is 256 tokens' cost.
        limits_of(day_cost=Decimal("0.2")),
    ],
)
async def test_the_ledger_is_asked_once_per_block(limits: Limits) -> None:
    ledger = CountingLedger()
    budget = budget_of(ledger, limits, PRICES)
    sent, cut = await relay_events(budget, 5_000)  # 10,000 tokens
    assert (sent, cut) == (5_000, False)
    # One at the first event (nothing is reserved in `dial` mode), then one per block (each
    # event passing a block asks for the block past it: 256 tokens plus the event's 2).
    assert 10_000 // (BLOCK_TOKENS + 2) <= ledger.extensions <= 1 + 10_000 // BLOCK_TOKENS
    await ledger.close()


async def test_a_reservation_of_reserve_mode_is_used_before_the_ledger_is_asked() -> None:
    ledger = CountingLedger()
    budget = budget_of(ledger, limits_of(day_tokens=100_000), None, ask_tokens=1_010)
    await relay_events(budget, 500)  # 10 + 1000 tokens: within the admission's reservation
    assert ledger.extensions == 0
    await relay_events(budget, 1)
    assert ledger.extensions == 1
    await ledger.close()


@pytest.mark.parametrize(
    "limits", [limits_of(day_tokens=1_000), limits_of(day_cost=Decimal("0.002"))]
)
async def test_a_stream_is_cut_at_the_limit_not_before(limits: Limits) -> None:
    """Tokens: 10 prompt + 2 per event, 1000 allowed: 495 events fit. Cost: $0.00001 for the
    prompt, $0.000004 an event, $0.002 allowed: 497 events fit."""
    ledger = CountingLedger()
    budget = budget_of(ledger, limits, PRICES)
    sent, cut = await relay_events(budget, 5_000)
    assert cut and sent == (495 if limits.tokens[1] == 1_000 else 497)
    assert budget.cut.status == 429
    # Charged the events sent and the one that did not fit.
    assert budget.charged(None) == Usage(10, 2 * sent + 2, 10 + 2 * sent + 2)
    # Asked per block, plus once more for what was left of the room, and the refusal.
    assert ledger.extensions <= 1 + (2 * sent) // BLOCK_TOKENS + 3
    await ledger.close()


def test_take_hands_on_whole_events_only() -> None:
    budget = budget_of(MemoryLedger(None), limits_of(day_tokens=1_000), None)
    event = chat_event(" hello")
    assert budget.take(event[:7]) == b""
    assert budget.take(event[7:] + event[:3]) == event
    assert budget.take(event[3:]) == event
    assert budget.completion == 4
    crlf = event.replace(b"\n\n", b"\r\n\r\n")
    assert budget.take(crlf) == crlf
    assert budget.take(b"data: [DO") == b"" and budget.end() == b"data: [DO"


def test_charged_prefers_what_the_upstream_counted() -> None:
    budget = budget_of(MemoryLedger(None), limits_of(day_tokens=1_000), None)
    budget.completion = 100
    assert budget.charged(None) == Usage(10, 100, 110)
    assert budget.charged(Usage(12, 120, 132)) == Usage(12, 120, 132)
    # Anthropic's `message_start`: the prompt, and one output token so far.
    assert budget.charged(Usage(8, 1, 9)) == Usage(8, 100, 108)


@pytest.mark.parametrize(
    ("api", "expected"),
    [
        (
            "openai",
            b'data: {"error":{"message":"Hit it.","code":"429","display_message":"Stop."}}\n\n'
            b"data: [DONE]\n\n",
        ),
        (
            "responses",
            b'event: error\ndata: {"type":"error","code":"rate_limit_exceeded",'
            b'"message":"Hit it.","param":null,"sequence_number":7}\n\n',
        ),
        (
            "anthropic",
            b'event: error\ndata: {"type":"error","error":{"type":"rate_limit_error",'
            b'"message":"Hit it."}}\n\n',
        ),
    ],
)
def test_the_error_event_of_each_api(api: str, expected: bytes) -> None:
    error = GatewayError(429, "Hit it.", display_message="Stop.")
    assert error_event(api, error, 7) == expected
