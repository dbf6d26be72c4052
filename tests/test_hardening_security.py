"""Hardening outside the relay (issue 11): client addresses behind proxies (item 1) and the
credentials the reload answer shows (item 7). Real processes, raw HTTP where headers matter."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FakeModel, Gateway, start_gateway, stop

TEN_KEY = "xff-key-ten-0123456789"


@pytest.fixture(scope="module")
def proxied(work_dir: Path, fake_model: FakeModel) -> Iterator[Gateway]:
    config = {
        "models": {"m": {"endpoint": fake_model.endpoint("m")}},
        "keys": {
            TEN_KEY: {"project": "p", "role": "r", "allowedIpAddressRanges": ["10.0.0.0/8"]},
        },
        "roles": {"r": {"limits": {"m": {}}}},
    }
    gw = start_gateway(work_dir, [config], env={"aidial.apiKeyValidation.proxyCount": "1"})
    yield gw
    stop(gw.process)


def raw_get(port: int, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 request with exactly these header lines (repeated names kept); the status
    and the body of the answer."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        # The client forges 10.1.2.3; the proxy appends the address it saw on a line of its own.
        (["10.1.2.3", "198.51.100.7"], 403),
        (["10.1.2.3, 10.9.9.9", "198.51.100.7"], 403),
        # The proxy saw 10.1.2.3: whatever the client claimed before does not matter.
        (["198.51.100.7", "10.1.2.3"], 200),
        (["198.51.100.7"], 403),
        (["10.1.2.3"], 200),
    ],
)
def test_every_forwarded_for_line_is_read_as_one_list(
    proxied: Gateway, lines: list[str], status: int
) -> None:
    headers = [("Api-Key", TEN_KEY)] + [("X-Forwarded-For", line) for line in lines]
    got, body = raw_get(proxied.port, "/v1/user/info", headers)
    assert got == status, body
    if status == 403:
        assert b"198.51.100.7" in body or b"10.9.9.9" in body  # the address it judged


# --- item 7: the reload answer masks credentials in every URL -------------------------------

ADMIN_KEY = "mask-admin-key-0123456789"
SECRETS = ("rate-pass-1", "tok-user-2", "qs-key-3", "qs-sig-4", "route-pass-5", "icpt-6", "up-7")


def test_the_reload_answer_masks_credentials_in_every_url(
    work_dir: Path, fake_model: FakeModel
) -> None:
    base = fake_model.url
    host = base.removeprefix("http://")
    config = {
        "models": {
            "m": {
                "endpoint": f"{base}/openai/deployments/m/chat/completions"
                "?api-version=1&key=qs-key-3",
                "features": {
                    "rateEndpoint": f"http://rater:rate-pass-1@{host}/rate",
                    "tokenizeEndpoint": f"http://tok-user-2@{host}/tokenize",
                    "truncatePromptEndpoint": f"{base}/truncate?sig=qs-sig-4&x=1",
                },
                "upstreams": [
                    {"endpoint": f"http://u:up-7@{host}/openai/deployments/m/chat/completions"}
                ],
            }
        },
        "routes": {
            "r": {
                "paths": ["/v1/things"],
                "upstreams": [{"endpoint": f"http://svc:route-pass-5@{host}/things"}],
            }
        },
        "interceptors": {"i": {"endpoint": f"{base}/icpt?access_token=icpt-6"}},
        "keys": {ADMIN_KEY: {"project": "ops", "role": "admin"}},
        "roles": {"admin": {"limits": {"m": {}}}},
    }
    gw = start_gateway(work_dir, [config])
    try:
        status, body = _post(gw.port, "/v1/ops/config/reload", ADMIN_KEY)
    finally:
        stop(gw.process)
    assert status == 200, body
    text = body.decode()
    for secret in SECRETS:
        assert secret not in text, secret
    tree = json.loads(text)
    model = tree["models"]["m"]
    assert model["endpoint"].endswith("?api-version=1&key=********")
    assert model["features"]["rateEndpoint"] == f"http://rater:********@{host}/rate"
    assert model["features"]["tokenizeEndpoint"] == f"http://********@{host}/tokenize"
    assert model["features"]["truncatePromptEndpoint"] == f"{base}/truncate?sig=********&x=1"
    assert tree["interceptors"]["i"]["endpoint"] == f"{base}/icpt?access_token=********"


def _post(port: int, path: str, key: str) -> tuple[int, bytes]:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Api-Key: {key}\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = _unchunk(body)
    return int(head.split(b" ", 2)[1]), body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
