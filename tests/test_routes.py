"""DIAL's `routes` end to end (spec proxy 10, 16.17; auth-limits 2.3, 4.1, 5.1).

Tollgate runs on a config holding DIAL's own test routes (`forbidden`, `plain`,
`vector_store_query`, `vector_store_mutation`, `route-rate`) plus routes for each behaviour;
it and the fake model run in process (`inprocess.py`), and the config-load refusals start
`tollgate serve` itself. The fake model is every upstream: on paths no model serves it echoes
the raw path when asked (`X-Fake-Echo-Path`, as the upstream of DIAL's `RouteApiTest` does),
fails on command per path, and records what it received. Each balancing test has a route of
its own: balancer state lives as long as the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_config import chat, error_of
from harness import free_port, run_gateway_expecting_exit
from inprocess import InProcessFake, InProcessGateway, start_inprocess_gateway
from tollgate.config.java_regex import JavaRegexError, compile_java
from tollgate.config.schema import Config
from tollgate.config_check import check_files
from tollgate.routing.balancer import Balancers
from tollgate.snapshot import build_snapshot

USER_KEY = "routes-vstore-user-0123456789"
ADMIN_KEY = "routes-vstore-admin-0123456789"
METERED_KEY = "routes-metered-0123456789"
ECHO = {"X-Fake-Echo-Path": "1"}
ATTEMPTS = "X-UPSTREAM-ATTEMPTS"


def routes_config(fake: InProcessFake, closed: str) -> dict[str, Any]:
    def up(path: str, **extra: Any) -> dict[str, Any]:
        return {"endpoint": f"{fake.url}{path}", **extra}

    vector_store = r"/v1/vector_store(/[^/]+)*$"
    return {
        "routes": {
            # DIAL's test routes (server/src/test/resources/aidial.config.json), as written.
            "route-rate": {
                "paths": ["/+v1/rate"],
                "methods": ["POST"],
                "response": {"status": 200},
            },
            "forbidden": {
                "paths": ["/v1/forbidden"],
                "methods": ["GET"],
                "userRoles": [],
                "upstreams": [up("")],
            },
            "plain": {"paths": ["/v1/plain"], "methods": ["GET"], "upstreams": [up("")]},
            "vector_store_query": {
                "paths": [vector_store],
                "rewritePath": True,
                "methods": ["GET", "HEAD"],
                "userRoles": ["vstore_user", "vstore_admin"],
                "upstreams": [up("")],
            },
            "vector_store_mutation": {
                "paths": [vector_store],
                "rewritePath": True,
                "methods": ["POST", "PUT", "DELETE"],
                "userRoles": ["vstore_admin"],
                "upstreams": [up("")],
            },
            # Tollgate's own.
            "static": {
                "paths": [r"/v1/static/(?<name>[a-z]+)/\k<name>"],  # Java named group
                "response": {"status": 201, "body": '{"made": true}'},
            },
            "search": {"paths": [r"/v1/search\?q=[a-z]+"], "response": {"body": "found"}},
            "shadow": {"paths": ["/openai/models"], "response": {"status": 418}},
            "listed-first": {"paths": ["/v1/ordered"], "response": {"body": "listed first"}},
            "ordered": {"paths": ["/v1/ordered"], "order": 1, "response": {"body": "ordered"}},
            "keyed": {
                "paths": ["/v1/keyed"],
                "upstreams": [up("/keyed/upstream", key="upstream-secret-key")],
            },
            "balanced": {"paths": ["/v1/balanced"], "upstreams": [up("/bal/a"), up("/bal/b")]},
            "retry-429": {
                "paths": ["/v1/retry-429"],
                "upstreams": [up("/r429/a", key="key-a"), up("/r429/b", key="key-b", tier=1)],
            },
            "refused": {
                "paths": ["/v1/refused"],
                # One tier: round robin tries the refusing one first, then the other (a
                # tier of its own would be tried again until parked, as Core does).
                "upstreams": [{"endpoint": closed}, up("/refused/ok")],
            },
            "dead": {
                "paths": ["/v1/dead"],
                "upstreams": [{"endpoint": closed}, {"endpoint": closed + "/other"}],
                "maxRetryAttempts": 2,
            },
            "one-try": {
                "paths": ["/v1/one-try"],
                "upstreams": [up("/one/a"), up("/one/b", tier=1)],
                "maxRetryAttempts": 1,
            },
            "parked": {"paths": ["/v1/parked"], "upstreams": [up("/park/a"), up("/park/b")]},
            "relayed": {"paths": ["/v1/relayed"], "upstreams": [up("/relay/a"), up("/relay/b")]},
            "stream": {
                "paths": ["/v1/stream"],
                "methods": ["POST"],
                "upstreams": [up("/openai/deployments/streamer/chat/completions")],
            },
            "limited": {"paths": ["/v1/limited"], "response": {"body": "counted"}},
            "closed-route": {"paths": ["/v1/closed-route"], "response": {"body": "never"}},
        },
        "keys": {
            USER_KEY: {"project": "vstore", "role": "vstore_user"},
            ADMIN_KEY: {"project": "vstore", "role": "vstore_admin"},
            METERED_KEY: {"project": "metered", "role": "metered"},
        },
        "roles": {
            # Newer DIAL limits routes by name: requests and cost, never tokens (auth-limits 5.1).
            "metered": {
                "limits": {"limited": {"requestDay": 2}, "closed-route": {"requestHour": 0}}
            },
        },
    }


@pytest.fixture(scope="module")
async def agateway(
    work_dir: Path, inprocess_fake: InProcessFake
) -> AsyncIterator[InProcessGateway]:
    """This module's gateway, in process, on the session's in-process fake model (`afake`
    clears its records and faults around each test)."""
    closed = f"http://127.0.0.1:{free_port()}"
    gw = await start_inprocess_gateway(work_dir, [routes_config(inprocess_fake, closed)])
    yield gw
    await gw.stop()


@pytest.fixture
async def aclient(
    agateway: InProcessGateway, afake: InProcessFake
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agateway.url, timeout=30) as http:
        yield http


async def send(
    client: httpx.AsyncClient, method: str, path: str, key: str = USER_KEY, **kwargs: Any
) -> httpx.Response:
    headers = {"Api-Key": key, **ECHO, **kwargs.pop("headers", {})}
    return await client.request(method, path, headers=headers, **kwargs)


def fault(fake: InProcessFake, **spec: Any) -> None:
    fake.add_fault(spec)


def paths_seen(fake: InProcessFake) -> list[str]:
    return [record["path"] for record in fake.requests()]


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in record["headers"] if key.lower() == name.lower()]


# --- DIAL's RouteApiTest (spec proxy 16.17, auth-limits 9.3 item 8) ---------------------------


@pytest.mark.parametrize("key", [USER_KEY, ADMIN_KEY])
async def test_plain_route_keeps_the_endpoint_path(aclient: httpx.AsyncClient, key: str) -> None:
    response = await send(aclient, "GET", "/v1/plain", key)
    assert response.status_code == 200
    assert response.text == "/"


@pytest.mark.parametrize("key", [USER_KEY, ADMIN_KEY])
async def test_rewrite_path_get_and_head(
    aclient: httpx.AsyncClient, afake: InProcessFake, key: str
) -> None:
    response = await send(aclient, "GET", "/v1/vector_store/1", key)
    assert response.status_code == 200
    assert response.text == "/v1/vector_store/1"
    head = await send(aclient, "HEAD", "/v1/vector_store/1", key)
    assert head.status_code == 200
    assert head.content == b""
    assert [(r["method"], r["path"]) for r in afake.requests()] == [
        ("GET", "/v1/vector_store/1"),
        ("HEAD", "/v1/vector_store/1"),
    ]


async def test_post_is_forbidden_for_the_user_and_allowed_for_the_admin(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    refused = await send(aclient, "POST", "/v1/vector_store/1", USER_KEY, content=b"user body")
    assert error_of(refused) == (403, "Forbidden route")
    assert afake.requests() == []  # refused before anything is sent
    allowed = await send(aclient, "POST", "/v1/vector_store/1", ADMIN_KEY, content=b"admin body")
    assert allowed.status_code == 200
    assert allowed.text == "/v1/vector_store/1"
    record = afake.last()
    assert (record["method"], record["body"]) == ("POST", "admin body")


async def test_empty_user_roles_admit_nobody(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    # DIAL's code and tests; the newer docs' "[] admits everyone" is not followed (DECISIONS 3).
    for key in (USER_KEY, ADMIN_KEY):
        assert error_of(await send(aclient, "GET", "/v1/forbidden", key)) == (
            403,
            "Forbidden route",
        )
    assert afake.requests() == []


# --- matching ----------------------------------------------------------------------------------


async def test_methods_filter_and_unmatched_requests(aclient: httpx.AsyncClient) -> None:
    # PATCH is in neither vector_store route: no route takes it (DECISIONS 4: 404, not 502).
    assert error_of(await send(aclient, "PATCH", "/v1/vector_store/1", ADMIN_KEY)) == (
        404,
        "No route",
    )
    assert error_of(await send(aclient, "POST", "/v1/plain")) == (404, "No route")  # GET only
    assert error_of(await send(aclient, "GET", "/v1/nowhere")) == (404, "No route")
    # A path must match whole: no prefix or suffix match.
    assert error_of(await send(aclient, "GET", "/v1/plain/more")) == (404, "No route")
    assert error_of(await send(aclient, "GET", "/prefix/v1/plain")) == (404, "No route")


async def test_the_query_string_is_part_of_the_match(aclient: httpx.AsyncClient) -> None:
    found = await send(aclient, "GET", "/v1/search?q=abc")
    assert found.status_code == 200 and found.text == "found"
    for uri in ("/v1/search", "/v1/search?q=ABC", "/v1/search?q=abc&page=2"):
        assert error_of(await send(aclient, "GET", uri)) == (404, "No route"), uri


async def test_the_query_string_is_not_forwarded(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    # As DIAL: the upstream URL is the endpoint, its path rewritten or not (spec proxy 10).
    response = await send(aclient, "GET", "/v1/vector_store/7?limit=3")
    assert response.status_code == 200
    assert response.text == "/v1/vector_store/7"
    assert afake.last()["query_string"] == ""


async def test_java_named_groups_and_back_references(aclient: httpx.AsyncClient) -> None:
    assert (await send(aclient, "GET", "/v1/static/abc/abc")).status_code == 201
    assert error_of(await send(aclient, "GET", "/v1/static/abc/abd")) == (404, "No route")


async def test_order_puts_a_route_first(aclient: httpx.AsyncClient) -> None:
    response = await send(aclient, "GET", "/v1/ordered")
    assert response.status_code == 200 and response.text == "ordered"


async def test_built_in_endpoints_come_first(aclient: httpx.AsyncClient) -> None:
    # `shadow` matches GET /openai/models, but the listing answers (spec proxy 3).
    response = await send(aclient, "GET", "/openai/models")
    assert response.status_code == 200
    assert response.json()["object"] == "list"


async def test_routes_need_a_known_key(aclient: httpx.AsyncClient) -> None:
    response = await aclient.get("/v1/plain", headers=ECHO)
    assert error_of(response) == (
        401,
        "At least API-KEY or Authorization header must be provided",
    )
    assert error_of(await send(aclient, "GET", "/v1/plain", "not-a-key")) == (
        401,
        "Unknown api key",
    )


# --- static responses ------------------------------------------------------------------------


async def test_static_response(aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
    rate = await send(aclient, "POST", "/v1/rate", content=b'{"rate": 1}')
    assert rate.status_code == 200
    assert rate.content == b""
    assert "content-type" not in rate.headers  # as DIAL: no body, no type
    made = await send(aclient, "GET", "/v1/static/x/x")
    assert made.status_code == 201
    assert made.headers["content-type"] == "application/json"
    assert made.json() == {"made": True}
    assert afake.requests() == []  # nothing proxied


# --- proxying: headers and keys --------------------------------------------------------------


async def test_api_key_is_the_upstreams_and_the_callers_never_leaves(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    response = await send(
        aclient,
        "POST",
        "/v1/keyed",
        content=b"payload",
        headers={
            # The openai SDK's way: the key in both headers.
            "Authorization": f"Bearer {USER_KEY}",
            "X-Upstream-Key": "client-forged",
            "X-Custom": "kept",
            "Content-Type": "text/plain",
        },
    )
    assert response.status_code == 200
    assert response.text == "/keyed/upstream"
    record = afake.last()
    assert header_values(record, "Api-Key") == ["upstream-secret-key"]
    assert header_values(record, "Authorization") == []
    assert header_values(record, "X-Upstream-Key") == []
    assert header_values(record, "X-Custom") == ["kept"]
    assert header_values(record, "Content-Type") == ["text/plain"]
    assert record["body"] == "payload"
    assert all(USER_KEY not in value for _, value in record["headers"])


async def test_no_upstream_key_sends_no_api_key(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    assert (
        await send(aclient, "GET", "/v1/plain", headers={"X-Api-Key": USER_KEY})
    ).status_code == 200
    record = afake.last()
    assert header_values(record, "Api-Key") == []
    assert all(USER_KEY not in value for _, value in record["headers"])


# --- balancing and retries (spec proxy 6, 10; DECISIONS 5) ------------------------------------


async def test_calls_are_balanced_over_the_upstreams(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    answers = [(await send(aclient, "GET", "/v1/balanced")).text for _ in range(6)]
    assert sorted(answers) == ["/bal/a"] * 3 + ["/bal/b"] * 3


async def test_a_429_moves_on_to_the_next_upstream(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, path="/r429/a", status=429, retryAfter="60", times=1)
    response = await send(aclient, "GET", "/v1/retry-429")
    assert response.status_code == 200
    assert response.text == "/r429/b"
    assert response.headers[ATTEMPTS] == "2"
    first, second = afake.requests()
    assert (first["path"], header_values(first, "Api-Key")) == ("/r429/a", ["key-a"])
    assert (second["path"], header_values(second, "Api-Key")) == ("/r429/b", ["key-b"])
    # The 429 parked the first upstream: the next call goes straight to the second.
    again = await send(aclient, "GET", "/v1/retry-429")
    assert again.text == "/r429/b" and again.headers[ATTEMPTS] == "1"


async def test_a_refused_connection_moves_on(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    response = await send(aclient, "GET", "/v1/refused")
    assert response.status_code == 200
    assert response.text == "/refused/ok"
    assert response.headers[ATTEMPTS] == "2"


async def test_exhausted_attempts_are_502_no_route(aclient: httpx.AsyncClient) -> None:
    response = await send(aclient, "GET", "/v1/dead")
    assert error_of(response) == (502, "No route")
    assert response.headers[ATTEMPTS] == "2"  # maxRetryAttempts


async def test_max_retry_attempts_stops_retries(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, path="/one/a", status=429, retryAfter="60")
    response = await send(aclient, "GET", "/v1/one-try")
    assert error_of(response) == (502, "No route")  # the second upstream is still available
    assert response.headers[ATTEMPTS] == "1"
    assert paths_seen(afake) == ["/one/a"]


async def test_all_upstreams_parked_by_429_is_503(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, path="/park/a", status=429, retryAfter="50")
    fault(afake, path="/park/b", status=429, retryAfter="70")
    response = await send(aclient, "GET", "/v1/parked")
    assert error_of(response) == (503, "Service is not available")
    assert response.headers["Retry-After"] in ("49", "50")  # the first one back
    assert response.headers[ATTEMPTS] == "2"
    assert sorted(paths_seen(afake)) == ["/park/a", "/park/b"]


async def test_other_errors_are_relayed_not_retried(
    aclient: httpx.AsyncClient, afake: InProcessFake
) -> None:
    fault(afake, path="/relay/a", status=503)
    fault(afake, path="/relay/b", status=503)
    response = await send(aclient, "GET", "/v1/relayed")
    assert response.status_code == 503  # a route retries 429s only (spec proxy 10)
    assert response.json() == {"error": {"message": "fake fault", "code": "503"}}
    assert response.headers[ATTEMPTS] == "1"
    assert len(afake.requests()) == 1


async def test_streams_are_relayed(aclient: httpx.AsyncClient, afake: InProcessFake) -> None:
    body = chat("stream please", stream=True)
    async with aclient.stream(
        "POST", "/v1/stream", json=body, headers={"Api-Key": USER_KEY, "X-Fake-Chunks": "5"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    events = [line for line in raw.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 1 + 5 + 1 + 1  # role, five pieces, finish, [DONE]
    assert afake.last()["path"] == "/openai/deployments/streamer/chat/completions"


# --- limits (spec auth-limits 5.1 [newer]) -----------------------------------------------------


async def test_route_request_limit(aclient: httpx.AsyncClient) -> None:
    for _ in range(2):
        response = await send(aclient, "GET", "/v1/limited", METERED_KEY)
        assert response.status_code == 200 and response.text == "counted"
    refused = await send(aclient, "GET", "/v1/limited", METERED_KEY)
    assert error_of(refused) == (
        429,
        "Hit request rate limit. Hour limit: 2 / 9223372036854775807 requests. "
        "Day limit: 2 / 2 requests.",
    )
    assert refused.json()["error"]["display_message"] == "You've exceeded your daily request limit"
    assert int(refused.headers["Retry-After"]) > 0
    # Counters are per caller project: another project is not limited by them.
    assert (await send(aclient, "GET", "/v1/limited", USER_KEY)).status_code == 200


async def test_non_positive_route_limit_is_access_denied(aclient: httpx.AsyncClient) -> None:
    assert error_of(await send(aclient, "GET", "/v1/closed-route", METERED_KEY)) == (
        403,
        "Access denied",
    )
    assert (await send(aclient, "GET", "/v1/closed-route", USER_KEY)).status_code == 200


# --- config load -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("/v1/(unclosed", "invalid regular expression '/v1/(unclosed': missing )"),
        ("/v1/[a-z&&[^m]]", "unsupported in regular expression '/v1/[a-z&&[^m]]'"),
        (r"/v1/\p{InGreek}", "the character property"),
    ],
)
def test_config_with_a_bad_route_regex_does_not_load(
    work_dir: Path, pattern: str, message: str
) -> None:
    config = {"routes": {"bad": {"paths": ["/ok", pattern], "response": {}}}}
    result = run_gateway_expecting_exit(work_dir, [config])
    assert result.returncode == 1
    assert "$.routes.bad.paths" in result.stderr
    assert message in result.stderr


def test_config_with_a_relative_route_upstream_does_not_load(work_dir: Path) -> None:
    config = {"routes": {"bad": {"paths": ["/x"], "upstreams": [{"endpoint": "/relative"}]}}}
    result = run_gateway_expecting_exit(work_dir, [config])
    assert result.returncode == 1
    assert "route upstream endpoint must be an absolute URL: /relative" in result.stderr


# --- the Java regex translation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (r"/v1/(?<id>[0-9]+)", "/v1/42", "/v1/x"),
        (r"\Q/v1/a.b?\E", "/v1/a.b?", "/v1/axb"),
        (r"/v1/(?i)ABC|/x", "/v1/abc", "/V1/abc"),
        (r"/v1/(?i)ABC|/x", "/X", "/y"),
        (r"/v1/\p{Alpha}+\z", "/v1/abc", "/v1/ab1"),
        (r"/v1/[\p{Digit}_]+", "/v1/1_2", "/v1/a"),
        (r"/v1/\x{41}\0102", "/v1/AB", "/v1/AA"),
        (r"/v1/a*+b", "/v1/aab", "/v1/aa"),
        (r"/v1/\w+", "/v1/abc", "/v1/é"),  # Java's \w is ASCII
    ],
)
def test_java_regex_translation(pattern: str, matching: str, not_matching: str) -> None:
    compiled = compile_java(pattern)
    assert compiled.fullmatch(matching) is not None
    assert compiled.fullmatch(not_matching) is None


@pytest.mark.parametrize("pattern", [r"[a[b]]", r"\G/v1", r"\X", r"\p{L}", "(", r"\b{g}"])
def test_java_regex_refusals(pattern: str) -> None:
    with pytest.raises(JavaRegexError):
        compile_java(pattern)


def test_config_check_warns_about_routes_that_cannot_work(tmp_path: Path) -> None:
    config = {
        "routes": {
            "both": {"paths": ["/a"], "response": {}, "upstreams": [{"endpoint": "http://u"}]},
            "socket": {"paths": ["/b"], "upstreams": [{"endpoint": "wss://u"}]},
            "everything": {"order": 5},
            "after": {"paths": ["/c"], "response": {}},
        }
    }
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(config, indent=2))
    problems = sorted((p.severity, p.path, p.message) for p in check_files([str(path)]))
    no_upstream = 'no response and no usable upstream: every call answers 502 "No route"'
    assert problems == sorted(
        [
            ("warning", "$.routes.everything", no_upstream),
            (
                "warning",
                "$.routes.both",
                'route "everything" before it takes every request: it is never used',
            ),
            ("warning", "$.routes.both.upstreams", "the route's response answers: never called"),
            (
                "warning",
                "$.routes.socket",
                'route "everything" before it takes every request: it is never used',
            ),
            (
                "warning",
                "$.routes.socket.upstreams[0].endpoint",
                "WebSocket upstreams are not supported: never called",
            ),
            ("warning", "$.routes.socket", no_upstream),
            (
                "warning",
                "$.routes.after",
                'route "everything" before it takes every request: it is never used',
            ),
        ]
    )


def test_route_balancer_state_survives_a_reload() -> None:
    """A route's upstreams keep their parking across snapshots, as a deployment's (spec 6.1)."""
    registry = Balancers()
    config = Config.model_validate(
        {"routes": {"r": {"upstreams": [{"endpoint": "http://a"}, {"endpoint": "http://b"}]}}}
    )
    first = build_snapshot(config, "1", registry).routes.routes[0]
    plan = first.balancer.plan(5, frozenset({429}))
    parked = plan.next()
    assert parked is not None and plan.record(429, "100")
    renamed = Config.model_validate(
        {
            "models": {"r": {"endpoint": "http://m"}},  # a model of the same name: no clash
            "routes": {"r": {"upstreams": [{"endpoint": "http://b"}, {"endpoint": "http://a"}]}},
        }
    )
    second = build_snapshot(renamed, "2", registry)
    again = second.routes.routes[0].balancer
    assert again is first.balancer  # same upstreams in another order: the balancer is kept
    assert [s.endpoint for s in again.states if not s.available(again.clock())] == [parked.endpoint]
    assert second.balancers["r"] is not again
