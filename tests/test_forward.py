"""Building the upstream request: body enhancement, URL and headers (spec proxy 5)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tollgate.config.schema import Config
from tollgate.config.snapshot import Deployment, build_snapshot
from tollgate.errors import GatewayError
from tollgate.pipeline.forward import enhance, parse_body, upstream_headers, upstream_url


def deployment(**model: Any) -> Deployment:
    snapshot = build_snapshot(Config.model_validate({"models": {"m": model}}))
    found = snapshot.resolve("m")
    assert found is not None
    return found


def test_defaults_fill_only_missing_top_level_keys() -> None:
    d = deployment(endpoint="http://u/x", defaults={"a": 1, "b": {"deep": True}, "c": None})
    body = b'{"b": {"mine": 1}, "c": 5}'
    sent = orjson.loads(enhance(body, parse_body(body), d))
    assert sent == {"b": {"mine": 1}, "c": 5, "a": 1}


def test_unchanged_body_keeps_its_bytes() -> None:
    d = deployment(endpoint="http://u/x")
    body = b'{ "z" : 1 ,"a":2 }'
    assert enhance(body, parse_body(body), d) is body


def test_override_name_only_when_different() -> None:
    d = deployment(endpoint="http://u/x", overrideName="real")
    body = b'{"model": "real"}'
    assert enhance(body, parse_body(body), d) is body
    assert orjson.loads(enhance(b"{}", {}, d)) == {"model": "real"}


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
    d = deployment(
        endpoint="http://u/x",
        upstreams=[
            {"endpoint": "http://off", "weight": 0},
            {"endpoint": "http://tier1", "key": "k1", "tier": 1},
            {"endpoint": "http://tier0", "key": "k0", "extraData": "raw text"},
        ],
    )
    client = [
        ("Host", "gw"),
        ("API-KEY", "client-secret"),
        ("Authorization", "Bearer client-secret"),
        ("X-Upstream-Key", "forged"),
        ("Connection", "keep-alive"),
        ("X-Conversation-Id", "c1"),
        ("Accept-Encoding", "br"),
    ]
    sent = upstream_headers(client, d, "hop-key", forward_authorization=False)
    assert sent == [
        ("X-Conversation-Id", "c1"),
        ("Api-Key", "hop-key"),
        ("Accept-Encoding", "identity"),
        ("X-UPSTREAM-ENDPOINT", "http://tier0"),
        ("X-UPSTREAM-KEY", "k0"),
        ("X-UPSTREAM-EXTRA-DATA", "raw text"),
    ]
    with_auth = upstream_headers(client, d, "hop-key", forward_authorization=True)
    assert ("Authorization", "Bearer client-secret") in with_auth
