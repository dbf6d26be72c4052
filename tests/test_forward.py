"""Building the upstream request: body enhancement, URL and headers (spec proxy 5)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tollgate.config.schema import Config
from tollgate.errors import GatewayError
from tollgate.pipeline.forward import enhance, parse_body, upstream_headers, upstream_url
from tollgate.snapshot import Deployment, build_snapshot


def deployment(**model: Any) -> Deployment:
    snapshot = build_snapshot(Config.model_validate({"models": {"m": model}}))
    found = snapshot.resolve("m")
    assert found is not None
    return found


def test_defaults_fill_only_missing_top_level_keys() -> None:
    d = deployment(endpoint="http://u/x", defaults={"a": 1, "b": {"deep": True}, "c": None})
    body = b'{"b": {"mine": 1}, "c": 5}'
    sent = orjson.loads(enhance(body, parse_body(body), d.defaults, d.override_name))
    assert sent == {"b": {"mine": 1}, "c": 5, "a": 1}


def test_unchanged_body_keeps_its_bytes() -> None:
    d = deployment(endpoint="http://u/x")
    body = b'{ "z" : 1 ,"a":2 }'
    assert enhance(body, parse_body(body), d.defaults, d.override_name) is body


def test_override_name_only_when_different() -> None:
    d = deployment(endpoint="http://u/x", overrideName="real")
    body = b'{"model": "real"}'
    assert enhance(body, parse_body(body), d.defaults, d.override_name) is body
    assert orjson.loads(enhance(b"{}", {}, d.defaults, d.override_name)) == {"model": "real"}


@pytest.mark.parametrize("body", [b"", b"nul", b"[]", b'"text"', b"{'a': 1}"])
def test_bodies_that_are_not_json_objects(body: bytes) -> None:
    with pytest.raises(GatewayError) as caught:
        parse_body(body)
    assert caught.value.status == 400


def test_url_keeps_the_query_as_sent() -> None:
    d = deployment(endpoint="http://u:81/openai/deployments/m/chat/completions")
    assert str(upstream_url(d, "")) == "http://u:81/openai/deployments/m/chat/completions"
    url = upstream_url(d, "api-version=1&q=%2F+x")
    assert url.raw_path_qs == "/openai/deployments/m/chat/completions?api-version=1&q=%2F+x"
    assert upstream_url(d, "api-version=1&q=%2F+x") is url  # parsed once
    with_query = deployment(endpoint="http://u/x?fixed=1")
    assert upstream_url(with_query, "b=2").raw_query_string == "fixed=1&b=2"


def test_headers() -> None:
    client = [
        ("Host", "gw"),
        ("API-KEY", "client-secret"),
        ("Authorization", "Bearer client-secret"),
        ("X-Upstream-Key", "forged"),
        ("x-upstream-endpoint", "forged"),
        ("X-UPSTREAM-EXTRA-DATA", "forged"),
        ("Connection", "keep-alive"),
        ("X-Conversation-Id", "c1"),
        ("Accept-Encoding", "br"),
    ]
    # X-UPSTREAM-* are the attempt's to add (pipeline/attempts.py), never the client's.
    sent = upstream_headers(client, "hop-key", forward_authorization=False)
    assert sent == [
        ("X-Conversation-Id", "c1"),
        ("Api-Key", "hop-key"),
        ("Accept-Encoding", "identity"),
    ]
    with_auth = upstream_headers(client, "hop-key", forward_authorization=True)
    assert ("Authorization", "Bearer client-secret") in with_auth


def test_deployment_attempt_settings() -> None:
    config = Config.model_validate(
        {
            "models": {
                "plain": {"endpoint": "http://u/x"},
                "tuned": {"endpoint": "http://u/x", "maxRetryAttempts": 2, "readTimeout": 1500},
            },
            "applications": {"app": {"endpoint": "http://a/x", "connect_timeout": "250"}},
            "retriableErrorCodes": [401, 418],
        }
    )
    snapshot = build_snapshot(config)
    plain, tuned, app = (snapshot.deployments[n] for n in ("plain", "tuned", "app"))
    assert (plain.max_attempts, plain.timeouts_ms) == (5, None)
    assert (tuned.max_attempts, tuned.timeouts_ms) == (2, (None, 1500))
    assert (app.max_attempts, app.timeouts_ms) == (1, (250, None))  # newer DIAL: 1 for apps
    assert snapshot.retriable == {429, 502, 503, 504, 401, 418}
    assert set(snapshot.balancers) == set(snapshot.deployments)


@pytest.mark.parametrize("field", ["connectTimeout", "readTimeout"])
@pytest.mark.parametrize("value", [0, -5, "soon"])
def test_timeouts_must_be_positive_milliseconds(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.removesuffix("Timeout")):
        Config.model_validate({"models": {"m": {"endpoint": "http://u/x", field: value}}})
